"""The workers of a group: how each starts, how its exit is seen, how the group is stopped whole.

Each worker leads its own process group and dies with the agent (``PR_SET_PDEATHSIG``);
it lets the agent trace it (``PR_SET_PTRACER``, for the native sampler under Yama's
ptrace restrictions). Stopping the group sends SIGTERM, waits, then SIGKILL, to every
member of every worker's process group and, when the agent is a child subreaper, to the
workers' descendants that left their group and came back to it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from .._bootstrap import die_with_parent, let_parent_trace
from .._cgroup import RunCgroup, join_from_env
from .._keeper import Keeper
from .._reaper import processes, start_time
from ..env import configure_from_env

__all__ = [
    "Worker",
    "children_of",
    "free_port",
    "run_function",
    "set_child_subreaper",
    "start_command",
    "start_keeper",
    "stop_group",
]

logger = logging.getLogger("hangwatch.agent")

_DEAD = (b"Z", b"X")


def run_function(
    fn: Callable[..., Any], args: Tuple[Any, ...], env: Dict[str, Optional[str]], parent: Optional[int], result: Any
) -> None:
    """The body of a function worker (in the child process)."""
    os.setpgid(0, 0)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    die_with_parent(parent)
    let_parent_trace(parent)
    join_from_env()  # into the run's cgroup before the function runs: all it starts is born there
    configure_from_env(required=False)
    value = fn(*args)
    try:
        result.send(("ok", value))
    except Exception as exc:  # an unpicklable return value: say so, do not fail the worker
        result.send(("unpicklable", f"{type(value).__name__}: {exc}"))


class Worker:
    """One running worker: its process, a pidfd to wait on, and (for commands) its output readers."""

    def __init__(self, rank: int, pid: int, handle: Any, result: Any = None) -> None:
        self.rank = rank
        self.pid = pid
        self.handle = handle
        self.result = result
        self.readers: List[threading.Thread] = []
        self.start = start_time(pid)  # tells its process group from a later one with the same number
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

    def reap(self) -> Optional[int]:
        """Wait for the process to end, collect it, close the pidfd, finish reading its output; its exit status.

        Returns:
            The exit status (negative: the signal), or None if another waiter collected it first.
        """
        if isinstance(self.handle, mp.process.BaseProcess):
            self.handle.join()
            code = self.handle.exitcode
        else:
            code = self.handle.wait()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        for reader in self.readers:
            reader.join(2.0)
        return None if code is None else int(code)


def _pump(stream: IO[bytes], out: IO[str], prefix: str) -> None:
    """Copy a worker's output line by line, each line prefixed with its rank."""
    with stream:
        for raw in iter(stream.readline, b""):
            out.write(prefix + raw.decode("utf-8", "replace"))
            out.flush()


def start_command(
    rank: int,
    command: str,
    args: Sequence[Any],
    env: Dict[str, Optional[str]],
    parent: int,
    prefix_output: bool,
    output: Optional[IO[str]],
) -> Worker:
    """Start a command worker in its own session; with ``prefix_output``, copy its lines prefixed with its rank."""
    argv = [sys.executable, "-m", "hangwatch._bootstrap", "--parent", str(parent), "--exec", command]
    argv += [str(a) for a in args]
    pipe = subprocess.PIPE if prefix_output else None
    merged = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(
        argv,
        env={name: value for name, value in merged.items() if value is not None},
        stdout=pipe,
        stderr=pipe,
        start_new_session=True,  # its own process group (and session): stopped as one
    )
    worker = Worker(rank, popen.pid, popen)
    if prefix_output:
        prefix = f"[{rank}] "
        assert popen.stdout is not None and popen.stderr is not None
        for stream, out in ((popen.stdout, output or sys.stdout), (popen.stderr, output or sys.stderr)):
            reader = threading.Thread(target=_pump, args=(stream, out, prefix), daemon=True)
            reader.start()
            worker.readers.append(reader)
    return worker


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_of(parent: int) -> Set[int]:
    """The live children of ``parent`` (from /proc)."""
    return {pid for pid, fields in processes() if int(fields[1]) == parent and fields[0] not in _DEAD}


def stop_group(
    workers: List[Worker], before: Set[int], grace: float, subreaper: bool, cgroup: Optional[RunCgroup] = None
) -> Dict[int, Optional[int]]:
    """Stop every process of the group: SIGTERM, ``grace``, SIGKILL, until none is left; then reap the workers.

    Args:
        workers: the group's workers (each leads its own process group).
        before: this process's children before the group started (never stopped here).
        grace: seconds between SIGTERM and SIGKILL.
        subreaper: whether this process is a child subreaper (then the workers' descendants
            that left their process group are its children, and are stopped too).
        cgroup: the run's cgroup, if any: what is in it is stopped too, wherever it went.

    Returns:
        Each worker's exit status, by rank (negative: the signal), None if it could not be known.
    """
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        pgids = _our_groups(workers)
        members, orphans = _leftovers(pgids, before, subreaper, cgroup)
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
        while time.monotonic() < deadline and any(_leftovers(pgids, before, subreaper, cgroup)):
            time.sleep(0.02)
    # A process's leader shows as a zombie while its other threads still exit: wait for the real end.
    codes = {w.rank: w.reap() for w in workers}
    members, _ = _leftovers(_our_groups(workers), before, subreaper, cgroup)
    if members:
        logger.error("processes %s of the stopped worker group did not exit (stuck in the kernel?)", sorted(members))
    return codes


def _our_groups(workers: List[Worker]) -> Set[int]:
    """The process groups the workers lead, but for a number that now names a later process's group.

    A worker collected early (multiprocessing collects a finished child when it starts the
    next one) frees its pid; once its group is empty, another process may get that number
    and lead a group of its own. Its start time tells it from the worker.
    """
    groups = set()
    for worker in workers:
        now = start_time(worker.pid)
        if now is None or worker.start is None or now == worker.start:
            groups.add(worker.pid)
    return groups


def _leftovers(
    pgids: Set[int], before: Set[int], subreaper: bool, cgroup: Optional[RunCgroup] = None
) -> Tuple[Set[int], Set[int]]:
    """One pass over /proc: the live processes of the groups ``pgids``, and the live orphans.

    Orphans are the workers' descendants outside their process groups: in the run's cgroup
    (wherever they went), or (with ``subreaper``) come back to this process: its children
    that it did not start before the group, that are not workers, and that are not in its
    own process group (its own helpers, such as multiprocessing's resource tracker, are).
    Orphans that already exited are collected here.
    """
    me = os.getpid()
    own_group = os.getpgrp()
    held = set(cgroup.pids()) if cgroup is not None else set()
    members: Set[int] = set()
    orphans: Set[int] = set()
    for pid, fields in processes():
        dead = fields[0] in _DEAD
        pgrp = int(fields[2])
        if pgrp in pgids:
            if not dead:
                members.add(pid)
        elif pid in held:
            if not dead:
                orphans.add(pid)
        elif subreaper and int(fields[1]) == me and pid not in before and pgrp != own_group:
            if not dead:
                orphans.add(pid)
            else:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
    return members, orphans


def start_keeper(token: str) -> Optional[Keeper]:
    """The process that takes down the workers' leftovers if this agent dies (Linux; None elsewhere or on failure)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return Keeper(token)
    except OSError as exc:
        logger.warning("could not start the keeper (%s); a SIGKILLed agent may leave worker children behind", exc)
        return None


def start_run_cgroup(token: str, keeper: Optional[Keeper]) -> Optional[RunCgroup]:
    """The run's cgroup (Linux, where one can be made; else None), held by the keeper so a SIGKILLed
    launcher's leftovers are reached there too."""
    if not sys.platform.startswith("linux"):
        return None
    cgroup = RunCgroup.create(f"hangwatch-{token[:16]}")
    if cgroup is not None and keeper is not None:
        keeper.hold(cgroup.path)
    return cgroup


def end_run_cgroup(cgroup: RunCgroup) -> List[int]:
    """Kill what is left in the run's cgroup (nothing, unless a worker's child escaped every group stop),
    remove it, and return the pids that were left."""
    left = cgroup.kill()
    cgroup.remove()
    return left


def set_child_subreaper() -> None:
    """Make this process a child subreaper (Linux): orphaned descendants come back to it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_child_subreaper = 36
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        logger.warning("could not become a child subreaper; a worker's escaped children may outlive it")
