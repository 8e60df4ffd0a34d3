"""Events: everything a timer server decides, as one record sent to every sink.

Every event goes to the ``hangwatch.events`` logger. Torch's ``log_event(name,
request)`` callback receives the four events torch itself reports, under torch's
names; hangwatch's own events go to the log only, so a callback written for torch
sees nothing it does not know.

Event names:

- ``watchdog started`` / ``watchdog stopped``: the server's watchdog thread started or stopped.
- ``timer expired``: a timer was not released by its deadline (one event per timer).
- ``kill worker process``: the worker of an expired timer was signalled.
- ``expired, not signalled``: the expired timers asked for no signal (a FileTimerClient with signal <= 0).
- ``worker exited``: a worker holding timers exited; its timers were dropped, it is not signalled.
- ``bad request``: a request was refused (malformed, or naming a process that must not be signalled).
- ``reap failed``: signalling the worker failed (the reason is in ``details``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

__all__ = ["TORCH_EVENT_NAMES", "Event", "EventEmitter"]

logger = logging.getLogger("hangwatch.events")

TORCH_EVENT_NAMES = frozenset({"watchdog started", "timer expired", "kill worker process", "watchdog stopped"})

_WARNING_EVENTS = frozenset({"timer expired", "kill worker process", "bad request", "reap failed"})


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
        parts.extend(f"{key}={value!r}" for key, value in self.details.items())
        return " ".join(parts)


class EventEmitter:
    """Builds events and delivers them to the log and to torch's ``log_event`` callback.

    Args:
        log_event: torch's callback, called as ``log_event(name, request_or_None)`` for torch's
            event names only. An exception it raises is logged, never propagated.
    """

    __slots__ = ("_log_event",)

    def __init__(self, log_event: Optional[Callable[[str, Any], None]] = None) -> None:
        self._log_event = log_event

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
        if self._log_event is not None and name in TORCH_EVENT_NAMES:
            try:
                self._log_event(name, request)
            except Exception:
                logger.exception("The log_event callback raised on event %r", name)
        return event
