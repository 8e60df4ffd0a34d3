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
import signal
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from ._pidserver import PidTimerServer
from ._reaper import ProcessPin, ReapPolicy, check_policy
from ._worker import DEFAULT_DUMP_SIGNAL, check_dump_signal, identity
from .api import RequestQueue, TimerClient, TimerRequest
from .events import EventSink

__all__ = ["LocalTimerClient", "LocalTimerServer", "MultiprocessingRequestQueue", "WorkerRequest"]


def _check_queue(mp_queue: Any, *methods: str) -> None:
    missing = [m for m in methods if not callable(getattr(mp_queue, m, None))]
    if missing:
        raise TypeError(
            f"mp_queue must be a multiprocessing queue, e.g. multiprocessing.get_context('spawn').Queue() "
            f"(got {type(mp_queue).__name__}, which has no {', '.join(missing)}())"
        )


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


class LocalTimerClient(TimerClient):
    """Client side of :class:`LocalTimerServer`: sends requests on a multiprocessing queue.

    Identifies the worker by ``os.getpid()`` at each request, so one client object can be
    inherited across ``fork``. Each acquire also carries the worker's start time (so a
    recycled pid is never mistaken for it) and, on Linux, the stack-dump handler it
    registers (see :meth:`register_dump_handler`).

    Args:
        mp_queue: the queue given to the server.
        dump_signal: the signal on which this worker writes its all-thread stack for the
            server before a reap (default SIGUSR2); None for no stack dumps.
        reap_policy: how this worker is reaped (default: the server's policy).

    Raises:
        TypeError: ``mp_queue`` is not a queue, or ``reap_policy`` is not a ReapPolicy.
        ValueError: ``dump_signal`` cannot carry stack dumps.
    """

    accepts_reap_policy = True

    def __init__(
        self,
        mp_queue: Any,
        *,
        dump_signal: Union[int, signal.Signals, None] = DEFAULT_DUMP_SIGNAL,
        reap_policy: Optional[ReapPolicy] = None,
    ) -> None:
        super().__init__()
        _check_queue(mp_queue, "put")
        self._mp_queue = mp_queue
        self._dump_signal = check_dump_signal(dump_signal)
        self._reap_policy = check_policy(reap_policy)
        self._ext_pid = -1
        self._ext: Dict[str, Any] = {}

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
        return self._ext

    def acquire(self, scope_id: str, expiration_time: float, reap_policy: Optional[ReapPolicy] = None) -> None:
        """Ask the server to reap this worker at ``expiration_time`` unless ``scope_id`` is released.

        Args:
            scope_id: the timer's name within this worker.
            expiration_time: absolute ``time.time()`` seconds.
            reap_policy: how to reap this worker if this timer expires (default: the client's).
        """
        ext = self._ext if self._ext_pid == os.getpid() else self._identity()
        if reap_policy is not None:
            check_policy(reap_policy)
            ext = {**ext, "reap": reap_policy.to_wire()}
        self._mp_queue.put(WorkerRequest(os.getpid(), scope_id, expiration_time, ext))

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
        reap_policy: how workers are reaped unless their client chooses (default: stack dump
            if registered, then SIGKILL).
        allowed_pids: if given, only these pids are ever signalled (see ``set_allowed_pids``).
        event_file: append every event to this file as JSON lines.
        on_event: called with every :class:`~hangwatch.Event`.
        pin: how a worker is pinned and signalled (tests pass a recorder).

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
        event_file: Union[str, os.PathLike[str], None] = None,
        on_event: Optional[EventSink] = None,
        pin: Callable[[int], ProcessPin] = ProcessPin,
    ) -> None:
        super().__init__(
            MultiprocessingRequestQueue(mp_queue),
            max_interval,
            daemon,
            log_event,
            reap_policy=reap_policy,
            allowed_pids=allowed_pids,
            event_file=event_file,
            on_event=on_event,
            pin=pin,
        )
