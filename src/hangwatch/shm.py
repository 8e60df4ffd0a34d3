"""The shared-memory pair: a check-in that makes no system call.

Each worker registers once, over a Unix socket where the kernel vouches for its pid
(``SO_PEERCRED``, and ``SO_PEERPIDFD`` on Linux 6.5+). The server answers with a small
shared-memory file of its own making (a sealed memfd: the worker can neither shrink
nor grow it), holding one slot per scope of that worker. Entering an ``expires`` block
writes the block's deadline into its scope's slot; leaving it writes 0. Both are one
store to memory: no system call, no lock, no thread, and they are done before the
block's body runs, so a worker that then hangs holding the GIL is still seen.

The server scans the slots of every worker at least every ``scan_interval`` and at
each deadline, turns each change into a :class:`~hangwatch.TimerRequest`, and from
there everything is the other pairs' machinery: the deadline book, pinning, stack
dumps, reap policies, events. What travels is state, not messages: a block that was
entered and left between two scans needed no action and is not seen; a block still
open is always seen, so no timer is lost. A timer whose ``after`` is shorter than the
scan interval is reaped at most one interval late.

Scope names travel once per scope over the socket (a system call the first time a
scope is used in a process). The server also writes a heartbeat into each worker's
file; a worker whose server stopped gets :class:`~hangwatch.ServerUnavailableError`
when it enters a block, and reconnects by itself if a new server listens on the same
path (its held timers carried over).

Linux only.
"""

from __future__ import annotations

import array
import atexit
import errno
import fcntl
import functools
import json
import logging
import math
import mmap
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
import weakref
from types import TracebackType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

from . import api as _api
from ._guards import GuardCache
from ._pidserver import PidTimerServer
from ._reaper import ProcessPin, ReapPolicy, check_policy, pidfd_identity
from ._stats import ScopeStats
from ._worker import DEFAULT_DUMP_SIGNAL, WorkerInfo, check_dump_signal, identity, parse_identity
from .api import RequestQueue, ServerUnavailableError, TimerClient, TimerRequest, _check_interval
from .events import EventSink
from .learn import Learning, ScopeStatistics
from .limits import Limits
from .local import WorkerRequest

__all__ = ["SharedMemoryTimerClient", "SharedMemoryTimerServer"]

logger = logging.getLogger(__name__)

_monotonic = time.monotonic

# The file: a header of 8 doubles, then the slots. Slot numbers are indexes of the whole
# file viewed as doubles, so the client's store needs no offset arithmetic.
_HEADER = 8
_HEARTBEAT = 0  # the server's monotonic time at its last scan, in the worker's clock; 0: stopped
_CAPACITY = 1  # how many slots the file holds
# Set by the server when it refused this worker's timers (1: not yet told; the worker writes 2 once told).
_REFUSED = 2
_SLOT_BYTES = 8
# A worker whose heartbeat is older than this checks its connection before trusting the server.
_STALE = 1.0
# While the heartbeat is stale but the connection is alive, how often the connection is checked again.
_RECHECK = 0.1
_MAX_SCOPE_BYTES = 4096
_MAX_MESSAGE = 1 << 16
_DEFAULT_SLOTS = 65536
# What a server grants one worker by default: 128 KB of shared memory, and a bound on the names it keeps.
_SERVER_SLOTS = 16384
_MAX_SLOTS = 1 << 20
# The server compares snapshots this many bytes at a time to find the changed slots.
_CHUNK = 4096
# The longest a worker's slots go unread (it also keeps the heartbeat fresh, well within _STALE).
_MAX_SCAN = 0.25
# How often, at most, a worker reports its blocks to a server that keeps statistics (from a block's exit).
_REPORT_EVERY = 1.0
# ... or sooner, when this many blocks of one scope wait to be folded into its figures.
_FOLD_AT = 4096
# Work one worker may cause in one round of the watchdog (the rest waits for the next round, after the others):
_DRAIN_MESSAGES = 64  # socket messages read
_SLOTS_PER_READ = 4096  # changed slots turned into requests
_ACCEPTS_PER_ROUND = 64  # connections accepted
# When accept() fails for want of descriptors or memory, how long before it is tried again.
_ACCEPT_PAUSE = 0.5
# An honest client says hello at once: a connection silent for longer may give way to a newcomer.
_HELLO_GRACE = 0.2
# The refusal a client answers by trying again (within its connect_timeout).
_BUSY = "busy: every place for a connection yet to say hello is taken (Limits.waiting_connections); try again"
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
# The seals a worker requires of the server's file: it can neither shrink nor grow, nor lose its seals.
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4) | getattr(fcntl, "F_SEAL_SEAL", 1)
_LINUX = sys.platform.startswith("linux")

# A memoryview of doubles (typeshed types item assignment of memoryviews as int only).
_View = Any


def _require_linux(what: str) -> None:
    if not _LINUX or not hasattr(os, "memfd_create"):
        raise OSError(
            errno.ENOSYS,
            f"{what} needs Linux (memfd and Unix-socket credentials); "
            f"use FileTimerServer/FileTimerClient or LocalTimerServer/LocalTimerClient on {sys.platform}",
        )


# --------------------------------------------------------------------- the client


class _Guard(_api._Expiry):
    """One scope's ``with`` block on a shared-memory client: enter stores the deadline, exit stores 0.

    A guard holds no state of its own between enter and exit, so one guard serves every
    block of its scope (nested, or in several threads), with torch's semantics: the last
    acquire wins, the first release releases.
    """

    __slots__ = ("__weakref__", "_code", "_due", "_slot", "_tally", "_view")

    _client: SharedMemoryTimerClient

    def __init__(self, client: SharedMemoryTimerClient, slot: int, after: float, scope: str, code: Any = None) -> None:
        super().__init__(after, scope, client)
        self._slot = slot
        self._view = client._view  # the client repoints its guards when it (re)registers
        # When the server keeps statistics: where the block's duration goes on exit (a list per
        # slot and timeout), and when the client next folds and reports them.
        self._tally = client._tally_of(slot, after)
        self._due = client._due
        self._code = code  # the call site's code object, for a default scope

    def __enter__(self, _clock: Callable[[], float] = time.monotonic, _stale: float = _STALE) -> None:
        now = _clock()
        view = self._view
        if now - view[_HEARTBEAT] > _stale:
            view = self._client._revive(now)
        view[self._slot] = now + self._after

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
        _clock: Callable[[], float] = time.monotonic,
    ) -> None:
        tally = self._tally
        if tally is None:
            self._view[self._slot] = 0.0
            return
        view, slot = self._view, self._slot
        deadline = view[slot]
        view[slot] = 0.0
        if deadline > 0.0:  # 0: released already (by a nested block of the same scope, as torch's)
            now = _clock()
            tally.append(now - deadline + self._after)
            if now >= self._due[0] or len(tally) > _FOLD_AT:
                self._client._fold(now)

    def _fresh(self) -> _api._Expiry:
        return self  # holds no per-block state: one guard serves every call of a decorated function

    def _disarm(self) -> None:
        """Release without counting a block (a heartbeat's stop: the time since its last beat is no block)."""
        self._view[self._slot] = 0.0

    def __repr__(self) -> str:
        return f"<expires(after={self._after!r}, scope={self._scope!r}) on {self._client!r}>"


def _detached_view(slots: int) -> _View:
    """A private stand-in for the server's file: heartbeat 0, so the next block (re)registers."""
    return memoryview(mmap.mmap(-1, (_HEADER + slots) * _SLOT_BYTES)).cast("d")


_CLIENTS: weakref.WeakSet[SharedMemoryTimerClient] = weakref.WeakSet()


class SharedMemoryTimerClient(GuardCache, TimerClient):
    """Client side of :class:`SharedMemoryTimerServer`: a check-in is a store to shared memory.

    The process registers with the server at :func:`hangwatch.configure`, or at its first
    block; a forked child registers on its own at its first block (it never writes to its
    parent's slots). Safe to share between threads.

    With :func:`hangwatch.expires` (client configured, or passed as ``client=``) a block
    costs two stores and a clock read. :meth:`acquire`/:meth:`release`, torch's
    interface, work too, at the price of a wall-clock conversion.

    Args:
        socket_path: the server's socket.
        dump_signal: the signal on which this worker writes its all-thread stack for the
            server before a reap (default SIGUSR2); None for no stack dumps.
        reap_policy: how this worker is reaped (default: the server's policy).
        slots: how many distinct scopes this process can hold at once (the server may
            grant fewer); slots of released scopes are recycled beyond that.
        connect_timeout: how long registering may wait for the server.
        send_timeout: how long sending a new scope's name may wait for the server.

    Raises:
        ValueError: a bad argument (the message says which).
        TypeError: ``reap_policy`` is not a ReapPolicy.
        OSError: not Linux.
    """

    accepts_reap_policy = True
    accepts_learn = True
    _fast_guards = True  # hangwatch.expires hands out this client's cached guards

    def __init__(
        self,
        socket_path: Union[str, os.PathLike[str]],
        *,
        dump_signal: Union[int, None] = DEFAULT_DUMP_SIGNAL,
        reap_policy: Optional[ReapPolicy] = None,
        slots: int = _DEFAULT_SLOTS,
        connect_timeout: float = 1.0,
        send_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        _require_linux("SharedMemoryTimerClient")
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= _MAX_SLOTS:
            raise ValueError(f"slots must be an int in [1, {_MAX_SLOTS}] (got {slots!r})")
        self._path = os.fspath(socket_path)
        self._dump_signal = check_dump_signal(dump_signal)
        self._reap_policy = check_policy(reap_policy)
        self._connect_timeout = _check_interval("connect_timeout", connect_timeout)
        self._send_timeout = _check_interval("send_timeout", send_timeout)
        self._want = slots
        self._lock = threading.RLock()
        self._pid = -1  # the process registered as self._sock/self._view; -1: none
        self._sock: Optional[socket.socket] = None
        self._view: _View = _detached_view(slots)
        self._capacity = slots
        self._next = _HEADER  # the next never-used slot
        self._free: List[int] = []
        self._names: Dict[str, int] = {}  # scope -> slot
        self._slot_names: Dict[int, str] = {}
        self._slot_policy: Dict[int, Optional[ReapPolicy]] = {}
        self._slot_learn: Dict[int, Optional[bool]] = {}
        self._slot_after: Dict[int, float] = {}  # the timeout of the slot's last acquire() (torch's interface)
        # Statistics, when the server keeps them: this process measures its blocks and reports them.
        self._keep_stats = False
        self._pending: Dict[Tuple[int, float], List[float]] = {}  # (slot, after) -> durations not folded yet
        self._tallies: Dict[int, ScopeStats] = {}  # slot -> blocks folded since the last report
        self._due = array.array("d", [0.0])  # when the pending blocks are next folded and reported
        self._guards_of: Dict[int, weakref.WeakSet[_Guard]] = {}
        self._init_guards(self._lock)  # expires()'s caches of this client's guards
        self._checked_at = -math.inf
        self._min_after = math.inf  # the shortest timeout used: the server scans our slots often enough for it
        _CLIENTS.add(self)

    # ----------------------------------------------------------------- torch's interface

    def register_dump_handler(self) -> None:
        """Register with the server now, and this process's stack-dump handler: :func:`hangwatch.configure` does.

        If no server answers yet, a warning is logged and the first block registers.
        """
        with self._lock:
            if self._pid != os.getpid():
                try:
                    self._register(None)
                except ServerUnavailableError as exc:
                    # configure() must not fail because the server starts later: the first block retries.
                    logger.warning("hangwatch: %s; registering again at the first block", exc)

    def acquire(
        self,
        scope_id: str,
        expiration_time: float,
        reap_policy: Optional[ReapPolicy] = None,
        learn: Optional[bool] = None,
    ) -> None:
        """Hold timer ``scope_id`` until ``expiration_time`` (``time.time()`` seconds).

        Args:
            scope_id: the timer's name within this worker.
            expiration_time: absolute ``time.time()`` seconds.
            reap_policy: how to reap this worker if this timer expires (default: the client's).
            learn: whether the server may learn this scope's deadline (default: the server's
                choice); the choice stays with the scope in this process until changed.

        Raises:
            ServerUnavailableError: the server is gone and none listens on the socket.
            ValueError: ``expiration_time`` is not finite, or the scope name is too long.
            TypeError: ``scope_id`` is not a str, or ``reap_policy`` not a ReapPolicy.
        """
        if not math.isfinite(expiration_time):
            raise ValueError(f"expiration_time must be a finite time.time() value (got {expiration_time!r})")
        policy = check_policy(reap_policy)
        with self._lock:
            slot = self._slot_for(scope_id)
            now, after = _monotonic(), expiration_time - time.time()
            self._note_after(max(0.0, after))
            self._slot_after[slot] = max(0.0, after)
            if self._slot_policy.get(slot) is not policy:
                self._set_policy(slot, policy)
            if self._slot_learn.get(slot) is not learn:
                self._set_learn(slot, learn)
            view = self._view
            if now - view[_HEARTBEAT] > _STALE:
                view = self._revive(now)
            view[slot] = max(now + after, 1e-9)

    def release(self, scope_id: str) -> None:
        """Release timer ``scope_id`` (nothing happens if it is not held)."""
        slot = self._names.get(scope_id)
        if slot is None:
            return
        view = self._view
        deadline = view[slot]
        view[slot] = 0.0
        after = self._slot_after.get(slot)
        tally = None if after is None or deadline <= 0.0 else self._tally_of(slot, after)
        if tally is not None and after is not None:
            now = _monotonic()
            tally.append(now - deadline + after)
            if now >= self._due[0] or len(tally) > _FOLD_AT:
                self._fold(now)

    def close(self) -> None:
        """Leave the server: held timers stay with it until this process exits; the next block registers again."""
        with self._lock:
            self.report_blocks()
            sock, self._sock = self._sock, None
            self._pid = -1
            self._repoint(_detached_view(self._capacity))
            if sock is not None:
                sock.close()

    @property
    def socket_path(self) -> str:
        """The server's socket."""
        return self._path

    def __repr__(self) -> str:
        return f"SharedMemoryTimerClient({self._path!r})"

    # ----------------------------------------------------------------- guards (the fast path of expires)

    @property
    def _guard_cache_max(self) -> int:
        return 4 * self._capacity

    def _new_guard(self, scope: str, after: float, code: Any) -> _Guard:
        self._note_after(after)
        guard = _Guard(self, self._slot_for(scope), after, scope, code)
        self._guards_of[guard._slot].add(guard)
        return guard

    def _repoint(self, view: _View) -> None:
        """Make ``view`` this process's file, for the client and every guard (holds the lock, or after fork)."""
        self._view = view
        for slot, guards in self._guards_of.items():
            for guard in guards:
                guard._view = view
                guard._tally = self._tally_of(slot, guard._after)

    # ----------------------------------------------------------------- statistics (when the server keeps them)

    def _tally_of(self, slot: int, after: float) -> Optional[List[float]]:
        """Where the durations of ``slot``'s blocks of timeout ``after`` go on exit: None without statistics."""
        if not self._keep_stats:
            return None
        key = (slot, after)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = []
        return pending

    def _fold(self, now: float, report: bool = False) -> None:
        """Count the pending blocks into each slot's figures; report them when a report is due (or ``report``)."""
        with self._lock:
            for (slot, after), pending in self._pending.items():
                if pending:
                    durations = pending[:]
                    del pending[: len(durations)]  # what another thread appended meanwhile stays for the next fold
                    stats = self._tallies.get(slot)
                    if stats is None:
                        stats = self._tallies[slot] = ScopeStats()
                    stats.add_durations(durations, after)
            if report or now >= self._due[0]:
                self._due[0] = now + _REPORT_EVERY
                self._report()

    def report_blocks(self) -> None:
        """Send the server the blocks counted since the last report (done about once a second, and at exit).

        A no-op when the server keeps no statistics or is not reachable (the counts then
        wait for the next report).
        """
        self._fold(_monotonic(), report=True)

    def _report(self) -> None:
        """Send the folded figures, in messages of bounded size (holds the lock)."""
        if not self._tallies or self._sock is None or self._pid != os.getpid():
            return
        tallies, self._tallies = self._tallies, {}
        batch: List[List[Any]] = []
        size = 0
        for slot, stats in tallies.items():
            wire = stats.to_wire()
            batch.append([slot, wire])
            size += 24 * (len(wire[6]) + 8)  # a generous bound of its JSON length
            if size > _MAX_MESSAGE // 2:
                self._send({"stats": batch}, quiet=True)
                batch, size = [], 0
        if batch:
            self._send({"stats": batch}, quiet=True)

    # ----------------------------------------------------------------- slots and names

    def _slot_for(self, scope: str) -> int:
        """The slot of ``scope``, bound (and announced to the server) on first use. Holds the lock."""
        slot = self._names.get(scope)
        if slot is not None:
            return slot
        if not isinstance(scope, str):
            raise TypeError(f"scope_id must be a str (got {scope!r})")
        if len(scope.encode("utf-8", "surrogatepass")) > _MAX_SCOPE_BYTES:
            raise ValueError(f"scope_id must be at most {_MAX_SCOPE_BYTES} bytes in UTF-8 (got {len(scope)} chars)")
        if not self._free and self._next >= _HEADER + self._capacity:
            self._recycle()
        if self._free:
            slot = self._free.pop()
            old = self._slot_names.pop(slot, None)
            if old is not None:
                del self._names[old]
        else:
            slot = self._next
            self._next += 1
        self._names[scope] = slot
        self._slot_names[slot] = scope
        self._slot_policy[slot] = None
        self._slot_learn[slot] = None
        self._slot_after.pop(slot, None)
        self._guards_of[slot] = weakref.WeakSet()
        if self._pid == os.getpid() and self._sock is not None:
            self._send({"bind": [[slot, scope]]}, quiet=True)
        return slot

    def _recycle(self) -> None:
        """Free the slots of released scopes that no guard can still write (every slot is bound)."""
        self.report_blocks()  # the counts of a slot go out under its old name
        view = self._view
        candidates = {s for s in self._slot_names if view[s] == 0.0}
        caches: Tuple[Dict[Any, Any], ...] = (self._named, self._sites, self._site_index)
        for cache in caches:
            for key in [k for k, g in cache.items() if g._slot in candidates]:
                del cache[key]
        self._free = sorted((s for s in candidates if not self._guards_of.get(s)), reverse=True)
        freed = set(self._free)
        self._pending = {key: durations for key, durations in self._pending.items() if key[0] not in freed}
        for slot in freed:
            self._tallies.pop(slot, None)  # not sent (no server): they must not count under the slot's next name
        if not self._free:
            raise RuntimeError(
                f"this process holds {self._capacity} timers at once, the most its shared-memory file allows; "
                f"pass a larger slots= to SharedMemoryTimerClient (the server's max_slots caps it)"
            )

    def _note_after(self, after: float) -> None:
        """A shorter timeout than any before: tell the server, which scans our slots at least twice per timeout."""
        if after < self._min_after:
            self._min_after = after
            if self._pid == os.getpid() and self._sock is not None:
                self._send({"after": after}, quiet=True)

    def _set_policy(self, slot: int, policy: Optional[ReapPolicy]) -> None:
        self._slot_policy[slot] = policy
        if self._pid == os.getpid() and self._sock is not None:
            self._send({"policy": [[slot, None if policy is None else policy.to_wire()]]}, quiet=True)

    def _set_learn(self, slot: int, learn: Optional[bool]) -> None:
        if learn is not None and not isinstance(learn, bool):
            raise TypeError(f"learn must be True, False or None (got {learn!r})")
        self._slot_learn[slot] = learn
        if self._pid == os.getpid() and self._sock is not None:
            self._send({"learn": [[slot, learn]]}, quiet=True)

    # ----------------------------------------------------------------- registration

    def _revive(self, now: float) -> _View:
        """The heartbeat is stale or zero: register, reconnect, or say the server is gone; return the view."""
        with self._lock:
            view = self._view
            if self._pid != os.getpid():
                return self._register(None)
            if view[_REFUSED] == 1.0:
                self._tell_refused(view)
                return view
            if view[_HEARTBEAT] != 0.0:
                # A slow server, not a gone one, while the connection stands: trust it, check again later.
                if now - self._checked_at < _RECHECK:
                    return view
                if self._connected():
                    self._checked_at = now
                    return view
            return self._register(view)

    def _tell_refused(self, view: _View) -> None:
        """The server refused this process's timers: say so on stderr, once per process (holds the lock)."""
        reason = "this process is not one of its workers"
        sock = self._sock
        while sock is not None:
            try:
                data = _recv_now(sock, _MAX_MESSAGE)
            except OSError:
                break
            if data is None:
                break
            try:
                message = json.loads(data)
            except ValueError:
                break
            if isinstance(message, dict) and isinstance(message.get("refused"), str):
                reason = message["refused"][:500]
                break
        view[_REFUSED] = 2.0
        text = (
            f"hangwatch: warning: the timer server on {self._path} refused the timers of this process "
            f"(pid {os.getpid()}): {reason}; its expires() blocks are not enforced"
        )
        logger.warning("%s", text)
        if not logging.getLogger().handlers:  # logging not configured: hangwatch's NullHandler would hide it
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def _connected(self) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            return _recv_now(sock, 1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _register(self, carry: Optional[_View]) -> _View:
        """Connect, say hello, map the server's file; re-announce every scope; carry held timers over.

        A server too busy with connections that never said hello answers "busy", or closes the
        connection before it could read the hello: both are tried again until ``connect_timeout``.
        """
        deadline = _monotonic() + self._connect_timeout
        while True:
            try:
                return self._register_once(carry)
            except ServerUnavailableError as exc:
                closed = isinstance(exc.__cause__, (ConnectionResetError, BrokenPipeError))
                if not (closed or _BUSY in str(exc)) or _monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    def _register_once(self, carry: Optional[_View]) -> _View:
        old, self._sock = self._sock, None
        if old is not None and self._pid == os.getpid():
            old.close()
        self._pid = -1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self._connect_timeout)
            try:
                sock.connect(self._path)
            except OSError as exc:
                raise ServerUnavailableError(
                    f"no SharedMemoryTimerServer listens on {self._path} ({exc.strerror or exc}); "
                    f"start the server first, or check the path"
                ) from exc
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid not in (os.geteuid(), 0):
                raise ServerUnavailableError(
                    f"the socket {self._path} is served by uid {uid}, not by this user: refusing to register"
                )
            hello: Dict[str, Any] = {"v": 1, "slots": self._want, "mono": _monotonic()}
            if self._min_after < math.inf:
                hello["after"] = self._min_after
            hello.update(identity(self._dump_signal, self._reap_policy, server_policy=True))
            try:
                sock.sendall(json.dumps(hello).encode())
            except OSError as exc:  # refused before the hello arrived: its answer may wait on the socket
                data = _recv_now(sock, _MAX_MESSAGE) or b""
                if data:
                    self._map(data, [])
                raise ServerUnavailableError(f"the server on {self._path} closed the connection ({exc})") from exc
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(struct.calcsize("i")))
            except OSError as exc:
                raise ServerUnavailableError(f"the server on {self._path} did not answer ({exc})") from exc
            fds = [
                fd
                for level, kind, payload in ancdata
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
            ]
            view = self._map(data, fds)
            sock.settimeout(self._send_timeout)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._pid = os.getpid()
        binds = [[slot, name] for slot, name in self._slot_names.items() if slot < _HEADER + self._capacity]
        for start in range(0, len(binds), 64):
            self._send({"bind": binds[start : start + 64]}, quiet=False)
        policies = [[s, p.to_wire()] for s, p in self._slot_policy.items() if p is not None]
        if policies:
            self._send({"policy": policies}, quiet=False)
        choices = [[s, c] for s, c in self._slot_learn.items() if c is not None]
        if choices:
            self._send({"learn": choices}, quiet=False)
        if carry is not None:
            for slot in self._slot_names:
                if slot < len(view) and slot < len(carry) and carry[slot] != 0.0:
                    view[slot] = carry[slot]
        self._checked_at = -math.inf
        self._repoint(view)
        return view

    def _map(self, data: bytes, fds: List[int]) -> _View:
        try:
            try:
                reply = json.loads(data)
            except ValueError as exc:
                raise ServerUnavailableError(f"the server on {self._path} answered {data[:200]!r}") from exc
            if not isinstance(reply, dict) or "error" in reply or len(fds) != 1:
                reason = reply.get("error") if isinstance(reply, dict) else reply
                raise ServerUnavailableError(f"the server on {self._path} refused this worker: {reason}")
            capacity = reply.get("slots")
            size = os.fstat(fds[0]).st_size
            if not isinstance(capacity, int) or not capacity >= 1 or (_HEADER + capacity) * _SLOT_BYTES > size:
                raise ServerUnavailableError(f"the server on {self._path} sent a bad file ({reply!r}, {size} bytes)")
            seals = fcntl.fcntl(fds[0], _F_GET_SEALS)
            if seals & _SEALS != _SEALS:
                # A file that can still shrink would kill this worker (SIGBUS) at its next block.
                raise ServerUnavailableError(
                    f"the server on {self._path} sent a file that is not sealed against resizing; refusing to map it"
                )
            view = memoryview(mmap.mmap(fds[0], (_HEADER + capacity) * _SLOT_BYTES)).cast("d")
        finally:
            for fd in fds:
                os.close(fd)
        self._keep_stats = reply.get("stats") is True
        if self._keep_stats:
            _start_reporter(self)
        if capacity < self._next - _HEADER:
            view.release()
            raise ServerUnavailableError(
                f"the server on {self._path} grants {capacity} slots, fewer than the {self._next - _HEADER} "
                f"scopes this process already uses; raise the server's max_slots"
            )
        self._capacity = capacity
        return view

    def _send(self, message: Dict[str, Any], *, quiet: bool) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.send(json.dumps(message).encode())
        except OSError as exc:
            if not quiet:
                raise ServerUnavailableError(f"the server on {self._path} went away ({exc})") from exc
            # The server is gone: the next block notices (heartbeat) and re-announces every scope.
            logger.debug("hangwatch: could not announce a scope to %s: %s", self._path, exc)

    def _after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's registration; the child's first block makes its own."""
        self._lock = threading.RLock()
        sock, self._sock = self._sock, None
        self._pid = -1
        self._tallies = {}  # the parent's blocks are the parent's to report
        self._pending = {}
        self._repoint(_detached_view(self._capacity))
        if sock is not None:
            os.close(sock.detach())  # the child's copy of the parent's connection; the parent's stays open


def _recv_now(sock: socket.socket, size: int, flags: int = 0) -> Optional[bytes]:
    """Receive what is waiting on ``sock`` without waiting (None if nothing is), whatever its timeout.

    A socket with a timeout waits up to that timeout before it even tries ``recv``, even
    with ``MSG_DONTWAIT``; so readiness is checked first.
    """
    ready, _, _ = select.select([sock], [], [], 0)
    if not ready:
        return None
    return sock.recv(size, flags | socket.MSG_DONTWAIT)


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_reporters: Dict[int, int] = {}  # id(client) -> the pid whose reporter thread serves it


def _start_reporter(client: SharedMemoryTimerClient) -> None:
    """Once per client and process: a thread that reports blocks left pending when no block exits for a while.

    Blocks report themselves from their exits, at most once a second; a job that stops
    entering blocks (a hang, a long phase without any) would otherwise hold back its last
    second of them. The thread holds only a weak reference: it ends with the client.
    """
    pid, key = os.getpid(), id(client)
    if _reporters.get(key) == pid:
        return
    _reporters[key] = pid
    ref = weakref.ref(client)

    def loop() -> None:
        while True:
            time.sleep(_REPORT_EVERY / 4)  # a pending report goes out at most a quarter second late
            found = ref()
            if found is None or found._pid != pid:
                if _reporters.get(key) == pid:
                    del _reporters[key]
                return
            if _monotonic() >= found._due[0]:
                try:
                    found._fold(_monotonic())
                except Exception:  # reporting must never take the worker down
                    logger.debug("hangwatch: reporting blocks to %s failed", found.socket_path, exc_info=True)
            del found

    threading.Thread(target=loop, name="hangwatch-report", daemon=True).start()


@atexit.register
def _report_at_exit() -> None:
    """A worker that exits normally reports its last blocks (a killed one loses at most a second of them)."""
    for client in list(_CLIENTS):
        try:
            client.report_blocks()
        except Exception:  # a client in any state must not turn a clean exit into a traceback
            logger.debug("hangwatch: could not report the last blocks to %s", client.socket_path, exc_info=True)


# --------------------------------------------------------------------- the server


class _Region:
    """One registered worker: its connection, its file, and what the server last saw in it."""

    __slots__ = (
        "accepted_at",
        "backlog",
        "capacity",
        "every",
        "info",
        "infos",
        "mm",
        "names",
        "next_scan",
        "offset",
        "pid",
        "snap",
        "sock",
        "used",
        "view",
    )

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.mm: Optional[mmap.mmap] = None
        self.view: Optional[_View] = None
        self.capacity = 0
        self.used = 0  # slots scanned: every slot up to the highest bound one
        self.snap = bytearray()  # the slots as last turned into requests
        self.accepted_at = _monotonic()
        self.backlog = False  # messages may wait on the socket (the last drain stopped at its limit)
        self.names: Dict[int, str] = {}
        self.info: Optional[WorkerInfo] = None
        self.infos: Dict[int, WorkerInfo] = {}  # slot -> identity with that slot's own policy
        self.offset = 0.0  # server monotonic - worker monotonic (non-zero across time namespaces)
        self.every = _MAX_SCAN  # how often the slots are read: half the worker's shortest timeout, bounded
        self.next_scan = 0.0

    def set_min_after(self, after: float, floor: float) -> None:
        self.every = min(_MAX_SCAN, max(floor, after / 2))
        self.next_scan = 0.0  # read now: a block with that timeout may have started

    def close(self) -> None:
        view, self.view = self.view, None
        if view is not None:
            try:
                view[_HEARTBEAT] = 0.0  # the worker's next block learns the server is gone
            except (ValueError, IndexError):
                pass
            view.release()
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.sock.close()


def _hung_up(sock: socket.socket) -> bool:
    """After a read of 0 bytes: whether the peer closed (True) or sent an empty message (False)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, events in poller.poll(0))


class _SlotQueue(RequestQueue):
    """The transport: registrations over the socket, requests read from the workers' slots."""

    def __init__(
        self, server: SharedMemoryTimerServer, listener: socket.socket, max_slots: int, scan_floor: float
    ) -> None:
        self._server = server
        self._scan_floor = scan_floor
        self._listener = listener
        self._max_slots = max_slots
        self._regions: Dict[int, _Region] = {}  # connection fd -> region
        self._pending: List[TimerRequest] = []
        self._accept_ready = True
        self._paused_until = 0.0  # accept() is paused until then (it failed for want of descriptors)

    def fileno(self) -> int:
        return self._listener.fileno()

    def size(self) -> int:
        return 1

    def get(self, size: int, timeout: float) -> List[TimerRequest]:
        if self._accept_ready:
            self._accept()
        self._scan()
        out, self._pending = self._pending, []
        return out

    @property
    def workers(self) -> int:
        return sum(1 for r in self._regions.values() if r.view is not None)

    # ----------------------------------------------------------------- registration

    def _accept(self) -> None:
        self._accept_ready = False
        for _ in range(_ACCEPTS_PER_ROUND):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                else:
                    logger.error("hangwatch: accept() on %s failed: %s", self._server.socket_path, exc)
                return
            sock.setblocking(False)
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            region = _Region(sock, pid)
            if uid not in (os.geteuid(), 0):  # the socket's mode already keeps others out
                self._refuse(region, f"uid {uid} is not this server's user")
                continue
            over = self._over_limit(pid)
            if over is not None:
                self._refuse(region, over, event="limit reached")
                continue
            if not self._make_room_for_a_hello():
                self._refuse(region, _BUSY, event="limit reached")
                continue
            # allowed_pids is applied when a timer arrives (as on the other transports): a worker's
            # own subprocess may register, its timers are refused with an event, and it keeps running.
            fd = sock.fileno()
            self._regions[fd] = region
            self._server._watch_fd(fd, functools.partial(self._readable, fd))
            self._drain(region)  # an honest client said hello right after connecting: register it now
        self._accept_ready = True  # more may wait: the next round takes them, after the others' work

    def _over_limit(self, pid: int) -> Optional[str]:
        """Why a new connection of ``pid`` would exceed the server's limits, or None."""
        limits = self._server._limits
        mine = registered = 0
        for region in self._regions.values():
            mine += region.pid == pid
            registered += region.view is not None
        if mine >= limits.connections_per_process:
            return f"pid {pid} holds {mine} connections, the most one process may (Limits.connections_per_process)"
        if registered >= limits.workers:
            return f"{registered} processes are registered, the most the server serves (Limits.workers)"
        return None

    def _make_room_for_a_hello(self) -> bool:
        """At most ``Limits.waiting_connections`` wait to say hello; True if a newcomer may wait too.

        An honest client says hello right after it connects; a connection still silent after
        a moment is the likeliest to be an attacker's. So when the pool is full its oldest
        connection silent for that long is closed for the newcomer; if every waiting one is
        that young, the newcomer is told the server is busy (its client tries again). Silent
        connections can never lock an honest worker out.
        """
        waiting = [(r.accepted_at, fd) for fd, r in self._regions.items() if r.view is None]
        cap = self._server._limits.waiting_connections
        if len(waiting) < cap:
            return True
        old_enough = _monotonic() - _HELLO_GRACE
        stale = sorted(item for item in waiting if item[0] <= old_enough)[: len(waiting) - cap + 1]
        if len(stale) < len(waiting) - cap + 1:
            return False
        for _, fd in stale:
            region = self._regions.pop(fd)
            self._server._unwatch_fd(fd)
            reason = f"{cap} connections wait to say hello, the most the server keeps (Limits.waiting_connections); "
            self._refuse(region, reason + "the oldest silent one is closed for a newcomer", event="limit reached")
        return True

    def _pause_accepting(self, exc: OSError) -> None:
        """accept() failed for want of descriptors or memory: stop watching the socket for a moment (no spin)."""
        self._server._unwatch_fd(self._listener.fileno())
        self._paused_until = _monotonic() + _ACCEPT_PAUSE
        self._server._events.emit(
            "limit reached",
            reason=f"cannot accept connections on {self._server.socket_path} ({exc.strerror}); "
            f"trying again in {_ACCEPT_PAUSE:g} s",
        )

    def _resume_accepting(self) -> None:
        self._paused_until = 0.0
        self._accept_ready = True
        self._server._watch_fd(self._listener.fileno(), self._listener_readable)

    def _listener_readable(self) -> None:
        self._accept_ready = True

    def _refuse(self, region: _Region, reason: str, event: str = "bad request") -> None:
        self._server._events.emit(event, worker=region.pid, reason=f"registration refused: {reason}")
        try:
            while _recv_now(region.sock, _MAX_MESSAGE):  # unread input would reset the connection and lose the answer
                pass
        except OSError:
            pass
        try:
            region.sock.send(json.dumps({"error": reason}).encode())
        except OSError:
            pass
        region.sock.close()

    def refused(self, pid: int, reason: str) -> None:
        """The server refused a timer of ``pid``: tell its client, once (it warns on stderr at its next block)."""
        for region in self._regions.values():
            view = region.view
            if region.pid != pid or view is None or view[_REFUSED] != 0.0:
                continue
            view[_REFUSED] = 1.0
            view[_HEARTBEAT] = -1.0  # stale: the worker's next block looks at the header
            try:
                region.sock.send(json.dumps({"refused": reason}).encode())
            except OSError:
                pass

    def _drop(self, fd: int) -> None:
        region = self._regions.pop(fd, None)
        if region is not None:
            self._server._unwatch_fd(fd)
            region.close()

    def _readable(self, fd: int) -> None:
        region = self._regions.get(fd)
        if region is not None:
            self._drain(region)

    def _drain(self, region: _Region) -> None:
        """Read the worker's messages: its hello, then scope names and policies; drop it at end-of-file."""
        fd = region.sock.fileno()
        region.backlog = True  # until the socket is seen empty
        for _ in range(_DRAIN_MESSAGES):  # bounded: a flood waits for later rounds, after the others' work
            try:
                data = region.sock.recv(_MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                region.backlog = False
                return
            except OSError:
                data = b""
            try:
                if not data and _hung_up(region.sock):
                    self._drop(fd)
                    return
                if not data:
                    raise ValueError("an empty message")
                message = json.loads(data)
                if not isinstance(message, dict):
                    raise ValueError("a message must be a JSON object")
                if region.view is None:
                    self._hello(region, message)
                else:
                    self._apply(region, message)
            except (ValueError, TypeError, KeyError, OSError, RecursionError) as exc:
                self._server._events.emit(
                    "bad request",
                    worker=region.pid,
                    reason=f"{exc}; the worker is disconnected",
                    line=data[:200].decode("utf-8", "replace"),
                )
                if region.view is None:
                    self._regions.pop(fd, None)
                    self._server._unwatch_fd(fd)
                    self._refuse(region, str(exc))
                else:
                    self._drop(fd)
                return

    def _hello(self, region: _Region, hello: Dict[str, Any]) -> None:
        if hello.get("v") != 1:
            raise ValueError(f"unknown protocol version {hello.get('v')!r} (this server speaks 1)")
        want = hello.get("slots")
        mono = hello.get("mono")
        if isinstance(want, bool) or not isinstance(want, int) or want < 1:
            raise ValueError(f"slots must be an int >= 1 (got {want!r})")
        if isinstance(mono, bool) or not isinstance(mono, (int, float)) or not math.isfinite(mono):
            raise ValueError(f"mono must be a finite number (got {mono!r})")
        claimed = parse_identity(
            {k: hello[k] for k in ("start", "pidfd_ino", "dump_signal", "dump_fd", "reap", "rank") if k in hello}
        )
        inode = self._peer_identity(region)
        region.info = claimed._replace(pidfd_ino=inode) if inode is not None else claimed
        after = hello.get("after")
        if after is not None:
            if isinstance(after, bool) or not isinstance(after, (int, float)) or not after >= 0:
                raise ValueError(f"after must be a number >= 0 (got {after!r})")
            region.set_min_after(float(after), self._scan_floor)
        offset = _monotonic() - float(mono)
        region.offset = offset if abs(offset) > 1.0 else 0.0  # only a time namespace makes it large
        capacity = min(want, self._max_slots)
        size = (_HEADER + capacity) * _SLOT_BYTES
        memfd = os.memfd_create("hangwatch-slots", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, size)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
            region.mm = mmap.mmap(memfd, size)
            view = memoryview(region.mm).cast("d")
            view[_CAPACITY] = float(capacity)
            view[_HEARTBEAT] = _monotonic() - region.offset
            reply = {"ok": True, "slots": capacity, "stats": self._server.statistics is not None}
            region.sock.sendmsg(
                [json.dumps(reply).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", memfd))],
            )
        finally:
            os.close(memfd)
        region.capacity = capacity
        region.view = view

    @staticmethod
    def _peer_identity(region: _Region) -> Optional[int]:
        """The worker's pidfd inode as the kernel reports it (SO_PEERPIDFD, Linux 6.5+), or None."""
        try:
            pidfd = region.sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
        except OSError:
            return None
        try:
            inode = pidfd_identity(pidfd, region.pid)
        finally:
            os.close(pidfd)
        return inode if inode >= 0 else None

    def _apply(self, region: _Region, message: Dict[str, Any]) -> None:
        after = message.get("after")
        if after is not None:
            if isinstance(after, bool) or not isinstance(after, (int, float)) or not after >= 0:
                raise ValueError(f"after must be a number >= 0 (got {after!r})")
            region.set_min_after(min(float(after), region.every * 2), self._scan_floor)
        for slot, name in message.get("bind", ()):
            self._check_slot(region, slot)
            if not isinstance(name, str) or len(name) > _MAX_SCOPE_BYTES:
                raise ValueError(f"a scope name must be a str of at most {_MAX_SCOPE_BYTES} chars (got {name!r:.80})")
            old = region.names.get(slot)
            used = slot - _HEADER + 1
            if used > region.used:
                region.snap.extend(bytes((used - region.used) * _SLOT_BYTES))
                region.used = used
            elif old is not None and old != name:
                # A recycled slot (released by the worker): forget what was seen under the old name.
                at = (slot - _HEADER) * _SLOT_BYTES
                if region.snap[at : at + _SLOT_BYTES] != bytes(_SLOT_BYTES):
                    self._pending.append(TimerRequest(region.pid, old, -1))
                    region.snap[at : at + _SLOT_BYTES] = bytes(_SLOT_BYTES)
            region.names[slot] = name
            region.infos.pop(slot, None)
        for slot, wire in message.get("policy", ()):
            self._check_slot(region, slot)
            assert region.info is not None
            # None: back to the client's own policy
            self._slot_info(region, slot, policy=region.info.policy if wire is None else ReapPolicy.from_wire(wire))
        for slot, learn in message.get("learn", ()):
            self._check_slot(region, slot)
            if learn is not None and not isinstance(learn, bool):
                raise ValueError(f"learn must be true, false or null (got {learn!r:.40})")
            self._slot_info(region, slot, learn=learn)
        reports = message.get("stats")
        if reports is not None:
            self._reports(region, reports)

    @staticmethod
    def _slot_info(region: _Region, slot: int, **changes: Any) -> None:
        """The identity of the slot's requests: the worker's, with the slot's own policy or learning choice."""
        assert region.info is not None
        info = region.infos.get(slot, region.info)._replace(**changes)
        if info == region.info:
            region.infos.pop(slot, None)
        else:
            region.infos[slot] = info

    def _reports(self, region: _Region, reports: Any) -> None:
        """The worker's report of its blocks since the last (it measures them: a scan cannot see short ones)."""
        if self._server.statistics is None:
            raise ValueError("this server keeps no statistics; a worker must not report blocks to it")
        if not isinstance(reports, list):
            raise ValueError("stats must be a list of [slot, figures]")
        assert region.info is not None
        for entry in reports:
            if not isinstance(entry, list) or len(entry) != 2:
                raise ValueError(f"a stats entry must be [slot, figures] (got {entry!r:.60})")
            slot, wire = entry
            self._check_slot(region, slot)
            name = region.names.get(slot)
            if name is None:
                raise ValueError(f"slot {slot} was reported before it was named")
            self._server._reported(region.pid, name, ScopeStats.from_wire(wire), region.infos.get(slot, region.info))

    @staticmethod
    def _check_slot(region: _Region, slot: Any) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not _HEADER <= slot < _HEADER + region.capacity:
            raise ValueError(f"slot must be an int in [{_HEADER}, {_HEADER + region.capacity}) (got {slot!r})")

    # ----------------------------------------------------------------- scanning

    def next_scan_in(self) -> Optional[float]:
        """Seconds until a worker's slots are due to be read (or other timed work is due), or None."""
        hello_timeout = self._server._limits.hello_timeout
        due = [r.next_scan if r.view is not None else r.accepted_at + hello_timeout for r in self._regions.values()]
        if self._paused_until:
            due.append(self._paused_until)
        return max(0.0, min(due) - _monotonic()) if due else None

    def rescan(self, pids: Iterable[int]) -> List[TimerRequest]:
        """Read these workers' slots now (before any of them is reaped); return what changed."""
        wanted = set(pids)
        now = _monotonic()
        for fd, region in list(self._regions.items()):
            if region.pid in wanted:
                self._read(fd, region, now)
        out, self._pending = self._pending, []
        return out

    def _scan(self) -> None:
        """Read the slots of every worker that is due; close connections that never said hello."""
        now = _monotonic()
        if self._paused_until and now >= self._paused_until:
            self._resume_accepting()
        hello_timeout = self._server._limits.hello_timeout
        for fd, region in list(self._regions.items()):
            if region.view is None:
                if now - region.accepted_at > hello_timeout:
                    self._regions.pop(fd, None)
                    self._server._unwatch_fd(fd)
                    reason = f"no hello within {hello_timeout:g} s (Limits.hello_timeout); disconnected"
                    self._refuse(region, reason, event="limit reached")
            elif region.next_scan <= now:
                self._read(fd, region, now)

    def _read(self, fd: int, region: _Region, now: float) -> None:
        """Read one worker's slots: turn what changed into requests; refresh its heartbeat."""
        mm = region.mm
        if mm is None or region.view is None:
            return
        every = region.every
        table = self._server.statistics
        if table is not None and table.shortest_learned < every * 4:
            # A learned deadline counts from when a scan first saw its block: read often enough that
            # it is enforced at most a quarter of itself late.
            every = max(self._scan_floor, table.shortest_learned / 4)
        region.next_scan = now + every
        end = (_HEADER + region.used) * _SLOT_BYTES
        current = mm[_HEADER * _SLOT_BYTES : end]
        if current != region.snap:
            self._drain(region)  # names travel before the stores that use them
            if fd not in self._regions:
                return
            if (_HEADER + region.used) * _SLOT_BYTES != end:
                current = mm[_HEADER * _SLOT_BYTES : (_HEADER + region.used) * _SLOT_BYTES]
            if not self._changes(region, current, now):
                region.next_scan = now  # more changed than one round takes: the rest at the next round
        if region.view[_REFUSED] != 1.0:  # a refused worker's stale heartbeat tells it at its next block
            region.view[_HEARTBEAT] = now - region.offset

    def _changes(self, region: _Region, new: bytes, now: float) -> bool:
        """Turn the slots that changed since the last read into requests, up to a bound; True if all were."""
        to_wall = time.time() - now + region.offset
        pending = self._pending
        snap = region.snap
        budget = _SLOTS_PER_READ
        assert region.info is not None
        for base in range(0, len(new), _CHUNK):
            chunk = new[base : base + _CHUNK]
            before = bytes(snap[base : base + _CHUNK])
            if chunk == before:
                continue
            for j in range(0, len(chunk), _SLOT_BYTES):
                if chunk[j : j + _SLOT_BYTES] == before[j : j + _SLOT_BYTES]:
                    continue
                slot = _HEADER + (base + j) // _SLOT_BYTES
                (value,) = struct.unpack_from("d", chunk, j)
                name = region.names.get(slot)
                if name is None:
                    if region.backlog:
                        continue  # its name may still wait on the socket: read the slot again later
                    if value != 0.0:
                        self._server._events.emit(
                            "bad request", worker=region.pid, reason=f"slot {slot} written before it was named"
                        )
                elif value <= 0.0:
                    if struct.unpack_from("d", before, j)[0] > 0.0:
                        pending.append(TimerRequest(region.pid, name, -1))
                elif math.isfinite(value):
                    info = region.infos.get(slot, region.info)
                    pending.append(WorkerRequest(region.pid, name, value + to_wall, info))
                else:
                    self._server._events.emit(
                        "bad request", worker=region.pid, scope=name, reason=f"deadline {value!r} is not finite"
                    )
                snap[base + j : base + j + _SLOT_BYTES] = chunk[j : j + _SLOT_BYTES]
                budget -= 1
                if budget == 0:
                    return False
        return True

    def close(self) -> None:
        for fd in list(self._regions):
            self._drop(fd)
        self._listener.close()


class SharedMemoryTimerServer(PidTimerServer):
    """Server side of :class:`SharedMemoryTimerClient`: watches its workers' slots in shared memory.

    The socket is created at once (mode 0600: only this user can register); a worker
    registering before :meth:`start` waits for it up to its ``connect_timeout``. The socket
    is removed by :meth:`stop`. A stale socket at the
    path is replaced; a live server's socket, or any other file, is an error.

    Args:
        socket_path: where to create the Unix socket.
        max_interval: the longest one wait of the watchdog, in seconds.
        daemon: whether the watchdog thread is a daemon thread.
        log_event: optional ``log_event(name, request)`` callback, with torch's event names.
        scan_interval: how often, at most, a worker's slots are read, in seconds. Each
            worker's slots are read at least twice per its shortest timeout (at most every
            0.25 s), and again just before any of its timers is taken as expired. A timer
            shorter than twice this is reaped at most this late (default 5 ms).
        max_slots: the most slots (distinct scopes held at once) one worker may get (default
            16,384: 128 KB of shared memory per worker; at most 1,048,576).
        reap_policy: how workers are reaped unless their client chose a policy
            (default: stack dump if registered, then SIGKILL).
        allowed_pids: if given, only these pids are ever signalled (see ``set_allowed_pids``).
        children_only: reap only this process's children and their descendants (a launcher
            such as torch's agent starts every worker as its direct child); a request naming
            any other pid is refused.
        event_file: append every event to this file as JSON lines.
        on_event: called with every :class:`~hangwatch.Event`.
        limits: what one client may cost this server (default :class:`~hangwatch.Limits`):
            connections per process, connections waiting to say hello, the hello timeout,
            processes registered at once, the refusal events' rate.
        pin: how a worker is pinned and signalled (tests pass a recorder).
        statistics: keep per-scope figures of the released blocks (:meth:`scope_statistics`):
            True, or a :class:`~hangwatch.ScopeStatistics` shared with other servers. The
            workers then measure their own blocks (a scan cannot see the short ones) and
            report them about once a second and when they exit.
        near_miss: with ``statistics``, the fraction of its budget above which a released
            block gives a ``near miss`` event (default 0.8); None for none.
        learn: learn each scope's deadline from its blocks (:class:`~hangwatch.Learning`). A
            block's learned deadline counts from when a scan first saw it, so it may be
            enforced up to one scan (at most 0.25 s) late, never early.

    Raises:
        FileExistsError: a live server or another kind of file is at ``socket_path``.
        ValueError: an interval is not a finite number > 0, or ``max_slots`` is out of range.
        OSError: not Linux, or the socket cannot be created.
    """

    def __init__(
        self,
        socket_path: Union[str, os.PathLike[str]],
        max_interval: float = 10,
        daemon: bool = True,
        log_event: Optional[Callable[[str, Any], None]] = None,
        *,
        scan_interval: float = 0.005,
        max_slots: int = _SERVER_SLOTS,
        reap_policy: Optional[ReapPolicy] = None,
        allowed_pids: Optional[Iterable[int]] = None,
        children_only: bool = False,
        event_file: Union[str, os.PathLike[str], None] = None,
        on_event: Optional[EventSink] = None,
        limits: Optional[Limits] = None,
        pin: Callable[[int], ProcessPin] = ProcessPin,
        statistics: Union[bool, ScopeStatistics] = False,
        near_miss: Optional[float] = 0.8,
        learn: Optional[Learning] = None,
    ) -> None:
        _require_linux("SharedMemoryTimerServer")
        self._scan_interval = _check_interval("scan_interval", scan_interval)
        if isinstance(max_slots, bool) or not isinstance(max_slots, int) or not 1 <= max_slots <= _MAX_SLOTS:
            raise ValueError(f"max_slots must be an int in [1, {_MAX_SLOTS}] (got {max_slots!r})")
        self._path = os.fspath(socket_path)
        listener, self._sock_id = _listen(self._path)
        self._slots = _SlotQueue(self, listener, max_slots, self._scan_interval)
        try:
            super().__init__(
                self._slots,
                max_interval,
                daemon,
                log_event,
                reap_policy=reap_policy,
                allowed_pids=allowed_pids,
                children_only=children_only,
                event_file=event_file,
                on_event=on_event,
                limits=limits,
                pin=pin,
                statistics=statistics,
                near_miss=near_miss,
                learn=learn,
            )
        except BaseException:
            self._remove_socket()
            raise
        self._closed = False

    # The workers measure their blocks and report them (see _reported): a release seen by a scan
    # says nothing of when the block really ended.
    _measures_blocks = False

    def _reported(self, pid: int, scope: str, blocks: ScopeStats, info: WorkerInfo) -> None:
        """A worker's report of its blocks of ``scope``: into the figures; a near miss says so."""
        table = self._stats
        assert table is not None
        if not table.merge(scope, blocks):
            self._table_full(pid, scope)
            return
        used, duration, budget = blocks.closest, blocks.closest_duration_s, blocks.closest_timeout_s
        extra: Optional[Dict[str, Any]] = None
        learning = self._learning
        if learning is not None and (learning.default if info.learn is None else info.learn):
            learned = table.learned(scope)
            # The worker measured against its after; its blocks had the learned deadline where shorter.
            if learned is not None and learned.seconds < blocks.timeout_s and blocks.max_s / learned.seconds > used:
                used, duration, budget = blocks.max_s / learned.seconds, blocks.max_s, learned.seconds
                extra = {"learned": {**learned.to_dict(), "after_s": round(blocks.timeout_s, 3)}}
        self._near(pid, scope, used, duration, budget, extra)

    @property
    def socket_path(self) -> str:
        """The Unix socket workers register on."""
        return self._path

    @property
    def registered_workers(self) -> int:
        """How many worker processes are registered now."""
        return self._slots.workers

    def start(self) -> None:
        """Start the watchdog thread and return at once.

        Raises:
            RuntimeError: the server is running, or was stopped (create a new one).
        """
        if self._closed:
            raise RuntimeError(f"this SharedMemoryTimerServer was stopped and {self._path} removed; create a new one")
        super().start()

    def _wait_timeout(self) -> float:
        timeout = super()._wait_timeout()
        scan = self._slots.next_scan_in()
        return timeout if scan is None else min(timeout, scan)

    def get_expired_timers(self, deadline: float) -> Dict[Any, List[TimerRequest]]:
        """The expired timers, after reading their workers' slots again (a release not yet seen counts)."""
        expired = super().get_expired_timers(deadline)
        if expired:
            changes = self._slots.rescan(expired)
            if changes:
                self.register_timers(changes)
                expired = super().get_expired_timers(deadline)
        return expired

    def _refused(self, pid: int, reason: str) -> None:
        self._slots.refused(pid, reason)

    def _wait(self, timeout: float) -> bool:
        if super()._wait(timeout):
            self._slots._accept_ready = True
        return True  # every round reads the slots

    def _on_stopped(self) -> None:
        self._closed = True
        self.close_pins()
        self._slots.close()
        self._remove_socket()
        super()._on_stopped()

    def _remove_socket(self) -> None:
        try:
            st = os.lstat(self._path)
            if (st.st_dev, st.st_ino) == self._sock_id:
                os.unlink(self._path)
        except FileNotFoundError:
            pass

    def __repr__(self) -> str:
        return f"SharedMemoryTimerServer({self._path!r})"


def _listen(path: str) -> Tuple[socket.socket, Tuple[int, int]]:
    """Bind a listening SEQPACKET socket at ``path`` (mode 0600), replacing a stale one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                f"{path} exists and is not a socket; refusing to replace it: remove it or choose another path",
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(0.5)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left by a server that died
        else:
            raise FileExistsError(errno.EEXIST, f"a timer server is already listening on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    # The socket file gets its mode (0600) when it is created: a chmod of the path afterwards could
    # follow a symlink swapped in meanwhile. (The umask is the process's; the window is one bind.)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    except FileNotFoundError as exc:
        listener.close()
        raise FileNotFoundError(
            exc.errno, f"cannot create the timer socket {path}: its directory does not exist"
        ) from None
    except BaseException:
        listener.close()
        raise
    finally:
        os.umask(old_umask)
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        listener.close()
        raise OSError(errno.EPERM, f"{path} was replaced while the timer socket was being created; not using it")
    listener.listen(128)
    listener.setblocking(False)
    return listener, (st.st_dev, st.st_ino)
