"""One node on hangwatch's own agent: ``hangwatch run --nproc-per-node N train.py`` (no torch needed).

The run's workers get torchrun's environment; ``MASTER_ADDR`` and ``MASTER_PORT`` of the
launcher's environment are honoured as torchrun honours them, and ``OMP_NUM_THREADS`` is
set to 1 when unset and more than one worker runs, with torchrun's notice.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, TextIO

from ..agent import FAILED, SUCCEEDED, LocalElasticAgent, WorkerSpec
from .options import EXIT_FAILED, EXIT_OK
from .reporter import Reporter

__all__ = ["OMP_NOTICE", "run_single", "set_omp_threads", "spec_for"]

OMP_NOTICE = (
    "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your "
    "system being overloaded, please further tune the variable for optimal performance in your "
    "application as needed."
)


def _environment_port() -> Optional[int]:
    text = os.environ.get("MASTER_PORT", "").strip()
    if not text:
        return None
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ValueError(f"MASTER_PORT in the environment must be a port number in [1, 65535] (got {text!r})")
    return int(text)


def spec_for(args: argparse.Namespace) -> WorkerSpec:
    """The agent's :class:`WorkerSpec` for ``hangwatch run`` (ValueError: a bad ``MASTER_PORT``)."""
    if args.no_python:
        entry, entry_args = args.target, list(args.target_args)
    else:
        mode = "--module" if args.module else "--script"
        entry = sys.executable
        entry_args = ["-u", "-m", "hangwatch._bootstrap", mode, args.target, *args.target_args]
    return WorkerSpec(
        local_world_size=args.nproc_per_node,
        entrypoint=entry,
        args=tuple(entry_args),
        max_restarts=args.max_restarts,
        monitor_interval=args.monitor_interval,
        master_port=_environment_port(),
        master_addr=os.environ.get("MASTER_ADDR") or None,
    )


def set_omp_threads(workers: int, out: TextIO) -> None:
    """As torchrun: ``OMP_NUM_THREADS=1`` for the workers when unset and more than one runs, with its notice."""
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        out.write(f"hangwatch: {OMP_NOTICE}\n")
        os.environ["OMP_NUM_THREADS"] = "1"


def run_single(spec: WorkerSpec, args: argparse.Namespace, out: TextIO, worker_out: Optional[TextIO] = None) -> int:
    """Run the group on hangwatch's agent; the exit status (0, 1, or 128+N when interrupted by signal N)."""
    reporter = Reporter(out, spec.max_restarts + 1)
    agent = LocalElasticAgent(
        spec,
        args.start_method,
        timer=args.timer,
        reap_policy=args.reap_policy,
        stop_grace=args.stop_grace,
        run_id=args.run_id,
        event_file=args.events,
        subreaper=True,
        on_attempt=reporter.attempt,
        on_event=reporter.event,
        output=worker_out,
        native_stacks=args.native_stacks,
        native_timeout=args.native_timeout,
        statistics=args.keep_statistics,
        learn=args.learning,
        statistics_file=args.statistics_file,
        timeouts_file=args.timeouts_file,
    )
    reporter.learning(args.learning, args.timeouts_file)
    started = time.monotonic()
    result = agent.run()
    reporter.summary(result, time.monotonic() - started)
    if result.state == SUCCEEDED:
        return EXIT_OK
    if result.state == FAILED:
        return EXIT_FAILED
    return 128 + (agent.interrupt_signal or 2)
