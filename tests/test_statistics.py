"""Per-scope statistics and near misses, measured by the server for any client."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import pytest

import hangwatch
from hangwatch._stats import ScopeStats

import _workers
from conftest import EventLog, run_worker, wait_for


class TestScopeStats:
    def test_quantiles_are_within_five_percent_and_max_is_exact(self) -> None:
        """Known durations: p50 and p99 within 5% of the true ones, the max exact, the closest call found."""
        rng = random.Random(7)
        durations = [rng.uniform(0.05, 0.15) for _ in range(9_900)] + [rng.uniform(1.0, 2.0) for _ in range(100)]
        stats = ScopeStats()
        for d in durations:
            stats.add(d, 4.0)
        ordered = sorted(durations)
        for q in (0.5, 0.99):
            true = ordered[int(q * len(ordered)) - 1]
            got = stats.quantile(q)
            assert got is not None and abs(got - true) <= 0.05 * true + 1e-9, (q, got, true)
        assert stats.max_s == max(durations) and stats.count == 10_000
        assert stats.closest == pytest.approx(max(durations) / 4.0)
        assert stats.timeout_s == 4.0

    def test_merge_and_round_trip(self) -> None:
        """Two ranks' figures merge as if one server saw both; the JSON form rebuilds the same figures."""
        a, b, both = ScopeStats(), ScopeStats(), ScopeStats()
        for i in range(1, 200):
            (a if i % 2 else b).add(i / 100, 5.0)
            both.add(i / 100, 5.0)
        b.expired = 2
        a.merge(b)
        assert a.to_dict() == {**both.to_dict(), "expired": 2}
        again = ScopeStats.from_dict(a.to_dict())
        assert again.to_dict() == a.to_dict()
        with pytest.raises(ValueError, match="not scope statistics"):
            ScopeStats.from_dict({"blocks": 3, "histogram": {"1": 1}})
        with pytest.raises(ValueError, match="not scope statistics"):
            ScopeStats.from_dict({"histogram": []})

    def test_an_empty_scope_has_no_figures(self) -> None:
        assert ScopeStats().quantile(0.5) is None
        assert ScopeStats().to_dict()["p99_s"] is None


@pytest.fixture
def fifo_stats(tmp_path: Path) -> Iterator[hangwatch.FileTimerServer]:
    server = hangwatch.FileTimerServer(str(tmp_path / "t.fifo"), statistics=True, near_miss=0.5)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_server_measures_each_scopes_blocks(fifo_stats: hangwatch.FileTimerServer, events: EventLog) -> None:
    """Blocks of known durations: counts, quantiles and timeout as a user would read them; no near miss."""
    plan = [("fast", 5.0, 0.0, 200), ("steady", 5.0, 0.05, 20)]
    p = run_worker(_workers.timed_blocks_file, fifo_stats.file_path, plan)
    assert p.exitcode == 0
    assert wait_for(lambda: fifo_stats.request_count >= 440, 10)
    stats = fifo_stats.scope_statistics()
    assert set(stats) == {"fast", "steady"}
    assert stats["fast"]["blocks"] == 200 and stats["steady"]["blocks"] == 20
    assert stats["fast"]["p50_s"] < 0.05  # generous: the benchmark has the tight figures
    assert 0.04 <= stats["steady"]["p50_s"] <= stats["steady"]["p99_s"] <= stats["steady"]["max_s"] < 2
    assert 4 < stats["steady"]["timeout_s"] <= 5.01
    assert stats["steady"]["closest_call"] < 0.5
    assert events.named("near miss") == []


def test_a_near_miss_is_told_once_per_scope(fifo_stats: hangwatch.FileTimerServer, events: EventLog) -> None:
    """Three blocks using ~60% of their budget (threshold 50%): one event, the closest call recorded."""
    p = run_worker(_workers.timed_blocks_file, fifo_stats.file_path, [("close", 1.0, 0.6, 3)])
    assert p.exitcode == 0
    assert wait_for(lambda: fifo_stats.scope_statistics().get("close", {}).get("blocks") == 3, 10)
    misses = events.named("near miss")
    assert len(misses) == 1 and misses[0].scope == "close" and misses[0].worker == p.pid
    assert 0.5 < misses[0].details["used"] < 1 and misses[0].details["timeout_s"] == pytest.approx(1.0, abs=0.1)
    assert 0.5 < fifo_stats.scope_statistics()["close"]["closest_call"] < 1


def test_an_expired_timer_is_counted(fifo_stats: hangwatch.FileTimerServer, events: EventLog) -> None:
    """A block that outlives its timer counts as an expiry of its scope (the client does not signal here)."""
    p = run_worker(_workers.timed_blocks_file, fifo_stats.file_path, [("late", 0.1, 0.4, 1)])
    assert p.exitcode == 0
    assert wait_for(lambda: fifo_stats.scope_statistics().get("late", {}).get("expired") == 1, 10)
    assert events.named("timer expired")[0].scope == "late"


def test_torchs_client_is_measured_too(fifo_stats: hangwatch.FileTimerServer) -> None:
    """The figures come from the server: torch's own FileTimerClient needs no change."""
    pytest.importorskip("torch.distributed.elastic.timer", reason="torch is not installed")
    p = run_worker(_workers.torch_timed_blocks_file, fifo_stats.file_path, 10, timeout=120)
    assert p.exitcode == 0
    assert wait_for(lambda: fifo_stats.scope_statistics().get("torch's", {}).get("blocks") == 10, 10)


def test_statistics_are_opt_in(tmp_path: Path) -> None:
    """Without statistics=True the server says how to get them; a bad threshold is refused."""
    q = __import__("multiprocessing").get_context("spawn").Queue()
    with pytest.raises(RuntimeError, match="statistics=True"):
        hangwatch.LocalTimerServer(q).scope_statistics()
    for bad in (0, 1.5, True, "0.8"):
        with pytest.raises(ValueError, match="near_miss"):
            hangwatch.LocalTimerServer(q, statistics=True, near_miss=bad)
