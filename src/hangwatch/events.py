"""Events: everything a timer server decides, as one record sent to every sink.

Sinks: the ``hangwatch.events`` logger (always; the record's argument is the
:class:`Event`), an optional JSON-lines file (one object per line, flushed per event),
optional ``on_event(event)`` callables, and torch's ``log_event(name, request)``
callback, which receives the four events torch itself reports under torch's names, so
a callback written for torch sees nothing it does not know.

The event names are listed in :data:`EVENT_NAMES` and in the README.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Union

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
    """Appends each event to a file as one JSON object per line, flushed per event.

    The file is created with mode 0600 (stack dumps name the workers' code and paths).
    Thread-safe. After :meth:`close`, the next event opens the file again.

    Args:
        path: the file; appended to if it exists.
    """

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._fd = -1

    def __call__(self, event: Event) -> None:
        """Write one event."""
        line = (json.dumps(event.to_dict(), default=str, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


EventSink = Callable[[Event], None]


class EventEmitter:
    """Builds events and delivers them to the log, the sinks, and torch's ``log_event`` callback.

    Args:
        log_event: torch's callback, called as ``log_event(name, request_or_None)`` for torch's
            event names only.
        sinks: callables receiving every :class:`Event` (e.g. a :class:`JsonLinesSink`).

    An exception raised by a callback or sink is logged, never propagated.
    """

    __slots__ = ("_log_event", "_sinks")

    def __init__(self, log_event: Optional[Callable[[str, Any], None]] = None, sinks: Iterable[EventSink] = ()) -> None:
        self._log_event = log_event
        self._sinks = tuple(sinks)

    def close(self) -> None:
        """Close the sinks that can be closed (a JSON-lines file reopens on the next event)."""
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
    ) -> Event:
        """Record one event; return it."""
        event = Event(name, time.time(), worker, scope, details)
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
        return event
