"""Learned deadlines: tight where the job is fast, never below the floor, never above the block's own after."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hangwatch
from hangwatch import Learning, ScopeStatistics

import _workers
from conftest import EventLog, run_worker, wait_for


class TestLearning:
    def test_settings_are_checked(self) -> None:
        """Each bad setting is refused with its name and what it must be."""
        for kwargs, name in (
            ({"floor": 0}, "floor"),
            ({"floor": float("nan")}, "floor"),
            ({"factor": 0.5}, "factor"),
            ({"quantile": 0.2}, "quantile"),
            ({"quantile": True}, "quantile"),
            ({"warmup": 0}, "warmup"),
            ({"warmup": 1.5}, "warmup"),
            ({"default": 1}, "default"),
        ):
            with pytest.raises(ValueError, match=name):
                Learning(**kwargs)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Learning"):
            ScopeStatistics("fast")  # type: ignore[arg-type]

    def test_nothing_is_learned_before_the_warmup(self) -> None:
        """A scope gets a deadline at its warmup-th block, not one block before."""
        table = ScopeStatistics(Learning(floor=1, warmup=50))
        for _ in range(49):
            table.add("step", 0.1, 600)
        assert table.learned("step") is None
        table.add("step", 0.1, 600)
        learned = table.learned("step")
        assert learned is not None and learned.blocks == 50

    @settings(max_examples=200, deadline=None)
    @given(
        durations=st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=60),
        floor=st.floats(0.001, 1e3),
        factor=st.floats(1, 10),
        quantile=st.floats(0.5, 1),
    )
    def test_never_below_the_floor_and_above_the_slowest_block_seen(
        self, durations: List[float], floor: float, factor: float, quantile: float
    ) -> None:
        """Whatever the blocks, a learned deadline is at least the floor, and with the maximum at least factor x it."""
        table = ScopeStatistics(Learning(floor=floor, factor=factor, quantile=quantile, warmup=1))
        for d in durations:
            table.add("s", d, 1e6)
            learned = table.learned("s")
            assert learned is not None and learned.seconds >= floor
        high = ScopeStatistics(Learning(floor=floor, factor=factor, warmup=1))
        for d in durations:
            high.add("s", d, 1e6)
        found = high.learned("s")
        assert found is not None and found.seconds >= factor * max(durations) * (1 - 1e-9)

    def test_a_slower_block_raises_the_deadline_at_once(self) -> None:
        """The maximum is the basis: one slow block moves the deadline up before the next block starts."""
        table = ScopeStatistics(Learning(floor=0.01, factor=3, warmup=10))
        for _ in range(1000):
            table.add("step", 0.1, 600)
        assert table.learned("step").seconds == pytest.approx(0.3)  # type: ignore[union-attr]
        table.add("step", 0.5, 600)
        assert table.learned("step").seconds == pytest.approx(1.5)  # type: ignore[union-attr]

    def test_a_quantile_is_within_five_percent(self) -> None:
        """With quantile=0.99 the basis is the p99 of what was seen (5% buckets)."""
        rng = random.Random(3)
        table = ScopeStatistics(Learning(floor=0.001, factor=2, quantile=0.99, warmup=100))
        durations = [rng.uniform(0.09, 0.11) for _ in range(5000)]
        for d in durations:
            table.add("step", d, 600)
        true = sorted(durations)[int(0.99 * len(durations)) - 1]
        learned = table.learned("step")
        assert learned is not None and abs(learned.basis_s - true) <= 0.05 * true
        assert "p99" in learned.describe() and f"{learned.blocks:,} blocks" in learned.describe()
        assert learned.blocks >= 5000 * (1 - 1 / 32)  # recomputed as the figures grow

    def test_saved_and_loaded_by_a_later_run(self, tmp_path: Path) -> None:
        """A later run that loads the file has the deadline at once; figures add up; bad files say why."""
        first = ScopeStatistics(Learning(floor=1, warmup=100))
        for _ in range(150):
            first.add("step", 0.2, 600)
        first.expired("step")
        path = tmp_path / "learned.json"
        first.save(path)
        later = ScopeStatistics(Learning(floor=1, warmup=100))
        assert later.load(path) == 1
        assert later.learned("step") == first.learned("step")
        assert later.figures()["step"]["blocks"] == 150 and later.figures()["step"]["expired"] == 1
        later.load(path)
        assert later.figures()["step"]["blocks"] == 300
        (tmp_path / "bad.json").write_text("{}")
        with pytest.raises(ValueError, match="not a file of hangwatch scope statistics"):
            later.load(tmp_path / "bad.json")
        (tmp_path / "torn.json").write_text('{"format": "hangwatch scope')
        with pytest.raises(ValueError, match="not JSON"):
            later.load(tmp_path / "torn.json")
        data = json.loads(path.read_text())
        data["scopes"]["step"]["blocks"] = 7
        (tmp_path / "lying.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match="scope 'step'"):
            later.load(tmp_path / "lying.json")

    def test_another_nodes_figures_count_for_learning_and_are_replaced_not_added(self) -> None:
        """A node with no blocks of its own learns from another's; a new report replaces the last; nothing is
        shared back twice (own_figures leaves the others' out)."""
        node0 = ScopeStatistics(Learning(floor=0.5, warmup=30))
        for _ in range(40):
            node0.add("step", 0.1, 600)
        told: List[Tuple[str, float]] = []
        node1 = ScopeStatistics(Learning(floor=0.5, warmup=30), on_learned=lambda s, d, a: told.append((s, a)))
        assert node1.set_remote("node 0", node0.own_figures()) == 1
        assert node1.learned("step") == node0.learned("step")
        assert told == [] and node1.figures()["step"]["learned_s"] is None  # no block of it here may get it yet
        node1.mark_learnable("step")  # a block that may get it arrived
        assert told == [("step", 600)] and node1.figures()["step"]["learned_s"] == 0.5
        assert node1.own_figures() == {} and node1.figures()["step"]["blocks"] == 40
        node0.add("step", 0.4, 600)
        node1.set_remote("node 0", node0.own_figures())
        assert node1.figures()["step"]["blocks"] == 41
        assert node1.learned("step").seconds == pytest.approx(1.2)  # type: ignore[union-attr]
        node1.set_remote("node 0", {"step": {"blocks": 3}, "other": "junk"})  # malformed: skipped
        assert node1.figures() == {}

    def test_the_table_is_bounded(self) -> None:
        """A client inventing a name per block cannot grow the table past max_scopes."""
        table = ScopeStatistics(max_scopes=3)
        assert [table.add(f"s{i}", 0.1, 1) is not None for i in range(5)] == [True, True, True, False, False]
        assert len(table) == 3


# --------------------------------------------------------------------- servers, real workers


def _server(kind: str, tmp_path: Path, **options: Any) -> Tuple[Any, Any]:
    """A started server of ``kind`` and the address its clients take."""
    if kind == "fifo":
        server: Any = hangwatch.FileTimerServer(str(tmp_path / "t.fifo"), **options)
        address: Any = server.file_path
    elif kind == "shm":
        server = hangwatch.SharedMemoryTimerServer(str(tmp_path / "t.sock"), **options)
        address = server.socket_path
    else:
        address = mp.get_context("spawn").Queue()
        server = hangwatch.LocalTimerServer(address, max_interval=0.05, **options)
    server.start()
    return server, address


@pytest.fixture(params=["fifo", "shm", "local"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def marks() -> Iterator[Any]:
    q = mp.get_context("spawn").Queue()
    yield q
    q.close()


def _start(target: Any, *args: Any) -> Any:
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def test_a_hang_is_caught_at_the_learned_deadline(kind: str, tmp_path: Path, events: EventLog, marks: Any) -> None:
    """after=30 by guesswork; blocks of ~10 ms; floor 0.5 s: the hang is reaped after ~0.5 s, and says why."""
    server, address = _server(kind, tmp_path, learn=Learning(floor=0.5, warmup=30))
    try:
        p = _start(_workers.learning_job, kind, address, [("step", 30, 0.01, 40, None)], 30, marks)
        began = marks.get(timeout=60)
        p.join(20)
        caught = time.monotonic()
        assert p.exitcode == -9, "the hang was not reaped within 20 s (its after was 30 s)"
        assert caught - began >= 0.5  # never before the floor
        expired = events.named("timer expired")
        assert len(expired) == 1 and expired[0].scope == "step"
        learned = expired[0].details["learned"]
        assert learned["deadline_s"] == 0.5 and learned["floor_s"] == 0.5 and learned["blocks"] >= 30
        assert 29 < learned["after_s"] <= 30
        kill = events.named("kill worker process")[0]
        assert kill.details["learned"]["deadline_s"] == 0.5
        assert kill.details["late_s"] < 1.0  # counted from the learned deadline, not from after=30
        assert server.scope_statistics()["step"]["learned_s"] == 0.5
    finally:
        server.stop()


def test_a_block_that_says_learn_false_keeps_its_after(kind: str, tmp_path: Path, events: EventLog) -> None:
    """A block may opt out: a 1.5 s block of a scope learned at 0.3 s, with learn=False, is left alone."""
    server, address = _server(kind, tmp_path, learn=Learning(floor=0.3, warmup=20))
    try:
        plan = [("step", 30, 0.005, 25, None), ("step", 30, 1.5, 1, False)]
        p = run_worker(_workers.learning_job, kind, address, plan, None, None, timeout=60)
        assert p.exitcode == 0
        assert events.named("timer expired") == []
        learned = server.statistics.learned("step")
        assert learned is not None and learned.basis_s >= 1.5  # it counts (the safe direction), unshortened
    finally:
        server.stop()


def test_only_blocks_that_ask_are_learned_when_the_default_is_off(tmp_path: Path, events: EventLog, marks: Any) -> None:
    """Learning(default=False): a block without learn=True keeps its after, however much was learned."""
    server, address = _server("fifo", tmp_path, learn=Learning(floor=0.3, warmup=20, default=False))
    try:
        plan = [("step", 30, 0.005, 25, True), ("step", 30, 1.0, 1, None), ("other", 30, 0, 25, None)]
        p = run_worker(_workers.learning_job, "fifo", address, plan, None, None, timeout=60)
        assert p.exitcode == 0 and events.named("timer expired") == []
        assert server.statistics.learned("step") is not None
        figures = server.scope_statistics()
        assert figures["step"]["learned_s"] is not None
        assert figures["other"]["learned_s"] is None  # none of its blocks may get one: none is shown
    finally:
        server.stop()


def test_a_healthy_job_with_slow_steps_is_never_killed(kind: str, tmp_path: Path, events: EventLog) -> None:
    """Steps of 20 ms with every 8th at 100 ms (5x the median), floor 0.1 s: the learned deadline sits above
    the slow steps (3 x the slowest), so none of the 120 steps is killed."""
    server, address = _server(kind, tmp_path, learn=Learning(floor=0.1, warmup=10))
    try:
        p = run_worker(_workers.slow_steps, kind, address, 120, 0.02, 0.1, 8, timeout=120)
        assert p.exitcode == 0, "a healthy step was killed"
        assert events.named("timer expired") == []
        learned = server.statistics.learned("step")
        assert learned is not None and learned.seconds >= 0.3 and not learned.at_floor
    finally:
        server.stop()


def test_servers_share_one_table(tmp_path: Path, events: EventLog, marks: Any) -> None:
    """The agent's two servers learn together: blocks seen by the FIFO one set the deadline on the other."""
    table = ScopeStatistics(Learning(floor=0.4, warmup=20))
    fifo, fifo_address = _server("fifo", tmp_path, statistics=table)
    shm, shm_address = _server("shm", tmp_path, statistics=table)
    try:
        p = run_worker(_workers.learning_job, "fifo", fifo_address, [("step", 30, 0.005, 25, None)], None, None)
        assert p.exitcode == 0
        assert wait_for(lambda: table.learned("step") is not None, 10)
        p = _start(_workers.learning_job, "shm", shm_address, [], 30, marks)
        began = marks.get(timeout=60)
        p.join(20)
        assert p.exitcode == -9 and time.monotonic() - began < 20
        assert events.named("timer expired")[0].details["learned"]["deadline_s"] == 0.4
        assert fifo.scope_statistics() == shm.scope_statistics()
    finally:
        fifo.stop()
        shm.stop()


def test_shared_memory_workers_count_their_own_blocks(tmp_path: Path) -> None:
    """Blocks far shorter than a scan are counted exactly (the worker measures them); a nested pair counts once."""
    server, address = _server("shm", tmp_path, statistics=True)
    try:
        plan = [("fast", 30, 0, 5000, None), ("steady", 30, 0.02, 10, None)]
        p = run_worker(_workers.learning_job, "shm", address, plan, None, None)
        assert p.exitcode == 0
        p = run_worker(_workers.shm_nested_blocks_counted, address, 300)
        assert p.exitcode == 0
        assert wait_for(lambda: server.scope_statistics().get("nested", {}).get("blocks") == 300, 10)
        stats = server.scope_statistics()
        assert stats["fast"]["blocks"] == 5000 and stats["steady"]["blocks"] == 10
        assert 0.015 < stats["steady"]["p50_s"] < 2 and stats["steady"]["timeout_s"] == 30
        assert stats["fast"]["p99_s"] < 0.05
    finally:
        server.stop()


def test_a_shared_memory_server_without_statistics_is_not_sent_any(tmp_path: Path, events: EventLog) -> None:
    """The workers of a server that keeps no statistics measure nothing and report nothing."""
    server, address = _server("shm", tmp_path)
    try:
        p = run_worker(_workers.learning_job, "shm", address, [("fast", 30, 0, 100, None)], None, None)
        assert p.exitcode == 0
        assert events.named("bad request") == []
        with pytest.raises(RuntimeError, match="statistics=True"):
            server.scope_statistics()
    finally:
        server.stop()


def test_learn_needs_a_hangwatch_client_and_a_bool() -> None:
    """expires(learn=) is checked up front, and a client that cannot carry it says so on entry."""

    class Plain(hangwatch.TimerClient):
        def acquire(self, scope_id: str, expiration_time: float) -> None:
            pass

        def release(self, scope_id: str) -> None:
            pass

    with pytest.raises(TypeError, match="learn must be"):
        hangwatch.expires(after=1, learn="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot carry learn"):
        with hangwatch.expires(after=1, client=Plain(), learn=True):
            pass
    with pytest.raises(ValueError, match="disagree"):
        q = mp.get_context("spawn").Queue()
        hangwatch.LocalTimerServer(q, statistics=ScopeStatistics(), learn=Learning())


def test_what_was_learned_survives_a_group_restart(tmp_path: Path) -> None:
    """Attempt 1 learns from 40 steps, then hangs; attempt 2 hangs in its very first step (no warm-up of its own):
    both are reaped at the learned deadline, and the report and the run's figures say so."""
    from hangwatch.agent import LocalElasticAgent, WorkerSpec

    script = tmp_path / "train.py"
    script.write_text(
        "import os, time, hangwatch\n"
        "hangwatch.configure_from_env()\n"
        "steps = 40 if os.environ['TORCHELASTIC_RESTART_COUNT'] == '0' else 0\n"
        "for _ in range(steps):\n"
        "    with hangwatch.expires(after=30, scope='step'):\n"
        "        time.sleep(0.01)\n"
        "time.sleep(1.6)  # the worker reports its blocks (at most 1.25 s after the last)\n"
        "with hangwatch.expires(after=30, scope='step'):\n"
        "    time.sleep(60)\n"
    )
    spec = WorkerSpec(local_world_size=1, entrypoint=sys.executable, args=(str(script),), max_restarts=1)
    with open(os.devnull, "w") as quiet:
        agent = LocalElasticAgent(spec, learn=Learning(floor=0.5, warmup=30), output=quiet)
        started = time.monotonic()
        result = agent.run()
    assert time.monotonic() - started < 25, "a hang was not caught at the learned deadline (after=30)"
    assert result.is_failed() and len(result.attempts) == 2
    for attempt in result.attempts:
        (failure,) = attempt.failures.values()
        assert failure.reaped and failure.learned is not None and failure.learned["deadline_s"] == 0.5
        assert "at its learned deadline of 0.5 s (its after: 30 s)" in failure.fate()
        assert attempt.report is not None and "learned deadline" in attempt.report.trigger
    assert result.statistics["step"]["blocks"] >= 40 and result.statistics["step"]["expired"] == 2
