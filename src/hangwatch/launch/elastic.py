"""Jobs on torch's elastic engine: ``hangwatch run --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...``.

Rendezvous, membership and restarts are torch's own: the launcher runs torchrun's engine in
its own process, through torch's public ``torch.distributed.run.parse_args`` and ``run``.
What hangwatch adds on each node, before the engine starts:

- its timer servers (shared memory and FIFO), reaping only the launcher's children and
  their descendants (torch's agent starts every worker as its direct child), and the
  environment that configures every worker's client with no set-up;
- the keeper and the run's cgroup: nothing of the node outlives a launcher killed with
  SIGKILL; each worker dies with it (``PR_SET_PDEATHSIG``, set by ``hangwatch._bootstrap``);
- the node watch (:mod:`hangwatch.launch.node`): every rank's stack before any is signalled,
  the other nodes' stacks through the job's rendezvous store, a report per worker group.

torch's own ``FileTimerServer`` never starts: torch 2.13's signals its own agent after each
reap (the node's workers are orphaned and the job never completes). A user's
``TORCHELASTIC_ENABLE_FILE_TIMER=1`` is served by hangwatch's FIFO server instead:
``TORCHELASTIC_TIMER_FILE`` names it, and the workers see the variable set (the bootstrap
sets it in each worker; the engine would start its own server if the launcher's
environment had it). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` is set unless the user set it:
torch 2.13's shared rendezvous store breaks the workers' restarts with gloo.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, TextIO

from .._bootstrap import ENV_TORCH_FILE_TIMER
from .._cgroup import ENV_CGROUP, RunCgroup
from .._keeper import TOKEN_VARIABLE, Keeper
from .._native import sampler_for
from .._pidserver import PidTimerServer
from .._reaper import ReapPolicy
from ..agent.figures import RunFigures
from ..agent.servers import server_variables, start_timer_servers
from ..agent.workers import end_run_cgroup, start_keeper, start_run_cgroup
from ..events import Event, EventEmitter, EventSink, JsonLinesSink
from ..learn import LearnedDeadline
from ..triage import ranks_text
from .exchange import StoreExchange, store_address
from .node import NodeWatch
from .options import EXIT_FAILED, EXIT_OK, EXIT_USAGE, bootstrap_args, engine_options, nnodes_range
from .reporter import Reporter, plural

__all__ = ["PREFIX_TEMPLATE", "run_elastic", "torchrun_argv"]

PREFIX_TEMPLATE = "[${rank}] "  # each worker line, prefixed with its global rank (as on one node)
_SHARE_EVERY = 2.0  # seconds between two publications of a node's figures to the other nodes


def torchrun_argv(args: argparse.Namespace, log_dir: str) -> List[str]:
    """torchrun's command line for the run: its options, then the bootstrap that runs the target."""
    argv = [
        "--nproc-per-node",
        str(args.nproc_per_node),
        "--max-restarts",
        str(args.max_restarts),
        "--monitor-interval",
        repr(args.monitor_interval),
        "--start-method",
        args.start_method,
        "--tee",
        "3",
        "--log-dir",
        log_dir,
    ]
    for flag, value in engine_options(args).items():
        argv += [flag] if value == "" else [f"{flag}={value}"]
    if args.run_id is not None and args.rdzv_id is None:
        argv.append(f"--rdzv-id={args.run_id}")
    argv += bootstrap_args(args, os.getpid())
    return argv


def run_elastic(args: argparse.Namespace, out: TextIO) -> int:
    """Run the job on torch's elastic engine with hangwatch's servers; the exit status (0, 1, 2, 128+N)."""
    given = ", ".join(engine_options(args))
    try:
        torchrun: Any = importlib.import_module("torch.distributed.run")  # torchrun's public entry points
        SignalException: Any = importlib.import_module("torch.distributed.elastic.multiprocessing.api").SignalException
        ChildFailedError: Any = importlib.import_module(
            "torch.distributed.elastic.multiprocessing.errors"
        ).ChildFailedError
    except ImportError as exc:
        out.write(
            f"hangwatch run: {given} run the job on torch's elastic engine, which needs PyTorch ({exc}). "
            f"Install it (pip install torch), or leave those options out to run one node on hangwatch's own agent.\n"
        )
        return EXIT_USAGE
    node = _Node(args, out)
    node.reporter.learning(args.learning, args.timeouts_file)
    try:
        parsed = torchrun.parse_args(torchrun_argv(args, node.log_dir))
    except SystemExit:  # torchrun's parser said what was wrong
        node.discard()
        return EXIT_USAGE
    high = nnodes_range(parsed.nnodes)[1]
    if parsed.standalone:
        address = None
    else:
        address = store_address(parsed.rdzv_backend, parsed.rdzv_endpoint, parsed.master_addr, parsed.master_port)
    exchange = StoreExchange(address, str(parsed.rdzv_id)) if address is not None and high > 1 else None

    def engine() -> None:
        torchrun.run(parsed)

    try:
        node.run(engine, exchange)
    except ChildFailedError as exc:
        node.finish(False, _failures_text(exc))
        return EXIT_FAILED
    except SignalException as exc:
        node.finish(None, f"interrupted by {exc.sigval.name}; every worker of this node was stopped")
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:
        node.finish(None, "interrupted by SIGINT; every worker of this node was stopped")
        return 130
    except Exception as exc:  # rendezvous errors, a store that went away: torch's engine gave up
        node.finish(False, f"torch's elastic engine stopped: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    node.finish(True, "")
    return EXIT_OK


def _failures_text(exc: Any) -> str:
    """torch's ChildFailedError, in one line: each failed rank and its exit."""
    parts = []
    for rank, failure in sorted(getattr(exc, "failures", {}).items()):
        code = int(getattr(failure, "exitcode", 0) or 0)
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        parts.append(f"rank {rank} (pid {getattr(failure, 'pid', '?')}): {how}")
    return "; ".join(parts) or str(exc)


class _Node:
    """This node's part of the run: keeper, cgroup, timer servers, environment, node watch; undone at the end."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self._args = args
        self._out = out
        self._token = uuid.uuid4().hex
        self._started = time.monotonic()
        self.reporter = Reporter(out, args.max_restarts + 1)
        self._dir = tempfile.mkdtemp(prefix="hangwatch-")
        self.log_dir = os.path.join(self._dir, "logs")  # torch's per-rank logs, tailed with each rank's prefix
        self._keeper: Optional[Keeper] = None
        self._cgroup: Optional[RunCgroup] = None
        self._servers: List[PidTimerServer] = []
        self._watch: Optional[NodeWatch] = None
        self._events: Optional[EventEmitter] = None
        self._saved: Dict[str, Optional[str]] = {}
        # This node's figures (its ranks, every worker group), and its learned deadlines.
        self._figures = RunFigures(
            args.keep_statistics, args.learning, args.statistics_file, args.timeouts_file, on_learned=self._learned
        )
        self._sharing: Optional[threading.Thread] = None
        self._stop_sharing = threading.Event()

    def discard(self) -> None:
        """Undo what was made before the run (its folder)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def _setenv(self, name: str, value: Optional[str]) -> None:
        if name not in self._saved:
            self._saved[name] = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def run(self, engine: Callable[[], None], exchange: Optional[StoreExchange]) -> None:
        """Set the node up, run torch's engine, undo the set-up (whatever the engine raised)."""
        args = self._args
        sinks: List[EventSink] = [JsonLinesSink(args.events)] if args.events else []
        sinks.append(self._event)
        self._events = EventEmitter(None, sinks)
        try:
            self._figures.load()
            self._keeper = start_keeper(self._token)  # before the token is in this environment: it must not carry it
            if self._keeper is not None:
                self._keeper.own(self._dir)
            self._cgroup = start_run_cgroup(self._token, self._keeper)
            self._start_servers()
            self._environment()
            native, native_note = sampler_for(args.native_stacks)
            self._watch = NodeWatch(
                self._servers,
                self.reporter,
                exchange,
                dump_timeout=(args.reap_policy or ReapPolicy()).dump_timeout,
                native=native,
                native_timeout=args.native_timeout,
                native_note=native_note,
                events=self._events,
                after_group=self._save_figures,
            )
            self._watch.start()
            if exchange is not None and self._figures.table is not None:
                self._sharing = threading.Thread(
                    target=self._share_figures, args=(exchange.another(),), name="hangwatch-figures", daemon=True
                )
                self._sharing.start()
            engine()
        finally:
            self._undo()

    def _share_figures(self, exchange: StoreExchange) -> None:
        """Every few seconds: publish this node's figures, take the other nodes' (every node learns from every rank)."""
        table = self._figures.table
        assert table is not None
        slot: Optional[int] = None
        while True:
            if slot is None:
                slot = exchange.join_figures()
            if slot is not None:
                exchange.share_figures(slot, table.own_figures())
                for other, figures in exchange.others_figures(slot).items():
                    table.set_remote(f"launcher {other}", figures)
            if self._stop_sharing.wait(_SHARE_EVERY):
                return

    def _start_servers(self) -> None:
        args = self._args
        common: Dict[str, Any] = {
            "reap_policy": args.reap_policy,
            "children_only": True,
            "event_file": args.events,
            "on_event": self._event,
            "statistics": False if self._figures.table is None else self._figures.table,
        }
        self._servers = start_timer_servers(args.timer, self._dir, args.rdzv_id or args.run_id or "", **common)

    def _environment(self) -> None:
        """What torch's engine and the workers read, in this process's environment (restored at the end)."""
        self._setenv("TORCHELASTIC_ENABLE_FILE_TIMER", None)  # torch's self-killing server must never start
        where = server_variables(self._servers)
        for name, value in where.items():
            self._setenv(name, value)
        # the bootstrap turns it into TORCHELASTIC_ENABLE_FILE_TIMER=1 in each worker
        self._setenv(ENV_TORCH_FILE_TIMER, "1" if where["TORCHELASTIC_TIMER_FILE"] else None)
        self._setenv(ENV_CGROUP, None if self._cgroup is None else self._cgroup.path)
        self._setenv(TOKEN_VARIABLE, self._token)
        if "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ:
            self._setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # torch 2.13's shared store breaks restarts
        if "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE" not in os.environ:
            self._setenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", PREFIX_TEMPLATE)

    def _event(self, event: Event) -> None:
        if self._watch is not None:
            self._watch.record(event)
        self.reporter.event(event)

    def _save_figures(self) -> None:
        problem = self._figures.save()
        if problem:
            self.reporter.say(problem)

    def _learned(self, scope: str, learned: LearnedDeadline, after: float) -> None:
        if self._events is not None:
            self._events.emit("deadline learned", scope=scope, after_s=round(after, 3), **learned.to_dict())

    def _undo(self) -> None:
        self._stop_sharing.set()
        if self._sharing is not None:
            self._sharing.join(10)
        if self._watch is not None:
            self._watch.stop()
        for server in self._servers:
            server.stop()
        self._servers = []
        if self._events is not None:
            self._events.close()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved = {}
        if self._cgroup is not None:
            left = end_run_cgroup(self._cgroup)
            if left:
                self.reporter.say(
                    f"stopped {plural(len(left), 'process', 'processes')} left in the run's cgroup: {left}"
                )
            self._cgroup = None
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None

    def finish(self, succeeded: Optional[bool], detail: str) -> None:
        """The node's last lines: how the job ended here, and each attempt's likely cause."""
        seconds = time.monotonic() - self._started
        attempts = [] if self._watch is None else sorted(self._watch.attempts, key=lambda a: a["attempt"])
        reaped = sorted({r for a in attempts for r in a["reaped"]})
        extra = f"; ranks reaped on this node: {ranks_text(reaped)}" if reaped else ""
        what = {True: "succeeded", False: "failed", None: "was interrupted"}[succeeded]
        tried = plural(len(attempts), "worker group", "worker groups")
        node = attempts[0]["node"] if attempts else (self._args.node_rank or 0)
        self.reporter.say(f"node {node}: the job {what} after {tried} on this node in {seconds:.1f} s{extra}")
        if detail:
            self.reporter.say(f"  {detail}")
        for attempt in attempts:
            if attempt.get("culprits"):
                place = f" at {attempt['culprit_place']}" if attempt.get("culprit_place") else ""
                self.reporter.say(
                    f"  attempt {attempt['attempt'] + 1}: likely caused by {ranks_text(attempt['culprits'])}{place} "
                    f"(confidence: {attempt['confidence']})"
                )
        self._save_figures()
        where = "every node's ranks" if self._sharing is not None else f"node {node}'s ranks"
        self.reporter.statistics(self._figures.figures(), where=f"{where}, every worker group")
