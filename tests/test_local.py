"""LocalTimerServer / LocalTimerClient with real worker processes, real signals, every start method."""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from typing import Iterator, Tuple

import pytest

import hangwatch

import _workers
from conftest import EventLog, run_worker, wait_for

START_METHODS = ["spawn", "fork", "forkserver"]


@pytest.fixture(params=START_METHODS)
def local(request: pytest.FixtureRequest) -> Iterator[Tuple[mp.context.BaseContext, hangwatch.LocalTimerServer]]:
    ctx = mp.get_context(request.param)
    q = ctx.Queue()
    server = hangwatch.LocalTimerServer(q)  # default max_interval=60: reaping must not depend on it
    server.start()
    try:
        yield ctx, server
    finally:
        server.stop()


def _queue(server: hangwatch.LocalTimerServer):  # the mp queue behind the server
    return server._request_queue._mp_queue  # type: ignore[attr-defined]


class TestLocalPair:
    def test_stuck_worker_is_killed_soon_after_its_deadline(self, local, events: EventLog) -> None:
        """A worker stuck past a 0.5 s deadline dies by SIGKILL within seconds, not max_interval (60 s)."""
        ctx, server = local
        p = run_worker(_workers.stuck_local, _queue(server), 0.5, timeout=20, ctx=ctx)
        assert p.exitcode == -signal.SIGKILL
        kills = events.named("kill worker process")
        assert [e.worker for e in kills] == [p.pid]
        late = events.named("timer expired")[0].details["late_s"]
        assert 0 <= late < 3  # generous: the benchmark reports the real figure (milliseconds)

    def test_finishing_worker_is_left_alone(self, local, events: EventLog) -> None:
        """A worker that leaves its blocks in time exits normally and holds no timer afterwards."""
        ctx, server = local
        p = run_worker(_workers.finishing_local, _queue(server), 500, timeout=30, ctx=ctx)
        assert p.exitcode == 0
        assert wait_for(lambda: server.request_count >= 1002, 10)
        assert server.active_timers == 0
        assert events.named("kill worker process") == []

    def test_worker_exiting_with_a_timer_is_not_signalled(self, local, events: EventLog) -> None:
        """A worker that exits holding a timer has its timers dropped at once and is never signalled."""
        ctx, server = local
        p = run_worker(_workers.exits_holding_local, _queue(server), 2.0, timeout=20, ctx=ctx)
        assert p.exitcode == 0
        assert wait_for(lambda: events.named("worker exited"), 5)
        assert server.active_timers == 0
        time.sleep(2.5)  # past the abandoned deadline
        assert events.named("kill worker process") == []
        assert events.named("timer expired") == []


class TestRecursion:
    def test_first_release_releases_the_shared_scope(self, events: EventLog) -> None:
        """Recursion re-acquires one scope: the inner (0.3 s) release also releases the outer, as torch's."""
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        server = hangwatch.LocalTimerServer(q)
        server.start()
        try:
            p = run_worker(_workers.recursion_local, q, 1.0, timeout=20, ctx=ctx)
            assert p.exitcode == 0  # running 1 s past the inner 0.3 s deadline did not get it killed
            assert events.named("kill worker process") == []
        finally:
            server.stop()

    def test_last_acquire_wins(self) -> None:
        """The inner acquire of the same scope sets the deadline: stuck inside it, the worker is reaped."""
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        server = hangwatch.LocalTimerServer(q)
        server.start()
        try:
            p = run_worker(_workers.recursion_stuck_local, q, timeout=20, ctx=ctx)
            assert p.exitcode == -signal.SIGKILL
        finally:
            server.stop()


def test_log_event_gets_torchs_names() -> None:
    """log_event is called with torch's event names, in order, and the expired request."""
    seen = []
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = hangwatch.LocalTimerServer(q, max_interval=60, log_event=lambda name, req: seen.append((name, req)))
    server.start()
    p = run_worker(_workers.stuck_local, q, 0.2, timeout=20, ctx=ctx)
    server.stop()
    names = [n for n, _ in seen]
    assert names == ["watchdog started", "timer expired", "kill worker process", "watchdog stopped"]
    assert seen[1][1].worker_id == p.pid
    assert seen[0][1] is None and seen[-1][1] is None


def test_bad_queue_is_a_clear_error() -> None:
    """Passing something that is not a queue fails at construction, naming what is wrong."""
    with pytest.raises(TypeError, match="mp_queue must be a multiprocessing queue"):
        hangwatch.LocalTimerServer("not a queue")
    with pytest.raises(TypeError, match="mp_queue must be a multiprocessing queue"):
        hangwatch.LocalTimerClient(42)


class TestQueueWire:
    def test_requests_arrive_whole_and_in_order_with_the_workers_identity(self) -> None:
        """The client's own writes (pickled once per scope) read back as the requests it sent, in order."""
        import os

        from hangwatch.local import MultiprocessingRequestQueue, WorkerRequest

        q = mp.get_context("spawn").Queue()
        client = hangwatch.LocalTimerClient(q)
        reader = MultiprocessingRequestQueue(q)
        sent = []
        for i in range(150):  # well under the pipe's 64 KiB: nothing reads until the end
            scope = f"scope-{i % 7}"
            at = time.time() + i
            client.acquire(scope, at)
            client.release(scope)
            sent += [(scope, at), (scope, -1)]
        got = []
        while len(got) < len(sent):
            got += reader.get(1000, 5)
        assert [(r.scope_id, r.expiration_time) for r in got] == sent
        assert {r.worker_id for r in got} == {os.getpid()}
        acquires = [r for r in got if r.expiration_time > 0]
        assert all(type(r) is WorkerRequest for r in acquires)
        assert acquires[0].hangwatch["start"] > 0 and acquires[0].hangwatch["dump_signal"] == signal.SIGUSR2
        assert q.qsize() == 0  # the queue's own count agrees: nothing written around its semaphore
        reader.close()
