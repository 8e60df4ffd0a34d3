"""The multiprocessing-queue pair: LocalTimerServer, LocalTimerClient, MultiprocessingRequestQueue.

Workers are subprocesses of the process running the server, started with spawn,
fork or forkserver, and identified by pid. Pass the same ``multiprocessing`` queue
(from the context you start the workers with) to the server and to each worker's
client.
"""

from __future__ import annotations

import io
import os
import queue as _queue
import time
from typing import Any, Callable, List, Optional

from ._pidserver import PidTimerServer
from .api import RequestQueue, TimerClient, TimerRequest

__all__ = ["LocalTimerClient", "LocalTimerServer", "MultiprocessingRequestQueue"]


def _check_queue(mp_queue: Any, *methods: str) -> None:
    missing = [m for m in methods if not callable(getattr(mp_queue, m, None))]
    if missing:
        raise TypeError(
            f"mp_queue must be a multiprocessing queue, e.g. multiprocessing.get_context('spawn').Queue() "
            f"(got {type(mp_queue).__name__}, which has no {', '.join(missing)}())"
        )


class LocalTimerClient(TimerClient):
    """Client side of :class:`LocalTimerServer`: sends requests on a multiprocessing queue.

    Identifies the worker by ``os.getpid()`` at each request, so one client object can be
    inherited across ``fork``.

    Args:
        mp_queue: the queue given to the server.

    Raises:
        TypeError: ``mp_queue`` is not a queue.
    """

    def __init__(self, mp_queue: Any) -> None:
        super().__init__()
        _check_queue(mp_queue, "put")
        self._mp_queue = mp_queue

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Ask the server to reap this worker at ``expiration_time`` unless ``scope_id`` is released."""
        self._mp_queue.put(TimerRequest(os.getpid(), scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        """Release this worker's timer ``scope_id``."""
        self._mp_queue.put(TimerRequest(os.getpid(), scope_id, -1))


class MultiprocessingRequestQueue(RequestQueue):
    """A :class:`RequestQueue` over a ``multiprocessing.Queue``; the watchdog waits on its pipe.

    Args:
        mp_queue: the queue the clients put requests on.
    """

    def __init__(self, mp_queue: Any) -> None:
        super().__init__()
        _check_queue(mp_queue, "get", "qsize")
        self._mp_queue = mp_queue

    def size(self) -> int:
        """How many requests are in the queue (raises NotImplementedError where the platform cannot tell)."""
        return int(self._mp_queue.qsize())

    def get(self, size: int, timeout: float) -> List[TimerRequest]:
        """Up to ``size`` requests, waiting at most ``timeout`` seconds in all."""
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

    def fileno(self) -> int:
        """The descriptor of the queue's pipe, readable when requests are waiting.

        Raises:
            io.UnsupportedOperation: the queue has no pipe to wait on (e.g. a manager's proxy).
        """
        reader = getattr(self._mp_queue, "_reader", None)
        if reader is None or not callable(getattr(reader, "fileno", None)):
            raise io.UnsupportedOperation("this queue has no pipe to wait on")
        return int(reader.fileno())


class LocalTimerServer(PidTimerServer):
    """Server side of :class:`LocalTimerClient`: reaps (SIGKILL) workers whose timers expired.

    Run it in the parent of the workers (the agent). It reaps a stuck worker within
    milliseconds of its deadline; ``max_interval`` only bounds one idle wait.

    Args:
        mp_queue: the queue given to the clients.
        max_interval: the longest one wait of the watchdog, in seconds.
        daemon: whether the watchdog thread is a daemon thread.
        log_event: optional ``log_event(name, request)`` callback, called with torch's event names.

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
    ) -> None:
        super().__init__(MultiprocessingRequestQueue(mp_queue), max_interval, daemon, log_event)
