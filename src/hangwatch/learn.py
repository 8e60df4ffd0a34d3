"""Deadlines that fit the job: per-scope statistics shared by servers, and deadlines learned from them.

A :class:`ScopeStatistics` table holds the figures of every scope (blocks, duration
quantiles, the closest call; see :class:`hangwatch._stats.ScopeStats`). Servers add each
released block to it; several servers may share one table (the agent's FIFO and
shared-memory servers, every attempt of a run), and a table can be saved to a file and
loaded by a later run.

With :class:`Learning`, the table also learns a deadline per scope once it has seen
``warmup`` blocks of it::

    learned = min(after, max(floor, factor * quantile of the observed durations))

The floor is never undercut and a block's own ``after`` never exceeded: learning only
ever shortens a deadline, and never below the floor. A learned deadline rises at once
when a block slower than the figures it came from is released, and is recomputed as the
figures grow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Union

from ._stats import ScopeStats

__all__ = ["LearnedDeadline", "Learning", "ScopeStatistics", "basis_text", "seconds_text", "statistics_table"]

_FORMAT = "hangwatch scope statistics"
_VERSION = 1
# How often a learned deadline is recomputed as a scope's blocks grow: every 1/_REFRESH of its count.
_REFRESH = 32


def _seconds(name: str, value: Any, *, low: float, strict: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bound} (got {value!r})")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Learning:
    """How deadlines are learned: ``min(after, max(floor, factor x quantile))`` per scope, after ``warmup`` blocks.

    Args:
        floor: the shortest deadline learning may give, in seconds; never undercut.
        factor: the safety factor over the observed quantile (>= 1).
        quantile: which quantile of the observed durations (0.5 .. 1; 1 is the maximum,
            the default: a learned deadline then sits ``factor`` times above the slowest
            block seen).
        warmup: how many released blocks of a scope are seen before its deadline is learned.
        default: whether a block is learned unless it says otherwise (``expires(...,
            learn=False)``); with False only blocks that ask (``learn=True``) are.

    Raises:
        ValueError: a value is out of range (the message says which).
    """

    floor: float = 60.0
    factor: float = 3.0
    quantile: float = 1.0
    warmup: int = 100
    default: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "floor", _seconds("floor", self.floor, low=0.0, strict=True))
        object.__setattr__(self, "factor", _seconds("factor", self.factor, low=1.0, strict=False))
        q = self.quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.5 <= q <= 1:
            raise ValueError(f"quantile must be a number in [0.5, 1] (got {q!r})")
        object.__setattr__(self, "quantile", float(q))
        w = self.warmup
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"warmup must be a number of blocks >= 1 (got {w!r})")
        if not isinstance(self.default, bool):
            raise ValueError(f"default must be True or False (got {self.default!r})")

    def deadline(self, stats: ScopeStats) -> Optional[LearnedDeadline]:
        """The deadline learned from ``stats``, or None before ``warmup`` blocks."""
        if stats.count < self.warmup:
            return None
        basis = stats.max_s if self.quantile >= 1 else stats.quantile(self.quantile)
        assert basis is not None
        return LearnedDeadline(max(self.floor, self.factor * basis), basis, self, stats.count)

    def to_dict(self) -> Dict[str, Any]:
        """The settings as JSON values."""
        return dataclasses.asdict(self)


class LearnedDeadline(NamedTuple):
    """A scope's learned deadline, and the figures it came from.

    Attributes:
        seconds: the deadline a block of the scope gets (unless its own ``after`` is shorter).
        basis_s: the observed quantile it was computed from.
        learning: the settings (floor, factor, quantile).
        blocks: how many released blocks the figures held.
    """

    seconds: float
    basis_s: float
    learning: Learning
    blocks: int

    @property
    def at_floor(self) -> bool:
        """Whether the floor decided (``factor x basis`` was below it)."""
        return self.learning.factor * self.basis_s <= self.learning.floor

    def describe(self) -> str:
        """E.g. ``10 s (the floor; 3 x max 0.13 s from 1,234 blocks)``."""
        how = f"{basis_text(self.to_dict())} from {self.blocks:,} blocks"
        lead = "the floor; " if self.at_floor else ""
        return f"{seconds_text(self.seconds)} ({lead}{how})"

    def to_dict(self) -> Dict[str, Any]:
        """As JSON values (for events)."""
        q = self.learning
        return {
            "deadline_s": round(self.seconds, 6),
            "basis_s": round(self.basis_s, 6),
            "quantile": q.quantile,
            "factor": q.factor,
            "floor_s": q.floor,
            "blocks": self.blocks,
        }


def basis_text(learned: Dict[str, Any]) -> str:
    """``3 x max 0.13 s`` (or ``3 x p99 0.12 s``): what a learned deadline came from.

    ``learned``: the deadline as :meth:`LearnedDeadline.to_dict` gives it (events, figures).
    """
    q = learned.get("quantile", 1)
    name = "max" if q >= 1 else f"p{q * 100:g}"
    return f"{learned.get('factor', 0):g} x {name} {seconds_text(learned.get('basis_s'))}"


def statistics_table(
    statistics: Union[bool, ScopeStatistics],
    learn: Optional[Learning],
    *,
    wanted: bool = False,
    on_learned: Optional[Callable[[str, LearnedDeadline, float], None]] = None,
) -> Optional[ScopeStatistics]:
    """The table a server or a run uses: the one given, a new one, or None.

    A new one is made when ``statistics`` is True, ``learn`` is given, or ``wanted``.

    Raises:
        TypeError: ``statistics`` or ``learn`` is of the wrong type.
        ValueError: ``learn`` disagrees with the given table's learning.
    """
    if learn is not None and not isinstance(learn, Learning):
        raise TypeError(f"learn must be a hangwatch.Learning (got {learn!r})")
    if isinstance(statistics, ScopeStatistics):
        if learn is not None and learn != statistics.learning:
            raise ValueError(
                "learn= and a shared statistics= table disagree: give the Learning to the ScopeStatistics "
                "(ScopeStatistics(learning)) and leave learn= out"
            )
        return statistics
    if not isinstance(statistics, bool):
        raise TypeError(f"statistics must be True, False or a hangwatch.ScopeStatistics (got {statistics!r})")
    if statistics or learn is not None or wanted:
        return ScopeStatistics(learn, on_learned=on_learned)
    return None


def seconds_text(value: Any) -> str:
    """A duration for people: ``2.9 us``, ``4.2 ms``, ``0.35 s``, ``10 s``, ``600 s``; ``-`` when unknown."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if value < 0.001:
        return f"{value * 1e6:.2g} us"
    if value < 0.01:
        return f"{value * 1000:.2g} ms"
    if value < 10:
        return f"{value:.3g} s"
    return f"{value:,.0f} s"


class ScopeStatistics:
    """Per-scope figures of released blocks, shared by any number of servers; with ``learning``, learned deadlines.

    Thread-safe: each server adds from its own watchdog thread. Reading a learned deadline
    takes no lock.

    Args:
        learning: learn a deadline per scope (see :class:`Learning`); None: figures only.
        max_scopes: the most scopes tracked; blocks of further scopes are not counted (a
            client inventing a new name per block cannot grow the table without bound).
        on_learned: called with ``(scope, deadline, after)`` when a scope gets its first
            learned deadline (``after``: the timeout its last block asked for), from the
            thread that added the block, outside the table's lock.

    Raises:
        TypeError: ``learning`` is not a :class:`Learning`.
        ValueError: ``max_scopes`` is not an int >= 1.
    """

    def __init__(
        self,
        learning: Optional[Learning] = None,
        *,
        max_scopes: int = 4096,
        on_learned: Optional[Callable[[str, LearnedDeadline, float], None]] = None,
    ) -> None:
        if learning is not None and not isinstance(learning, Learning):
            raise TypeError(f"learning must be a hangwatch.Learning (got {learning!r})")
        if isinstance(max_scopes, bool) or not isinstance(max_scopes, int) or max_scopes < 1:
            raise ValueError(f"max_scopes must be an int >= 1 (got {max_scopes!r})")
        if on_learned is not None and not callable(on_learned):
            raise TypeError(f"on_learned must be callable (got {on_learned!r})")
        self._learning = learning
        self._max_scopes = max_scopes
        self._on_learned = on_learned
        self._lock = threading.Lock()
        self._scopes: Dict[str, ScopeStats] = {}
        self._learned: Dict[str, LearnedDeadline] = {}
        self._recompute_at: Dict[str, int] = {}  # scope -> block count at which its deadline is computed again
        # Figures from elsewhere, by source (another node of the job, a loaded file): they count for
        # learning and in figures(), and each source's are replaced as a whole when it sends again.
        self._remote: Dict[str, Dict[str, ScopeStats]] = {}
        self._remote_count: Dict[str, int] = {}  # scope -> blocks of it in the remote figures
        self._loads = 0
        # Scopes with blocks that may get a learned deadline (not all opted out): only theirs are
        # shown and announced. Servers mark them as such blocks arrive.
        self._learnable: Set[str] = set()
        self._untold: Dict[str, LearnedDeadline] = {}  # first deadlines of scopes not marked yet
        self.shortest_learned = math.inf  # the shortest deadline learned for any scope (seconds)

    @property
    def learning(self) -> Optional[Learning]:
        """The learning settings, or None (figures only)."""
        return self._learning

    @property
    def max_scopes(self) -> int:
        """The most scopes tracked."""
        return self._max_scopes

    def learned(self, scope: str) -> Optional[LearnedDeadline]:
        """The deadline learned for ``scope``, or None (not learning, or before its warm-up)."""
        return self._learned.get(scope)

    def mark_learnable(self, scope: str) -> None:
        """A block of ``scope`` that may get a learned deadline arrived (a server says so at its acquire).

        The scope's learned deadline is then shown in :meth:`figures` and announced (``on_learned``);
        a scope whose blocks all opt out (``learn=False``) is learned from but never shown as learned.
        """
        if scope in self._learnable or len(self._learnable) >= self._max_scopes:
            return
        with self._lock:
            self._learnable.add(scope)
            first = self._untold.pop(scope, None)
            after = self._timeout_of(scope) if first is not None else 0.0
        if first is not None:
            self._tell(scope, first, after)

    def add(self, scope: str, duration: float, budget: float, after: Optional[float] = None) -> Optional[float]:
        """Count one released block of ``scope``; the fraction of its budget it used, or None if not counted.

        Args:
            scope: the block's scope.
            duration: how long it ran, in seconds.
            budget: how long it had (its deadline minus its start).
            after: the timeout it asked for, when its budget was a shorter learned deadline.
        """
        with self._lock:
            stats = self._stats_of(scope)
            if stats is None:
                return None
            used = stats.add(duration, budget, after)
            first = self._relearn(scope, stats, duration)
        if first is not None:
            self._tell(scope, first, stats.timeout_s)
        return used

    def merge(self, scope: str, blocks: ScopeStats) -> bool:
        """Add ``blocks`` (another table's figures, a client's report) to ``scope``; False if not counted."""
        with self._lock:
            stats = self._stats_of(scope)
            if stats is None:
                return False
            stats.merge(blocks)
            first = self._relearn(scope, stats, blocks.max_s)
        if first is not None:
            self._tell(scope, first, stats.timeout_s)
        return True

    def _tell(self, scope: str, learned: LearnedDeadline, after: float) -> None:
        if scope not in self._learnable:
            with self._lock:
                if scope not in self._learnable:
                    self._untold[scope] = learned  # told when a block that may get it arrives
                    return
        if self._on_learned is not None:
            self._on_learned(scope, learned, after)

    def expired(self, scope: str) -> None:
        """Count one expired timer of ``scope``."""
        with self._lock:
            stats = self._stats_of(scope)
            if stats is not None:
                stats.expired += 1

    def __len__(self) -> int:
        """How many scopes this table's own servers track."""
        return len(self._scopes)

    def __bool__(self) -> bool:
        return True  # a table is a table, even empty (``statistics or ...`` must not drop an empty one)

    def set_remote(self, source: str, figures: Dict[str, Any]) -> int:
        """Take ``source``'s figures (another node's :meth:`own_figures`) in place of what it sent before.

        They count for learning, so every node of a job learns from every rank, and in
        :meth:`figures`; :meth:`own_figures` leaves them out. Malformed scopes are skipped.
        Returns how many scopes were taken.
        """
        taken: Dict[str, ScopeStats] = {}
        for scope, data in list(figures.items())[: self._max_scopes]:
            try:
                taken[str(scope)] = ScopeStats.from_dict(data)
            except ValueError:
                continue
        self._set_source(f"remote:{source}", taken)
        return len(taken)

    def _set_source(self, source: str, taken: Dict[str, ScopeStats]) -> None:
        """Put ``taken`` in place of what ``source`` gave before; tell the scopes that got a first deadline."""
        firsts = []
        with self._lock:
            old = self._remote.get(source, {})
            self._remote[source] = taken
            for scope in set(old) | set(taken):
                self._remote_count[scope] = sum(r[scope].count for r in self._remote.values() if scope in r)
            for scope, stats in taken.items():
                first = self._relearn(scope, self._scopes.get(scope), stats.max_s)
                if first is not None:
                    firsts.append((scope, first))
            timeouts = {scope: self._timeout_of(scope) for scope, _ in firsts}
        for scope, first in firsts:
            self._tell(scope, first, timeouts[scope])

    def own_figures(self) -> Dict[str, Dict[str, Any]]:
        """The figures of the blocks this table's own servers saw (no remote ones): what a node shares."""
        with self._lock:
            return {scope: stats.to_dict() for scope, stats in sorted(self._scopes.items())}

    def figures(self, *, loaded: bool = True) -> Dict[str, Dict[str, Any]]:
        """Each scope's figures (see :meth:`ScopeStats.to_dict`); when learning, also ``learned_s`` and
        ``learned`` (the deadline and its figures, or None) and ``learnable`` (whether any of its
        blocks may get one: False when they all opt out).

        Remote figures (:meth:`set_remote`) are included, and with ``loaded`` those of files
        (:meth:`load`); the learned deadlines come from all of them.
        """
        with self._lock:
            sources = [r for name, r in self._remote.items() if loaded or not name.startswith("file:")]
            names = sorted(set(self._scopes).union(*sources))
            out = {scope: self._combined(scope, self._scopes.get(scope), sources).to_dict() for scope in names}
            learned = dict(self._learned)
        if self._learning is not None:
            for scope, figures in out.items():
                figures["learnable"] = scope in self._learnable
                found = learned.get(scope) if figures["learnable"] else None
                figures["learned_s"] = None if found is None else round(found.seconds, 6)
                figures["learned"] = None if found is None else found.to_dict()
        return out

    def to_dict(self, *, loaded: bool = True) -> Dict[str, Any]:
        """The whole table as JSON values: what :meth:`save` writes and :meth:`load` reads."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "learning": None if self._learning is None else self._learning.to_dict(),
            "scopes": self.figures(loaded=loaded),
        }

    def save(self, path: Union[str, os.PathLike[str]], *, loaded: bool = True) -> None:
        """Write the table to ``path`` as JSON (atomically: a reader sees the old file or the new one).

        With ``loaded`` (the default) the figures of loaded files are included: a file saved
        after a load holds both, for the next run.
        """
        target = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(target))
        fd, temporary = tempfile.mkstemp(prefix=".hangwatch-stats-", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(loaded=loaded), f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(temporary, target)
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise

    def load(self, path: Union[str, os.PathLike[str]]) -> int:
        """Add the figures saved in ``path`` (by :meth:`save`) to this table; return how many scopes it held.

        Learned deadlines follow from all the figures (this table's settings apply), so a
        run that loads an earlier run's figures has its deadlines from its first block. They
        are kept apart from this table's own blocks: :meth:`own_figures` (what a node shares
        with the others) and ``figures(loaded=False)`` leave them out.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not saved scope statistics (the message says what is wrong).
        """
        target = os.fspath(path)
        with open(target, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except ValueError as exc:
                raise ValueError(f"{target} is not JSON ({exc}); was it written by ScopeStatistics.save?") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("scopes"), dict):
            raise ValueError(f"{target} is not a file of hangwatch scope statistics (written by ScopeStatistics.save)")
        if data.get("version") != _VERSION:
            raise ValueError(f"{target} has version {data.get('version')!r}; this hangwatch reads version {_VERSION}")
        loaded: Dict[str, ScopeStats] = {}
        for scope, figures in data["scopes"].items():
            try:
                loaded[scope] = ScopeStats.from_dict(figures)
            except ValueError as exc:
                raise ValueError(f"{target}: scope {scope!r}: {exc}") from None
        self._loads += 1
        self._set_source(f"file:{self._loads}:{target}", loaded)  # apart from this table's own blocks
        return len(loaded)

    # ----------------------------------------------------------------- internals (hold the lock)

    def _stats_of(self, scope: str) -> Optional[ScopeStats]:
        stats = self._scopes.get(scope)
        if stats is None:
            if len(self._scopes) >= self._max_scopes:
                return None
            stats = self._scopes[scope] = ScopeStats()
        return stats

    def _combined(
        self, scope: str, own: Optional[ScopeStats], sources: Optional[List[Dict[str, ScopeStats]]] = None
    ) -> ScopeStats:
        """The scope's own figures with those of ``sources`` (default: every remote one) added.

        Returns ``own`` itself when there is nothing to add.
        """
        if not self._remote_count.get(scope) and own is not None:
            return own
        combined = ScopeStats()
        if own is not None:
            combined.merge(own)
        for remote in self._remote.values() if sources is None else sources:
            found = remote.get(scope)
            if found is not None:
                combined.merge(found)
        return combined

    def _timeout_of(self, scope: str) -> float:
        own = self._scopes.get(scope)
        return own.timeout_s if own is not None and own.count else self._combined(scope, own).timeout_s

    def _relearn(self, scope: str, own: Optional[ScopeStats], slowest: float) -> Optional[LearnedDeadline]:
        """Compute the scope's deadline again when its figures grew enough, or a block was slower than its basis.

        Returns the deadline when it is the scope's first.
        """
        learning = self._learning
        count = (0 if own is None else own.count) + self._remote_count.get(scope, 0)
        if learning is None or count < learning.warmup:
            return None
        current = self._learned.get(scope)
        if current is not None and count < self._recompute_at.get(scope, 0) and slowest <= current.basis_s:
            return None
        stats = self._combined(scope, own)
        found = learning.deadline(stats)
        if found is not None:
            self._learned[scope] = found
            self._recompute_at[scope] = stats.count + max(1, stats.count // _REFRESH)
            if found.seconds <= self.shortest_learned:
                self.shortest_learned = found.seconds
            elif current is not None and current.seconds <= self.shortest_learned:  # the shortest grew
                self.shortest_learned = min(d.seconds for d in self._learned.values())
        return found if current is None else None
