"""How a worker dies: target validation, process pins, the reap policy, stack-dump collection.

A :class:`ProcessPin` is taken when a worker's first timer arrives. On Linux it is a
pidfd: signals go through it, so a pid that was recycled after the worker died is
never signalled, and it becomes readable when the worker exits, which tells the
watchdog to drop that worker's timers without polling. Where pidfds are missing
(old kernels, other systems) the pin remembers the process start time and checks it
before each signal.

A :class:`ReapPolicy` says what happens to a worker whose timer expired: collect its
stack (if it registered a dump handler), then the signals to send, a grace period
apart. A :class:`DumpReader` reads the stack dump a worker wrote into the in-memory
file it registered (see :mod:`hangwatch._worker`).
"""

from __future__ import annotations

import math
import os
import select
import signal
import stat
import sys
from typing import Any, Container, Iterable, Iterator, Optional, Tuple, Union

__all__ = [
    "VALID_SIGNALS",
    "DumpReader",
    "ProcessPin",
    "ReapPolicy",
    "ancestor_in",
    "check_policy",
    "child_below",
    "pidfd_identity",
    "pidfd_inode",
    "process_state",
    "processes",
    "refuse_target",
    "signal_name",
    "start_time",
    "stat_fields",
]

_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")

VALID_SIGNALS = frozenset(int(s) for s in signal.valid_signals())
"""The signal numbers of this system (computed once: ``signal.valid_signals()`` is slow)."""


def stat_fields(pid: Union[int, str]) -> Optional[list[bytes]]:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None.

    ``fields[0]`` is the state, ``[1]`` the parent, ``[2]`` the process group, ``[19]`` the start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()


def processes() -> Iterator[tuple[int, list[bytes]]]:
    """Every process visible in /proc, as (pid, :func:`stat_fields`)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(entry)
            if fields is not None:
                yield int(entry), fields


def ancestor_in(pid: int, pids: Container[int], depth: int = 64) -> Optional[int]:
    """The nearest of ``pids`` among ``pid``'s ancestors (following /proc's parent links), or None.

    ``pid`` itself does not count. Linux only (None elsewhere, or when /proc is unreadable).
    """
    for _ in range(depth):
        fields = stat_fields(pid)
        if fields is None:
            return None
        pid = int(fields[1])
        if pid <= 1:
            return None
        if pid in pids:
            return pid
    return None


def child_below(pid: int, parent: int, depth: int = 64) -> Optional[int]:
    """Which child of ``parent`` is ``pid`` or its ancestor (following /proc's parent links), or None.

    None when ``pid`` does not descend from ``parent`` or /proc is unreadable (Linux only).
    """
    for _ in range(depth):
        fields = stat_fields(pid)
        if fields is None:
            return None
        above = int(fields[1])
        if above == parent:
            return pid
        if above <= 1:
            return None
        pid = above
    return None


def _ancestors() -> set[int]:
    """The pids of this process's ancestors (read from /proc; empty where there is none)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        fields = stat_fields(pid)
        if fields is None:
            break
        pid = int(fields[1])
    return found


def refuse_target(pid: object) -> Optional[str]:
    """Return why ``pid`` must never be signalled by this server, or None if it may be.

    Refused: anything but an int, pids <= 1 (0 and -1 mean process groups and "every
    process"; 1 is init), pids beyond any pid_max, this process, a thread id that is not
    its process's pid (``kill`` would signal the whole process), and this process's ancestors.
    """
    if isinstance(pid, bool) or not isinstance(pid, int):
        return f"worker pid must be an int (got {pid!r})"
    if pid <= 1:
        return f"worker pid must be > 1 (got {pid}): 0, -1 and negative pids name process groups or every process"
    if pid > _PID_LIMIT:
        return f"worker pid {pid} is out of range (no pid exceeds {_PID_LIMIT})"
    if pid == os.getpid():
        return f"worker pid {pid} is the timer server's own process"
    group = _thread_group(pid)
    if group is not None and group != pid:
        return f"{pid} is a thread of process {group}, not a process"
    if pid in _ancestors():
        return f"worker pid {pid} is an ancestor of the timer server"
    return None


# The kernel's ceiling for pid_max (PID_MAX_LIMIT on 64-bit Linux).
_PID_LIMIT = 4194304


def _thread_group(pid: int) -> Optional[int]:
    """The process (thread group) that ``pid`` belongs to, from /proc; None where unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def start_time(pid: int) -> Optional[int]:
    """The process start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def _own_pidfd_inode() -> int:
    """The inode of a pidfd for this process, or -1 (no pidfds)."""
    if not _HAVE_PIDFD:
        return -1
    fd = os.pidfd_open(os.getpid())
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


_PIDFD_INODE_OF_SELF = _own_pidfd_inode()


def pidfd_inode(pid: int) -> int:
    """A boot-unique identity of process ``pid`` where the kernel gives one, else -1.

    Since Linux 6.9 (pidfs) every process's pidfd has its own inode number, never
    reused; on older kernels all pidfds share one inode and this returns -1.
    """
    if _PIDFD_INODE_OF_SELF < 0:
        return -1
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return -1
    try:
        return pidfd_identity(fd, pid)
    finally:
        os.close(fd)


def pidfd_identity(fd: int, pid: int) -> int:
    """The boot-unique inode of ``fd``, a pidfd of process ``pid`` (Linux 6.9+), else -1."""
    if _PIDFD_INODE_OF_SELF < 0:
        return -1
    inode = os.fstat(fd).st_ino
    return inode if inode != _PIDFD_INODE_OF_SELF or pid == os.getpid() else -1


class ProcessPin:
    """A handle on one process that is never confused with a later process of the same pid.

    Args:
        pid: the process to pin.

    Raises:
        ProcessLookupError: the process does not exist.
    """

    __slots__ = ("_fd", "_start", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1
        self._start: Optional[int] = None
        if _HAVE_PIDFD:
            self._fd = os.pidfd_open(pid)  # raises ProcessLookupError if it is gone
        else:
            self._start = start_time(pid)
            os.kill(pid, 0)  # raises ProcessLookupError if it is gone
            if self._start is None and sys.platform.startswith("linux"):
                raise ProcessLookupError(pid)

    def fileno(self) -> int:
        """A descriptor that becomes readable when the process exits, or -1 where there is none."""
        return self._fd

    def identity(self) -> int:
        """The pinned process's boot-unique pidfd inode (Linux 6.9+), or -1 where the kernel gives none."""
        if self._fd < 0 or _PIDFD_INODE_OF_SELF < 0:
            return -1
        inode = os.fstat(self._fd).st_ino
        return inode if inode != _PIDFD_INODE_OF_SELF or self.pid == os.getpid() else -1

    def alive(self) -> bool:
        """Whether the pinned process has not exited yet."""
        if self._fd >= 0:
            ready, _, _ = select.select([self._fd], [], [], 0)
            return not ready
        if self._start is not None and start_time(self.pid) != self._start:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the pinned process (never to a later process with the same pid).

        Raises:
            ProcessLookupError: the process has exited.
            PermissionError: this process may not signal it.
        """
        if self._fd >= 0:
            signal.pidfd_send_signal(self._fd, signum)
            return
        if not self.alive():
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, signum)

    def close(self) -> None:
        """Release the pin's descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"ProcessPin(pid={self.pid})"


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15; the number itself for a number that names no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _to_signal(value: object) -> int:
    """A signal from a number, a :class:`signal.Signals` or a name (``"TERM"`` or ``"SIGTERM"``)."""
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise ValueError(f"unknown signal name {value!r}; use a name such as 'TERM' or 'KILL'") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"a signal must be a signal number or name (got {value!r})")
    if value <= 0 or value not in VALID_SIGNALS:
        raise ValueError(f"{value} is not a signal number of this system")
    return int(value)


def _seconds(name: str, value: object, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds (got {value!r})")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g} seconds (got {value!r})")
    return float(value)


# After the last signal, how long at least before a worker that is still alive is reported.
_MIN_EXIT_WAIT = 1.0


class ReapPolicy:
    """How a worker whose timer expired is reaped: evidence first, then signals a grace period apart.

    1. If ``dump`` is true and the worker registered a stack-dump handler (hangwatch's
       clients do), the server sends it the dump signal and waits up to ``dump_timeout``
       seconds for its all-thread stack, which goes into the reap event. A worker that
       did not register one is never sent the dump signal.
    2. The server sends ``signals[0]``; if the worker is still alive ``grace`` seconds
       later, ``signals[1]``; and so on.
    3. If it is still alive ``grace`` seconds (at least one second) after the last
       signal, a ``reap failed`` event says so and in which state the process is (for
       instance stuck in the kernel); the watchdog goes on serving everyone else.

    No signals at all means "expire, collect the stack, but do not signal" (torch's
    FileTimerClient ``signal <= 0``). The default is torch's: one SIGKILL.

    Args:
        signals: one signal or a sequence, as numbers or names (``"TERM"``, ``"SIGKILL"``).
        grace: seconds between two signals, and after the last one before reporting
            a worker that did not die.
        dump: collect the stack of a worker that registered a dump handler.
        dump_timeout: the longest wait for the stack, in seconds.

    Raises:
        ValueError: a signal is unknown, or a time is not a finite number in range.
    """

    __slots__ = ("dump", "dump_timeout", "grace", "signals")

    signals: Tuple[int, ...]
    grace: float
    dump: bool
    dump_timeout: float

    def __init__(
        self,
        signals: Union[int, str, Iterable[Union[int, str]]] = signal.SIGKILL,
        grace: float = 5.0,
        *,
        dump: bool = True,
        dump_timeout: float = 1.0,
    ) -> None:
        items = (signals,) if isinstance(signals, (int, str)) else tuple(signals)
        object.__setattr__(self, "signals", tuple(_to_signal(s) for s in items))
        object.__setattr__(self, "grace", _seconds("grace", grace, low=0, high=86400))
        if not isinstance(dump, bool):
            raise ValueError(f"dump must be True or False (got {dump!r})")
        object.__setattr__(self, "dump", dump)
        object.__setattr__(self, "dump_timeout", _seconds("dump_timeout", dump_timeout, low=0.001, high=60))

    @classmethod
    def parse(cls, text: str, *, allow_empty: bool = True) -> ReapPolicy:
        """Build a policy from text such as ``"TERM,10,KILL"`` (signals, and the grace in seconds).

        ``"KILL"`` is torch's behaviour; ``"TERM,10,KILL"`` sends SIGTERM, waits up to 10 s, then
        SIGKILL; ``"none"`` expires without signalling.

        Args:
            text: the policy.
            allow_empty: whether an empty text means ``"none"`` (the launcher asks for ``none`` spelled out).

        Raises:
            ValueError: the text names an unknown signal, gives more than one grace, or is empty
                where that is not allowed.
        """
        if not allow_empty and not text.strip():
            raise ValueError(
                "the reap policy is empty: write e.g. 'KILL' or 'TERM,10,KILL', or 'none' to expire without signalling"
            )
        signals = []
        grace: Optional[float] = None
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if part.lower() == "none":
                continue
            try:
                number = float(part)
            except ValueError:
                signals.append(_to_signal(part))
                continue
            if grace is not None:
                raise ValueError(f"a reap policy has one grace period (got {text!r}); write e.g. 'TERM,10,KILL'")
            grace = number
        return cls(signals, 5.0 if grace is None else grace)

    @classmethod
    def term_then_kill(cls, grace: float = 5.0) -> ReapPolicy:
        """SIGTERM, then SIGKILL if the worker is still alive after ``grace`` seconds."""
        return cls((signal.SIGTERM, signal.SIGKILL), grace)

    def to_wire(self) -> list[Any]:
        """The policy as JSON-compatible values: ``[[signals...], grace, dump, dump_timeout]``."""
        return [list(self.signals), self.grace, self.dump, self.dump_timeout]

    @classmethod
    def from_wire(cls, value: object) -> ReapPolicy:
        """Decode :meth:`to_wire`'s form (a list or tuple).

        Raises:
            ValueError: the value is not a well-formed policy.
        """
        if not isinstance(value, (list, tuple)) or len(value) != 4 or not isinstance(value[0], (list, tuple)):
            raise ValueError(f"reap policy must be [[signals...], grace, dump, dump_timeout] (got {value!r})")
        signals, grace, dump, dump_timeout = value
        if any(isinstance(s, str) for s in signals):
            raise ValueError(f"reap policy signals must be numbers on the wire (got {signals!r})")
        return cls(signals, grace, dump=dump, dump_timeout=dump_timeout)

    def exit_wait(self) -> float:
        """How long after the last signal a worker may take to exit before it is reported."""
        return max(self.grace, _MIN_EXIT_WAIT)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ReapPolicy is immutable; build a new one (cannot set {name!r})")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ReapPolicy):
            return self.to_wire() == other.to_wire()
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.signals, self.grace, self.dump, self.dump_timeout))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_policy_from_wire, (self.to_wire(),))

    def __repr__(self) -> str:
        names = ", ".join(signal_name(s) for s in self.signals)
        return f"ReapPolicy(({names}), grace={self.grace:g}, dump={self.dump}, dump_timeout={self.dump_timeout:g})"


def check_policy(policy: object) -> Optional[ReapPolicy]:
    """Validate a ``reap_policy`` argument: None or a :class:`ReapPolicy`.

    Raises:
        TypeError: anything else.
    """
    if policy is not None and not isinstance(policy, ReapPolicy):
        raise TypeError(f"reap_policy must be a hangwatch.ReapPolicy or None (got {policy!r})")
    return policy


def _policy_from_wire(value: object) -> ReapPolicy:
    return ReapPolicy.from_wire(value)


_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "uninterruptible sleep, stuck in the kernel",
    "T": "stopped",
    "t": "stopped by a debugger",
    "Z": "zombie: exited, not yet waited for by its parent",
    "X": "dead",
}


def process_state(pid: int) -> str:
    """The scheduler state of ``pid`` in words (from /proc), or ``"unknown"``."""
    fields = stat_fields(pid)
    if not fields:
        return "unknown"
    code = fields[0].decode()
    return f"{code} ({_STATES.get(code, 'other')})"


class DumpReader:
    """Reads the stack dump a worker writes into the in-memory file it registered for its dump signal.

    The file is reached through ``/proc/PID/fd/FD``, so the kernel vouches that it is the
    worker's own; only a regular file is opened, and only what is written after this
    reader was created is read (at most ``limit`` bytes).

    Args:
        pid: the worker (still alive: the caller checks its pin afterwards).
        fd: the descriptor number the worker reported.
        limit: the most bytes to read.

    Raises:
        OSError: the file cannot be opened (the worker exited, or this process may not read it).
        ValueError: the descriptor is not a regular file.
    """

    __slots__ = ("_fd", "_last", "_limit", "_start")

    def __init__(self, pid: int, fd: int, limit: int = 1 << 20) -> None:
        path = f"/proc/{pid}/fd/{fd}"
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"descriptor {fd} of worker {pid} is not a regular file")
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise ValueError(f"descriptor {fd} of worker {pid} is not a regular file")
        self._start = st.st_size
        self._limit = limit
        self._last = -1

    def size(self) -> int:
        """How many bytes the worker has written since this reader was created."""
        return os.fstat(self._fd).st_size - self._start

    def settled(self) -> bool:
        """Whether the dump is complete: something was written, and nothing more since the previous call.

        Call it at a steady interval (the servers poll every millisecond): faulthandler
        writes the whole dump in one go, so a size unchanged over one interval is the end.
        """
        size = self.size()
        done = size > 0 and size == self._last
        self._last = size
        return done

    def read(self) -> str:
        """What the worker has written since this reader was created (decoded, possibly truncated)."""
        size = self.size()
        data = os.pread(self._fd, min(size, self._limit), self._start) if size > 0 else b""
        text = data.decode("utf-8", "replace")
        if size > self._limit:
            text += f"\n... ({size - self._limit} more bytes not read)\n"
        return text

    def close(self) -> None:
        """Release the descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
