"""The agent: run a group of workers, and when one fails or is reaped, stop the group and start it again.

A supervisor loop, like gunicorn's arbiter: signal handlers only set a flag and wake
the loop; the loop waits on the workers' exits (pidfds), the wake pipe and a short
timeout. A failed or reaped worker stops its whole group (each worker leads its own
process group: SIGTERM, a grace period, SIGKILL, until no process of the group is
left), then the group starts again, up to ``max_restarts`` times.

Workers are either a function (started with ``multiprocessing``, its return value
reported) or a command (started with ``subprocess``, its output prefixed with its
rank). Each worker dies with the agent (``PR_SET_PDEATHSIG``), and what the workers
started is taken down by a keeper process if the agent is killed (see
:mod:`hangwatch._keeper`). In the zero-setup mode
(``timer="auto"``, the default) the agent runs a :class:`~hangwatch.SharedMemoryTimerServer`
and a :class:`~hangwatch.FileTimerServer` that reap only its workers, and tells them
where they are through the environment (``HANGWATCH_TIMER_SOCKET``,
``HANGWATCH_TIMER_FILE``, and ``TORCHELASTIC_TIMER_FILE`` as torchrun does), so
``hangwatch.expires`` works in them without set-up.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

from ._bootstrap import die_with_parent
from ._keeper import TOKEN_VARIABLE, Keeper
from ._pidserver import PidTimerServer
from ._reaper import ReapPolicy, check_policy, processes, signal_name
from .env import ENV_TIMER_FILE, ENV_TIMER_SOCKET, configure_from_env
from .events import Event
from .file import FileTimerServer
from .shm import SharedMemoryTimerServer

__all__ = ["Attempt", "LocalElasticAgent", "RunResult", "WorkerFailure", "WorkerSpec"]

logger = logging.getLogger(__name__)

SUCCEEDED, FAILED, INTERRUPTED = "SUCCEEDED", "FAILED", "INTERRUPTED"


@dataclasses.dataclass
class WorkerSpec:
    """What to run in each worker, how many, and how often to restart the group (torch's names and order).

    Args:
        role: the workers' role name (``ROLE_NAME``).
        local_world_size: how many workers (ranks 0..n-1).
        rdzv_handler: torch's rendezvous handler; hangwatch's agent runs one node and takes none.
        fn: deprecated alias of a function ``entrypoint`` (torch's).
        entrypoint: a function (run in a ``multiprocessing`` child; its return value is
            reported) or a command (run with ``args`` as its arguments).
        args: the arguments of ``entrypoint``.
        max_restarts: how many times the group is started again after a failure.
        monitor_interval: the longest wait of the supervisor loop between checks, in seconds
            (worker exits and signals wake it at once).
        master_port: ``MASTER_PORT`` for the workers (default: a free port).
        master_addr: ``MASTER_ADDR`` for the workers (default ``127.0.0.1``).
        local_addr: accepted for torch compatibility; unused on one node.

    Raises:
        ValueError: a field is out of range, or both or neither of ``fn``/``entrypoint`` is given.
    """

    role: str = "default"
    local_world_size: int = 1
    rdzv_handler: Any = None
    fn: Optional[Callable[..., Any]] = None
    entrypoint: Union[Callable[..., Any], str, None] = None
    args: Tuple[Any, ...] = ()
    max_restarts: int = 3
    monitor_interval: float = 0.1
    master_port: Optional[int] = None
    master_addr: Optional[str] = None
    local_addr: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.local_world_size, bool) or not isinstance(self.local_world_size, int):
            raise ValueError(f"local_world_size must be an int >= 1 (got {self.local_world_size!r})")
        if self.local_world_size < 1:
            raise ValueError(f"local_world_size must be an int >= 1 (got {self.local_world_size!r})")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0 (got {self.max_restarts!r})")
        interval = self.monitor_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval < 3600:
            raise ValueError(f"monitor_interval must be a number of seconds > 0 (got {interval!r})")
        if self.rdzv_handler is not None:
            raise ValueError(
                "hangwatch's LocalElasticAgent runs the workers of one node and takes no rdzv_handler; for "
                "multi-node jobs use torchrun with TORCHELASTIC_ENABLE_FILE_TIMER=1 and hangwatch's clients"
            )
        if self.fn is not None and self.entrypoint is not None:
            raise ValueError("give either entrypoint or fn (its deprecated alias), not both")
        if self.entrypoint is None:
            self.entrypoint = self.fn
        if self.entrypoint is None:
            raise ValueError("entrypoint must be a function or a command (got None)")
        if not callable(self.entrypoint) and not isinstance(self.entrypoint, str):
            raise ValueError(f"entrypoint must be a function or a command string (got {self.entrypoint!r})")
        self.args = tuple(self.args)


@dataclasses.dataclass
class WorkerFailure:
    """Why one worker failed.

    Attributes:
        rank: the worker's rank.
        pid: its process id.
        exitcode: its exit status (negative: killed by that signal), as ``multiprocessing`` reports it.
        reaped: whether a timer server reaped it (its timer expired).
        scope: the expired timer's scope, for a reaped worker.
        stack: where it was stuck (the all-thread stack dump), for a reaped worker that registered one.
        late_s: how late after the deadline the first signal was sent, for a reaped worker.
    """

    rank: int
    pid: int
    exitcode: int
    reaped: bool = False
    scope: Optional[str] = None
    stack: Optional[str] = None
    late_s: Optional[float] = None

    @property
    def signal(self) -> Optional[str]:
        """The signal that ended the worker (``"SIGKILL"``), or None for an exit."""
        return signal_name(-self.exitcode) if self.exitcode < 0 else None

    def describe(self) -> str:
        """One line: who, how it ended, and for a reaped worker which timer."""
        how = f"killed by {self.signal}" if self.exitcode < 0 else f"exited with status {self.exitcode}"
        if self.reaped:
            late = "" if self.late_s is None else f", signalled {self.late_s * 1000:.0f} ms after its deadline"
            return f"rank {self.rank} (pid {self.pid}) was reaped: timer {self.scope!r} expired{late}; {how}"
        return f"rank {self.rank} (pid {self.pid}) {how}"

    def stuck_at(self) -> Optional[str]:
        """The innermost frame of the thread the stack dump was taken in, e.g. ``File "x.py", line 3 in f``."""
        if not self.stack:
            return None
        lines = self.stack.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), 0)
        for line in lines[start + 1 :]:
            if line.strip().startswith("File "):
                return line.strip()
        return None


@dataclasses.dataclass
class Attempt:
    """One start of the worker group.

    Attributes:
        number: 0 for the first start, then 1, 2, ... (``TORCHELASTIC_RESTART_COUNT``).
        pids: the workers' pids by rank.
        outcome: ``SUCCEEDED``, ``FAILED`` or ``INTERRUPTED``.
        failures: the workers that failed by themselves (not those the agent stopped), by rank.
        seconds: how long the attempt ran.
    """

    number: int
    pids: Dict[int, int]
    outcome: str
    failures: Dict[int, WorkerFailure]
    seconds: float


@dataclasses.dataclass
class RunResult:
    """What :meth:`LocalElasticAgent.run` returns (torch's fields, plus the attempts).

    Attributes:
        state: ``SUCCEEDED``, ``FAILED`` (after ``max_restarts`` restarts) or ``INTERRUPTED``.
        return_values: each rank's return value, for function workers that succeeded.
        failures: the failed workers of the last attempt, by rank.
        attempts: every start of the group, in order.
    """

    state: str
    return_values: Dict[int, Any]
    failures: Dict[int, WorkerFailure]
    attempts: List[Attempt]

    def is_failed(self) -> bool:
        """Whether the run did not succeed."""
        return self.state != SUCCEEDED

    @property
    def restarts(self) -> int:
        """How many times the group was started again."""
        return max(0, len(self.attempts) - 1)


# --------------------------------------------------------------------------- the workers


def _run_function(
    fn: Callable[..., Any], args: Tuple[Any, ...], env: Dict[str, str], parent: Optional[int], result: Any
) -> None:
    """The body of a function worker (in the child process)."""
    os.setpgid(0, 0)
    os.environ.update(env)
    die_with_parent(parent)
    configure_from_env(required=False)
    value = fn(*args)
    try:
        result.send(("ok", value))
    except Exception as exc:  # an unpicklable return value: say so, do not fail the worker
        result.send(("unpicklable", f"{type(value).__name__}: {exc}"))


class _Worker:
    """One running worker: its process, a pidfd to wait on, and (for commands) its output readers."""

    def __init__(self, rank: int, pid: int, handle: Any, result: Any = None) -> None:
        self.rank = rank
        self.pid = pid
        self.handle = handle
        self.result = result
        self.readers: List[threading.Thread] = []
        try:
            self.pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else -1
        except ProcessLookupError:
            self.pidfd = -1
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first closes the race
        except OSError:
            pass

    def status(self) -> Optional[int]:
        """None while running; else the exit status (negative: the signal), without reaping the process."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # already reaped (multiprocessing reaps when it starts a sibling)
            code = self.handle.exitcode if isinstance(self.handle, mp.process.BaseProcess) else self.handle.poll()
            return None if code is None else int(code)
        if info is None or info.si_pid == 0:
            return None
        if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return -info.si_status
        return int(info.si_status)

    def reap(self) -> None:
        """Collect the exited process, close the pidfd and finish reading its output."""
        if isinstance(self.handle, mp.process.BaseProcess):
            self.handle.join()
        else:
            self.handle.wait()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        for reader in self.readers:
            reader.join(2.0)


def _pump(stream: IO[bytes], out: IO[str], prefix: str) -> None:
    """Copy a worker's output line by line, each line prefixed with its rank."""
    with stream:
        for raw in iter(stream.readline, b""):
            out.write(prefix + raw.decode("utf-8", "replace"))
            out.flush()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_DEAD = (b"Z", b"X")


def _children_of(parent: int) -> Set[int]:
    """The live children of ``parent`` (from /proc)."""
    return {pid for pid, fields in processes() if int(fields[1]) == parent and fields[0] not in _DEAD}


# --------------------------------------------------------------------------- the agent

_TIMER_MODES = ("auto", "fifo", "shm", "off")


class LocalElasticAgent:
    """Runs ``spec.local_world_size`` workers; restarts the whole group when one fails or is reaped.

    Torch's documented usage works (a user-created ``LocalTimerServer`` whose queue reaches
    the workers through ``spec.args``). With ``timer="auto"`` (the default) the agent also
    runs its own timer servers, reaping only its workers, and each worker is configured
    for them before its code runs.

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
        event_file: append the timer server's events to this file as JSON lines.
        prefix_output: prefix each line a command worker prints with ``[rank]`` (function
            workers write to the agent's own stdout and stderr unchanged).
        output: where command workers' prefixed lines go (default: stdout and stderr, as
            the worker wrote them).
        subreaper: make this process a child subreaper (Linux), so a worker's children that
            leave its process group come back to the agent and are stopped with the group.
            The ``hangwatch run`` launcher sets it.
        on_event: called with every timer-server event (from its watchdog thread).
        on_attempt: called with each :class:`Attempt` as it ends (from :meth:`run`'s thread).

    Raises:
        ValueError: ``start_method``, ``timer`` or ``stop_grace`` is invalid.
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
    ) -> None:
        if not isinstance(spec, WorkerSpec):
            raise TypeError(f"spec must be a hangwatch.agent.WorkerSpec (got {spec!r})")
        if start_method not in mp.get_all_start_methods():
            raise ValueError(f"start_method must be one of {mp.get_all_start_methods()} (got {start_method!r})")
        if timer not in _TIMER_MODES:
            raise ValueError(f"timer must be one of {', '.join(map(repr, _TIMER_MODES))} (got {timer!r})")
        if isinstance(stop_grace, bool) or not isinstance(stop_grace, (int, float)) or not 0 <= stop_grace <= 3600:
            raise ValueError(f"stop_grace must be a number of seconds in [0, 3600] (got {stop_grace!r})")
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
        self._interrupt = threading.Event()
        self._interrupt_signal = 0
        self._wake_r, self._wake_w = -1, -1
        self._reaps: Dict[int, Event] = {}  # pid -> the first signal's event, from the timer server
        self._reaps_lock = threading.Lock()
        self._servers: List[PidTimerServer] = []
        self._keeper: Optional[Keeper] = None
        self._token = uuid.uuid4().hex

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
        try:
            if self._subreaper:
                _set_child_subreaper()
            self._keeper = _start_keeper(self._token)
            if self._timer != "off":
                timer_dir = tempfile.mkdtemp(prefix="hangwatch-")
                self._start_servers(timer_dir)
            return self._run_attempts()
        finally:
            for server in self._servers:
                server.stop()
            self._servers = []
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
        port = spec.master_port or _free_port()
        for number in range(spec.max_restarts + 1):
            attempt, values = self._run_once(number, port)
            attempts.append(attempt)
            if self._on_attempt is not None:
                self._on_attempt(attempt)
            if attempt.outcome == SUCCEEDED:
                return RunResult(SUCCEEDED, values, {}, attempts)
            if attempt.outcome == INTERRUPTED:
                return RunResult(INTERRUPTED, {}, attempt.failures, attempts)
            if number < spec.max_restarts:
                logger.warning(
                    "worker group failed (%s); restarting it (%d of %d restarts)",
                    "; ".join(f.describe() for f in attempt.failures.values()),
                    number + 1,
                    spec.max_restarts,
                )
        return RunResult(FAILED, {}, attempts[-1].failures, attempts)

    def _start_servers(self, timer_dir: str) -> None:
        """The timer servers of this run: the FIFO (torch's clients, torchrun's variables) and shared memory."""
        common: Dict[str, Any] = {
            "reap_policy": self._reap_policy,
            "allowed_pids": [],
            "event_file": self._event_file,
            "on_event": self._record_event,
        }
        if self._timer in ("auto", "fifo"):
            self._servers.append(FileTimerServer(os.path.join(timer_dir, "timer.fifo"), self._run_id, **common))
        if self._timer in ("auto", "shm"):
            self._servers.append(SharedMemoryTimerServer(os.path.join(timer_dir, "timer.sock"), **common))
        for server in self._servers:
            server.start()

    def _allow(self, pids: List[int]) -> None:
        for server in self._servers:
            server.set_allowed_pids(pids)

    def _run_once(self, number: int, port: int) -> Tuple[Attempt, Dict[int, Any]]:
        started = time.monotonic()
        before = _children_of(os.getpid()) if self._subreaper else set()
        workers = self._start_group(number, port)
        pids = {w.rank: w.pid for w in workers}
        outcome, failures = self._monitor(workers)
        values: Dict[int, Any] = {}
        if outcome == SUCCEEDED:
            values = self._collect_results(workers)
        self._stop_group(workers, before)
        if self._keeper is not None:
            self._keeper.forget([w.pid for w in workers])
        self._allow([])
        return Attempt(number, pids, outcome, failures, round(time.monotonic() - started, 3)), values

    def _monitor(self, workers: List[_Worker]) -> Tuple[str, Dict[int, WorkerFailure]]:
        interval = self.spec.monitor_interval
        while True:
            if self._interrupt.is_set():
                return INTERRUPTED, {}
            codes = {w.rank: w.status() for w in workers}
            failed = {rank: code for rank, code in codes.items() if code is not None and code != 0}
            if failed:
                return FAILED, {rank: self._failure(workers[rank], code) for rank, code in failed.items()}
            if all(code == 0 for code in codes.values()):
                return SUCCEEDED, {}
            waitables = [w.pidfd for w in workers if w.pidfd >= 0 and codes[w.rank] is None]
            ready, _, _ = select.select([self._wake_r, *waitables], [], [], interval)
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 64):
                        pass
                except BlockingIOError:
                    pass

    def _failure(self, worker: _Worker, code: int) -> WorkerFailure:
        failure = WorkerFailure(worker.rank, worker.pid, code)
        # A reaped worker dies of the server's signal; the server's event may trail its death by a moment.
        deadline = time.monotonic() + (0.5 if self._servers and code < 0 else 0.0)
        while True:
            with self._reaps_lock:
                event = self._reaps.get(worker.pid)
            if event is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if event is not None:
            failure.reaped = True
            failure.scope = event.scope
            failure.stack = event.details.get("stack")
            failure.late_s = event.details.get("late_s")
        return failure

    def _collect_results(self, workers: List[_Worker]) -> Dict[int, Any]:
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

    # ------------------------------------------------------------------ starting and stopping

    def _environment(self, rank: int, number: int, port: int) -> Dict[str, str]:
        spec = self.spec
        size = str(spec.local_world_size)
        env = {
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
        for server in self._servers:
            if isinstance(server, FileTimerServer):
                env[ENV_TIMER_FILE] = server.file_path
                env["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
                env["TORCHELASTIC_TIMER_FILE"] = server.file_path
            elif isinstance(server, SharedMemoryTimerServer):
                env[ENV_TIMER_SOCKET] = server.socket_path
        return env

    def _start_group(self, number: int, port: int) -> List[_Worker]:
        spec = self.spec
        workers: List[_Worker] = []
        parent = os.getpid()
        for rank in range(spec.local_world_size):
            env = self._environment(rank, number, port)
            entry = spec.entrypoint
            if callable(entry):
                receiver, sender = self._ctx.Pipe(duplex=False)
                die_parent = None if self._start_method == "forkserver" else parent
                process = self._ctx.Process(
                    target=_run_function, args=(entry, spec.args, env, die_parent, sender), name=f"worker-{rank}"
                )
                process.start()
                sender.close()
                assert process.pid is not None
                workers.append(_Worker(rank, process.pid, process, receiver))
            else:
                assert isinstance(entry, str)
                workers.append(self._start_command(rank, entry, spec.args, env, parent))
            self._allow([w.pid for w in workers])  # before the worker can send its first request
            if self._keeper is not None:
                self._keeper.watch(workers[-1].pid)
        return workers

    def _start_command(self, rank: int, command: str, args: Sequence[Any], env: Dict[str, str], parent: int) -> _Worker:
        argv = [sys.executable, "-m", "hangwatch._bootstrap", "--parent", str(parent), "--exec", command]
        argv += [str(a) for a in args]
        pipe = subprocess.PIPE if self._prefix_output else None
        popen = subprocess.Popen(
            argv,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=pipe,
            stderr=pipe,
            start_new_session=True,  # its own process group (and session): stopped as one
        )
        worker = _Worker(rank, popen.pid, popen)
        if self._prefix_output:
            prefix = f"[{rank}] "
            assert popen.stdout is not None and popen.stderr is not None
            for stream, out in ((popen.stdout, self._output or sys.stdout), (popen.stderr, self._output or sys.stderr)):
                reader = threading.Thread(target=_pump, args=(stream, out, prefix), daemon=True)
                reader.start()
                worker.readers.append(reader)
        return worker

    def _stop_group(self, workers: List[_Worker], before: Set[int]) -> None:
        """Stop every process of the group: SIGTERM, grace, SIGKILL, until none is left; then reap them."""
        pgids = {w.pid for w in workers}
        for signum, wait in ((signal.SIGTERM, self._stop_grace), (signal.SIGKILL, 10.0)):
            members, orphans = self._leftovers(pgids, before)
            if not members and not orphans:
                break
            for pgid in pgids:
                try:
                    os.killpg(pgid, signum)  # a group whose leader is unreaped cannot be reused meanwhile
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in orphans:
                try:
                    os.kill(pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(self._leftovers(pgids, before)):
                time.sleep(0.02)
        for worker in workers:
            worker.reap()
        members, _ = self._leftovers(pgids, before)
        if members:
            logger.error(
                "processes %s of the stopped worker group did not exit (stuck in the kernel?)", sorted(members)
            )

    def _leftovers(self, pgids: Set[int], before: Set[int]) -> Tuple[Set[int], Set[int]]:
        """One pass over /proc: the live processes of the groups ``pgids``, and the live orphans.

        Orphans (with ``subreaper`` only) are descendants of the workers that left their
        process group and came back to this process: its children that it did not start
        before the group, that are not workers, and that are not in its own process group
        (its own helpers, such as multiprocessing's resource tracker, are). Orphans that
        already exited are collected here.
        """
        me = os.getpid()
        own_group = os.getpgrp()
        members: Set[int] = set()
        orphans: Set[int] = set()
        for pid, fields in processes():
            dead = fields[0] in _DEAD
            pgrp = int(fields[2])
            if pgrp in pgids:
                if not dead:
                    members.add(pid)
            elif self._subreaper and int(fields[1]) == me and pid not in before and pgrp != own_group:
                if not dead:
                    orphans.add(pid)
                else:
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
        return members, orphans

    # ------------------------------------------------------------------ events and signals

    def _record_event(self, event: Event) -> None:
        if event.name == "kill worker process" and "late_s" in event.details:
            with self._reaps_lock:
                self._reaps.setdefault(int(event.worker), event)
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


def _start_keeper(token: str) -> Optional[Keeper]:
    """The process that takes down the workers' leftovers if this agent dies (Linux; None elsewhere or on failure)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return Keeper(token)
    except OSError as exc:
        logger.warning("could not start the keeper (%s); a SIGKILLed agent may leave worker children behind", exc)
        return None


def _set_child_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_child_subreaper = 36
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        logger.warning("could not become a child subreaper; a worker's escaped children may outlive it")
