"""Per-scope statistics of released blocks: how long they took, against how long they had.

A server that keeps statistics notes when each acquire arrived; when its release arrives
it adds the block's duration and its budget (deadline minus arrival) to the scope's
figures. Durations go into a histogram of logarithmic buckets 5% wide, so a quantile is
within 5% of the true one, memory stays bounded whatever the number of blocks, and the
figures of several servers (ranks, attempts) merge by adding counts.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, List, Optional

__all__ = ["ScopeStats"]

_RATIO = 1.05
_LOG_RATIO = math.log(_RATIO)
_INV_LOG_RATIO = 1 / _LOG_RATIO
_SMALLEST = 1e-6  # seconds: shorter durations share the first bucket
_MAX_BUCKET = 1000  # 1e-6 * 1.05**1000 s: far beyond any run
_MAX_COUNT = 1 << 53


def _bucket(seconds: float) -> int:
    if seconds <= _SMALLEST:
        return 0
    return min(_MAX_BUCKET, 1 + int(math.log(seconds / _SMALLEST) * _INV_LOG_RATIO))


def _upper(bucket: int) -> float:
    return _SMALLEST * _RATIO**bucket


class ScopeStats:
    """The figures of one scope: blocks released, their durations, their budgets, the closest call.

    Attributes:
        count: blocks released.
        expired: timers of this scope that expired.
        max_s: the longest block released, in seconds.
        timeout_s: the timeout the last released block asked for (its ``after``), in seconds.
        closest: the largest fraction of its budget a released block used (0 when none); a
            block's budget is its deadline minus its start: its ``after``, or the shorter
            learned deadline it was given.
        closest_duration_s: that block's duration.
        closest_timeout_s: that block's budget.
    """

    __slots__ = (
        "_buckets",
        "closest",
        "closest_duration_s",
        "closest_timeout_s",
        "count",
        "expired",
        "max_s",
        "timeout_s",
    )

    def __init__(self) -> None:
        self._buckets: Dict[int, int] = {}
        self.count = 0
        self.expired = 0
        self.max_s = 0.0
        self.timeout_s = 0.0
        self.closest = 0.0
        self.closest_duration_s = 0.0
        self.closest_timeout_s = 0.0

    def add(self, duration: float, budget: float, after: Optional[float] = None) -> float:
        """Count one released block; return the fraction of its budget it used (0 for a budget <= 0).

        Args:
            duration: how long the block ran, in seconds.
            budget: how long it had (its deadline minus its start).
            after: the timeout it asked for, when its budget was a shorter learned deadline.
        """
        duration = max(0.0, duration)
        index = _bucket(duration)
        self._buckets[index] = self._buckets.get(index, 0) + 1
        self.count += 1
        if duration > self.max_s:
            self.max_s = duration
        self.timeout_s = budget if after is None else after
        used = duration / budget if budget > 0 else 0.0
        if used > self.closest:
            self.closest, self.closest_duration_s, self.closest_timeout_s = used, duration, budget
        return used

    def add_durations(self, durations: List[float], after: float) -> None:
        """Count released blocks of one timeout: their durations, each with the budget ``after``."""
        if not durations:
            return
        log, smallest, inv, top = math.log, _SMALLEST, _INV_LOG_RATIO, _MAX_BUCKET
        counts = Counter([1 + int(log(d / smallest) * inv) if d > smallest else 0 for d in durations])
        buckets = self._buckets
        for index, n in counts.items():
            index = min(top, index)
            buckets[index] = buckets.get(index, 0) + n
        longest = max(0.0, max(durations))
        self.count += len(durations)
        self.max_s = max(self.max_s, longest)
        self.timeout_s = after
        if after > 0 and longest > self.closest * after:
            self.closest, self.closest_duration_s, self.closest_timeout_s = longest / after, longest, after

    def quantile(self, q: float) -> Optional[float]:
        """The ``q`` quantile (0..1) of the durations, within 5% (never above the maximum); None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return min(_upper(index), self.max_s)
        return self.max_s

    def merge(self, other: ScopeStats) -> None:
        """Add ``other``'s blocks to these (e.g. another rank's, another attempt's)."""
        for index, n in other._buckets.items():
            self._buckets[index] = self._buckets.get(index, 0) + n
        self.count += other.count
        self.expired += other.expired
        self.max_s = max(self.max_s, other.max_s)
        if other.count:
            self.timeout_s = other.timeout_s
        if other.closest > self.closest:
            self.closest = other.closest
            self.closest_duration_s, self.closest_timeout_s = other.closest_duration_s, other.closest_timeout_s

    def to_wire(self) -> List[Any]:
        """The blocks counted, compactly (no expiries, no quantiles): what a client reports to its server."""
        return [
            self.count,
            self.max_s,
            self.timeout_s,
            self.closest,
            self.closest_duration_s,
            self.closest_timeout_s,
            [[k, v] for k, v in self._buckets.items()],
        ]

    @classmethod
    def from_wire(cls, data: Any) -> ScopeStats:
        """Rebuild (and check) figures a client sent with :meth:`to_wire`.

        Raises:
            ValueError: ``data`` is not such a list, or its figures do not add up.
        """
        if not isinstance(data, list) or len(data) != 7:
            raise ValueError(f"block figures must be a list of 7 items (got {data!r:.80})")
        count, *seconds, buckets = data
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MAX_COUNT:
            raise ValueError(f"a block count must be an int in [1, {_MAX_COUNT}] (got {count!r:.40})")
        for value in seconds:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"block figures must be finite numbers >= 0 (got {value!r:.40})")
        if not isinstance(buckets, list) or len(buckets) > _MAX_BUCKET + 1:
            raise ValueError("the histogram must be a list of [bucket, count] pairs")
        stats = cls()
        for pair in buckets:
            if not (isinstance(pair, list) and len(pair) == 2 and all(type(x) is int for x in pair)):
                raise ValueError(f"a histogram entry must be [bucket, count] (got {pair!r:.40})")
            index, n = pair
            if not 0 <= index <= _MAX_BUCKET or not 1 <= n <= count or index in stats._buckets:
                raise ValueError(f"bad histogram entry {pair!r:.40}")
            stats._buckets[index] = n
        if sum(stats._buckets.values()) != count:
            raise ValueError("the histogram does not add up to the block count")
        stats.count = count
        stats.max_s, stats.timeout_s, stats.closest, stats.closest_duration_s, stats.closest_timeout_s = map(
            float, seconds
        )
        return stats

    def to_dict(self) -> Dict[str, Any]:
        """The figures as plain JSON values (durations in seconds), histogram included for merging."""
        return {
            "blocks": self.count,
            "expired": self.expired,
            "p50_s": self.quantile(0.5),
            "p99_s": self.quantile(0.99),
            "max_s": self.max_s if self.count else None,
            "timeout_s": self.timeout_s if self.count else None,
            "closest_call": self.closest if self.count else None,
            "closest_call_duration_s": self.closest_duration_s if self.count else None,
            "closest_call_timeout_s": self.closest_timeout_s if self.count else None,
            "histogram": {str(k): v for k, v in sorted(self._buckets.items())},
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> ScopeStats:
        """Rebuild figures written by :meth:`to_dict`.

        Raises:
            ValueError: ``data`` is not such a dict.
        """
        stats = cls()
        try:
            stats._buckets = {int(k): int(v) for k, v in data.get("histogram", {}).items()}
            stats.count = int(data["blocks"])
            stats.expired = int(data.get("expired", 0))
            stats.max_s = float(data.get("max_s") or 0.0)
            stats.timeout_s = float(data.get("timeout_s") or 0.0)
            stats.closest = float(data.get("closest_call") or 0.0)
            stats.closest_duration_s = float(data.get("closest_call_duration_s") or 0.0)
            stats.closest_timeout_s = float(data.get("closest_call_timeout_s") or 0.0)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not scope statistics ({type(exc).__name__}: {exc})") from None
        if sum(stats._buckets.values()) != stats.count:
            raise ValueError("not scope statistics: the histogram does not add up to the block count")
        return stats
