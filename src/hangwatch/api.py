"""The torch-compatible timer API: requests, the client and server contracts, the watchdog loop.

Everything here keeps the names, signatures and observable semantics of
``torch.distributed.elastic.timer.api``. What differs is how the loop waits: it
waits for requests only until the next deadline, so a stuck worker is reaped
within milliseconds of its deadline whatever ``max_interval`` is.
"""

from __future__ import annotations

import abc
import functools
import inspect
import logging
import math
import os
import selectors
import sys
import threading
import time
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Set, Type, TypeVar, cast

__all__ = [
    "RequestQueue",
    "ServerUnavailableError",
    "TimerClient",
    "TimerRequest",
    "TimerServer",
    "configure",
    "expires",
    "get_configured_client",
]

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

# How long a round waits when its queue cannot be woken (a user's RequestQueue without fileno()):
# bounds how long stop() can take and how late a reap can be for such a queue.
_UNWAKEABLE_WAIT = 0.2
# After a reap that asked to be retried, how long before the next attempt (capped by max_interval).
_REAP_RETRY_INTERVAL = 1.0


class ServerUnavailableError(BrokenPipeError):
    """No timer server is taking requests (not started, stopped, or wedged): a client cannot send.

    A :class:`BrokenPipeError`, as torch's FileTimerClient raises.
    """


class TimerRequest:
    """One acquire or release of a countdown timer, as sent from a client to a server.

    A negative ``expiration_time`` means "release". ``worker_id`` is whatever the
    client/server pair uses to identify a worker (the built-in pairs use the pid).

    Args:
        worker_id: the worker that holds the timer.
        scope_id: the name of the timer within that worker.
        expiration_time: when the timer expires, in ``time.time()`` seconds; negative to release.
    """

    __slots__ = ("expiration_time", "scope_id", "worker_id")

    def __init__(self, worker_id: Any, scope_id: str, expiration_time: float) -> None:
        self.worker_id = worker_id
        self.scope_id = scope_id
        self.expiration_time = expiration_time

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TimerRequest):
            return (
                self.worker_id == other.worker_id
                and self.scope_id == other.scope_id
                and self.expiration_time == other.expiration_time
            )
        return False

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value, as torch's

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(worker_id={self.worker_id!r}, scope_id={self.scope_id!r}, "
            f"expiration_time={self.expiration_time!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker_id, self.scope_id, self.expiration_time))


class TimerClient(abc.ABC):
    """Acquires and releases countdown timers by talking to a :class:`TimerServer`.

    Subclass it and implement :meth:`acquire` and :meth:`release` to write your own pair.
    """

    @abc.abstractmethod
    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Register a timer for this worker named ``scope_id`` expiring at ``expiration_time``.

        Args:
            scope_id: the timer's name within this worker; acquiring it again replaces it.
            expiration_time: absolute ``time.time()`` seconds.
        """

    @abc.abstractmethod
    def release(self, scope_id: str) -> None:
        """Release this worker's timer named ``scope_id``; after this it can no longer expire.

        Args:
            scope_id: the timer's name within this worker.
        """


class RequestQueue(abc.ABC):
    """The server's side of a transport: where :class:`TimerRequest` objects arrive.

    A queue may also define ``fileno()``: a descriptor that becomes readable when
    requests are waiting. The watchdog then waits on it together with its other
    events (deadlines, worker exits, ``stop()``), so it never polls. Without it the
    watchdog calls ``get`` with waits of at most 0.2 s.
    """

    @abc.abstractmethod
    def size(self) -> int:
        """Return how many requests are waiting now (a lower bound: more may arrive)."""

    @abc.abstractmethod
    def get(self, size: int, timeout: float) -> List[TimerRequest]:
        """Return up to ``size`` requests, waiting at most ``timeout`` seconds for the first.

        Args:
            size: the most requests to return.
            timeout: seconds to wait when none is waiting; 0 means do not wait.

        Returns:
            The requests, in the order they arrived (possibly none).
        """


def _check_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0 (got {value!r})")
    return float(value)


class TimerServer(abc.ABC):
    """Watches active timers and reaps the workers whose timers expired: the one watchdog loop.

    Subclasses implement torch's extension points (:meth:`register_timers`,
    :meth:`clear_timers`, :meth:`get_expired_timers`, :meth:`_reap_worker`) and get
    the loop. A subclass may also implement :meth:`_next_deadline` so the loop wakes
    exactly when the next timer expires instead of after ``max_interval``.

    One round of the loop: wait for requests (until the next deadline, at most
    ``max_interval``), register them, take the timers expired now, reap their
    workers (an exception from ``_reap_worker`` counts as reaped; ``False`` means
    retry), and clear the timers of the reaped workers.

    Args:
        request_queue: where the requests arrive.
        max_interval: the longest the loop waits in one round, in seconds.
        daemon: whether the watchdog thread is a daemon thread.

    Raises:
        ValueError: ``max_interval`` is not a finite number > 0.
    """

    def __init__(self, request_queue: RequestQueue, max_interval: float, daemon: bool = True) -> None:
        super().__init__()
        self._request_queue = request_queue
        self._max_interval = _check_interval("max_interval", max_interval)
        self._daemon = daemon
        self._watchdog_thread: Optional[threading.Thread] = None
        self._stop_event = threading.Event()
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r = -1
        self._wake_w = -1
        self._queue_watched = False
        self._retry_soon = False
        self._pending_watches: Dict[int, Callable[[], None]] = {}
        self._last_progress_time = time.time()

    # ----------------------------------------------------------------- extension points (torch's)

    @abc.abstractmethod
    def register_timers(self, timer_requests: List[TimerRequest]) -> None:
        """Apply incoming requests: a negative ``expiration_time`` releases, any other acquires.

        Args:
            timer_requests: the requests of this round, in arrival order.
        """

    @abc.abstractmethod
    def clear_timers(self, worker_ids: Set[Any]) -> None:
        """Remove every timer of the given workers.

        Args:
            worker_ids: the workers whose timers go.
        """

    @abc.abstractmethod
    def get_expired_timers(self, deadline: float) -> Dict[Any, List[TimerRequest]]:
        """Return the timers expired at ``deadline`` (``time.time()`` seconds), by worker.

        Args:
            deadline: a timer whose expiration time is at or before it has expired.

        Returns:
            ``{worker_id: [request, ...]}`` for every worker with an expired timer.
        """

    @abc.abstractmethod
    def _reap_worker(self, worker_id: Any) -> bool:
        """Reap one worker; return True when done, False to retry in a later round.

        An exception raised here counts as reaped, and the worker's timers are cleared.
        """

    def _next_deadline(self) -> Optional[float]:
        """Return seconds until the earliest active timer expires, or None if unknown.

        The default (None) makes the loop wait ``max_interval`` between checks, as torch's
        does. The built-in servers answer from their deadline book.
        """
        return None

    def _reap_expired(self, worker_id: Any, expired_timers: List[TimerRequest]) -> bool:
        """Reap a worker whose timers expired; the loop calls this once per such worker.

        The default is torch's behaviour: call :meth:`_reap_worker`, treating an exception
        as reaped. The built-in servers override it to choose the signal from the timers
        and to report events.

        Args:
            worker_id: the worker.
            expired_timers: its expired timers.

        Returns:
            True when the worker's timers should be cleared, False to retry later.
        """
        return self._reap_worker_no_throw(worker_id)

    def _reap_worker_no_throw(self, worker_id: Any) -> bool:
        """Call :meth:`_reap_worker`; an exception is logged and counts as reaped."""
        try:
            return self._reap_worker(worker_id)
        except Exception:
            logger.exception(
                "Uncaught exception thrown from _reap_worker(%r); treating the worker as reaped. "
                "Catch exceptions inside _reap_worker to decide otherwise.",
                worker_id,
            )
            return True

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the watchdog thread and return at once.

        Raises:
            RuntimeError: the server is already running.
        """
        if self._watchdog_thread is not None and self._watchdog_thread.is_alive():
            raise RuntimeError(f"{type(self).__name__} is already running; stop() it before start()")
        logger.info("Starting %s... max_interval=%s, daemon=%s", type(self).__name__, self._max_interval, self._daemon)
        self._stop_event.clear()
        self._open_selector()
        self._watchdog_thread = threading.Thread(
            target=self._watchdog_loop, name=f"hangwatch-{type(self).__name__}", daemon=self._daemon
        )
        self._watchdog_thread.start()
        self._on_started()

    def stop(self) -> None:
        """Stop the watchdog thread; it ends promptly, whatever ``max_interval`` is.

        Waits for the thread for at most ``max_interval`` seconds (a reap in progress
        is allowed to finish). Calling it on a server that is not running does nothing.
        """
        logger.info("Stopping %s", type(self).__name__)
        self._stop_event.set()
        thread = self._watchdog_thread
        if thread is not None:
            self._wake()
            thread.join(self._max_interval)
            if thread.is_alive():
                logger.error(
                    "The watchdog thread of %s did not stop within %.1f s; it is left running",
                    type(self).__name__,
                    self._max_interval,
                )
                return
            self._watchdog_thread = None
        self._close_selector()
        self._on_stopped()

    @property
    def _stop_signaled(self) -> bool:
        """Whether :meth:`stop` was called (torch's attribute name)."""
        return self._stop_event.is_set()

    def get_last_progress_time(self) -> int:
        """Return when the watchdog last completed a round, in whole ``time.time()`` seconds.

        An idle watchdog completes a round at least every ``max_interval``. Torch's agent
        uses this as a liveness check of the watchdog.
        """
        return int(self._last_progress_time)

    def _on_started(self) -> None:
        """Called after the watchdog thread started (subclasses report an event)."""

    def _on_stopped(self) -> None:
        """Called after the watchdog thread stopped (subclasses report an event, release resources)."""

    # ----------------------------------------------------------------- the loop

    def _watchdog_loop(self) -> None:
        while not self._stop_event.is_set():
            try:
                self._run_watchdog()
            except Exception:
                logger.exception("Error running the watchdog round of %s", type(self).__name__)
                # A broken subclass must not turn the loop into a busy spin.
                self._stop_event.wait(min(self._max_interval, _REAP_RETRY_INTERVAL))

    def _run_watchdog(self) -> None:
        timeout = self._wait_timeout()
        queue = self._request_queue
        if self._queue_watched:
            requests = queue.get(max(1, self._queue_size()), 0) if self._wait(timeout) else []
        else:
            requests = queue.get(max(1, self._queue_size()), min(timeout, _UNWAKEABLE_WAIT))
            self._wait(0)
        self.register_timers(requests)
        self._expire_and_reap()
        self._last_progress_time = time.time()
        self._between_rounds()

    def _between_rounds(self) -> None:
        """Called after each round of the watchdog (hangwatch's servers give way to a stack dump in progress)."""

    def _expire_and_reap(self) -> None:
        reaped: Set[Any] = set()
        retry = False
        for worker_id, expired in self.get_expired_timers(time.time()).items():
            logger.info("Reaping worker_id=[%s]. Expired timers: %s", worker_id, [r.scope_id for r in expired])
            try:
                done = self._reap_expired(worker_id, expired)
            except Exception:  # contained to this worker: the others are reaped on time
                logger.exception("Reaping worker=[%s] raised; will retry", worker_id)
                done = False
            if done:
                reaped.add(worker_id)
            else:
                retry = True
                logger.error("Error reaping worker=[%s]. Will retry.", worker_id)
        self._retry_soon = retry
        self.clear_timers(reaped)

    def _queue_size(self) -> int:
        try:
            return self._request_queue.size()
        except NotImplementedError:  # e.g. multiprocessing.Queue.qsize() on macOS
            return 1

    def _wait_timeout(self) -> float:
        timeout = self._max_interval
        next_deadline = self._next_deadline()
        if next_deadline is not None:
            if self._retry_soon:
                next_deadline = max(next_deadline, _REAP_RETRY_INTERVAL)
            timeout = min(timeout, max(0.0, next_deadline))
        return timeout

    # ----------------------------------------------------------------- waiting on descriptors

    def _open_selector(self) -> None:
        if self._selector is not None:
            return
        selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._selector = selector
        self._queue_watched = False
        fileno = getattr(self._request_queue, "fileno", None)
        if callable(fileno):
            try:
                fd = fileno()
            except (OSError, AttributeError, NotImplementedError, ValueError):
                fd = None
            if isinstance(fd, int) and fd >= 0:
                selector.register(fd, selectors.EVENT_READ, self._request_queue)
                self._queue_watched = True
        for fd, callback in self._pending_watches.items():
            selector.register(fd, selectors.EVENT_READ, callback)
        self._pending_watches.clear()

    def _close_selector(self) -> None:
        selector, self._selector = self._selector, None
        if selector is None:
            return
        # Keep the watched descriptors (worker pins) for a later start().
        for key in list(selector.get_map().values()):
            if callable(key.data):
                self._pending_watches[key.fd] = key.data
        selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    def _watch_fd(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable()`` from the loop when ``fd`` becomes readable (until unwatched)."""
        if self._selector is None:
            self._pending_watches[fd] = on_readable
        else:
            self._selector.register(fd, selectors.EVENT_READ, on_readable)

    def _unwatch_fd(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
        if self._selector is None:
            self._pending_watches.pop(fd, None)
            return
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a watched event; run callbacks; True if requests are waiting."""
        selector = self._selector
        if selector is None:
            return True
        queue_ready = False
        for key, _ in selector.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            elif key.data is self._request_queue:
                queue_ready = True
            else:
                key.data()
        return queue_ready

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # a wake-up is already pending, or the selector is closing


# --------------------------------------------------------------------- configure / expires

_client_lock = threading.Lock()
_timer_client: Optional[TimerClient] = None
# The configured client and its guard caches, when it offers cached guards (hangwatch's clients).
_fast_client: Any = None
_fast_named: Optional[Dict[str, Any]] = None
_fast_sites: Dict[int, Any] = {}
_getframe = sys._getframe


def configure(timer_client: Optional[TimerClient]) -> None:
    """Set the process-wide default client used by :func:`expires`; thread-safe.

    A hangwatch client also registers this process's stack-dump handler now (a
    :mod:`faulthandler` handler on its ``dump_signal``), so the server can show where
    the worker was stuck before it reaps it.

    Args:
        timer_client: the client; any object with ``acquire`` and ``release`` methods.
            None removes the configured client, as torch's ``configure(None)`` does.

    Raises:
        TypeError: ``timer_client`` has no ``acquire``/``release`` methods.
    """
    global _timer_client, _fast_client, _fast_named, _fast_sites
    if timer_client is None:
        with _client_lock:
            _timer_client, _fast_client, _fast_named, _fast_sites = None, None, None, {}
        logger.info("Timer client configuration removed")
        return
    if not (callable(getattr(timer_client, "acquire", None)) and callable(getattr(timer_client, "release", None))):
        raise TypeError(
            f"timer_client must be a TimerClient with acquire() and release() methods (got {timer_client!r})"
        )
    register = getattr(type(timer_client), "register_dump_handler", None)
    if callable(register):
        register(timer_client)
    with _client_lock:
        _timer_client = timer_client
        if getattr(timer_client, "_fast_guards", False) is True:
            _fast_client = timer_client
            _fast_named, _fast_sites = timer_client._named, timer_client._sites  # type: ignore[attr-defined]
        else:
            _fast_client, _fast_named, _fast_sites = None, None, {}
    logger.info("Timer client configured to: %s", type(timer_client).__name__)


def get_configured_client() -> Optional[TimerClient]:
    """Return the client set by :func:`configure`, or None."""
    return _timer_client


def _check_after(after: Any) -> float:
    if isinstance(after, bool) or not isinstance(after, (int, float)):
        raise ValueError(f"after must be a finite number of seconds >= 0 (got {after!r})")
    value = float(after)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"after must be a finite number of seconds >= 0 (got {after!r})")
    return value


_NO_CLIENT = (
    "Configure timer client before using countdown timers: call hangwatch.configure(client) "
    "in this process, or pass client= to expires()"
)


class _Expiry:
    """What :func:`expires` returns: a context manager, and a decorator."""

    __slots__ = ("_after", "_client", "_entered_client", "_learn", "_policy", "_scope")

    def __init__(
        self, after: float, scope: str, client: Optional[TimerClient], policy: Any = None, learn: Optional[bool] = None
    ) -> None:
        self._after = after
        self._scope = scope
        self._client = client
        self._policy = policy
        self._learn = learn
        self._entered_client: Optional[TimerClient] = None

    def __enter__(self) -> None:
        client = self._client
        if client is None:
            client = _timer_client
            if client is None:
                raise RuntimeError(_NO_CLIENT)
        self._entered_client = client
        if self._policy is None and self._learn is None:
            client.acquire(self._scope, time.time() + self._after)
            return
        options: Dict[str, Any] = {}
        if self._policy is not None:
            if not getattr(client, "accepts_reap_policy", False):
                raise TypeError(
                    f"{type(client).__name__} cannot carry a reap policy; use a hangwatch client "
                    f"(LocalTimerClient, FileTimerClient, SharedMemoryTimerClient) or set reap_policy on the server"
                )
            options["reap_policy"] = self._policy
        if self._learn is not None:
            if not getattr(client, "accepts_learn", False):
                raise TypeError(
                    f"{type(client).__name__} cannot carry learn=; use a hangwatch client (LocalTimerClient, "
                    f"FileTimerClient, SharedMemoryTimerClient), or choose on the server (Learning(default=...))"
                )
            options["learn"] = self._learn
        client.acquire(self._scope, time.time() + self._after, **options)

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        client = self._entered_client
        assert client is not None
        if exc_type is None:
            client.release(self._scope)
            return
        try:
            client.release(self._scope)
        except Exception:
            # The block's own exception is what the user needs to see; say why the release failed.
            logger.warning(
                "Could not release timer %r while the block raised %s",
                self._scope,
                exc_type.__name__,
                exc_info=True,
            )

    def _fresh(self) -> _Expiry:
        """A context manager for one call of a decorated function."""
        return _Expiry(self._after, self._scope, self._client, self._policy, self._learn)

    def __call__(self, func: _F) -> _F:
        fresh = self._fresh
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with fresh():
                    return await func(*args, **kwargs)

            return cast(_F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with fresh():
                return func(*args, **kwargs)

        return cast(_F, wrapper)


def expires(
    after: float,
    scope: Optional[str] = None,
    client: Optional[TimerClient] = None,
    *,
    reap_policy: Any = None,
    learn: Optional[bool] = None,
) -> _Expiry:
    """Guard a block with a countdown timer: if it is not left within ``after`` seconds, the worker may be reaped.

    Use it as ``with expires(after=60): ...`` or as a decorator ``@expires(after=60)``.
    The timer is acquired on entry (expiring ``after`` seconds later) and released on
    exit, whatever happens; the block's own exceptions propagate unchanged. The worker
    is *eligible* to be reaped after the deadline: when and how is the server's decision
    (the built-in servers act within milliseconds).

    Args:
        after: seconds from entry until the timer expires; a finite number >= 0.
        scope: the timer's name within this worker; default ``"<file>#<line>"`` of the caller.
            Re-entering a scope that is held replaces its timer (the last acquire wins,
            the first release releases), as torch's.
        client: the client to use; default the one set by :func:`configure`.
        reap_policy: how to reap the worker if this block's timer expires (a
            :class:`~hangwatch.ReapPolicy`; default: the client's, else the server's).
            Needs a hangwatch client.
        learn: whether a server that learns deadlines (:class:`~hangwatch.Learning`) may
            give this block a learned deadline shorter than ``after``: True to ask for it,
            False never to (e.g. a checkpoint save of varying length); default the server's
            choice. Needs a hangwatch client; a server that does not learn ignores it.

    Returns:
        A context manager that is also a decorator.

    Raises:
        ValueError: ``after`` is not a finite number >= 0.
        TypeError: ``reap_policy`` is not a ReapPolicy, ``learn`` not a bool, or (on entry)
            the client cannot carry them.
        RuntimeError: on entry, when no client was given or configured.
    """
    # hangwatch's clients' fast path: a cached guard per scope (or call site), bound to the
    # client configured now (see hangwatch._guards).
    if client is None and reap_policy is None and learn is None and _fast_named is not None:
        if scope is None:
            frame = _getframe(1)
            guard = _fast_sites.get(frame.f_lasti)
            if guard is not None and guard._code is frame.f_code and guard._after == after:
                return guard  # type: ignore[no-any-return]
            return _fast_client._site_guard(after, frame)  # type: ignore[no-any-return]
        guard = _fast_named.get(scope)
        if guard is not None and guard._after == after:
            return guard  # type: ignore[no-any-return]
        return _fast_client._named_guard(after, scope)  # type: ignore[no-any-return]
    if reap_policy is None and learn is None and getattr(client, "_fast_guards", False) is True:
        fast: Any = client
        if scope is None:
            frame = _getframe(1)
            guard = fast._sites.get(frame.f_lasti)
            if guard is not None and guard._code is frame.f_code and guard._after == after:
                return guard  # type: ignore[no-any-return]
            return fast._site_guard(after, frame)  # type: ignore[no-any-return]
        guard = fast._named.get(scope)
        if guard is not None and guard._after == after:
            return guard  # type: ignore[no-any-return]
        return fast._named_guard(after, scope)  # type: ignore[no-any-return]
    if scope is None:
        frame = _getframe(1)
        scope = f"{frame.f_code.co_filename}#{frame.f_lineno}"
    if reap_policy is not None:
        from ._reaper import check_policy

        check_policy(reap_policy)
    if learn is not None and not isinstance(learn, bool):
        raise TypeError(f"learn must be True, False or None (got {learn!r})")
    return _Expiry(_check_after(after), scope, client, reap_policy, learn)
