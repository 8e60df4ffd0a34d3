"""hangwatch: catch stuck worker processes, explain why they were stuck, recover the job.

A drop-in for ``torch.distributed.elastic.timer``: ``import hangwatch as timer`` and
torch's documented usage works unchanged::

    server = hangwatch.LocalTimerServer(mp_queue, max_interval=0.01)
    server.start()
    ...
    # in each worker
    hangwatch.configure(hangwatch.LocalTimerClient(mp_queue))
    with hangwatch.expires(after=60):
        train_step()
"""

from __future__ import annotations

import logging
import sys

if sys.platform == "win32":  # pragma: no cover - refused before anything else is imported
    raise ImportError(
        "hangwatch needs a POSIX system (Linux first; macOS partially): it reaps workers with POSIX "
        "signals and talks to them over named pipes"
    )

from ._reaper import ReapPolicy
from .api import RequestQueue, TimerClient, TimerRequest, TimerServer, configure, expires, get_configured_client
from .env import configure_from_env
from .events import EVENT_NAMES, Event, JsonLinesSink
from .file import FileTimerClient, FileTimerRequest, FileTimerServer, ServerUnavailableError
from .heartbeat import Heartbeat, heartbeat
from .learn import LearnedDeadline, Learning, ScopeStatistics
from .limits import Limits
from .local import LocalTimerClient, LocalTimerServer, MultiprocessingRequestQueue
from .shm import SharedMemoryTimerClient, SharedMemoryTimerServer

# A library does not print unless the application configures logging (then every event shows).
logging.getLogger("hangwatch").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "EVENT_NAMES",
    "Event",
    "FileTimerClient",
    "FileTimerRequest",
    "FileTimerServer",
    "Heartbeat",
    "JsonLinesSink",
    "LearnedDeadline",
    "Learning",
    "Limits",
    "LocalTimerClient",
    "LocalTimerServer",
    "MultiprocessingRequestQueue",
    "ReapPolicy",
    "RequestQueue",
    "ScopeStatistics",
    "ServerUnavailableError",
    "SharedMemoryTimerClient",
    "SharedMemoryTimerServer",
    "TimerClient",
    "TimerRequest",
    "TimerServer",
    "__version__",
    "configure",
    "configure_from_env",
    "expires",
    "get_configured_client",
    "heartbeat",
]
