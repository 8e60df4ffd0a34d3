"""The base of the built-in servers: torch's extension points on one deadline book, workers by pid.

Deadlines arrive as wall-clock ``expiration_time`` values (torch's wire format) and are
turned into ``time.monotonic()`` deadlines on receipt, so a later wall-clock jump
changes nothing. Each worker is pinned (see :mod:`hangwatch._reaper`) when its first
timer arrives; its exit drops its timers at once.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Set

from ._deadlines import DeadlineBook
from ._reaper import ProcessPin, refuse_target
from .api import RequestQueue, TimerRequest, TimerServer
from .events import EventEmitter

__all__ = ["PidTimerServer"]


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class PidTimerServer(TimerServer):
    """A :class:`TimerServer` whose workers are processes on this host, identified by pid.

    Args:
        request_queue: where requests arrive.
        max_interval: the longest one wait of the loop, in seconds.
        daemon: whether the watchdog thread is a daemon thread.
        log_event: torch's event callback (see :mod:`hangwatch.events`).
    """

    def __init__(
        self,
        request_queue: RequestQueue,
        max_interval: float,
        daemon: bool = True,
        log_event: Optional[Callable[[str, Any], None]] = None,
    ) -> None:
        super().__init__(request_queue, max_interval, daemon)
        self._book: DeadlineBook[int, TimerRequest] = DeadlineBook()
        self._pins: Dict[int, ProcessPin] = {}
        self._polled_pins: Dict[int, ProcessPin] = {}  # pins without a descriptor to watch (no pidfd)
        self._events = EventEmitter(log_event)
        self._request_count = 0

    # ----------------------------------------------------------------- the request's signal

    def _signal_of(self, request: TimerRequest) -> int:
        """The signal that reaps the worker of an expired ``request`` (<= 0: do not signal)."""
        return int(signal.SIGKILL)

    # ----------------------------------------------------------------- torch's extension points

    def register_timers(self, timer_requests: List[TimerRequest]) -> None:
        """Apply acquires and releases; refuse (with a ``bad request`` event) what is malformed."""
        if not timer_requests:
            return
        # One offset for the batch: the wall clock at receipt maps onto the monotonic clock.
        offset = time.monotonic() - time.time()
        book = self._book
        for request in timer_requests:
            self._request_count += 1
            try:
                pid = request.worker_id
                scope = request.scope_id
                expiration = request.expiration_time
            except AttributeError:
                self._events.emit("bad request", reason=f"not a TimerRequest: {request!r}")
                continue
            if (
                not isinstance(scope, str)
                or isinstance(expiration, bool)
                or not isinstance(expiration, (int, float))
                or math.isnan(expiration)
            ):
                self._events.emit(
                    "bad request",
                    worker=pid,
                    request=request,
                    reason=f"scope_id must be a str and expiration_time a number (got {request!r})",
                )
                continue
            if expiration < 0:
                book.remove(pid, scope)
                continue
            if not math.isfinite(expiration):
                self._events.emit("bad request", worker=pid, scope=scope, reason="expiration_time is infinite")
                continue
            if pid not in self._pins and not self._pin(pid, scope):
                continue
            book.set(pid, scope, expiration + offset, request)

    def clear_timers(self, worker_ids: Set[Any]) -> None:
        """Remove every timer of the given workers."""
        for worker_id in worker_ids:
            self._book.drop_worker(worker_id)

    def get_expired_timers(self, deadline: float) -> Dict[Any, List[TimerRequest]]:
        """The timers expired at ``deadline`` (``time.time()`` seconds), by pid, earliest first."""
        return self._book.expired(deadline + (time.monotonic() - time.time()))

    def _reap_worker(self, worker_id: Any) -> bool:
        """Kill the worker with SIGKILL through its pin; True when done (or it is already gone)."""
        return self._signal_worker(worker_id, int(signal.SIGKILL), None)

    def _next_deadline(self) -> Optional[float]:
        deadline = self._book.next_deadline()
        return None if deadline is None else deadline - time.monotonic()

    # ----------------------------------------------------------------- reaping

    def _reap_expired(self, worker_id: Any, expired_timers: List[TimerRequest]) -> bool:
        now = time.time()
        expired = sorted(expired_timers, key=lambda r: r.expiration_time)
        chosen: Optional[TimerRequest] = None
        for request in expired:
            self._events.emit(
                "timer expired",
                worker=worker_id,
                scope=request.scope_id,
                request=request,
                late_s=round(now - request.expiration_time, 6),
            )
            if chosen is None and self._signal_of(request) > 0:
                chosen = request
        if chosen is None:
            self._events.emit(
                "expired, not signalled",
                worker=worker_id,
                scopes=[r.scope_id for r in expired],
                reason="the expired timers asked for no signal (signal <= 0)",
            )
            return True
        return self._signal_worker(worker_id, self._signal_of(chosen), chosen)

    def _signal_worker(self, pid: Any, signum: int, request: Optional[TimerRequest]) -> bool:
        scope = None if request is None else request.scope_id
        pin = self._pins.get(pid)
        if pin is None:
            pin = self._take_pin(pid, scope, refusal="reap failed")
            if pin is None:
                return True
        try:
            pin.send_signal(signum)
        except ProcessLookupError:
            self._worker_gone(pid)
            return True
        except PermissionError as exc:
            self._events.emit("reap failed", worker=pid, scope=scope, signal=_signal_name(signum), reason=str(exc))
            return True
        except OSError as exc:
            self._events.emit(
                "reap failed", worker=pid, scope=scope, signal=_signal_name(signum), reason=f"{exc}; will retry"
            )
            return False
        finally:
            if pid not in self._pins:
                pin.close()
        self._events.emit("kill worker process", worker=pid, scope=scope, request=request, signal=_signal_name(signum))
        return True

    # ----------------------------------------------------------------- worker identity

    def _take_pin(self, pid: Any, scope: Optional[str], refusal: str) -> Optional[ProcessPin]:
        """Validate ``pid`` and pin it; None (with a ``refusal`` or ``worker exited`` event) if that fails."""
        reason = refuse_target(pid)
        if reason is None:
            try:
                return ProcessPin(pid)
            except ProcessLookupError:
                self._events.emit("worker exited", worker=pid, scope=scope, reason="not running; never signalled")
                return None
            except PermissionError as exc:
                reason = f"cannot watch process: {exc}"
        self._events.emit(refusal, worker=pid, scope=scope, reason=reason)
        return None

    def _pin(self, pid: Any, scope: str) -> bool:
        pin = self._take_pin(pid, scope, refusal="bad request")
        if pin is None:
            return False
        self._pins[pid] = pin
        if pin.fileno() >= 0:
            self._watch_fd(pin.fileno(), lambda: self._worker_gone(pid))
        else:
            self._polled_pins[pid] = pin
        return True

    def _release_pin(self, pid: int) -> None:
        """Forget the worker's pin: stop watching it and close it."""
        pin = self._pins.pop(pid, None)
        self._polled_pins.pop(pid, None)
        if pin is not None:
            if pin.fileno() >= 0:
                self._unwatch_fd(pin.fileno())
            pin.close()

    def _worker_gone(self, pid: int) -> None:
        """The worker exited: drop its timers and its pin."""
        self._release_pin(pid)
        dropped = self._book.drop_worker(pid)
        if dropped:
            self._events.emit(
                "worker exited",
                worker=pid,
                scopes=[r.scope_id for r in dropped],
                reason="its timers were dropped; it will not be signalled",
            )

    def _check_pins(self) -> None:
        """Drop the workers that exited (for pins without a descriptor to watch)."""
        for pid, pin in list(self._polled_pins.items()):
            if not pin.alive():
                self._worker_gone(pid)

    def _expire_and_reap(self) -> None:
        self._check_pins()
        super()._expire_and_reap()

    # ----------------------------------------------------------------- lifecycle

    def _on_started(self) -> None:
        self._events.emit("watchdog started", server=type(self).__name__, max_interval=self._max_interval)

    def _on_stopped(self) -> None:
        self._events.emit("watchdog stopped", server=type(self).__name__)

    def close_pins(self) -> None:
        """Release every worker pin (the server forgets its workers' timers too)."""
        for pid in list(self._pins):
            self._release_pin(pid)
        for pid in list(self._book.workers()):
            self._book.drop_worker(pid)

    @property
    def active_timers(self) -> int:
        """How many timers are active now."""
        return len(self._book)

    @property
    def request_count(self) -> int:
        """How many requests this server has received."""
        return self._request_count
