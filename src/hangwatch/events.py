"""Events: everything a timer server decides, as one record sent to every sink.

Sinks: the ``hangwatch.events`` logger (always; the record's argument is the
:class:`Event`), an optional JSON-lines file (one object per line, flushed per event),
optional ``on_event(event)`` callables, and torch's ``log_event(name, request)``
callback, which receives the four events torch itself reports under torch's names, so
a callback written for torch sees nothing it does not know.

The event names are listed in :data:`EVENT_NAMES` and in the README.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, Optional, Union

__all__ = ["EVENT_NAMES", "TORCH_EVENT_NAMES", "Event", "EventEmitter", "JsonLinesSink"]

logger = logging.getLogger("hangwatch.events")

EVENT_NAMES: Dict[str, str] = {
    "watchdog started": "the server's watchdog thread started",
    "watchdog stopped": "the server's watchdog thread stopped",
    "timer expired": "a timer was not released by its deadline (one per timer; late_s says how late)",
    "kill worker process": "a signal was sent to the worker of an expired timer (signal, step, stack, late_s)",
    "expired, not signalled": "the expired timer asked for no signal; the stack is attached when there is one",
    "worker reaped": "a signalled worker exited (signal that ended it, seconds since the first signal)",
    "worker exited": "a worker exited while holding timers, before they expired; they were dropped, unsignalled",
    "bad request": "a request was refused (malformed, or naming a process that must not be signalled)",
    "reap refused": "an expired worker is not on the allow-list of worker pids; it was not signalled",
    "reap failed": "a signal could not be sent, or the worker is still alive after the last signal (state given)",
    "kill server process": "torch's behaviour, opted into: the server signalled its own process after a reap",
    "hang report": "the agent's report of a failed attempt: every rank's stack, the grouping, the likely culprit",
    "limit reached": "a client reached a limit of the server (connections, timers, scopes); what it asked is refused",
    "near miss": "a released block used more than near_miss of its budget (statistics on; one per scope a minute)",
    "deadline learned": "the agent: a scope got its first learned deadline (its value and the figures it came from)",
}

TORCH_EVENT_NAMES = frozenset({"watchdog started", "timer expired", "kill worker process", "watchdog stopped"})

_WARNING_EVENTS = frozenset(
    {
        "timer expired",
        "kill worker process",
        "bad request",
        "reap refused",
        "reap failed",
        "kill server process",
        "hang report",
        "limit reached",
    }
)


@dataclass(frozen=True)
class Event:
    """One decision of a timer server.

    Attributes:
        name: what happened (see the module's list of names).
        time: when, in ``time.time()`` seconds.
        worker: the worker's id (the pid for the built-in servers), if any.
        scope: the timer's scope, if any.
        details: anything else worth knowing (signal, lateness in seconds, reason, ...).
    """

    name: str
    time: float
    worker: Any = None
    scope: Optional[str] = None
    details: Dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """One human-readable line."""
        parts = [self.name]
        if self.worker is not None:
            parts.append(f"worker={self.worker}")
        if self.scope is not None:
            parts.append(f"scope={self.scope!r}")
        stack = None
        for key, value in self.details.items():
            if key == "stack" and isinstance(value, str) and value:
                stack = value
                parts.append("stack=(below)")
            else:
                parts.append(f"{key}={_brief(value)}")
        line = " ".join(parts)
        return line if stack is None else f"{line}\n{stack.rstrip()}"

    def to_dict(self) -> Dict[str, Any]:
        """The event as JSON-compatible values: ``name``, ``time``, ``worker``, ``scope``, ``details``."""
        return {
            "name": self.name,
            "time": self.time,
            "worker": self.worker,
            "scope": self.scope,
            "details": self.details,
        }


def _brief(value: Any, limit: int = 300) -> str:
    """A value for the one-line form: a large container is summarised (the JSON-lines file has it whole)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, dict):
        return f"{{... {len(value)} entries}}"
    if isinstance(value, (list, tuple)):
        return f"[... {len(value)} items]"
    return text[:limit] + "..."


class JsonLinesSink:
    """Appends each event to a file as one JSON object per line, written by a thread of its own.

    The file is opened at once, safely: it is created with mode 0600 (stack dumps name the
    workers' code and paths), a symlink at the path is not followed, and an existing file
    must be a regular file of this user (never another user's file, a FIFO or a device).
    The writes happen on the sink's own thread, so a slow or stalled file system never
    holds up the watchdog that reports the event; at most ``max_pending`` lines wait
    (beyond that, lines are dropped and the count is logged). :meth:`close` writes what is
    waiting (for at most ``close_timeout`` seconds). After :meth:`close`, the next event
    opens the file again. Thread-safe.

    Args:
        path: the file; appended to if it exists.
        max_pending: how many lines may wait to be written.
        close_timeout: how long :meth:`close` waits for the waiting lines to be written.

    Raises:
        OSError: the file cannot be opened, or is not a regular file of this user (the
            message names the path).
    """

    def __init__(
        self, path: Union[str, os.PathLike[str]], *, max_pending: int = 100_000, close_timeout: float = 5.0
    ) -> None:
        self.path = os.fspath(path)
        self._max_pending = max_pending
        self._close_timeout = close_timeout
        self._cond = threading.Condition()
        self._pending: Deque[bytes] = deque()
        self._dropped = 0
        self._fd = _open_event_file(self.path)
        self._writer: Optional[threading.Thread] = None
        self._closing = False

    def __call__(self, event: Event) -> None:
        """Queue one event for writing (never blocks on the file)."""
        line = (json.dumps(event.to_dict(), default=str, ensure_ascii=False) + "\n").encode()
        with self._cond:
            if self._fd < 0:
                self._fd = _open_event_file(self.path)
                self._closing = False
            if len(self._pending) >= self._max_pending:
                self._dropped += 1
                return
            self._pending.append(line)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="hangwatch-events", daemon=True)
                self._writer.start()
            self._cond.notify()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:  # closing, and everything is written
                    if self._fd >= 0:
                        os.close(self._fd)
                        self._fd = -1
                    self._writer = None
                    self._cond.notify_all()
                    return
                lines, self._pending = self._pending, deque()
                dropped, self._dropped = self._dropped, 0
                fd = self._fd
            if dropped:
                logger.warning("%d events were not written to %s: the file did not keep up", dropped, self.path)
            try:
                _write_all(fd, b"".join(lines))
            except OSError as exc:
                logger.error("Writing %d events to %s failed: %s", len(lines), self.path, exc)

    def close(self) -> None:
        """Write what is waiting (bounded in time), then close the file."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            deadline = time.monotonic() + self._close_timeout
            while self._writer is not None and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            if self._writer is not None:  # it closes the file when it is done
                logger.error("The events file %s took longer than %g s to write", self.path, self._close_timeout)
            elif self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _open_event_file(path: str) -> int:
    """Open ``path`` for appending events: created 0600, no symlink followed, a regular file of this user only."""
    refusal = f"refusing to write events to {path}: it is not a regular file owned by this user"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open the events file {path}: {exc.strerror}") from None
    else:
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, f"refusing to write events to {path}: it is a symbolic link")
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, refusal)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open the events file {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():  # replaced since the check above
        os.close(fd)
        raise OSError(errno.EPERM, refusal)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


EventSink = Callable[[Event], None]


# Events that a hostile or broken client can cause at will (rate-limited when the emitter has a rate).
_RATE_LIMITED = frozenset({"bad request", "limit reached"})


class EventEmitter:
    """Builds events and delivers them to the log, the sinks, and torch's ``log_event`` callback.

    With a ``rate``, ``bad request`` and ``limit reached`` events, which a client can cause
    at will, are rate-limited: at most ``rate`` a second after a burst of five seconds'
    worth (at least 100); the ones left out are counted, and the next one delivered carries
    the count (``suppressed``), as does a last summary at :meth:`close`.

    Args:
        log_event: torch's callback, called as ``log_event(name, request_or_None)`` for torch's
            event names only.
        sinks: callables receiving every :class:`Event` (e.g. a :class:`JsonLinesSink`).
        rate: the rate limit of the events clients can cause, per second; None for none.

    An exception raised by a callback or sink is logged, never propagated.
    """

    __slots__ = ("_allowance", "_burst", "_checked", "_lock", "_log_event", "_rate", "_sinks", "_suppressed")

    def __init__(
        self,
        log_event: Optional[Callable[[str, Any], None]] = None,
        sinks: Iterable[EventSink] = (),
        rate: Optional[float] = None,
    ) -> None:
        self._log_event = log_event
        self._sinks = tuple(sinks)
        self._lock = threading.Lock()
        self._rate = rate
        self._burst = 0.0 if rate is None else max(100.0, 5 * rate)
        self._allowance = self._burst
        self._checked = time.monotonic()
        self._suppressed: Dict[str, int] = {}

    def close(self) -> None:
        """Say how many rate-limited events were left out since the last one, then close the sinks."""
        with self._lock:
            suppressed, self._suppressed = self._suppressed, {}
        for name, count in suppressed.items():
            reason = f"{count} more were left out of the events (at most {self._rate:g} a second are written)"
            self._deliver(Event(name, time.time(), None, None, {"suppressed": count, "reason": reason}), None)
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    logger.exception("Closing the event sink %r failed", sink)

    def emit(
        self,
        name: str,
        *,
        worker: Any = None,
        scope: Optional[str] = None,
        request: Any = None,
        **details: Any,
    ) -> Optional[Event]:
        """Record one event; return it (None when a rate limit left it out)."""
        if self._rate is not None and name in _RATE_LIMITED:
            with self._lock:
                now = time.monotonic()
                self._allowance = min(self._burst, self._allowance + (now - self._checked) * self._rate)
                self._checked = now
                if self._allowance < 1.0:
                    self._suppressed[name] = self._suppressed.get(name, 0) + 1
                    return None
                self._allowance -= 1.0
                left_out = self._suppressed.pop(name, 0)
            if left_out:
                details["suppressed"] = left_out
        event = Event(name, time.time(), worker, scope, details)
        self._deliver(event, request)
        return event

    def _deliver(self, event: Event, request: Any) -> None:
        name = event.name
        # The record's argument is the Event itself: handlers can read it structured.
        logger.log(logging.WARNING if name in _WARNING_EVENTS else logging.INFO, "%s", event)
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                logger.exception("The event sink %r raised on event %r", sink, name)
        if self._log_event is not None and name in TORCH_EVENT_NAMES:
            try:
                self._log_event(name, request)
            except Exception:
                logger.exception("The log_event callback raised on event %r", name)
