"""Heartbeats: a timer that every beat re-arms, for loops with no natural block.

::

    for message in consumer:                       # a loop that may stall anywhere
        hangwatch.heartbeat("consumer", timeout=30)  # each call re-arms; a missed beat expires
        handle(message)
    hangwatch.heartbeat("consumer", timeout=30).stop()

A heartbeat is a timer like any other (same scope namespace, same server, reaping,
stack dumps and events): each beat acquires it again with a deadline ``timeout``
seconds away, so it expires only when no beat came for that long. On the shared-memory
pair a beat is a store to shared memory, with no system call; on the queue and FIFO
pairs it is one request, as an ``expires`` block's acquire is.

A beat that is never stopped holds its timer until the process exits (the server then
drops it at once, unsignalled).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Optional, Type

from . import api as _api
from .api import TimerClient

__all__ = ["Heartbeat", "heartbeat"]


class Heartbeat:
    """A heartbeat timer: :meth:`beat` re-arms it, :meth:`stop` releases it.

    Made (and beaten once) by :func:`heartbeat`. Also a context manager: ``with
    heartbeat("loop", 30) as hb: ... hb.beat() ...`` stops it on the way out.
    """

    __slots__ = ("_guard",)

    def __init__(self, guard: Any) -> None:
        self._guard = guard

    @property
    def scope(self) -> str:
        """The timer's scope."""
        return str(self._guard._scope)

    @property
    def timeout(self) -> float:
        """Seconds a beat keeps the timer from expiring."""
        return float(self._guard._after)

    def beat(self) -> None:
        """Re-arm: the timer now expires ``timeout`` seconds from now, unless beaten again or stopped.

        Raises:
            RuntimeError: no client was given or configured.
            ServerUnavailableError: the server is gone (FIFO and shared-memory pairs).
        """
        self._guard.__enter__()

    def stop(self) -> None:
        """Release the timer: it can no longer expire (until the next beat)."""
        guard = self._guard
        disarm = getattr(guard, "_disarm", None)
        if disarm is not None:
            disarm()
        else:
            guard.__exit__(None, None, None)

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<heartbeat {self.scope!r} timeout={self.timeout!r}>"


def heartbeat(scope: str, timeout: float, client: Optional[TimerClient] = None) -> Heartbeat:
    """Beat ``scope``: if the next beat does not come within ``timeout`` seconds, the worker may be reaped.

    Every call re-arms the same timer (the last beat wins), so calling it once per loop
    iteration is the whole set-up. It returns the :class:`Heartbeat`, whose
    :meth:`~Heartbeat.stop` ends it. With hangwatch's clients a call costs about what an
    ``expires`` block's entry costs (a store to shared memory on the shared-memory pair).

    Args:
        scope: the timer's name within this worker (shared with ``expires`` scopes: use
            a name of its own).
        timeout: seconds from this beat until the timer expires; a finite number >= 0.
        client: the client to use; default the one set by :func:`hangwatch.configure`.

    Returns:
        The heartbeat, already beaten.

    Raises:
        TypeError: ``scope`` is not a str.
        ValueError: ``timeout`` is not a finite number >= 0.
        RuntimeError: no client was given or configured.
    """
    if not isinstance(scope, str):
        raise TypeError(f"scope must be a str naming the heartbeat (got {scope!r})")
    fast: Any = _api._fast_client if client is None else client
    guard: Any
    if fast is not None and getattr(fast, "_fast_guards", False) is True:
        named = fast._named
        guard = named.get(scope)
        if guard is None or guard._after != timeout:
            guard = fast._named_guard(timeout, scope)
    else:
        guard = _api._Expiry(_api._check_after(timeout), scope, client)
    guard.__enter__()
    return Heartbeat(guard)
