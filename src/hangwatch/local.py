"""The multiprocessing-queue pair: LocalTimerServer, LocalTimerClient, MultiprocessingRequestQueue.

Workers are subprocesses of the process running the server, started with spawn,
fork or forkserver, and identified by pid. Pass the same ``multiprocessing`` queue
(from the context you start the workers with) to the server and to each worker's
client.
"""

from __future__ import annotations

import errno
import io
import multiprocessing.queues
import os
import pickle
import queue as _queue
import select
import signal
import struct
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple, Union

from ._guards import GuardCache, PickleGuard, Wire
from ._pidserver import PidTimerServer
from ._pipe import read_available, wait_and_take
from ._reaper import ProcessPin, ReapPolicy, check_policy
from ._worker import DEFAULT_DUMP_SIGNAL, check_dump_signal, identity
from .api import RequestQueue, ServerUnavailableError, TimerClient, TimerRequest, _check_interval
from .events import EventSink
from .learn import Learning, ScopeStatistics
from .limits import Limits

__all__ = ["LocalTimerClient", "LocalTimerServer", "MultiprocessingRequestQueue", "WorkerRequest"]


def _check_queue(mp_queue: Any, *methods: str) -> None:
    missing = [m for m in methods if not callable(getattr(mp_queue, m, None))]
    if missing:
        raise TypeError(
            f"mp_queue must be a multiprocessing queue, e.g. multiprocessing.get_context('spawn').Queue() "
            f"(got {type(mp_queue).__name__}, which has no {', '.join(missing)}())"
        )


_frame_length = struct.Struct("!i").pack


class _QueueWriter:
    """Puts requests on a ``multiprocessing.Queue`` synchronously, without its feeder thread.

    ``Queue.put`` hands the object to a feeder thread, which needs the GIL to write it: a
    worker that acquires a timer and then hangs in C code holding the GIL (a runaway
    regex, a ctypes call) would never send its request, and nothing would reap it. This
    writer pickles and writes the request in the calling thread, in the queue's own
    message format and under its semaphore, so the queue stays consistent for every
    other user (see :meth:`put_pickled` for its write lock). It writes through a
    non-blocking descriptor of its own for the pipe (opened through /proc, so the queue's
    descriptor stays blocking for everyone else); when the pipe is full it waits for the
    server to drain it, up to ``send_timeout``. Queues of other types (a manager's proxy, a JoinableQueue) use
    their own ``put``.
    """

    __slots__ = ("_direct", "_fd", "_fd_pid", "_queue", "_send_timeout")

    def __init__(self, mp_queue: Any, send_timeout: float) -> None:
        self._queue = mp_queue
        self._send_timeout = send_timeout
        self._direct = type(mp_queue) is multiprocessing.queues.Queue and all(
            hasattr(mp_queue, a) for a in ("_writer", "_wlock", "_sem", "_closed")
        )
        self._fd = -1
        self._fd_pid = -1

    def _nonblocking_fd(self) -> int:
        """This process's non-blocking descriptor for the queue's pipe (-1 where /proc cannot give one)."""
        pid = os.getpid()
        if self._fd_pid != pid:
            self._fd_pid = pid
            self._fd = -1  # inherited across fork: the parent's to close
            try:
                self._fd = os.open(
                    f"/proc/self/fd/{self._queue._writer.fileno()}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                )
            except OSError:
                pass
        return self._fd

    @property
    def direct(self) -> bool:
        """Whether requests are written here (True) or handed to the queue's own ``put``."""
        return self._direct

    def put(self, obj: Any) -> None:
        """Send one object."""
        if not self._direct:
            self._queue.put(obj)
            return
        self.put_pickled(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))

    def put_pickled(self, data: bytes) -> None:
        """Send one already pickled object (only when :attr:`direct`).

        A message of at most ``PIPE_BUF`` bytes (every request of a hangwatch client with a
        scope name of reasonable length) is one atomic write and takes no lock: a writer
        killed at any moment cannot leave the queue's write lock held and block the other
        writers, as happens to ``multiprocessing.Queue`` users. Longer messages are written
        under the queue's write lock, as ``Queue.put`` does.
        """
        q = self._queue
        if q._closed:
            raise ValueError(f"Queue {q!r} is closed")
        message = _frame_length(len(data)) + data  # multiprocessing.Connection's framing
        sem = q._sem
        deadline = 0.0  # set when the request has to wait: send_timeout bounds the whole wait
        if not sem.acquire(False):
            deadline = time.monotonic() + self._send_timeout
            if not sem.acquire(True, self._send_timeout):
                raise ServerUnavailableError(errno.ETIMEDOUT, "the timer queue stayed full; is the server running?")
        try:
            if len(message) <= select.PIPE_BUF:
                fd = self._fd if self._fd_pid == os.getpid() else self._nonblocking_fd()
                if fd >= 0:
                    try:
                        os.write(fd, message)  # at most PIPE_BUF bytes on a pipe: all or nothing
                    except BlockingIOError:
                        self._write(fd, message, deadline or time.monotonic() + self._send_timeout)
                    return
            self._write_locked(q, data, deadline or time.monotonic() + self._send_timeout)
        except BaseException:
            sem.release()  # not sent: the server will not release it
            raise

    def _write_locked(self, q: Any, data: bytes, deadline: float) -> None:
        wlock = q._wlock
        if wlock is not None and not wlock.acquire(True, self._send_timeout):
            raise ServerUnavailableError(
                errno.ETIMEDOUT,
                "another writer held the timer queue's lock too long (a writer killed while writing leaves it "
                "held for good: use the FIFO or shared-memory pair, or scope names under ~3 KB)",
            )
        try:
            self._wait_writable(q._writer.fileno(), deadline)
            q._writer.send_bytes(data)
        finally:
            if wlock is not None:
                wlock.release()

    def _write(self, fd: int, message: bytes, deadline: float) -> None:
        while True:
            try:
                os.write(fd, message)  # at most PIPE_BUF bytes on a pipe: all or nothing
                return
            except BlockingIOError:
                self._wait_writable(fd, deadline)

    def _wait_writable(self, fd: int, deadline: float) -> None:
        while not select.select([], [fd], [], max(0.0, deadline - time.monotonic()))[1]:
            if time.monotonic() >= deadline:
                raise ServerUnavailableError(
                    errno.ETIMEDOUT,
                    f"the timer server did not drain its queue within {self._send_timeout:g} s; "
                    f"it may be stopped or wedged",
                )


# A float no caller sends, marking where the expiration time goes in a pickled acquire.
_MARK_TIME = 1.2345678901234567e300
_MARK_BYTES = b"G" + struct.pack(">d", _MARK_TIME)  # pickle's BINFLOAT: opcode + 8 bytes big-endian
_CACHE_SCOPES = 4096


def _acquire_template(request: TimerRequest) -> Optional[Tuple[bytes, bytes]]:
    """Split the pickle of ``request`` (whose time is the mark) around its time, or None if it cannot be.

    An acquire then costs a ``struct.pack`` instead of a pickling. Checked once by unpickling.
    """
    return _split_at_time(pickle.dumps(request, pickle.HIGHEST_PROTOCOL), request)


def _split_at_time(data: bytes, request: TimerRequest) -> Optional[Tuple[bytes, bytes]]:
    """Split ``data``, the pickle of ``request``, around the 8 bytes of its float time: (head, tail), or None.

    The head ends with the BINFLOAT opcode. Checked by unpickling the split with another time:
    it must give the same request (identity included) with that time.
    """
    cls = type(request)
    if cls not in _TEMPLATE_TYPES or type(request.expiration_time) is not float:
        return None
    time_bytes = b"G" + _pack_time(request.expiration_time)
    if data.count(time_bytes) != 1:
        return None
    head, tail = data.split(time_bytes)
    head += b"G"
    try:
        probe = pickle.loads(head + _pack_time(1.5) + tail)
    except Exception:  # those bytes were not the time after all
        return None
    if type(probe) is not cls or probe != cls(request.worker_id, request.scope_id, 1.5):
        return None
    if cls is WorkerRequest and probe.hangwatch != request.hangwatch:  # type: ignore[attr-defined]
        return None
    return head, tail


_pack_time = struct.Struct(">d").pack
_unpack_time = struct.Struct(">d").unpack_from


class WorkerRequest(TimerRequest):
    """A :class:`TimerRequest` that also carries the worker's identity (``hangwatch``, see :mod:`hangwatch._worker`).

    Torch's servers read only the three torch fields.
    """

    __slots__ = ("hangwatch",)

    def __init__(self, worker_id: Any, scope_id: str, expiration_time: float, hangwatch: Any = None) -> None:
        super().__init__(worker_id, scope_id, expiration_time)
        self.hangwatch = hangwatch

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker_id, self.scope_id, self.expiration_time, self.hangwatch))


# The request types whose pickles are split around their time (the client's acquire, the server's known frames).
_TEMPLATE_TYPES = (TimerRequest, WorkerRequest)


class LocalTimerClient(GuardCache, TimerClient):
    """Client side of :class:`LocalTimerServer`: sends requests on a multiprocessing queue.

    Identifies the worker by ``os.getpid()`` at each request, so one client object can be
    inherited across ``fork``. Each acquire also carries the worker's start time (so a
    recycled pid is never mistaken for it) and, on Linux, the stack-dump handler it
    registers (see :meth:`register_dump_handler`).

    Requests are written in the calling thread (not by the queue's feeder thread), so
    a worker that hangs right after ``acquire`` while holding the GIL is still reaped.

    Args:
        mp_queue: the queue given to the server.
        dump_signal: the signal on which this worker writes its all-thread stack for the
            server before a reap (default SIGUSR2); None for no stack dumps.
        reap_policy: how this worker is reaped (default: the server's policy).
        send_timeout: how long a request may wait for room in a full queue before
            :class:`~hangwatch.ServerUnavailableError` is raised.

    Raises:
        TypeError: ``mp_queue`` is not a queue, or ``reap_policy`` is not a ReapPolicy.
        ValueError: ``dump_signal`` cannot carry stack dumps, or ``send_timeout`` is not > 0.
    """

    accepts_reap_policy = True
    accepts_learn = True

    def __init__(
        self,
        mp_queue: Any,
        *,
        dump_signal: Union[int, signal.Signals, None] = DEFAULT_DUMP_SIGNAL,
        reap_policy: Optional[ReapPolicy] = None,
        send_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        _check_queue(mp_queue, "put")
        self._mp_queue = mp_queue
        self._writer = _QueueWriter(mp_queue, _check_interval("send_timeout", send_timeout))
        self._dump_signal = check_dump_signal(dump_signal)
        self._reap_policy = check_policy(reap_policy)
        self._ext_pid = -1
        self._ext: Dict[str, Any] = {}
        # This process's requests, pickled once per scope (a plain Queue only): an acquire
        # template split around its time, and the release.
        self._acquires: Dict[str, Optional[Tuple[bytes, bytes]]] = {}
        self._releases: Dict[str, bytes] = {}
        self._init_guards()

    @property
    def _fast_guards(self) -> bool:
        """Whether :func:`hangwatch.expires` may hand out cached guards (a plain queue; methods not overridden)."""
        cls = type(self)
        return (
            self._writer.direct and cls.acquire is LocalTimerClient.acquire and cls.release is LocalTimerClient.release
        )

    def _new_guard(self, scope: str, after: float, code: Any) -> PickleGuard:
        return PickleGuard(self, after, scope, code, self._wire_for, self._writer.put_pickled)

    def _wire_for(self, scope: str) -> Wire:
        """A guard's requests for ``scope`` from this process: the acquire split around its time, the release."""
        pid = os.getpid()
        ext = self._ext if self._ext_pid == pid else self._identity()
        template = self._template(pid, ext, scope)
        if template is None:
            return (pid, None, None, None)
        return (pid, template[0], template[1], self._release_data(pid, scope))

    def _template(self, pid: int, ext: Dict[str, Any], scope: str) -> Optional[Tuple[bytes, bytes]]:
        """This process's acquire of ``scope``, pickled once and split around its time (None: cannot be)."""
        try:
            return self._acquires[scope]
        except KeyError:
            template = _acquire_template(WorkerRequest(pid, scope, _MARK_TIME, ext))
            if len(self._acquires) < _CACHE_SCOPES:
                self._acquires[scope] = template
            return template

    def _release_data(self, pid: int, scope: str) -> bytes:
        """This process's release of ``scope``, pickled once."""
        data = self._releases.get(scope)
        if data is None:
            data = pickle.dumps(TimerRequest(pid, scope, -1), pickle.HIGHEST_PROTOCOL)
            if len(self._releases) < _CACHE_SCOPES:
                self._releases[scope] = data
        return data

    def register_dump_handler(self) -> None:
        """Register this process's stack-dump handler now (:func:`hangwatch.configure` does; so does the first acquire).

        A signal that already has a handler of the application is left alone (logged once).
        """
        self._identity()

    def _identity(self) -> Dict[str, Any]:
        pid = os.getpid()
        if self._ext_pid != pid:
            self._ext = identity(self._dump_signal, self._reap_policy)
            self._ext_pid = pid
            self._acquires = {}  # the pid is inside them
            self._releases = {}
        return self._ext

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
        """
        pid = os.getpid()
        ext = self._ext if self._ext_pid == pid else self._identity()
        if learn is not None:
            ext = {**ext, "learn": bool(learn)}
        elif reap_policy is None and self._writer.direct:
            template = self._template(pid, ext, scope_id)
            if template is not None and type(expiration_time) is float:
                self._writer.put_pickled(template[0] + struct.pack(">d", expiration_time) + template[1])
                return
        if reap_policy is not None:
            check_policy(reap_policy)
            ext = {**ext, "reap": reap_policy.to_wire()}
        self._writer.put(WorkerRequest(pid, scope_id, expiration_time, ext))

    def release(self, scope_id: str) -> None:
        """Release this worker's timer ``scope_id``."""
        pid = os.getpid()
        if self._ext_pid != pid:
            self._identity()
        if not self._writer.direct:
            self._writer.put(TimerRequest(pid, scope_id, -1))
            return
        self._writer.put_pickled(self._release_data(pid, scope_id))


# No timer request comes near this size: a longer frame is torn or hostile.
_MAX_FRAME = 1 << 20
# A writer writes a whole frame at once; one still incomplete after this long lost its writer.
_TORN_AFTER = 0.2


def _next_frame(data: bytes, start: int, keep_tail: bool = True) -> int:
    """The first offset from ``start`` that can begin a frame: a sane length, then a pickle's PROTO opcode.

    With ``keep_tail``, the last bytes (fewer than a frame's first six) are kept for the
    next read; without, they are dropped when nothing before them can begin a frame.
    """
    end = len(data)
    i = start
    while True:
        j = data.find(b"\x80", i + 4)
        if j < 0 or j + 1 >= end:
            return max(start, end - 5) if keep_tail else end
        (n,) = struct.unpack_from("!i", data, j - 4)
        if 2 <= data[j + 1] <= pickle.HIGHEST_PROTOCOL and 2 < n <= _MAX_FRAME:
            return j - 4
        i = j - 3


class _Unreadable:
    """Stands in for a queue message that could not be unpickled; the server refuses it as a bad request."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<unreadable queue message: {self.reason}>"


class _KnownFrames:
    """The frames hangwatch's clients send over and over, decoded without unpickling.

    A worker sends the same release, and the same acquire but for the time's 8 bytes,
    every time for a scope. The first of each is unpickled; if it is one of hangwatch's
    request types, its bytes are kept (an acquire's split around its time and checked, see
    :func:`_split_at_time`). A later frame of the same bytes (but for the time's) decodes
    to the same request, so it is built directly: exactly what unpickling it would give.
    """

    __slots__ = ("_by_length", "_count")

    def __init__(self) -> None:
        # By frame length: (head, tail, make): a release has tail None and make the request itself.
        self._by_length: Dict[int, List[Tuple[bytes, Optional[bytes], Any]]] = {}
        self._count = 0

    def decode(self, data: bytes, start: int, end: int) -> Any:
        """The request in ``data[start:end]`` if it is a known frame, else None."""
        shapes = self._by_length.get(end - start)
        if shapes is not None:
            for head, tail, make in shapes:
                if data.startswith(head, start, end):
                    if tail is None:
                        return make
                    if data.endswith(tail, start, end):
                        return make(_unpack_time(data, start + len(head))[0])
        return None

    def learn(self, payload: bytes, request: Any) -> None:
        """Keep the bytes of ``request``, just unpickled from ``payload``, if it is of a kind to keep."""
        cls = type(request)
        if cls not in _TEMPLATE_TYPES:
            return
        expiration = request.expiration_time
        if type(expiration) is int and expiration < 0:
            shape: Tuple[bytes, Optional[bytes], Any] = (payload, None, request)
        else:
            split = _split_at_time(payload, request)
            if split is None:
                return
            pid, scope = request.worker_id, request.scope_id
            if cls is WorkerRequest:
                ext = request.hangwatch
                shape = (split[0], split[1], lambda t: WorkerRequest(pid, scope, t, ext))
            else:
                shape = (split[0], split[1], lambda t: TimerRequest(pid, scope, t))
        if self._count >= _CACHE_SCOPES:
            self._by_length.clear()
            self._count = 0
        self._by_length.setdefault(len(payload), []).insert(0, shape)
        self._count += 1


class MultiprocessingRequestQueue(RequestQueue):
    """A :class:`RequestQueue` over a ``multiprocessing.Queue``; the watchdog waits on its pipe.

    For a plain ``multiprocessing.Queue`` on Linux it reads everything waiting in the pipe
    at once (under the queue's read lock, through a non-blocking descriptor of its own),
    instead of one ``get`` per request: the server drains many clients at the pace they
    write. Other queues are read with their own ``get``.

    Args:
        mp_queue: the queue the clients put requests on.
    """

    def __init__(self, mp_queue: Any) -> None:
        super().__init__()
        self._fd = -1
        _check_queue(mp_queue, "get", "qsize")
        self._mp_queue = mp_queue
        if type(mp_queue) is multiprocessing.queues.Queue and all(
            hasattr(mp_queue, a) for a in ("_reader", "_rlock", "_sem")
        ):
            try:
                reader_fd = getattr(mp_queue, "_reader").fileno()  # noqa: B009  (private, checked above)
                self._fd = os.open(f"/proc/self/fd/{reader_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                self._fd = -1
        self._buffer = b""
        self._partial_since: Optional[float] = None  # since when the frame at the buffer's head is incomplete
        self._ready: Deque[Any] = deque()
        self._known = _KnownFrames()

    def size(self) -> int:
        """How many requests are waiting (raises NotImplementedError where the platform cannot tell)."""
        if self._fd >= 0:
            self._read_available()
            return len(self._ready)
        return int(self._mp_queue.qsize())

    def get(self, size: int, timeout: float) -> List[TimerRequest]:
        """Up to ``size`` requests, waiting at most ``timeout`` seconds in all."""
        if self._fd < 0:
            return self._get_one_by_one(size, timeout)
        if self._buffer:  # an incomplete frame: look again in time to tell a torn one
            timeout = min(timeout, _TORN_AFTER)
        return wait_and_take(self._fd, self._ready, self._read_available, size, timeout)

    def _get_one_by_one(self, size: int, timeout: float) -> List[TimerRequest]:
        requests: List[TimerRequest] = []
        deadline = time.monotonic() + timeout
        mp_queue = self._mp_queue
        for _ in range(size):
            wait = deadline - time.monotonic()
            try:
                item = mp_queue.get(block=wait > 0, timeout=wait if wait > 0 else None)
            except _queue.Empty:
                break
            requests.append(item)
        return requests

    def _read_available(self) -> None:
        q = self._mp_queue
        if not q._rlock.acquire(False):
            return  # another reader (there should be none) is inside get(); read next round
        try:
            data = read_available(self._fd)
            if data or self._buffer:
                self._frames(self._buffer + data)
        finally:
            q._rlock.release()

    def _frames(self, data: bytes) -> None:
        """Split multiprocessing.Connection frames (4-byte big-endian length, then the pickle).

        A frame that cannot be one (a length no request comes near, a pickle that does not
        load) or that stays incomplete for :data:`_TORN_AFTER` seconds (its writer was killed
        part way through a long message) is refused, and reading resumes at the next byte
        that can start a frame: the requests written after it are not lost.
        """
        view = memoryview(data)
        pos = 0
        end = len(data)
        sem = self._mp_queue._sem
        known = self._known
        while pos < end:
            n = struct.unpack_from("!i", view, pos)[0] if end - pos >= 4 else 0
            if end - pos >= 4 and not 0 < n <= _MAX_FRAME:
                self._ready.append(_Unreadable(f"a frame of length {n} (torn or not a timer request)"))
                pos = _next_frame(data, pos + 1)
                continue
            if end - pos < 4 or end - pos - 4 < n:  # incomplete
                now = time.monotonic()
                if pos > 0 or self._partial_since is None:  # a new one (later bytes may be others')
                    self._partial_since = now
                elif now - self._partial_since >= _TORN_AFTER:
                    self._ready.append(_Unreadable(f"a frame left incomplete at {end - pos} bytes (its writer died?)"))
                    pos = _next_frame(data, pos + 1, keep_tail=False)
                    continue
                break
            item = known.decode(data, pos + 4, pos + 4 + n)
            if item is None:
                payload = data[pos + 4 : pos + 4 + n]
                try:
                    item = pickle.loads(payload)
                except Exception as exc:
                    self._ready.append(_Unreadable(f"{type(exc).__name__}: {exc}"))
                    pos = _next_frame(data, pos + 1)
                    continue
                known.learn(payload, item)
            pos += 4 + n
            try:
                sem.release()  # the writer acquired it for this message
            except ValueError:
                pass  # a writer that bypassed the semaphore
            self._ready.append(item)
        if pos >= end:
            self._partial_since = None
        self._buffer = data[pos:]

    def fileno(self) -> int:
        """The descriptor of the queue's pipe, readable when requests are waiting.

        Raises:
            io.UnsupportedOperation: the queue has no pipe to wait on (e.g. a manager's proxy).
        """
        if self._fd >= 0:
            return self._fd
        reader = getattr(self._mp_queue, "_reader", None)
        if reader is None or not callable(getattr(reader, "fileno", None)):
            raise io.UnsupportedOperation("this queue has no pipe to wait on")
        return int(reader.fileno())

    def close(self) -> None:
        """Close this reader's own descriptor (the queue itself stays open; reading falls back to ``get``)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class LocalTimerServer(PidTimerServer):
    """Server side of :class:`LocalTimerClient`: reaps (SIGKILL) workers whose timers expired.

    Run it in the parent of the workers (the agent). It reaps a stuck worker within
    milliseconds of its deadline; ``max_interval`` only bounds one idle wait.

    Args:
        mp_queue: the queue given to the clients.
        max_interval: the longest one wait of the watchdog, in seconds.
        daemon: whether the watchdog thread is a daemon thread.
        log_event: optional ``log_event(name, request)`` callback, called with torch's event names.
        reap_policy: how workers are reaped unless their client chooses (default: stack dump
            if registered, then SIGKILL).
        allowed_pids: if given, only these pids are ever signalled (see ``set_allowed_pids``).
        children_only: reap only this process's children and their descendants (a launcher
            such as torch's agent starts every worker as its direct child); a request naming
            any other pid is refused.
        event_file: append every event to this file as JSON lines.
        on_event: called with every :class:`~hangwatch.Event`.
        limits: what one client may cost this server (default :class:`~hangwatch.Limits`).
        pin: how a worker is pinned and signalled (tests pass a recorder).
        statistics: keep per-scope figures of the released blocks (:meth:`scope_statistics`):
            True, or a :class:`~hangwatch.ScopeStatistics` shared with other servers.
        near_miss: with ``statistics``, the fraction of its budget above which a released
            block gives a ``near miss`` event (default 0.8); None for none.
        learn: learn each scope's deadline from its blocks (:class:`~hangwatch.Learning`).

    Raises:
        TypeError: ``mp_queue`` is not a queue.
        ValueError: ``max_interval`` is not a finite number > 0.
    """

    def __init__(
        self,
        mp_queue: Any,
        max_interval: float = 60,
        daemon: bool = True,
        *,
        log_event: Optional[Callable[[str, Any], None]] = None,
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
        super().__init__(
            MultiprocessingRequestQueue(mp_queue),
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
