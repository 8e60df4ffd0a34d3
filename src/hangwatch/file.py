"""The named-pipe pair: FileTimerServer, FileTimerClient, FileTimerRequest (torch's wire format).

One JSON object per line, each line written with a single ``write`` of at most
PIPE_BUF (4096) bytes so lines from many clients never interleave::

    {"version": 1, "pid": 4242, "scope_id": "train.py#10", "expiration_time": 1700000000.5, "signal": 9}

A release carries ``expiration_time`` -1 and ``signal`` 0. Torch's clients work
against this server and these clients against torch's server. hangwatch's client adds
a ``"hangwatch"`` field to each acquire (its start time, its stack-dump handler, its
reap policy: see :mod:`hangwatch._worker`); torch's server ignores it.

Two things differ from torch, both safe by default:

- The client keeps its pipe descriptor open between requests when the server is a
  hangwatch server (torch's server cannot see a stuck worker while a client holds the
  pipe open, so against it the client opens and closes per request, as torch's does).
  A hangwatch server marks its FIFO with the sticky bit, which means nothing else on
  a FIFO, so the client can tell.
- A full pipe never makes the client fail: it waits, up to ``send_timeout``, for the
  server to drain it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import select
import signal as _signal
import stat
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple, Union, overload

from ._guards import GuardCache, LineGuard, Wire
from ._pidserver import PidTimerServer
from ._pipe import read_available, wait_and_take
from ._reaper import VALID_SIGNALS, ProcessPin, ReapPolicy, check_policy, signal_name
from ._worker import DEFAULT_DUMP_SIGNAL, check_dump_signal, identity
from .api import RequestQueue, ServerUnavailableError, TimerClient, TimerRequest, _check_interval
from .events import EventSink
from .learn import Learning, ScopeStatistics
from .limits import Limits

__all__ = ["FileTimerClient", "FileTimerRequest", "FileTimerServer", "ServerUnavailableError"]

logger = logging.getLogger(__name__)

PIPE_BUF = select.PIPE_BUF
_MARK = stat.S_ISVTX  # the sticky bit on the FIFO: "a hangwatch server reads this"


class FileTimerRequest(TimerRequest):
    """A timer request of the FIFO pair: a :class:`TimerRequest` plus the signal that reaps the worker.

    Args:
        worker_pid: the worker's pid.
        scope_id: the timer's name within the worker.
        expiration_time: ``time.time()`` seconds; negative to release.
        signal: the signal that reaps the worker; <= 0 means expire without signalling.

    Attributes:
        hangwatch: the ``"hangwatch"`` field of the line it was read from (the worker's
            identity, see :mod:`hangwatch._worker`), or None for torch's clients.
    """

    __slots__ = ("hangwatch", "signal")

    def __init__(self, worker_pid: int, scope_id: str, expiration_time: float, signal: int = 0) -> None:
        super().__init__(worker_id=worker_pid, scope_id=scope_id, expiration_time=expiration_time)
        self.signal = signal
        self.hangwatch: Any = None

    @property
    def version(self) -> int:
        """The wire format's version: 1, the only one there is (a class constant, so a held timer costs less)."""
        return 1

    @property
    def worker_pid(self) -> int:
        """The worker's pid (the same as ``worker_id``)."""
        return int(self.worker_id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FileTimerRequest):
            return super().__eq__(other) and self.signal == other.signal
        return False

    __hash__ = None

    def __repr__(self) -> str:
        return (
            f"FileTimerRequest(worker_pid={self.worker_id!r}, scope_id={self.scope_id!r}, "
            f"expiration_time={self.expiration_time!r}, signal={self.signal!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker_id, self.scope_id, self.expiration_time, self.signal))

    def to_json(self) -> str:
        """The request as one line of the wire format (without the newline)."""
        return json.dumps(
            {
                "version": self.version,
                "pid": self.worker_id,
                "scope_id": self.scope_id,
                "expiration_time": self.expiration_time,
                "signal": self.signal,
            }
        )


# ------------------------------------------------------------------------------------ client


class _DefaultSignal(int):
    """SIGKILL, as the default of FileTimerClient's ``signal``: "the server's reap policy decides"."""

    def __repr__(self) -> str:
        return "SIGKILL"


_SERVER_DECIDES = _DefaultSignal(_signal.SIGKILL)
_LONGEST_TIME = len(repr(-1.7976931348623157e308))  # the longest repr of a float


# The wire format, built by hand: the same JSON as torch's, at a fraction of the cost. An acquire
# line is this head, the time's repr, then the client's tail (signal and identity).
def _acquire_head(pid: int, scope_json: str) -> str:
    return f'{{"version": 1, "pid": {pid}, "scope_id": {scope_json}, "expiration_time": '


def _release_line(pid: int, scope_json: str) -> str:
    return f'{{"version": 1, "pid": {pid}, "scope_id": {scope_json}, "expiration_time": -1, "signal": 0}}\n'


class FileTimerClient(GuardCache, TimerClient):
    """Client side of :class:`FileTimerServer`: writes requests to the server's FIFO.

    Works with hangwatch's server and with torch's. Safe to share between threads and to
    inherit across ``fork`` (each process opens its own descriptor).

    Args:
        file_path: the FIFO the server created.
        signal: the signal that reaps this worker; <= 0 means the timer expires (an event)
            but the worker is not signalled. Left at its default (SIGKILL), a hangwatch
            server applies its own reap policy (SIGKILL unless configured otherwise);
            given explicitly, it is the one signal sent, as torch's.
        dump_signal: the signal on which this worker writes its all-thread stack for the
            server before a reap (default SIGUSR2); None for no stack dumps.
        reap_policy: how this worker is reaped by a hangwatch server (overrides ``signal``;
            torch's server receives the policy's first signal).
        keep_open: keep the pipe open between requests. Default: only when the server is a
            hangwatch server (never keep it open to torch's server, which would stop reaping).
        connect_timeout: how long to wait for a server to appear when opening the pipe.
        send_timeout: how long to wait for the server to drain a full pipe before failing.

    Raises:
        ValueError: a timeout is not a finite number > 0, ``signal`` is not an int, or
            ``dump_signal`` cannot carry stack dumps.
        TypeError: ``reap_policy`` is not a ReapPolicy.
    """

    accepts_reap_policy = True
    accepts_learn = True

    def __init__(
        self,
        file_path: str,
        signal: Union[int, _signal.Signals] = _SERVER_DECIDES,
        *,
        keep_open: Optional[bool] = None,
        connect_timeout: float = 1.0,
        send_timeout: float = 60.0,
        dump_signal: Union[int, _signal.Signals, None] = DEFAULT_DUMP_SIGNAL,
        reap_policy: Optional[ReapPolicy] = None,
    ) -> None:
        super().__init__()
        if isinstance(signal, bool) or not isinstance(signal, int):
            raise ValueError(f"signal must be a signal number (<= 0: do not signal) (got {signal!r})")
        if signal > 0 and signal not in VALID_SIGNALS:
            raise ValueError(f"signal {signal} is not a signal number of this system (<= 0: do not signal)")
        self._file_path = os.fspath(file_path)
        self._server_decides = signal is _SERVER_DECIDES
        self.signal = int(signal)
        self._dump_signal = check_dump_signal(dump_signal)
        self._reap_policy = check_policy(reap_policy)
        self._keep_open = keep_open
        self._connect_timeout = _check_interval("connect_timeout", connect_timeout)
        self._send_timeout = _check_interval("send_timeout", send_timeout)
        self._fd = -1  # the persistent descriptor, owned by the process self._fd_pid
        self._fd_pid = -1
        self._retired: List[int] = []
        self._lock = threading.Lock()
        _CLIENTS.add(self)
        self._scopes: Dict[str, str] = {}
        self._tail_pid = -1
        self._acquire_tail = ""
        self._init_guards()

    @property
    def _fast_guards(self) -> bool:
        """Whether :func:`hangwatch.expires` may hand out cached guards (acquire/release not overridden)."""
        cls = type(self)
        return cls.acquire is FileTimerClient.acquire and cls.release is FileTimerClient.release

    def _new_guard(self, scope: str, after: float, code: Any) -> LineGuard:
        return LineGuard(self, after, scope, code, self._wire_for, self._send_data)

    def _wire_for(self, scope: str) -> Wire:
        """A guard's lines for ``scope`` from this process: the acquire split around its time, the release."""
        pid = os.getpid()
        if self._tail_pid != pid:
            self.register_dump_handler()
        scope_json = self._scope_json(scope)
        head = _acquire_head(pid, scope_json)
        tail = self._acquire_tail
        if len(head.encode()) + len(tail.encode()) + _LONGEST_TIME >= PIPE_BUF:
            return (pid, None, None, None)  # acquire() says what is wrong
        return (pid, head, tail, _release_line(pid, scope_json).encode())

    def _scope_json(self, scope_id: str) -> str:
        encoded = self._scopes.get(scope_id)
        if encoded is None:
            if not isinstance(scope_id, str):
                raise TypeError(f"scope_id must be a str (got {scope_id!r})")
            encoded = json.dumps(scope_id)
            if len(self._scopes) < 4096:
                self._scopes[scope_id] = encoded
        return encoded

    def _tail(self, policy: Optional[ReapPolicy], learn: Optional[bool] = None) -> str:
        """The end of an acquire line: the signal and this process's identity."""
        signum = self.signal
        if policy is not None:
            signum = policy.signals[0] if policy.signals else 0
        ext = identity(self._dump_signal, policy, server_policy=self._server_decides, learn=learn)
        return f', "signal": {signum}, "hangwatch": {json.dumps(ext, separators=(",", ":"))}}}\n'

    def register_dump_handler(self) -> None:
        """Register this process's stack-dump handler now (:func:`hangwatch.configure` does; so does the first acquire).

        A signal that already has a handler of the application is left alone (logged once).
        """
        self._acquire_tail = self._tail(self._reap_policy)
        self._tail_pid = os.getpid()

    def acquire(
        self,
        scope_id: str,
        expiration_time: float,
        reap_policy: Optional[ReapPolicy] = None,
        learn: Optional[bool] = None,
    ) -> None:
        """Ask the server to reap this worker at ``expiration_time`` unless ``scope_id`` is released.

        Args:
            scope_id: the timer's name within this worker.
            expiration_time: absolute ``time.time()`` seconds.
            reap_policy: how to reap this worker if this timer expires (default: the client's).
            learn: whether the server may learn this timer's deadline (default: the server's choice).

        Raises:
            ServerUnavailableError: no server reads the FIFO (a BrokenPipeError).
            ValueError: the request would be longer than PIPE_BUF bytes, or the time is not finite.
        """
        if not math.isfinite(expiration_time):
            raise ValueError(f"expiration_time must be a finite time.time() value (got {expiration_time!r})")
        pid = os.getpid()
        if reap_policy is not None or learn is not None:
            tail = self._tail(check_policy(reap_policy) or self._reap_policy, learn)
        else:
            if self._tail_pid != pid:
                self.register_dump_handler()
            tail = self._acquire_tail
        self._send(_acquire_head(pid, self._scope_json(scope_id)) + repr(float(expiration_time)) + tail)

    def release(self, scope_id: str) -> None:
        """Release this worker's timer ``scope_id``.

        Raises:
            ServerUnavailableError: no server reads the FIFO (a BrokenPipeError).
        """
        self._send(_release_line(os.getpid(), self._scope_json(scope_id)))

    def close(self) -> None:
        """Close the pipe descriptor, if open (the next request opens it again).

        Do not call it while other threads of this process are sending with this client.
        """
        with self._lock:
            if self._fd >= 0 and self._fd_pid == os.getpid():
                self._retired.append(self._fd)
            self._fd = -1
            retired, self._retired = self._retired, []
        for fd in retired:
            os.close(fd)

    def _send(self, line: str) -> None:
        data = line.encode()
        if len(data) > PIPE_BUF:
            raise ValueError(
                f"timer request is {len(data)} bytes, more than PIPE_BUF ({PIPE_BUF}); use a shorter scope_id"
            )
        self._send_data(data)

    def _send_data(self, data: bytes) -> None:
        """Send one line of at most PIPE_BUF bytes."""
        fd = self._fd
        if fd >= 0 and self._fd_pid == os.getpid():
            try:
                self._write(fd, data)
                return
            except ServerUnavailableError:
                raise
            except BrokenPipeError:
                self._retire(fd)  # that server went away; a new one may be reading the path now
        fd, persistent = self._open()
        try:
            self._write(fd, data)
        except ServerUnavailableError:
            raise
        except BrokenPipeError as exc:
            if persistent:
                self._retire(fd)
            raise ServerUnavailableError(
                errno.EPIPE, f"the timer server reading {self._file_path} has gone away (was it stopped?)"
            ) from exc
        finally:
            if not persistent:
                os.close(fd)

    def _write(self, fd: int, data: bytes) -> None:
        try:
            os.write(fd, data)  # at most PIPE_BUF bytes on a pipe: all or nothing
            return
        except BlockingIOError:
            pass
        # The pipe is full: wait for the server to drain it, bounded.
        deadline = time.monotonic() + self._send_timeout
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailableError(
                    errno.ETIMEDOUT,
                    f"the timer server reading {self._file_path} did not drain its pipe within "
                    f"{self._send_timeout:g} s; it may be wedged",
                )
            poller.poll(min(remaining, 1.0) * 1000)
            try:
                os.write(fd, data)
                return
            except BlockingIOError:
                continue

    def _retire(self, fd: int) -> None:
        # Not closed now: another thread may be writing to it, and a closed number can be reused
        # by an unrelated file. Retired descriptors are closed by close().
        with self._lock:
            if self._fd == fd:
                self._fd = -1
                self._retired.append(fd)

    def _open(self) -> Tuple[int, bool]:
        """Open the FIFO: (fd, persistent). A persistent fd is shared; any other is the caller's to close."""
        with self._lock:
            pid = os.getpid()
            if self._fd >= 0:
                if self._fd_pid == pid:
                    return self._fd, True
                # Inherited across fork: this process gets its own descriptor.
                os.close(self._fd)
                self._fd = -1
            deadline = time.monotonic() + self._connect_timeout
            while True:
                try:
                    fd = os.open(self._file_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.ENXIO, errno.ENOENT) or time.monotonic() >= deadline:
                        raise ServerUnavailableError(
                            errno.EPIPE,
                            f"no timer server is reading {self._file_path} ({exc.strerror}); start a "
                            f"FileTimerServer on that path before the workers",
                        ) from exc
                    time.sleep(0.02)
            st = os.fstat(fd)
            mode = st.st_mode
            if not stat.S_ISFIFO(mode):
                os.close(fd)
                raise ServerUnavailableError(
                    errno.EPIPE, f"{self._file_path} is not a FIFO; is file_path the server's path?"
                )
            if st.st_uid not in (os.geteuid(), 0):
                os.close(fd)
                raise ServerUnavailableError(
                    errno.EPERM,
                    f"{self._file_path} belongs to uid {st.st_uid}, not to this user: refusing to send timer "
                    f"requests to another user's FIFO",
                )
            persistent = bool(mode & _MARK) if self._keep_open is None else self._keep_open
            if persistent:
                self._fd, self._fd_pid = fd, pid
            return fd, persistent


def _reset_locks_after_fork() -> None:
    for client in list(_CLIENTS):
        client._lock = threading.Lock()


_CLIENTS: weakref.WeakSet[FileTimerClient] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_after_fork)


# ------------------------------------------------------------------------------------ server side


# The exact shape of the lines hangwatch's client and torch's write (json.dumps' separators,
# torch's key order; hangwatch's optional field last). A line of this shape is decoded without
# the JSON parser; any other line, even one that is valid JSON, takes the full path below.
_CANONICAL = re.compile(
    rb'\{"version": 1, "pid": ([1-9][0-9]{0,9}), "scope_id": "((?:[^"\\\x00-\x1f]|\\[^\x00-\x1f])*)", '
    rb'"expiration_time": (-?(?:0|[1-9][0-9]{0,19})(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?), '
    rb'"signal": (-?[0-9]{1,3})(?:, "hangwatch": (\{.*\}))?\}'
)
# The "hangwatch" fields seen lately (a worker sends the same one with every acquire), decoded.
_FIELDS: Dict[bytes, Any] = {}
_MAX_FIELDS = 1024


def _parse_canonical(line: bytes) -> Optional[FileTimerRequest]:
    """Decode a line of the canonical shape, or return None (the caller then takes the full path)."""
    match = _CANONICAL.fullmatch(line)
    if match is None:
        return None
    pid_b, scope_b, expiration_b, signal_b, field_b = match.groups()
    try:
        scope = json.loads(b'"' + scope_b + b'"') if b"\\" in scope_b else scope_b.decode()
    except ValueError:  # a bad escape, or not UTF-8
        return None
    if expiration_b == b"-1":
        expiration: float = -1
    elif b"." in expiration_b or b"e" in expiration_b or b"E" in expiration_b:
        expiration = float(expiration_b)
        if not math.isfinite(expiration):
            return None
    else:
        expiration = int(expiration_b)
    signum = int(signal_b)
    if signum > 0 and signum not in VALID_SIGNALS:
        return None
    field = None
    if field_b is not None:
        field = _FIELDS.get(field_b)
        if field is None:
            try:
                field = json.loads(field_b)
            except (ValueError, RecursionError):
                return None  # e.g. more keys after it: the full parser decides
            if not isinstance(field, dict):
                return None
            if len(_FIELDS) >= _MAX_FIELDS:
                _FIELDS.clear()
            _FIELDS[field_b] = field
    request = FileTimerRequest(int(pid_b), scope, expiration, signum)
    request.hangwatch = field
    return request


def _parse_line(line: bytes) -> Tuple[Optional[FileTimerRequest], str]:
    """Decode one line of the wire format: (request, "") or (None, why it was refused)."""
    request = _parse_canonical(line)
    if request is not None:
        return request, ""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    version = obj.get("version", 1)
    if version != 1 or isinstance(version, bool):
        return None, f"unsupported version {version!r} (this server speaks version 1)"
    pid, scope, expiration, signum = (obj.get(k) for k in ("pid", "scope_id", "expiration_time", "signal"))
    if isinstance(pid, bool) or not isinstance(pid, int):
        return None, f"pid must be an int (got {pid!r})"
    if not isinstance(scope, str):
        return None, f"scope_id must be a string (got {scope!r})"
    if isinstance(expiration, bool) or not isinstance(expiration, (int, float)) or not math.isfinite(expiration):
        return None, f"expiration_time must be a finite number (got {expiration!r})"
    if isinstance(signum, bool) or not isinstance(signum, int):
        return None, f"signal must be an int (got {signum!r})"
    if signum > 0 and signum not in VALID_SIGNALS:
        return None, f"signal {signum} is not a signal number of this system (<= 0: do not signal)"
    request = FileTimerRequest(pid, scope, expiration, signum)
    request.hangwatch = obj.get("hangwatch")
    return request, ""


# How every line of the wire format starts (torch's json.dumps and hangwatch's client alike).
_LINE_START = b'{"version"'


class _FifoRequestQueue(RequestQueue):
    """Reads and decodes the FIFO; refuses bad lines one by one, keeping the good ones around them."""

    def __init__(self, fd: int, on_bad_line: Callable[[bytes, str], None]) -> None:
        super().__init__()
        self._fd = fd
        self._on_bad_line = on_bad_line
        self._buffer = b""
        self._discarding = False  # inside an over-long line, skipping to its end
        self._ready: Deque[FileTimerRequest] = deque()

    def fileno(self) -> int:
        """The FIFO's read end."""
        return self._fd

    def size(self) -> int:
        """How many decoded requests are waiting (reads what the pipe holds, without blocking)."""
        self._read_available()
        return len(self._ready)

    def get(self, size: int, timeout: float) -> List[TimerRequest]:
        """Up to ``size`` requests, waiting at most ``timeout`` seconds when none is waiting."""
        return wait_and_take(self._fd, self._ready, self._read_available, size, timeout)

    def _read_available(self) -> None:
        data = read_available(self._fd)
        if data:
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        data = self._buffer + data
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if self._discarding:  # the end of an over-long line (reported): only what follows it may count
                self._discarding = False
                self._salvage(line, None)
                continue
            if not line.strip():
                continue
            if len(line) >= PIPE_BUF:
                self._salvage(line, f"line of {len(line) + 1} bytes, longer than PIPE_BUF ({PIPE_BUF})")
                continue
            request, reason = _parse_line(line)
            if request is None:
                self._salvage(line, reason)
            else:
                self._ready.append(request)
        if len(self._buffer) >= PIPE_BUF:
            # An over-long line so far: drop it, but keep what may be the start of a request glued after it.
            start = self._buffer.rfind(_LINE_START)
            if not self._discarding:
                self._on_bad_line(self._buffer[:200], f"line longer than PIPE_BUF ({PIPE_BUF}); skipped")
            if start > 0 and len(self._buffer) - start < PIPE_BUF:
                self._buffer = self._buffer[start:]
                self._discarding = False
            else:
                self._buffer = b""
                self._discarding = True

    def _salvage(self, line: bytes, reason: Optional[str]) -> None:
        """Refuse a line, but keep a whole request at its end: what a torn fragment glued itself to.

        A writer that dies or stalls in the middle of a line leaves a fragment with no
        newline, and the next writer's line (one atomic write, as every client writes,
        hangwatch's and torch's alike, each starting with ``{"version"``) lands right after
        it. So the last ``{"version"`` of a refused line that parses on its own is that
        request, and only what stands before it is refused. ``reason`` None: the line's
        start was already reported.
        """
        start = line.rfind(_LINE_START)
        if start > 0 or (start == 0 and reason is None):  # after a dropped start, a request may open the line
            request, _ = _parse_line(line[start:]) if len(line) - start < PIPE_BUF else (None, "")
            if request is not None:
                if reason is not None:
                    self._on_bad_line(
                        line[: min(start, 200)],
                        "an incomplete line (its writer died or stalled before its end); "
                        "the request written after it is kept",
                    )
                self._ready.append(request)
                return
        if reason is not None:
            self._on_bad_line(line[:200], reason)


class FileTimerServer(PidTimerServer):
    """Server side of :class:`FileTimerClient` (and of torch's): creates a FIFO and reaps from it.

    Accepts torch 2.1's form ``FileTimerServer(file_path, max_interval=10, daemon=True,
    log_event=None)`` and torch 2.2+'s ``FileTimerServer(file_path, run_id, max_interval=10,
    daemon=True, log_event=None)``.

    The FIFO is created at once (readable by this server only, mode 0600), so clients may
    connect before :meth:`start`; it is removed by :meth:`stop`. An existing FIFO at the
    path is replaced; any other existing file is an error.

    How an expired worker is reaped: a torch client's request names one signal, which is
    sent (the first expired timer with a signal > 0, as torch's), after the stack dump if
    the worker registered one. A hangwatch client that did not choose a signal gets the
    server's ``reap_policy``; one that chose a policy gets that. Unlike torch's, this
    server never signals its own process, unless ``signal_self=True`` asks for torch's
    behaviour.

    Args:
        file_path: where to create the FIFO.
        run_id: the job's run id (torch 2.2+), reported in the log.
        max_interval: the longest one wait of the watchdog, in seconds.
        daemon: whether the watchdog thread is a daemon thread.
        log_event: optional ``log_event(name, request)`` callback, called with torch's event names.
        reap_policy: the server's reap policy (default: stack dump if registered, then SIGKILL);
            its ``grace``, ``dump`` and ``dump_timeout`` also apply to torch clients' signals.
        allowed_pids: if given, only these pids are ever signalled (see ``set_allowed_pids``).
        children_only: reap only this process's children and their descendants (a launcher
            such as torch's agent starts every worker as its direct child); a request naming
            any other pid is refused.
        event_file: append every event to this file as JSON lines.
        on_event: called with every :class:`~hangwatch.Event`.
        signal_self: torch's behaviour: after reaping a worker, send the same signal to this
            server's own process (usually ending it). Off by default.
        limits: what one client may cost this server (default :class:`~hangwatch.Limits`).
        pin: how a worker is pinned and signalled (tests pass a recorder).
        statistics: keep per-scope figures of the released blocks (:meth:`scope_statistics`):
            True, or a :class:`~hangwatch.ScopeStatistics` shared with other servers.
        near_miss: with ``statistics``, the fraction of its budget above which a released
            block gives a ``near miss`` event (default 0.8); None for none.
        learn: learn each scope's deadline from its blocks (:class:`~hangwatch.Learning`).

    Raises:
        FileExistsError: something other than a FIFO exists at ``file_path``.
        ValueError: ``max_interval`` is not a finite number > 0.
        OSError: the FIFO cannot be created.
    """

    @overload
    def __init__(
        self,
        file_path: str,
        max_interval: float = 10,
        daemon: bool = True,
        log_event: Optional[Callable[[str, Optional[FileTimerRequest]], None]] = None,
        *,
        reap_policy: Optional[ReapPolicy] = None,
        allowed_pids: Optional[Iterable[int]] = None,
        children_only: bool = False,
        event_file: Union[str, os.PathLike[str], None] = None,
        on_event: Optional[EventSink] = None,
        signal_self: bool = False,
        limits: Optional[Limits] = None,
        pin: Callable[[int], ProcessPin] = ProcessPin,
        statistics: Union[bool, ScopeStatistics] = False,
        near_miss: Optional[float] = 0.8,
        learn: Optional[Learning] = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        file_path: str,
        run_id: str,
        max_interval: float = 10,
        daemon: bool = True,
        log_event: Optional[Callable[[str, Optional[FileTimerRequest]], None]] = None,
        *,
        reap_policy: Optional[ReapPolicy] = None,
        allowed_pids: Optional[Iterable[int]] = None,
        children_only: bool = False,
        event_file: Union[str, os.PathLike[str], None] = None,
        on_event: Optional[EventSink] = None,
        signal_self: bool = False,
        limits: Optional[Limits] = None,
        pin: Callable[[int], ProcessPin] = ProcessPin,
        statistics: Union[bool, ScopeStatistics] = False,
        near_miss: Optional[float] = 0.8,
        learn: Optional[Learning] = None,
    ) -> None: ...

    def __init__(self, file_path: str, *args: Any, **kwargs: Any) -> None:
        signal_self = kwargs.pop("signal_self", False)
        if not isinstance(signal_self, bool):
            raise TypeError(f"signal_self must be True or False (got {signal_self!r})")
        extras = {k: kwargs.pop(k) for k in list(kwargs) if k in _SERVER_EXTRAS}
        run_id, max_interval, daemon, log_event = _server_args(args, kwargs)
        self._file_path = os.fspath(file_path)
        self._run_id = run_id
        self._signal_self = signal_self
        self._torch_policies: Dict[int, ReapPolicy] = {}
        read_fd, self._write_fd, self._fifo_id = _create_fifo(self._file_path)
        try:
            super().__init__(_FifoRequestQueue(read_fd, self._bad_line), max_interval, daemon, log_event, **extras)
        except BaseException:
            self._close_fifo(read_fd)
            raise
        self._read_fd = read_fd
        self._closed = False

    def _bad_line(self, line: bytes, reason: str) -> None:
        self._events.emit("bad request", reason=reason, line=line.decode("utf-8", "replace"))

    def _default_policy(self, request: TimerRequest) -> ReapPolicy:
        """A torch-style request: its own signal (none if <= 0), with the server's grace and dump settings."""
        signum = int(getattr(request, "signal", 0))
        policy = self._torch_policies.get(signum)
        if policy is None:
            base = self._reap_policy
            policy = ReapPolicy(
                (signum,) if signum > 0 else (), base.grace, dump=base.dump, dump_timeout=base.dump_timeout
            )
            if len(self._torch_policies) < 64:
                self._torch_policies[signum] = policy
        return policy

    def _after_first_signal(self, pid: int, signum: int) -> None:
        if self._signal_self:
            self._events.emit(
                "kill server process",
                worker=pid,
                signal=signal_name(signum),
                reason="signal_self=True (torch's behaviour): the server signals its own process after a reap",
            )
            os.kill(os.getpid(), signum)

    def _reap_worker(self, worker_id: Any, signal: int = _signal.SIGKILL) -> bool:
        """Signal the worker (default SIGKILL) through its pin, at once; True when done or already gone."""
        return self._signal_now(worker_id, int(signal))

    def start(self) -> None:
        """Start the watchdog thread and return at once.

        Raises:
            RuntimeError: the server is running, or was stopped (its FIFO is gone: create a new server).
        """
        if self._closed:
            raise RuntimeError(
                f"this FileTimerServer was stopped and its FIFO {self._file_path} removed; create a new one"
            )
        logger.info("FileTimerServer run_id=%r reading %s", self._run_id, self._file_path)
        super().start()

    def _on_stopped(self) -> None:
        self._closed = True
        self.close_pins()
        self._close_fifo(self._read_fd)
        super()._on_stopped()

    def _close_fifo(self, read_fd: int) -> None:
        for fd in (read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            st = os.lstat(self._file_path)
            if (st.st_dev, st.st_ino) == self._fifo_id:  # remove it only if it is still ours
                os.unlink(self._file_path)
        except FileNotFoundError:
            pass

    @property
    def file_path(self) -> str:
        """The FIFO's path."""
        return self._file_path

    def __repr__(self) -> str:
        return f"FileTimerServer({self._file_path!r}, run_id={self._run_id!r})"


_SERVER_EXTRAS = frozenset(
    {
        "reap_policy",
        "allowed_pids",
        "children_only",
        "event_file",
        "on_event",
        "limits",
        "pin",
        "statistics",
        "near_miss",
        "learn",
    }
)


def _server_args(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[str, float, bool, Any]:
    """Sort torch 2.1's and 2.2+'s positional forms into (run_id, max_interval, daemon, log_event)."""
    values: Dict[str, Any] = {"run_id": "", "max_interval": 10, "daemon": True, "log_event": None}
    names = ["max_interval", "daemon", "log_event"]
    if args and isinstance(args[0], str):
        names = ["run_id", *names]
    if len(args) > len(names):
        raise TypeError(f"FileTimerServer takes at most {len(names) + 1} positional arguments ({len(args) + 1} given)")
    for name, value in zip(names, args):
        values[name] = value
    for name, value in kwargs.items():
        if name not in values:
            raise TypeError(f"FileTimerServer got an unexpected keyword argument {name!r}")
        if name in names[: len(args)]:
            raise TypeError(f"FileTimerServer got multiple values for argument {name!r}")
        values[name] = value
    log_event = values["log_event"]
    if log_event is not None and not callable(log_event):
        raise TypeError(f"log_event must be callable or None (got {log_event!r})")
    return str(values["run_id"]), values["max_interval"], bool(values["daemon"]), log_event


def _create_fifo(path: str) -> Tuple[int, int, Tuple[int, int]]:
    """Create the FIFO (mode 0600 + the hangwatch mark) and open it: (read fd, write fd, (dev, ino))."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISFIFO(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                f"{path} exists and is not a FIFO; refusing to replace it: remove it or choose another file_path",
            )
        os.unlink(path)  # a FIFO left by an earlier server, as torch replaces it
    try:
        os.mkfifo(path, 0o600)  # at most 0600 whatever the umask; the mark is set through the descriptor below
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            exc.errno, f"cannot create the timer FIFO {path}: its directory does not exist"
        ) from None
    # Our own write end keeps the pipe from reporting end-of-file when the last client closes.
    # O_NOFOLLOW and the checks on the descriptor: the path is never trusted twice.
    read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        write_fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        st = os.fstat(read_fd)
        if (
            not stat.S_ISFIFO(st.st_mode)
            or st.st_uid != os.geteuid()
            or (st.st_dev, st.st_ino) != _identity(os.fstat(write_fd))
        ):
            os.close(write_fd)
            raise OSError(errno.EPERM, f"{path} was replaced while it was being created; not using it")
        os.fchmod(read_fd, 0o600 | _MARK)
    except BaseException:
        os.close(read_fd)
        raise
    return read_fd, write_fd, (st.st_dev, st.st_ino)


def _identity(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino
