"""The agent: run a group of workers, and when one fails or is reaped, explain it, stop the group, start it again.

A supervisor loop, like gunicorn's arbiter: signal handlers only set a flag and wake
the loop; the loop waits on the workers' exits (pidfds), the wake pipe and a short
timeout. A failed or reaped worker stops its whole group (see
:func:`~hangwatch.agent.workers.stop_group`), then the group starts again, up to
``max_restarts`` times.

Before the group is stopped, its evidence is taken: at the first expiry of one of its
timers the timer servers take every rank's stack before anyone is signalled
(:class:`~hangwatch._evidence.GroupEvidence`), and when a worker fails by itself the
agent takes the stacks of the ranks still running. The attempt's
:class:`~hangwatch.agent.report.HangReport` groups the ranks by where they were stuck,
names the likely culprit, and says what became of each rank; it is also sent as a
``hang report`` event.

In the zero-setup mode (``timer="auto"``, the default) the agent runs a
:class:`~hangwatch.SharedMemoryTimerServer` and a :class:`~hangwatch.FileTimerServer`
that reap only its workers and their descendants, and tells them where they are
through the environment (``HANGWATCH_TIMER_SOCKET``, ``HANGWATCH_TIMER_FILE``, and
``TORCHELASTIC_TIMER_FILE`` as torchrun does), so ``hangwatch.expires`` works in them
without set-up.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import select
import shutil
import signal
import tempfile
import threading
import time
import uuid
from multiprocessing import resource_tracker
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .._cgroup import ENV_CGROUP, RunCgroup
from .._evidence import GroupEvidence
from .._keeper import TOKEN_VARIABLE, Keeper
from .._native import sampler_for
from .._pidserver import PidTimerServer
from .._reaper import ReapPolicy, check_policy
from ..events import Event, EventEmitter, EventSink, JsonLinesSink
from ..learn import LearnedDeadline, Learning, ScopeStatistics
from .figures import RunFigures
from .report import build_report
from .results import (
    FAILED,
    INTERRUPTED,
    SUCCEEDED,
    Attempt,
    Reaped,
    RunResult,
    WorkerFailure,
    exit_text,
)
from .servers import TIMER_MODES, server_variables, start_timer_servers
from .spec import WorkerSpec
from .workers import (
    Worker,
    children_of,
    end_run_cgroup,
    free_port,
    run_function,
    set_child_subreaper,
    start_command,
    start_keeper,
    start_run_cgroup,
    stop_group,
)

__all__ = ["LocalElasticAgent"]

logger = logging.getLogger("hangwatch.agent")

_NATIVE_MODES = ("auto", "off")
# A worker killed by a signal: how long its timer server's event may trail its death.
_REAP_EVENT_WAIT = 0.5


class LocalElasticAgent:
    """Runs ``spec.local_world_size`` workers; restarts the whole group when one fails or is reaped.

    Torch's documented usage works (a user-created ``LocalTimerServer`` whose queue reaches
    the workers through ``spec.args``). With ``timer="auto"`` (the default) the agent also
    runs its own timer servers, reaping only its workers and their descendants, and each
    worker is configured for them before its code runs.

    Args:
        spec: what to run.
        start_method: ``multiprocessing`` start method for function workers.
        timer: ``"auto"``: run both timer servers for the workers, a
            :class:`~hangwatch.FileTimerServer` (for torch's clients and torchrun's
            variables) and a :class:`~hangwatch.SharedMemoryTimerServer` (which
            :func:`~hangwatch.configure_from_env` prefers); ``"fifo"`` or ``"shm"``: only
            that one; ``"off"``: none (bring your own).
        reap_policy: the agent's timer server's reap policy.
        stop_grace: when stopping the group, seconds between SIGTERM and SIGKILL.
        run_id: ``TORCHELASTIC_RUN_ID`` (default: a random id).
        event_file: append the timer servers' events, and the agent's ``hang report``
            events, to this file as JSON lines.
        prefix_output: prefix each line a command worker prints with ``[rank]`` (function
            workers write to the agent's own stdout and stderr unchanged).
        output: where command workers' prefixed lines go (default: stdout and stderr, as
            the worker wrote them).
        subreaper: make this process a child subreaper (Linux), so a worker's children that
            leave its process group come back to the agent and are stopped with the group.
            The ``hangwatch run`` launcher sets it.
        on_event: called with every event: the timer servers' (from their watchdog
            threads) and the agent's ``hang report`` (from :meth:`run`'s thread).
        on_attempt: called with each :class:`Attempt` as it ends (from :meth:`run`'s thread).
        native_stacks: ``"auto"``: add native (C/C++) frames to the group's stacks when the
            sampler (pystack, ``pip install 'hangwatch[native]'``) is installed; ``"off"``: never.
        native_timeout: the longest the native sampler may run when a group's stacks are
            taken, in seconds (the first reap of the group waits for it).
        statistics: keep per-scope figures of every block the timer servers see (True, the
            default, or a :class:`~hangwatch.ScopeStatistics` of yours): one table for both
            servers and every attempt, in :attr:`RunResult.statistics`.
        learn: learn each scope's deadline from its blocks (:class:`~hangwatch.Learning`);
            what is learned is kept between attempts. A ``deadline learned`` event tells
            when a scope gets its first.
        statistics_file: write the run's figures there as JSON after every attempt.
        timeouts_file: figures carried across runs: read at the start when the file exists
            (a run that learns then has its deadlines from its first block), written back
            after every attempt.
        cgroup: hold the workers and everything they start in a cgroup v2 of the run where
            one can be made (Linux, with write access to this process's cgroup): the group
            stop and the keeper then reach even a child with a clean environment in a session
            of its own. Elsewhere process groups and the run token do it alone.

    Raises:
        ValueError: ``start_method``, ``timer``, ``native_stacks`` or a time is invalid.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        start_method: str = "spawn",
        *,
        timer: str = "auto",
        reap_policy: Optional[ReapPolicy] = None,
        stop_grace: float = 5.0,
        run_id: Optional[str] = None,
        event_file: Optional[str] = None,
        prefix_output: bool = True,
        output: Optional[IO[str]] = None,
        subreaper: bool = False,
        on_event: Optional[Callable[[Event], None]] = None,
        on_attempt: Optional[Callable[[Attempt], None]] = None,
        native_stacks: str = "auto",
        native_timeout: float = 3.0,
        cgroup: bool = True,
        statistics: Union[bool, ScopeStatistics] = True,
        learn: Optional[Learning] = None,
        statistics_file: Optional[str] = None,
        timeouts_file: Optional[str] = None,
    ) -> None:
        if not isinstance(spec, WorkerSpec):
            raise TypeError(f"spec must be a hangwatch.agent.WorkerSpec (got {spec!r})")
        if start_method not in mp.get_all_start_methods():
            raise ValueError(f"start_method must be one of {mp.get_all_start_methods()} (got {start_method!r})")
        if timer not in TIMER_MODES:
            raise ValueError(f"timer must be one of {', '.join(map(repr, TIMER_MODES))} (got {timer!r})")
        if native_stacks not in _NATIVE_MODES:
            raise ValueError(f"native_stacks must be 'auto' or 'off' (got {native_stacks!r})")
        for name, value, high in (("stop_grace", stop_grace, 3600), ("native_timeout", native_timeout, 600)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise ValueError(f"{name} must be a number of seconds in [0, {high}] (got {value!r})")
        self.spec = spec
        self._ctx: Any = mp.get_context(start_method)
        self._start_method = start_method
        self._timer = timer
        self._reap_policy = check_policy(reap_policy)
        self._stop_grace = float(stop_grace)
        self._run_id = run_id or uuid.uuid4().hex[:12]
        self._event_file = event_file
        self._prefix_output = prefix_output
        self._output = output
        self._subreaper = subreaper
        self._on_event = on_event
        self._on_attempt = on_attempt
        self._native, self._native_note = sampler_for(native_stacks)
        self._native_timeout = float(native_timeout)
        self._interrupt = threading.Event()
        self._interrupt_signal = 0
        self._wake_r, self._wake_w = -1, -1
        self._lock = threading.Lock()
        self._reaps: Dict[int, Event] = {}  # pid -> its first signal's event, this attempt
        self._expired = 0  # timers expired, this attempt
        self._servers: List[PidTimerServer] = []
        self._events: Optional[EventEmitter] = None
        self._keeper: Optional[Keeper] = None
        self._token = uuid.uuid4().hex
        self._use_cgroup = bool(cgroup)
        self._cgroup: Optional[RunCgroup] = None
        self._figures = RunFigures(statistics, learn, statistics_file, timeouts_file, on_learned=self._learned)

    # ------------------------------------------------------------------ public

    def run(self) -> RunResult:
        """Run the group until it succeeds, fails ``max_restarts + 1`` times, or is interrupted.

        SIGINT and SIGTERM (when called from the main thread) stop every worker and end the run
        with state ``INTERRUPTED``.
        """
        self._interrupt.clear()
        self._interrupt_signal = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        previous = self._install_signal_handlers()
        timer_dir: Optional[str] = None
        sinks: List[EventSink] = [JsonLinesSink(self._event_file)] if self._event_file else []
        if self._on_event is not None:
            sinks.append(self._on_event)
        self._events = EventEmitter(None, sinks)
        try:
            self._figures.load()
            if self._subreaper:
                set_child_subreaper()
            self._keeper = start_keeper(self._token)
            if self._use_cgroup:
                self._cgroup = start_run_cgroup(self._token, self._keeper)
            if self._timer != "off":
                timer_dir = tempfile.mkdtemp(prefix="hangwatch-")
                if self._keeper is not None:
                    self._keeper.own(timer_dir)  # removed even if this process is SIGKILLed
                self._start_servers(timer_dir)
            return self._run_attempts()
        finally:
            for server in self._servers:
                server.stop()
            self._servers = []
            self._events.close()
            if self._cgroup is not None:
                left = end_run_cgroup(self._cgroup)
                if left:
                    logger.warning("killed %d process(es) left in the run's cgroup: %s", len(left), left)
                self._cgroup = None
            if timer_dir is not None:
                shutil.rmtree(timer_dir, ignore_errors=True)
            if self._keeper is not None:
                self._keeper.close()
                self._keeper = None
            self._restore_signal_handlers(previous)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def interrupt(self, signum: int = int(signal.SIGTERM)) -> None:
        """Stop the run from another thread (as SIGINT/SIGTERM would): every worker is stopped."""
        self._interrupt_signal = signum
        self._interrupt.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    @property
    def interrupt_signal(self) -> int:
        """The signal that interrupted the run (0 if none)."""
        return self._interrupt_signal

    # ------------------------------------------------------------------ the loop

    def _run_attempts(self) -> RunResult:
        spec = self.spec
        attempts: List[Attempt] = []
        port = spec.master_port or free_port()
        for number in range(spec.max_restarts + 1):
            attempt, values = self._run_once(number, port)
            attempts.append(attempt)
            self._figures.save()
            if self._on_attempt is not None:
                self._on_attempt(attempt)
            if attempt.outcome == SUCCEEDED:
                return RunResult(SUCCEEDED, values, {}, attempts, self._figures.figures())
            if attempt.outcome == INTERRUPTED:
                return RunResult(INTERRUPTED, {}, attempt.failures, attempts, self._figures.figures())
            if number < spec.max_restarts:
                logger.warning(
                    "worker group failed (%s); restarting it (%d of %d restarts)",
                    "; ".join(f.describe() for f in attempt.failures.values()),
                    number + 1,
                    spec.max_restarts,
                )
        return RunResult(FAILED, {}, attempts[-1].failures, attempts, self._figures.figures())

    def _start_servers(self, timer_dir: str) -> None:
        """The timer servers of this run: the FIFO (torch's clients, torchrun's variables) and shared memory."""
        common: Dict[str, Any] = {
            "reap_policy": self._reap_policy,
            "allowed_pids": [],
            "event_file": self._event_file,
            "on_event": self._record_event,
            "statistics": False if self._figures.table is None else self._figures.table,
        }
        self._servers = start_timer_servers(self._timer, timer_dir, self._run_id, **common)

    @property
    def statistics(self) -> Optional[ScopeStatistics]:
        """The run's statistics table (every server's, every attempt's), or None when statistics are off."""
        return self._figures.table

    def _learned(self, scope: str, learned: LearnedDeadline, after: float) -> None:
        """A scope got its first learned deadline (from a server's thread): a ``deadline learned`` event."""
        if self._events is not None:
            self._events.emit("deadline learned", scope=scope, after_s=round(after, 3), **learned.to_dict())

    def _allow(self, pids: List[int]) -> None:
        for server in self._servers:
            server.set_allowed_pids(pids, descendants=True)

    def _run_once(self, number: int, port: int) -> Tuple[Attempt, Dict[int, Any]]:
        started = time.monotonic()
        before = children_of(os.getpid()) if self._subreaper else set()
        with self._lock:
            self._reaps, self._expired = {}, 0
        workers = self._start_group(number, port)
        pids = {w.rank: w.pid for w in workers}
        dump_timeout = (self._reap_policy or ReapPolicy()).dump_timeout
        group = GroupEvidence(
            pids,
            dump_timeout=dump_timeout,
            native=self._native,
            native_timeout=self._native_timeout,
            native_note=self._native_note,
        )
        for server in self._servers:
            server.set_group(group)
        try:
            outcome, seen = self._monitor(workers)
            values: Dict[int, Any] = {}
            if outcome == FAILED:
                self._take_evidence(group, workers, seen)
            elif outcome == SUCCEEDED:
                values = self._collect_results(workers)
            last = {w.rank: w.status() for w in workers}  # who had ended before the group stop
            finals = stop_group(workers, before, self._stop_grace, self._subreaper, self._cgroup)
        finally:
            for server in self._servers:
                server.set_group(None)
        if self._keeper is not None:
            self._keeper.forget([w.pid for w in workers])
        self._allow([])
        attempt = self._attempt(number, workers, outcome, seen, last, finals, group)
        attempt.seconds = round(time.monotonic() - started, 3)  # the report's time included
        return attempt, values

    def _monitor(self, workers: List[Worker]) -> Tuple[str, Dict[int, Optional[int]]]:
        """Wait until the group succeeds, a worker fails, or the run is interrupted; each worker's status then."""
        interval = self.spec.monitor_interval
        while True:
            codes = {w.rank: w.status() for w in workers}
            if self._interrupt.is_set():
                return INTERRUPTED, codes
            if any(code is not None and code != 0 for code in codes.values()):
                return FAILED, codes
            if all(code == 0 for code in codes.values()):
                return SUCCEEDED, codes
            waitables = [w.pidfd for w in workers if w.pidfd >= 0 and codes[w.rank] is None]
            ready, _, _ = select.select([self._wake_r, *waitables], [], [], interval)
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 64):
                        pass
                except BlockingIOError:
                    pass

    def _take_evidence(self, group: GroupEvidence, workers: List[Worker], seen: Dict[int, Optional[int]]) -> None:
        """Before the group stop: the group's stacks (being taken already after a first expiry, else now)."""
        running = [w for w in workers if w.status() is None]
        if not group.started and running:
            failed = next(w for w in workers if seen[w.rank] not in (None, 0))
            how = exit_text(seen[failed.rank] or 0)
            group.collect(rank=failed.rank, pid=failed.pid, reason=f"rank {failed.rank} (pid {failed.pid}) {how}")
        if group.started:
            group.wait()

    def _await_reap_events(self, workers: List[Worker], last: Dict[int, Optional[int]]) -> None:
        """A worker a timer server killed may be seen dead before the server's event arrives: wait a moment."""
        if not self._servers:
            return
        killed = [w.pid for w in workers if (last.get(w.rank) or 0) < 0]
        deadline = time.monotonic() + _REAP_EVENT_WAIT
        while killed and time.monotonic() < deadline:
            with self._lock:
                if all(pid in self._reaps for pid in killed):
                    return
            time.sleep(0.01)

    def _attempt(
        self,
        number: int,
        workers: List[Worker],
        outcome: str,
        seen: Dict[int, Optional[int]],
        last: Dict[int, Optional[int]],
        finals: Dict[int, Optional[int]],
        group: GroupEvidence,
    ) -> Attempt:
        """What became of each worker (and each reaped descendant), and the hang report of a failed attempt."""
        self._await_reap_events(workers, last)
        with self._lock:
            reaps, expired = dict(self._reaps), self._expired
        rank_of = {w.pid: w.rank for w in workers}
        reaped: List[Reaped] = []
        for pid, event in reaps.items():
            ancestor = event.details.get("descendant_of")
            rank = rank_of.get(pid, rank_of.get(ancestor, -1) if isinstance(ancestor, int) else -1)
            reaped.append(
                Reaped(
                    pid,
                    rank,
                    child=pid not in rank_of,
                    scope=event.scope,
                    late_s=event.details.get("late_s"),
                    signal=event.details.get("signal"),
                    stack=event.details.get("stack"),
                    learned=event.details.get("learned"),
                )
            )
        failures: Dict[int, WorkerFailure] = {}
        stopped: Dict[int, Optional[int]] = {}
        fates: Dict[int, str] = {}
        ended: Dict[int, str] = {}
        for worker in workers:
            rank, pid = worker.rank, worker.pid
            code = finals.get(rank)
            before_stop = last.get(rank)
            child = next((r for r in reaped if r.child and r.rank == rank), None)
            reap = reaps.get(pid)
            if reap is not None:
                failure = WorkerFailure(
                    rank,
                    pid,
                    code,
                    reaped=True,
                    scope=reap.scope,
                    stack=reap.details.get("stack"),
                    late_s=reap.details.get("late_s"),
                    learned=reap.details.get("learned"),
                )
                failures[rank] = failure
                fates[pid] = failure.fate()
            elif before_stop is not None and before_stop != 0:
                failures[rank] = WorkerFailure(rank, pid, before_stop, child_reaped=child)
                fates[pid] = failures[rank].fate()
                if seen.get(rank) not in (None, 0):
                    ended[rank] = fates[pid]
            elif before_stop == 0:
                fates[pid] = "finished (exit status 0)"
            else:
                stopped[rank] = code
                fates[pid] = f"stopped by the group stop; {exit_text(code)}"
        for r in reaped:
            if r.child:
                fates[r.pid] = f"reaped: timer {r.scope!r} expired"
        attempt = Attempt(
            number,
            {w.rank: w.pid for w in workers},
            outcome,
            failures,
            0.0,
            stopped=stopped,
            reaped=reaped,
            timers_expired=expired,
        )
        if outcome == FAILED and group.snapshot is not None:
            finished = [rank for rank, code in seen.items() if code == 0]
            attempt.report = build_report(number, group.snapshot, fates, ended, finished)
            if self._events is not None:
                self._events.emit("hang report", **attempt.report.to_dict())
        return attempt

    def _collect_results(self, workers: List[Worker]) -> Dict[int, Any]:
        values: Dict[int, Any] = {}
        for worker in workers:
            if worker.result is None:
                continue
            if worker.result.poll(1.0):
                kind, value = worker.result.recv()
                if kind == "ok":
                    values[worker.rank] = value
                else:
                    logger.warning("rank %d returned a value that cannot be pickled: %s", worker.rank, value)
            worker.result.close()
        return values

    # ------------------------------------------------------------------ starting

    def _environment(self, rank: int, number: int, port: int) -> Dict[str, Optional[str]]:
        """The worker's environment over the agent's own: None removes a variable (one of an outer run's)."""
        spec = self.spec
        size = str(spec.local_world_size)
        where = server_variables(self._servers)  # the servers of this run, never an outer run's
        env: Dict[str, Optional[str]] = {
            **where,
            "TORCHELASTIC_ENABLE_FILE_TIMER": "1" if where["TORCHELASTIC_TIMER_FILE"] else None,
            ENV_CGROUP: None if self._cgroup is None else self._cgroup.path,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "ROLE_RANK": str(rank),
            "ROLE_NAME": spec.role,
            "WORLD_SIZE": size,
            "LOCAL_WORLD_SIZE": size,
            "ROLE_WORLD_SIZE": size,
            "GROUP_WORLD_SIZE": "1",
            "MASTER_ADDR": spec.master_addr or "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": str(number),
            "TORCHELASTIC_MAX_RESTARTS": str(spec.max_restarts),
            "TORCHELASTIC_RUN_ID": self._run_id,
            TOKEN_VARIABLE: self._token,  # marks everything the worker starts, for the keeper
        }
        return env

    def _start_group(self, number: int, port: int) -> List[Worker]:
        spec = self.spec
        workers: List[Worker] = []
        parent = os.getpid()
        for rank in range(spec.local_world_size):
            env = self._environment(rank, number, port)
            entry = spec.entrypoint
            if callable(entry):
                receiver, sender = self._ctx.Pipe(duplex=False)
                die_parent = None if self._start_method == "forkserver" else parent
                process = self._ctx.Process(
                    target=run_function, args=(entry, spec.args, env, die_parent, sender), name=f"worker-{rank}"
                )
                if self._start_method == "spawn":
                    # Born with the token in its environment, which is where the keeper reads it (a fork or a
                    # forkserver child inherits another process's: groups and the cgroup hold those).
                    resource_tracker.ensure_running()  # multiprocessing's helper must not carry the token
                    with _token_in_environment(self._token):
                        process.start()
                else:
                    process.start()
                sender.close()
                assert process.pid is not None
                workers.append(Worker(rank, process.pid, process, receiver))
            else:
                assert isinstance(entry, str)
                workers.append(start_command(rank, entry, spec.args, env, parent, self._prefix_output, self._output))
            if self._cgroup is not None:
                self._cgroup.add(workers[-1].pid)  # before it can start anything: all it starts is born there
            self._allow([w.pid for w in workers])  # before the worker can send its first request
            if self._keeper is not None:
                self._keeper.watch(workers[-1].pid)
        return workers

    # ------------------------------------------------------------------ events and signals

    def _record_event(self, event: Event) -> None:
        if event.name == "kill worker process" and "late_s" in event.details:
            with self._lock:
                self._reaps.setdefault(int(event.worker), event)
        elif event.name == "timer expired":
            with self._lock:
                self._expired += 1
        if self._on_event is not None:
            self._on_event(event)

    def _install_signal_handlers(self) -> Dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: Dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda s, _f: self.interrupt(s))
        return previous

    def _restore_signal_handlers(self, previous: Dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_environ_lock = threading.Lock()


@contextlib.contextmanager
def _token_in_environment(token: str) -> Iterator[None]:
    """The run token in this process's environment while a worker is started (only then: other children of a
    program that runs the agent must not carry it)."""
    with _environ_lock:
        previous = os.environ.get(TOKEN_VARIABLE)
        os.environ[TOKEN_VARIABLE] = token
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(TOKEN_VARIABLE, None)
            else:
                os.environ[TOKEN_VARIABLE] = previous
