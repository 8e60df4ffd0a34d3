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
import tempfile
import threading
import time
from typing import Callable, List, NoReturn, Optional, Set, TextIO

from . import __version__
from ._reaper import ReapPolicy
from .agent import FAILED, SUCCEEDED, Attempt, LocalElasticAgent, RunResult, WorkerSpec
from .agent.report import LAUNCH_FRAMES
from .events import Event, JsonLinesSink
from .triage import ranks_text

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


def _seconds(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a number of seconds in [low, high] (or (low, high] with ``open_low``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds (got {text!r})") from None
        if not (low < value <= high if open_low else low <= value <= high):
            bracket = "(" if open_low else "["
            raise argparse.ArgumentTypeError(f"must be a number of seconds in {bracket}{low:g}, {high:g}] (got {text})")
        return value

    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _policy(text: str) -> ReapPolicy:
    try:
        return ReapPolicy.parse(text, allow_empty=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, with where to look (argparse prints the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hangwatch",
        description="Catch stuck worker processes, explain why they were stuck, recover the job.",
        epilog="Run 'hangwatch run --help' for the launcher's options, 'hangwatch demo' to see it at work.",
    )
    parser.add_argument("--version", action="version", version=f"hangwatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{run,demo}", parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="run a script in N workers, restarting the group when one fails or is reaped",
        description="Run a training script in a group of workers, like torchrun on one node.",
    )
    run.add_argument("--nproc-per-node", "--nproc_per_node", type=_nproc, default=1, help="workers (default 1)")
    run.add_argument("--max-restarts", "--max_restarts", type=_count, default=0, help="group restarts (default 0)")
    run.add_argument(
        "--monitor-interval",
        "--monitor_interval",
        type=_seconds(0, 3600, open_low=True),
        default=0.1,
        help="supervisor wait, s (default 0.1)",
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
        "--stop-grace",
        type=_seconds(0, 3600),
        default=5.0,
        help="seconds between SIGTERM and SIGKILL when stopping the group (default 5)",
    )
    run.add_argument("--events", default=None, metavar="FILE", help="append the timer events to FILE as JSON lines")
    run.add_argument(
        "--timer",
        choices=("auto", "fifo", "shm", "off"),
        default="auto",
        help="timer servers for the workers: auto (shared memory + FIFO), fifo, shm, off (default auto)",
    )
    run.add_argument(
        "--native-stacks",
        choices=("auto", "off"),
        default="auto",
        help="add C/C++ frames to a hang report when pystack is installed (default auto)",
    )
    run.add_argument(
        "--native-timeout",
        type=_seconds(0, 600),
        default=3.0,
        help="the longest the native sampler may run when a hang is reported, s (default 3)",
    )
    run.add_argument("-m", "--module", action="store_true", help="run the target as a module (python -m)")
    run.add_argument("--no-python", "--no_python", action="store_true", help="run the target as a command")
    run.add_argument("target", nargs="?", help="the script (or module, or command) to run")
    run.add_argument("target_args", nargs=argparse.REMAINDER, help="its arguments")
    commands.add_parser(
        "demo",
        help="watch a stuck worker reaped, explained and recovered (a few seconds)",
        description="A group of 4 workers; one hangs; it is reaped with its stack shown; the group restarts.",
    )
    return parser


def _spec_for(args: argparse.Namespace) -> WorkerSpec:
    if args.target is None:
        raise SystemExit("hangwatch run: say what to run: hangwatch run [options] train.py [its arguments]")
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
    return WorkerSpec(
        local_world_size=args.nproc_per_node,
        entrypoint=entry,
        args=tuple(entry_args),
        max_restarts=args.max_restarts,
        monitor_interval=args.monitor_interval,
    )


class _Reporter:
    """Writes the launcher's own lines (attempts, hang reports, refused timers, the summary) to stderr."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self._lock = threading.Lock()
        self._refused: Set[int] = set()

    def say(self, text: str) -> None:
        with self._lock:
            self.out.write(f"hangwatch: {text}\n")
            self.out.flush()

    def event(self, event: Event) -> None:
        """From the timer servers' threads: a process whose timers are refused is named once."""
        if event.name != "bad request" or "allowed_pids" not in str(event.details.get("reason", "")):
            return
        pid = event.worker
        with self._lock:
            if pid in self._refused:
                return
            self._refused.add(pid)
        self.say(
            f"pid {pid} is not one of this run's workers nor a descendant of one: its timer "
            f"{event.scope!r} is ignored (was it started outside the run, or did its parent exit?)"
        )

    def attempt(self, attempt: Attempt) -> None:
        label = f"attempt {attempt.number + 1} of {self.total}"
        if attempt.outcome == SUCCEEDED:
            self.say(f"{label}: all {len(attempt.pids)} workers finished ({attempt.seconds:.1f} s)")
            return
        if attempt.outcome != FAILED:
            self.say(f"{label}: interrupted; every worker was stopped")
            return
        report = attempt.report
        if report is not None:
            lines = report.render()
            self.say(f"{label} failed: {lines[0]}")
            with self._lock:
                for line in lines[1:]:
                    self.out.write(line + "\n" if line.startswith("    ") else f"hangwatch: {line}\n")
                self.out.flush()
        else:
            for failure in attempt.failures.values():
                self.say(f"{label}: {failure.describe()}")
                stuck = failure.stuck_at()
                if stuck:
                    self.say(f"  stuck at: {stuck}")
                if failure.stack:
                    with self._lock:
                        for line in failure.stack.rstrip().splitlines():
                            if not any(noise in line for noise in LAUNCH_FRAMES):  # how the worker was started
                                self.out.write(f"    {line}\n")
        self.say(f"  {_counts(attempt)}")
        if attempt.number + 1 < self.total:
            self.say(f"stopping the group and starting it again (restart {attempt.number + 1} of {self.total - 1})")

    def summary(self, result: RunResult, seconds: float) -> None:
        workers = sum(1 for a in result.attempts for r in a.reaped if not r.child)
        children = sum(1 for a in result.attempts for r in a.reaped if r.child)
        tried = f"{len(result.attempts)} attempt{'s' if len(result.attempts) != 1 else ''}"
        what = {SUCCEEDED: "succeeded", FAILED: "failed"}.get(result.state, "was interrupted")
        extra = f"; {_plural(workers, 'worker', 'workers')} reaped" if workers else ""
        if children:
            extra += f"; {_plural(children, 'worker child', 'worker children')} reaped"
        self.say(f"the job {what} after {tried} in {seconds:.1f} s{extra}")
        for attempt in result.attempts:
            report = attempt.report
            if report is not None and report.culprits:
                culprit = report.ranks[report.culprits[0]]
                user = None if culprit.place is None else culprit.place.user
                place = "" if user is None else f" at {user.short()}"
                self.say(
                    f"  attempt {attempt.number + 1}: likely caused by {ranks_text(report.culprits)}{place} "
                    f"(confidence: {report.verdict.confidence})"
                )


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _counts(attempt: Attempt) -> str:
    """``4 timers expired; 3 workers reaped, 1 stopped by the group stop``."""
    parts = [_plural(attempt.timers_expired, "timer expired", "timers expired")]
    workers = [r for r in attempt.reaped if not r.child]
    children = [r for r in attempt.reaped if r.child]
    counts = [_plural(len(workers), "worker reaped", "workers reaped")]
    if children:
        counts.append(_plural(len(children), "worker's child reaped", "workers' children reaped"))
    failed = [f for f in attempt.failures.values() if not f.reaped]
    if failed:
        counts.append(_plural(len(failed), "worker failed by itself", "workers failed by themselves"))
    counts.append(f"{len(attempt.stopped)} stopped by the group stop")
    return f"{'; '.join(parts)}; {', '.join(counts)}"


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
        on_event=reporter.event,
        output=worker_out,
        native_stacks=args.native_stacks,
        native_timeout=args.native_timeout,
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
        "hangwatch demo: 4 ranks train for 4 steps. Each step loads a batch, then meets the other ranks\n"
        "in all_reduce (no rank leaves it before every rank arrived), guarded by\n"
        "    with hangwatch.expires(after=1.0, scope='train_step'): ...\n"
        "On the first attempt rank 2 hangs reading its batch, so ranks 0, 1 and 3 wait for it in\n"
        "all_reduce, and every rank's timer expires. Watch hangwatch take every rank's stack before\n"
        "signalling any, name rank 2 as the likely cause, and restart the group, which finishes.\n\n"
    )
    out.flush()
    args = argparse.Namespace(
        start_method="spawn",
        reap_policy=None,
        stop_grace=2.0,
        run_id="demo",
        events=None,
        timer="auto",
        native_stacks="auto",
        native_timeout=3.0,
    )
    with tempfile.TemporaryDirectory(prefix="hangwatch-demo-") as folder:
        script = os.path.join(folder, "train.py")
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_demo.py"), script)
        spec = WorkerSpec(
            local_world_size=4,
            entrypoint=sys.executable,
            args=("-u", "-m", "hangwatch._bootstrap", "--script", script, os.path.join(folder, "sync")),
            max_restarts=2,
        )
        return _run(spec, args, out, worker_out=out)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``hangwatch`` command; return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if not sys.platform.startswith("linux"):
        print("hangwatch: the launcher needs Linux (process groups, pidfds, PR_SET_PDEATHSIG)", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "demo":
        return _demo(sys.stderr)
    try:
        spec = _spec_for(args)
        if args.events is not None:
            JsonLinesSink(args.events).close()  # an unwritable events file fails now, not silently later
    except (SystemExit, ValueError, OSError) as exc:
        print(exc if isinstance(exc, SystemExit) else f"hangwatch run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _run(spec, args, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
