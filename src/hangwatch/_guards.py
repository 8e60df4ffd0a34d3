"""Cached guards: what :func:`hangwatch.expires` hands out for the built-in clients.

``expires(after=60, scope="step")`` on a hangwatch client returns the same guard object
for every block of that scope (or, for a default scope, of that call site), built once.
A guard holds no state between its enter and its exit, so one guard serves nested
blocks, threads and every call of a decorated function, with torch's semantics: the
last acquire wins, the first release releases.

The shared-memory client's guards store a deadline; the queue's and the FIFO's send the
request each time, from bytes prepared once per scope and process (a fork prepares them
again: the pid is inside).
"""

from __future__ import annotations

import abc
import logging
import os
import struct
import threading
import time
from types import TracebackType
from typing import Any, Callable, Dict, Optional, Tuple, Type

from . import api as _api

__all__ = ["GuardCache", "LineGuard", "PickleGuard", "SendGuard", "Wire"]

logger = logging.getLogger(__name__)

_CACHE_MAX = 4096


class GuardCache(abc.ABC):
    """A client mixin: the caches :func:`hangwatch.expires` reads, and how a guard is made.

    A client sets up the caches with :meth:`_init_guards` and implements :meth:`_new_guard`.
    """

    _named: Dict[str, _api._Expiry]  # guards of named scopes
    _sites: Dict[int, _api._Expiry]  # guards of default scopes, by instruction offset (cheap to hash)
    _site_index: Dict[Tuple[Any, int], _api._Expiry]  # ... and by (code, offset)
    _guard_lock: Any

    def _init_guards(self, lock: Any = None) -> None:
        self._named = {}
        self._sites = {}
        self._site_index = {}
        self._guard_lock = lock if lock is not None else threading.Lock()

    @property
    def _guard_cache_max(self) -> int:
        return _CACHE_MAX

    @abc.abstractmethod
    def _new_guard(self, scope: str, after: float, code: Any) -> _api._Expiry:
        """A new guard for ``scope`` (``code``: the call site's code object for a default scope). Holds the lock."""

    def _named_guard(self, after: float, scope: str) -> _api._Expiry:
        """A guard for ``scope`` (validated and cached); called by :func:`hangwatch.expires`."""
        value = _api._check_after(after)
        with self._guard_lock:
            guard = self._new_guard(scope, value, None)
            if len(self._named) >= self._guard_cache_max:
                self._named.clear()
            self._named[scope] = guard
        return guard

    def _site_guard(self, after: float, frame: Any) -> _api._Expiry:
        """A guard for the default scope of the call site ``frame`` is at; called by :func:`hangwatch.expires`.

        Two sites at the same instruction offset (in different code) share a cache entry:
        each guard checks its code object, so they are slower, but right.
        """
        value = _api._check_after(after)
        code, lasti = frame.f_code, frame.f_lasti
        with self._guard_lock:
            guard = self._site_index.get((code, lasti))
            if guard is None or guard._after != value:
                guard = self._new_guard(f"{code.co_filename}#{frame.f_lineno}", value, code)
                if len(self._site_index) >= self._guard_cache_max:
                    self._site_index.clear()
                    self._sites.clear()
                self._site_index[(code, lasti)] = guard
            self._sites[lasti] = guard
        return guard


# What a send guard sends in one process: (pid, acquire head, acquire tail, release), or the
# pid and None when this client cannot prepare the scope's requests (it then calls acquire/release).
Wire = Tuple[int, Any, Any, Any]

_pack_time = struct.Struct(">d").pack


class SendGuard(_api._Expiry):
    """A guard that sends an acquire on enter and a release on exit, from bytes prepared per process.

    The client gives ``prepare(scope)`` (the wire of the calling process) and ``send(data)``.
    Subclasses say how the time goes into the acquire (:meth:`__enter__`).
    """

    __slots__ = ("__weakref__", "_code", "_prepare", "_send", "_wire")

    def __init__(
        self,
        client: Any,
        after: float,
        scope: str,
        code: Any,
        prepare: Callable[[str], Wire],
        send: Callable[[bytes], None],
    ) -> None:
        super().__init__(after, scope, client)
        self._code = code  # the call site's code object, for a default scope
        self._prepare = prepare
        self._send = send
        self._wire: Wire = (-1, None, None, None)

    def _rewire(self) -> Wire:
        wire = self._wire = self._prepare(self._scope)
        return wire

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
        _getpid: Callable[[], int] = os.getpid,
    ) -> None:
        wire = self._wire
        if wire[0] != _getpid():
            wire = self._rewire()  # forked inside the block: release this process's timer, not the parent's
        try:
            if wire[3] is None:
                self._client.release(self._scope)  # type: ignore[union-attr]
            else:
                self._send(wire[3])
        except Exception:
            if exc_type is None:
                raise
            # The block's own exception is what the user needs to see; say why the release failed.
            logger.warning(
                "Could not release timer %r while the block raised %s", self._scope, exc_type.__name__, exc_info=True
            )

    def _fresh(self) -> _api._Expiry:
        return self  # holds no per-block state: one guard serves every call of a decorated function

    def __repr__(self) -> str:
        return f"<expires(after={self._after!r}, scope={self._scope!r}) on {self._client!r}>"


class PickleGuard(SendGuard):
    """The queue client's guard: the acquire is a pickle with the time's 8 bytes in the middle."""

    __slots__ = ()

    def __enter__(
        self,
        _getpid: Callable[[], int] = os.getpid,
        _time: Callable[[], float] = time.time,
        _pack: Callable[[float], bytes] = _pack_time,
    ) -> None:
        wire = self._wire
        if wire[0] != _getpid():
            wire = self._rewire()
        if wire[1] is None:
            self._client.acquire(self._scope, _time() + self._after)  # type: ignore[union-attr]
            return
        self._send(wire[1] + _pack(_time() + self._after) + wire[2])


class LineGuard(SendGuard):
    """The FIFO client's guard: the acquire is a JSON line with the time's digits in the middle."""

    __slots__ = ()

    def __enter__(
        self,
        _getpid: Callable[[], int] = os.getpid,
        _time: Callable[[], float] = time.time,
        _repr: Callable[[float], str] = float.__repr__,
    ) -> None:
        wire = self._wire
        if wire[0] != _getpid():
            wire = self._rewire()
        if wire[1] is None:
            self._client.acquire(self._scope, _time() + self._after)  # type: ignore[union-attr]
            return
        self._send((wire[1] + _repr(_time() + self._after) + wire[2]).encode())
