"""The deadline book: active timers keyed by (worker, scope), ordered by deadline.

A binary heap with lazy deletion (replaced and removed entries stay in the heap,
marked dead, until they surface or the heap is compacted), plus an index by
worker. Costs: set/remove O(log n), next_deadline O(1) amortised, expired(cutoff)
O(k) for k timers at or before the cutoff, drop_worker O(timers of that worker).
Deadlines are plain floats on whatever clock the caller uses (the servers use
``time.monotonic()``).
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

__all__ = ["DeadlineBook"]

W = TypeVar("W", bound=int)
P = TypeVar("P")

# An entry is a list so the heap can compare it cheaply: [deadline, worker, scope, payload]. Live
# entries differ in (deadline, worker, scope), so a comparison never reaches the payloads. A dead
# entry (replaced or removed) gets the worker _DEAD_WORKER (workers are ints >= 0) and the payload
# _DEAD: it then differs from every live entry before the payload, and equals other dead ones.
# A book that keeps start times (for statistics) or notes appends them: [deadline, worker, scope, payload, start, note].
_DEADLINE, _WORKER, _SCOPE, _PAYLOAD, _START, _NOTE = range(6)
_DEAD_WORKER = -1
_DEAD: Any = object()


class DeadlineBook(Generic[W, P]):
    """Active timers, one per (worker, scope), ordered by deadline."""

    __slots__ = ("_by_worker", "_heap", "_live")

    def __init__(self) -> None:
        self._by_worker: Dict[W, Dict[str, List[Any]]] = {}
        self._heap: List[List[Any]] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def set(
        self, worker: W, scope: str, deadline: float, payload: P, start: Optional[float] = None, note: Any = None
    ) -> None:
        """Add the timer, or replace the one this worker holds under ``scope`` (``worker``: an int >= 0).

        ``start`` and ``note``, if given, are kept with the timer: :meth:`take` returns them,
        :meth:`note_of` the note.
        """
        scopes = self._by_worker.get(worker)
        if scopes is None:
            scopes = self._by_worker[worker] = {}
        old = scopes.get(scope)
        if old is not None:
            old[_WORKER] = _DEAD_WORKER
            old[_PAYLOAD] = _DEAD
        else:
            self._live += 1
        if start is None and note is None:
            entry = [deadline, worker, scope, payload]
        else:
            entry = [deadline, worker, scope, payload, start, note]
        scopes[scope] = entry
        heapq.heappush(self._heap, entry)
        self._maybe_compact()

    def remove(self, worker: W, scope: str) -> bool:
        """Remove one timer; return whether it was there."""
        return self.take(worker, scope) is not None

    def take(self, worker: W, scope: str) -> Optional[Tuple[float, Optional[float], Any]]:
        """Remove one timer; return its (deadline, start, note), or None if it was not held."""
        scopes = self._by_worker.get(worker)
        if scopes is None:
            return None
        entry = scopes.pop(scope, None)
        if entry is None:
            return None
        if not scopes:
            del self._by_worker[worker]
        self._kill(entry)
        if len(entry) > _START:
            return entry[_DEADLINE], entry[_START], entry[_NOTE]
        return entry[_DEADLINE], None, None

    def drop_worker(self, worker: W) -> List[P]:
        """Remove every timer of ``worker``; return their payloads."""
        scopes = self._by_worker.pop(worker, None)
        if not scopes:
            return []
        payloads = []
        for entry in scopes.values():
            payloads.append(entry[_PAYLOAD])
            self._kill(entry)
        return payloads

    def count_of(self, worker: W) -> int:
        """How many timers ``worker`` holds."""
        return len(self._by_worker.get(worker, ()))

    def holds(self, worker: W, scope: str) -> bool:
        """Whether ``worker`` holds a timer named ``scope``."""
        return scope in self._by_worker.get(worker, ())

    def has_worker(self, worker: W) -> bool:
        """Whether ``worker`` holds any timer."""
        return worker in self._by_worker

    def workers(self) -> Iterator[W]:
        """The workers that hold at least one timer."""
        return iter(list(self._by_worker))

    def timers_of(self, worker: W) -> Dict[str, P]:
        """The payloads ``worker`` holds, by scope."""
        scopes = self._by_worker.get(worker, {})
        return {scope: entry[_PAYLOAD] for scope, entry in scopes.items()}

    def deadline_of(self, worker: W, scope: str) -> Optional[float]:
        """The deadline of one timer, or None if it is not held."""
        entry = self._by_worker.get(worker, {}).get(scope)
        return None if entry is None else float(entry[_DEADLINE])

    def note_of(self, worker: W, scope: str) -> Any:
        """The note kept with one timer (None if none, or the timer is not held)."""
        entry = self._by_worker.get(worker, {}).get(scope)
        return entry[_NOTE] if entry is not None and len(entry) > _NOTE else None

    def next_deadline(self) -> Optional[float]:
        """The earliest deadline among active timers, or None when there are none."""
        heap = self._heap
        while heap and heap[0][_PAYLOAD] is _DEAD:
            heapq.heappop(heap)
        return heap[0][_DEADLINE] if heap else None

    def expired(self, cutoff: float) -> Dict[W, List[P]]:
        """The payloads of timers whose deadline is at or before ``cutoff``, by worker, earliest first.

        Nothing is removed: the caller clears what it has dealt with.
        """
        heap = self._heap
        found: List[List[Any]] = []
        stack = [0] if heap else []
        n = len(heap)
        while stack:
            i = stack.pop()
            entry = heap[i]
            if entry[_DEADLINE] > cutoff:
                continue  # the heap property: nothing below it is earlier
            if entry[_PAYLOAD] is not _DEAD:
                found.append(entry)
            left = 2 * i + 1
            if left < n:
                stack.append(left)
                if left + 1 < n:
                    stack.append(left + 1)
        found.sort()  # live entries: by deadline, then worker and scope
        result: Dict[W, List[P]] = {}
        for entry in found:
            result.setdefault(entry[_WORKER], []).append(entry[_PAYLOAD])
        return result

    def _kill(self, entry: List[Any]) -> None:
        entry[_WORKER] = _DEAD_WORKER
        entry[_PAYLOAD] = _DEAD
        self._live -= 1
        heap = self._heap
        while heap and heap[0][_PAYLOAD] is _DEAD:
            heapq.heappop(heap)
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        # Dead entries are at most half the heap (plus slack), so memory and the cost
        # of expired() stay proportional to the live timers.
        if len(self._heap) > 2 * self._live + 64:
            self._heap = [entry for entry in self._heap if entry[_PAYLOAD] is not _DEAD]
            heapq.heapify(self._heap)
