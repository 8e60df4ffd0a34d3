"""The ``hangwatch`` command line: its options, their checks, and which engine a run goes to.

``hangwatch run`` takes torchrun's options. Those that make a job span nodes or choose its
rendezvous (:data:`ENGINE_OPTIONS`) send the run to torch's elastic engine
(:mod:`hangwatch.launch.elastic`); without them hangwatch's own single-node agent runs it
(:mod:`hangwatch.launch.single`), which needs no torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Callable, Dict, List, NoReturn, Optional, Tuple

from .. import __version__
from .._reaper import ReapPolicy
from ..learn import Learning

__all__ = ["ENGINE_OPTIONS", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "engine_options", "learning_for", "parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# torchrun's options that hand the run to torch's elastic engine: attribute -> flag.
ENGINE_OPTIONS: Dict[str, str] = {
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "rdzv_backend": "--rdzv-backend",
    "rdzv_endpoint": "--rdzv-endpoint",
    "rdzv_id": "--rdzv-id",
    "rdzv_conf": "--rdzv-conf",
    "master_addr": "--master-addr",
    "master_port": "--master-port",
    "standalone": "--standalone",
}


def engine_options(args: argparse.Namespace) -> Dict[str, str]:
    """The engine options the user gave, flag -> value as typed (empty: hangwatch's own agent runs the job)."""
    given: Dict[str, str] = {}
    for attribute, flag in ENGINE_OPTIONS.items():
        value = getattr(args, attribute, None)
        if value is not None and value is not False:
            given[flag] = "" if value is True else str(value)
    return given


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


def nnodes_range(text: str) -> Tuple[int, int]:
    """``N`` or ``MIN:MAX`` as (min, max); ValueError with what was wrong."""
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"must be a number of nodes N or a range MIN:MAX (got {text!r})")
    low, high = int(parts[0]), int(parts[-1])
    if not 0 < low <= high:
        raise ValueError(f"needs 0 < MIN <= MAX (got {text!r})")
    return low, high


def _nnodes(text: str) -> str:
    try:
        nnodes_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number (got {text!r})") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535] (got {value})")
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


def _flag(*names: str) -> Tuple[str, ...]:
    """A torchrun flag in both spellings: ``--node-rank`` and ``--node_rank``."""
    spelled = [n for name in names for n in (name, name.replace("-", "_")) if n.startswith("--")]
    return tuple(dict.fromkeys(spelled))


def parser() -> argparse.ArgumentParser:
    """The ``hangwatch`` command's parser."""
    top = _Parser(
        prog="hangwatch",
        description="Catch stuck worker processes, explain why they were stuck, recover the job.",
        epilog="Run 'hangwatch run --help' for the launcher's options, 'hangwatch demo' to see it at work.",
    )
    top.add_argument("--version", action="version", version=f"hangwatch {__version__}")
    commands = top.add_subparsers(dest="command", metavar="{run,demo}", parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="run a script in N workers, restarting the group when one fails or is reaped",
        description=(
            "Run a training script in a group of workers, like torchrun. On one node hangwatch's own agent "
            "runs it (no torch needed); with any of torchrun's multi-node options (--nnodes, --node-rank, "
            "--rdzv-*, --master-addr, --master-port, --standalone) torch's elastic engine does, with "
            "hangwatch's timer servers on every node."
        ),
    )
    run.add_argument(
        *_flag("--nproc-per-node"), dest="nproc_per_node", type=_nproc, default=1, help="workers (default 1)"
    )
    run.add_argument(*_flag("--max-restarts"), dest="max_restarts", type=_count, default=0, help="restarts (default 0)")
    run.add_argument(
        *_flag("--monitor-interval"),
        dest="monitor_interval",
        type=_seconds(0, 3600, open_low=True),
        default=0.1,
        help="supervisor wait, s (default 0.1)",
    )
    run.add_argument(
        *_flag("--start-method"),
        dest="start_method",
        choices=["spawn", "fork", "forkserver"],
        default="spawn",
        help="accepted for torchrun compatibility; script workers are always new processes",
    )
    run.add_argument(*_flag("--run-id"), dest="run_id", default=None, help="TORCHELASTIC_RUN_ID (default: random)")
    multi = run.add_argument_group("multi-node (torchrun's options; any of them runs the job on torch's engine)")
    multi.add_argument(*_flag("--nnodes"), dest="nnodes", type=_nnodes, default=None, help="N or MIN:MAX nodes")
    multi.add_argument(*_flag("--node-rank"), dest="node_rank", type=_count, default=None, help="static rendezvous")
    multi.add_argument(*_flag("--rdzv-backend"), dest="rdzv_backend", default=None, help="c10d, static or etcd")
    multi.add_argument(*_flag("--rdzv-endpoint"), dest="rdzv_endpoint", default=None, help="HOST:PORT")
    multi.add_argument(*_flag("--rdzv-id"), dest="rdzv_id", default=None, help="the job's id, the same on every node")
    multi.add_argument(*_flag("--rdzv-conf"), dest="rdzv_conf", default=None, help="KEY=VALUE,... for the backend")
    multi.add_argument(*_flag("--master-addr"), dest="master_addr", default=None, help="static rendezvous host")
    multi.add_argument(*_flag("--master-port"), dest="master_port", type=_port, default=None, help="its port")
    multi.add_argument("--standalone", action="store_true", default=None, help="one node, a local c10d rendezvous")
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
        help="seconds between SIGTERM and SIGKILL when stopping the group (default 5; one node)",
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
    deadlines = run.add_argument_group("deadlines (per-scope statistics, near misses, learned timeouts)")
    deadlines.add_argument(
        "--no-statistics",
        dest="keep_statistics",
        action="store_false",
        help="do not measure the blocks (statistics and near misses are on by default)",
    )
    deadlines.add_argument(
        "--statistics",
        dest="statistics_file",
        default=None,
        metavar="FILE",
        help="write each scope's figures to FILE as JSON (default: beside --events, as NAME.statistics.json)",
    )
    deadlines.add_argument(
        "--learn-timeouts",
        dest="learn_timeouts",
        action="store_true",
        help="after a warm-up, give each scope's blocks min(after, max(floor, factor x the slowest block seen))",
    )
    deadlines.add_argument(
        "--timeout-floor", type=_seconds(0, 1e9, open_low=True), default=None, help="seconds (default 60)"
    )
    deadlines.add_argument("--timeout-factor", type=float, default=None, help="safety factor >= 1 (default 3)")
    deadlines.add_argument(
        "--timeout-quantile", type=float, default=None, help="0.5 .. 1 of the durations (default 1: the slowest)"
    )
    deadlines.add_argument("--timeout-warmup", type=_count, default=None, help="blocks before learning (default 100)")
    deadlines.add_argument(
        "--timeouts-file",
        default=None,
        metavar="FILE",
        help="carry the figures across runs: read at the start if FILE exists, written after every attempt",
    )
    run.add_argument("-m", "--module", action="store_true", help="run the target as a module (python -m)")
    run.add_argument(*_flag("--no-python"), dest="no_python", action="store_true", help="run the target as a command")
    run.add_argument("target", nargs="?", help="the script (or module, or command) to run")
    run.add_argument("target_args", nargs=argparse.REMAINDER, help="its arguments")
    commands.add_parser(
        "demo",
        help="watch a stuck worker reaped, explained and recovered (a few seconds)",
        description="A group of 4 workers; one hangs; it is reaped with its stack shown; the group restarts.",
    )
    return top


_LEARNING_FLAGS = {
    "timeout_floor": ("--timeout-floor", "floor"),
    "timeout_factor": ("--timeout-factor", "factor"),
    "timeout_quantile": ("--timeout-quantile", "quantile"),
    "timeout_warmup": ("--timeout-warmup", "warmup"),
}


def learning_for(args: argparse.Namespace) -> Optional[Learning]:
    """The run's :class:`~hangwatch.Learning` from ``--learn-timeouts`` and its options (None without it).

    Raises:
        ValueError: an option is out of range, or given without ``--learn-timeouts``, or
            ``--learn-timeouts`` with ``--no-statistics`` (the message names the flag).
    """
    given = {
        field: getattr(args, attr) for attr, (_, field) in _LEARNING_FLAGS.items() if getattr(args, attr) is not None
    }
    if not args.learn_timeouts:
        if given:
            flags = ", ".join(flag for attr, (flag, _) in _LEARNING_FLAGS.items() if getattr(args, attr) is not None)
            raise ValueError(f"{flags} set how timeouts are learned: add --learn-timeouts")
        return None
    if not args.keep_statistics:
        raise ValueError("--learn-timeouts learns from the statistics: leave out --no-statistics")
    try:
        return Learning(**given)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        flag = next((f for f, name in _LEARNING_FLAGS.values() if name == field), "--learn-timeouts")
        raise ValueError(f"{flag}: {exc}") from None


def check_target(args: argparse.Namespace) -> Optional[str]:
    """Why the run's target cannot be run (None if it can)."""
    if args.target is None:
        return "hangwatch run: say what to run: hangwatch run [options] train.py [its arguments]"
    if args.module and args.no_python:
        return "hangwatch run: -m and --no-python cannot be used together"
    if args.no_python:
        if shutil.which(args.target) is None and not os.path.exists(args.target):
            return f"hangwatch run: command not found: {args.target}"
    elif not args.module and not os.path.exists(args.target):
        return f"hangwatch run: no such script: {args.target}"
    return None


def bootstrap_args(args: argparse.Namespace, parent: int) -> List[str]:
    """``-m hangwatch._bootstrap`` arguments that run the target in a worker (after ``python -u``)."""
    mode = "--exec" if args.no_python else "--module" if args.module else "--script"
    return ["-m", "hangwatch._bootstrap", "--parent", str(parent), mode, args.target, *args.target_args]
