"""How a worker is identified and signalled: target validation and process pins.

A :class:`ProcessPin` is taken when a worker's first timer arrives. On Linux it is a
pidfd: signals go through it, so a pid that was recycled after the worker died is
never signalled, and it becomes readable when the worker exits, which tells the
watchdog to drop that worker's timers without polling. Where pidfds are missing
(old kernels, other systems) the pin remembers the process start time and checks it
before each signal.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Optional

__all__ = ["ProcessPin", "refuse_target"]

_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


def _ancestors() -> set[int]:
    """The pids of this process's ancestors (read from /proc; empty where there is none)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            break
        pid = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return found


def refuse_target(pid: object) -> Optional[str]:
    """Return why ``pid`` must never be signalled by this server, or None if it may be.

    Refused: anything but an int, pids <= 1 (0 and -1 mean process groups and "every
    process"; 1 is init), this process, and its ancestors.
    """
    if isinstance(pid, bool) or not isinstance(pid, int):
        return f"worker pid must be an int (got {pid!r})"
    if pid <= 1:
        return f"worker pid must be > 1 (got {pid}): 0, -1 and negative pids name process groups or every process"
    if pid == os.getpid():
        return f"worker pid {pid} is the timer server's own process"
    if pid in _ancestors():
        return f"worker pid {pid} is an ancestor of the timer server"
    return None


def _start_time(pid: int) -> Optional[int]:
    """The process start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


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
            self._start = _start_time(pid)
            os.kill(pid, 0)  # raises ProcessLookupError if it is gone
            if self._start is None and sys.platform.startswith("linux"):
                raise ProcessLookupError(pid)

    def fileno(self) -> int:
        """A descriptor that becomes readable when the process exits, or -1 where there is none."""
        return self._fd

    def alive(self) -> bool:
        """Whether the pinned process has not exited yet."""
        if self._fd >= 0:
            ready, _, _ = select.select([self._fd], [], [], 0)
            return not ready
        if self._start is not None and _start_time(self.pid) != self._start:
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
