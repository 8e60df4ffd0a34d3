"""The worker's side of safe reaping: who it is, and where its stack goes when the server asks.

hangwatch's clients attach a small identity to each acquire, as an extra field that
torch's servers ignore (``"hangwatch"`` on the FIFO, an attribute on the queue's
request)::

    {"start": 81234, "dump_signal": 12, "dump_fd": 7, "reap": [[15, 9], 5.0, true, 1.0]}

- ``start``: the process start time (clock ticks since boot, from /proc), and
  ``pidfd_ino``: its pidfd's inode (Linux 6.9+, unique for the boot). The server pins
  the pid only if the process it finds matches them, so a request of a worker that
  already exited never pins a newcomer that got its pid. (The start time alone cannot
  tell apart two processes started within the same clock tick.)
- ``dump_signal``/``dump_fd``: the worker registered :mod:`faulthandler` for that signal,
  writing to that descriptor (an in-memory file). The server sends the signal and reads
  the all-thread stack from ``/proc/PID/fd/FD`` before the kill. The handler is C code
  run by the kernel's signal delivery, so it works while the worker holds the GIL.
- ``rank``: the worker's global rank (its ``RANK`` variable, as torchrun and ``hangwatch run``
  set it), so the server's events and reports name ranks, not only pids.
- ``reap``: the reap policy chosen by the client or the ``expires`` call (see
  :class:`~hangwatch.ReapPolicy`); ``"server"`` means the server's. Without the key a
  request follows torch's rule (its own ``signal``, or the server's policy).
- ``learn``: the ``expires(..., learn=)`` choice of the block: true to have its deadline
  learned (see :mod:`hangwatch.learn`), false never to; without the key the server's
  default applies.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import signal
import sys
import threading
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

from ._reaper import VALID_SIGNALS, ReapPolicy, pidfd_inode, signal_name, start_time

__all__ = ["DEFAULT_DUMP_SIGNAL", "WorkerInfo", "check_dump_signal", "dump_channel", "identity", "parse_identity"]

logger = logging.getLogger("hangwatch")

DEFAULT_DUMP_SIGNAL = int(signal.SIGUSR2)

# Signals faulthandler cannot take (it raises for the fatal ones) or nobody can catch.
_UNREGISTRABLE = frozenset(
    int(s)
    for s in (
        signal.SIGKILL,
        signal.SIGSTOP,
        signal.SIGSEGV,
        signal.SIGFPE,
        signal.SIGABRT,
        signal.SIGBUS,
        signal.SIGILL,
    )
)
_CAN_DUMP = sys.platform.startswith("linux") and hasattr(os, "memfd_create")


def check_dump_signal(value: Union[int, signal.Signals, None]) -> int:
    """Validate a client's ``dump_signal`` argument: the signal number, or 0 for "no stack dumps".

    Raises:
        ValueError: not a signal faulthandler can register.
    """
    if value is None or value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_SIGNALS:
        raise ValueError(f"dump_signal must be a signal number, or None for no stack dumps (got {value!r})")
    if value in _UNREGISTRABLE:
        raise ValueError(
            f"dump_signal cannot be {signal_name(value)} (uncatchable or reserved for crashes); "
            f"use e.g. SIGUSR2 (the default) or SIGUSR1"
        )
    return int(value)


_lock = threading.Lock()
_owner = -1  # the pid whose registrations _channels describes
_channels: Dict[int, int] = {}  # dump signal -> memfd registered for it in this process
_refused: set[int] = set()  # signals already in use by the application (warned once)


def dump_channel(signum: int) -> int:
    """Register a faulthandler stack dump on ``signum`` into an in-memory file; return its descriptor.

    Once per process (a forked child gets its own file). Returns -1 when stack dumps are
    not possible here (not Linux) or ``signum`` already has a handler of the application,
    which is left untouched (logged once).
    """
    global _owner
    if signum == 0 or not _CAN_DUMP:
        return -1
    pid = os.getpid()
    with _lock:
        if _owner != pid:
            _adopt_after_fork(pid)
        fd = _channels.get(signum)
        if fd is not None:
            return fd
        if signum in _refused:
            return -1
        if signal.getsignal(signum) is not signal.SIG_DFL:
            _refused.add(signum)
            logger.warning(
                "hangwatch: %s already has a handler in this process; stack dumps before a reap are off "
                "(pass dump_signal= another signal to the timer client to have them)",
                signal_name(signum),
            )
            return -1
        fd = os.memfd_create(f"hangwatch-stack-{signal_name(signum)}", os.MFD_CLOEXEC)
        faulthandler.register(signum, file=fd, all_threads=True, chain=False)
        _channels[signum] = fd
        return fd


def _adopt_after_fork(pid: int) -> None:
    """In a forked child: point each inherited registration at a file of its own (the parent's stays the parent's)."""
    global _owner
    inherited = dict(_channels)
    _channels.clear()
    for signum, old_fd in inherited.items():
        fd = os.memfd_create(f"hangwatch-stack-{signal_name(signum)}", os.MFD_CLOEXEC)
        faulthandler.register(signum, file=fd, all_threads=True, chain=False)
        _channels[signum] = fd
        try:
            os.close(old_fd)
        except OSError:
            pass
    _owner = pid


_start_cache = (-1, -1, -1)


def _own_identity() -> tuple[int, int]:
    """(start time, pidfd inode) of this process, -1 where unknown; computed once per process."""
    global _start_cache
    pid = os.getpid()
    if _start_cache[0] != pid:
        start = start_time(pid)
        _start_cache = (pid, -1 if start is None else start, pidfd_inode(pid))
    return _start_cache[1], _start_cache[2]


def identity(
    dump_signal: int,
    policy: Optional[ReapPolicy] = None,
    *,
    server_policy: bool = False,
    learn: Optional[bool] = None,
) -> Dict[str, Any]:
    """This process's identity for the wire (see the module docstring); registers the dump handler.

    Args:
        dump_signal: the client's dump signal (0: none).
        policy: the reap policy to ask for, if any.
        server_policy: without a policy, ask explicitly for the server's (``"reap": "server"``).
        learn: the block's learning choice, if it made one.
    """
    info: Dict[str, Any] = {}
    start, inode = _own_identity()
    if start >= 0:
        info["start"] = start
    if inode >= 0:
        info["pidfd_ino"] = inode
    fd = dump_channel(dump_signal)
    if fd >= 0:
        info["dump_signal"] = dump_signal
        info["dump_fd"] = fd
    rank = _own_rank()
    if rank is not None:
        info["rank"] = rank
    if policy is not None:
        info["reap"] = policy.to_wire()
    elif server_policy:
        info["reap"] = "server"
    if learn is not None:
        info["learn"] = bool(learn)
    return info


def _own_rank() -> Optional[int]:
    """This process's ``RANK`` (set by torchrun and ``hangwatch run``), or None when unset or not a rank."""
    text = os.environ.get("RANK", "")
    return int(text) if text.isdigit() and len(text) < 10 else None


class WorkerInfo(NamedTuple):
    """A request's identity, decoded and validated by the server."""

    start: Optional[int]
    pidfd_ino: Optional[int]
    dump_signal: int
    dump_fd: int
    policy: Union[ReapPolicy, str, None]  # a policy, "server", or None (torch's rule)
    rank: Optional[int] = None  # the worker's global rank, when it said
    learn: Optional[bool] = None  # the block's learning choice (None: the server's default)


def _int_field(info: Mapping[str, Any], key: str, low: int, high: float) -> Optional[int]:
    value = info.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"hangwatch.{key} must be an int in [{low}, {high:g}] (got {value!r})")
    return value


def parse_identity(info: object) -> WorkerInfo:
    """Decode and validate a request's ``hangwatch`` field.

    Raises:
        ValueError: the field is malformed (the whole request is then refused).
    """
    if isinstance(info, WorkerInfo):  # decoded by the transport already (shared memory)
        return info
    if not isinstance(info, dict):
        raise ValueError(f"the hangwatch field must be an object (got {info!r})")
    start = _int_field(info, "start", 0, math.inf)
    pidfd_ino = _int_field(info, "pidfd_ino", 0, math.inf)
    dump_signal = _int_field(info, "dump_signal", 1, signal.NSIG - 1)
    dump_fd = _int_field(info, "dump_fd", 0, 1 << 30)
    if (dump_signal is None) != (dump_fd is None):
        raise ValueError("hangwatch.dump_signal and hangwatch.dump_fd go together")
    if dump_signal is not None and (dump_signal not in VALID_SIGNALS or dump_signal in _UNREGISTRABLE):
        raise ValueError(f"hangwatch.dump_signal {dump_signal} is not a signal a dump handler can use")
    rank = _int_field(info, "rank", 0, (1 << 31) - 1)
    reap = info.get("reap")
    policy: Union[ReapPolicy, str, None]
    policy = reap if reap is None or reap == "server" else ReapPolicy.from_wire(reap)
    learn = info.get("learn")
    if learn is not None and not isinstance(learn, bool):
        raise ValueError(f"hangwatch.learn must be true or false (got {learn!r})")
    return WorkerInfo(start, pidfd_ino, dump_signal or 0, -1 if dump_fd is None else dump_fd, policy, rank, learn)
