"""The agent: run a group of workers, explain a hang or a failure, restart the group.

``LocalElasticAgent(spec).run()`` starts ``spec.local_world_size`` workers (a function in
``multiprocessing`` children, or a command), with torchrun's environment and a timer
client configured in each; when one fails or is reaped, it takes every rank's stack,
names the likely culprit (:class:`HangReport`), stops the group and starts it again, up
to ``spec.max_restarts`` times. ``hangwatch run`` is its command line.
"""

from .local import LocalElasticAgent
from .report import HangReport, ProcessReport
from .results import FAILED, INTERRUPTED, SUCCEEDED, Attempt, Reaped, RunResult, WorkerFailure
from .spec import WorkerSpec

__all__ = [
    "FAILED",
    "INTERRUPTED",
    "SUCCEEDED",
    "Attempt",
    "HangReport",
    "LocalElasticAgent",
    "ProcessReport",
    "Reaped",
    "RunResult",
    "WorkerFailure",
    "WorkerSpec",
]
