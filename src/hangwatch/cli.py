"""The ``hangwatch`` command: ``hangwatch run`` (a torchrun-style launcher) and ``hangwatch demo``.

``hangwatch run --nproc-per-node 4 train.py`` starts four workers with torchrun's
environment and a timer server, so ``hangwatch.expires`` works in ``train.py`` with no
set-up. When a worker fails or is reaped, the whole group is stopped and started again,
up to ``--max-restarts`` times. Each line a worker prints is prefixed with its rank. At
the end a short summary says what happened, and the exit status tells the outcomes
apart: 0 succeeded, 1 failed after every restart, 128+N interrupted by signal N (130
for Ctrl-C), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import List, Optional, TextIO

from ._reaper import ReapPolicy
from .agent import FAILED, SUCCEEDED, Attempt, LocalElasticAgent, RunResult, WorkerSpec

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _nproc(text: str) -> int:
    if text in ("auto", "cpu"):
        return os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of workers or 'auto' (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _policy(text: str) -> ReapPolicy:
    try:
        return ReapPolicy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hangwatch", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run a script in N workers, restarting the group when one fails or is reaped",
        description="Run a training script in a group of workers, like torchrun on one node.",
    )
    run.add_argument("--nproc-per-node", "--nproc_per_node", type=_nproc, default=1, help="workers (default 1)")
    run.add_argument("--max-restarts", "--max_restarts", type=int, default=0, help="group restarts (default 0)")
    run.add_argument(
        "--monitor-interval", "--monitor_interval", type=float, default=0.1, help="supervisor wait, s (default 0.1)"
    )
    run.add_argument(
        "--start-method",
        "--start_method",
        choices=["spawn", "fork", "forkserver"],
        default="spawn",
        help="accepted for torchrun compatibility; script workers are always new processes",
    )
    run.add_argument("--run-id", "--run_id", default=None, help="TORCHELASTIC_RUN_ID (default: random)")
    run.add_argument(
        "--reap-policy",
        type=_policy,
        default=None,
        help="how stuck workers are reaped, e.g. TERM,10,KILL (default KILL)",
    )
    run.add_argument(
        "--stop-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL when stopping the group"
    )
    run.add_argument("--events", default=None, metavar="FILE", help="append the timer events to FILE as JSON lines")
    run.add_argument(
        "--timer",
        choices=("auto", "fifo", "shm", "off"),
        default="auto",
        help="timer servers for the workers: auto (shared memory + FIFO), fifo, shm, off (default auto)",
    )
    run.add_argument("-m", "--module", action="store_true", help="run the target as a module (python -m)")
    run.add_argument("--no-python", "--no_python", action="store_true", help="run the target as a command")
    run.add_argument("target", help="the script (or module, or command) to run")
    run.add_argument("target_args", nargs=argparse.REMAINDER, help="its arguments")
    commands.add_parser(
        "demo",
        help="watch a stuck worker reaped, explained and recovered (a few seconds)",
        description="A group of 4 workers; one hangs; it is reaped with its stack shown; the group restarts.",
    )
    return parser


def _spec_for(args: argparse.Namespace) -> WorkerSpec:
    if args.module and args.no_python:
        raise SystemExit("hangwatch run: -m and --no-python cannot be used together")
    if args.no_python:
        if shutil.which(args.target) is None and not os.path.exists(args.target):
            raise SystemExit(f"hangwatch run: command not found: {args.target}")
        entry, entry_args = args.target, list(args.target_args)
    else:
        if not args.module and not os.path.exists(args.target):
            raise SystemExit(f"hangwatch run: no such script: {args.target}")
        mode = "--module" if args.module else "--script"
        entry = sys.executable
        entry_args = ["-u", "-m", "hangwatch._bootstrap", mode, args.target, *args.target_args]
    if args.max_restarts < 0:
        raise SystemExit("hangwatch run: --max-restarts must be >= 0")
    return WorkerSpec(
        local_world_size=args.nproc_per_node,
        entrypoint=entry,
        args=tuple(entry_args),
        max_restarts=args.max_restarts,
        monitor_interval=args.monitor_interval,
    )


_LAUNCH_FRAMES = ("<frozen runpy>", "runpy.py", "hangwatch/_bootstrap.py")


class _Reporter:
    """Writes the launcher's own lines (attempts, reaps, the summary) to stderr."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total

    def say(self, text: str) -> None:
        self.out.write(f"hangwatch: {text}\n")
        self.out.flush()

    def attempt(self, attempt: Attempt) -> None:
        label = f"attempt {attempt.number + 1} of {self.total}"
        if attempt.outcome == SUCCEEDED:
            self.say(f"{label}: all {len(attempt.pids)} workers finished ({attempt.seconds:.1f} s)")
            return
        if attempt.outcome != FAILED:
            self.say(f"{label}: interrupted; every worker was stopped")
            return
        for failure in attempt.failures.values():
            self.say(f"{label}: {failure.describe()}")
            stuck = failure.stuck_at()
            if stuck:
                self.say(f"  stuck at: {stuck}")
            if failure.stack:
                for line in failure.stack.rstrip().splitlines():
                    if not any(noise in line for noise in _LAUNCH_FRAMES):  # how the worker was started
                        self.out.write(f"    {line}\n")
        if attempt.number + 1 < self.total:
            self.say(f"stopping the group and starting it again (restart {attempt.number + 1} of {self.total - 1})")

    def summary(self, result: RunResult, seconds: float) -> None:
        reaped = [f for a in result.attempts for f in a.failures.values() if f.reaped]
        tried = f"{len(result.attempts)} attempt{'s' if len(result.attempts) != 1 else ''}"
        what = {SUCCEEDED: "succeeded", FAILED: "failed"}.get(result.state, "was interrupted")
        extra = f"; {len(reaped)} worker{'s' if len(reaped) != 1 else ''} reaped" if reaped else ""
        self.say(f"the job {what} after {tried} in {seconds:.1f} s{extra}")


def _run(spec: WorkerSpec, args: argparse.Namespace, out: TextIO, worker_out: Optional[TextIO] = None) -> int:
    reporter = _Reporter(out, spec.max_restarts + 1)
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
        output=worker_out,
    )
    started = time.monotonic()
    result = agent.run()
    reporter.summary(result, time.monotonic() - started)
    if result.state == SUCCEEDED:
        return EXIT_OK
    if result.state == FAILED:
        return EXIT_FAILED
    return 128 + (agent.interrupt_signal or 2)


def _demo(out: TextIO) -> int:
    out.write(
        "hangwatch demo: 4 workers train for 4 steps; each step is guarded by\n"
        "    with hangwatch.expires(after=1.0, scope='all_reduce'): ...\n"
        "On the first attempt rank 2 hangs inside its step. Watch it being reaped just after\n"
        "its 1 s deadline, with the stack where it hung, and the group restart and finish.\n\n"
    )
    out.flush()
    args = argparse.Namespace(
        start_method="spawn", reap_policy=None, stop_grace=2.0, run_id="demo", events=None, timer="auto"
    )
    spec = WorkerSpec(
        local_world_size=4,
        entrypoint=sys.executable,
        args=("-u", "-m", "hangwatch._bootstrap", "--module", "hangwatch._demo"),
        max_restarts=2,
    )
    return _run(spec, args, out, worker_out=out)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``hangwatch`` command; return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("hangwatch: the launcher needs Linux (process groups, pidfds, PR_SET_PDEATHSIG)", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "demo":
        return _demo(sys.stderr)
    try:
        spec = _spec_for(args)
    except (SystemExit, ValueError) as exc:
        print(exc if isinstance(exc, SystemExit) else f"hangwatch run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _run(spec, args, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
