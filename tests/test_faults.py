"""Reliability under load and faults, on every transport: real processes, real signals, real pipes.

The bounded versions of the scenarios that ``python -m benchmarks.stress`` runs at full size:
a storm of clients (nothing lost, nobody reaped), clients SIGKILLed at random moments while
others send (the server never wedges, survivors are still reaped on time), and the faults
particular to the multiprocessing queue (a dead writer's lock, a torn message).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest

import hangwatch
from hangwatch.api import TimerServer

import _workers
from conftest import EventLog, run_worker, wait_for

spawn = mp.get_context("spawn")
TRANSPORTS = ["local", "fifo", "shm"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: Any, tmp_path: Path) -> Iterator[Tuple[str, Any, Any]]:
    """(kind, address for the clients, running server)."""
    kind = request.param
    server: Any
    if kind == "local":
        address: Any = spawn.Queue()
        server = hangwatch.LocalTimerServer(address, max_interval=10)
    elif kind == "fifo":
        address = str(tmp_path / "timer.fifo")
        server = hangwatch.FileTimerServer(address)
    else:
        address = str(tmp_path / "timer.sock")
        server = hangwatch.SharedMemoryTimerServer(address)
    server.start()
    try:
        yield kind, address, server
    finally:
        server.stop()


def watchdog_alive(server: TimerServer) -> bool:
    thread = server._watchdog_thread
    return thread is not None and thread.is_alive()


def reap_pids(events: EventLog) -> List[int]:
    return [e.worker for e in events.named("kill worker process")]


def test_storm_loses_nothing_and_reaps_nobody(transport: Tuple[str, Any, Any], events: EventLog) -> None:
    """32 processes x 3 threads of nested blocks at once: no client error, no reap, every request
    counted (the queue and the FIFO carry each one; shared memory carries the state), no timer left."""
    kind, address, server = transport
    go, report = spawn.Event(), spawn.Queue()
    procs = [spawn.Process(target=_workers.storm, args=(kind, address, 3, 200, go, report)) for _ in range(32)]
    for p in procs:
        p.start()
    go.set()
    results = [report.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 32
    assert [e for _, errors in results for e in errors] == []
    sent = sum(n for n, _ in results)
    if kind == "shm":
        # A check-in is a store, read by the scan: what must hold is the state, not a count.
        assert 0 < server.request_count <= sent
    else:
        assert wait_for(lambda: server.request_count == sent, 60), (server.request_count, sent)
    assert wait_for(lambda: server.active_timers == 0, 30), server.active_timers
    assert reap_pids(events) == [] and events.named("bad request") == []
    assert watchdog_alive(server)


def test_clients_killed_mid_send_leave_the_server_serving(transport: Tuple[str, Any, Any], events: EventLog) -> None:
    """Clients SIGKILLed at random moments while others send: no wrong kill, the dead clients' timers
    are dropped, and survivors that then get stuck are reaped on time."""
    kind, address, server = transport
    rng = random.Random(6)
    stop = spawn.Event()
    survivors = [spawn.Process(target=_workers.survivor, args=(kind, address, stop, 0.5)) for _ in range(3)]
    for p in survivors:
        p.start()
    pool = [spawn.Process(target=_workers.churn, args=(kind, address)) for _ in range(4)]
    for p in pool:
        p.start()
    killed: List[int] = []
    try:
        for _ in range(12):
            victim = pool.pop(rng.randrange(len(pool)))
            time.sleep(0.3 + rng.random() * 0.3)  # spawned clients take a while to start sending
            os.kill(victim.pid, signal.SIGKILL)
            victim.join()
            killed.append(victim.pid)
            fresh = spawn.Process(target=_workers.churn, args=(kind, address))
            fresh.start()
            pool.append(fresh)
        assert watchdog_alive(server)
        stop.set()
        t0 = time.monotonic()
        for p in survivors:
            p.join(30)
        assert [p.exitcode for p in survivors] == [-signal.SIGKILL] * 3
        assert time.monotonic() - t0 < 20  # generous: the benchmark suite measures the milliseconds
    finally:
        for p in pool + survivors:
            if p.is_alive():
                p.kill()
            p.join()
    assert sorted(reap_pids(events)) == sorted(p.pid for p in survivors)
    assert not set(killed) & set(reap_pids(events))
    assert events.named("bad request") == []
    assert wait_for(lambda: server.active_timers == 0, 30), server.active_timers
    assert watchdog_alive(server)


class TestQueueFaults:
    def test_a_writer_killed_holding_the_queue_lock_blocks_no_one(self, events: EventLog) -> None:
        """A process dies holding the queue's write lock (a writer killed inside ``put``): hangwatch
        clients do not need it, so a stuck worker is still reaped and a healthy one finishes."""
        q = spawn.Queue()
        server = hangwatch.LocalTimerServer(q, max_interval=10)
        server.start()
        try:
            parent, child = spawn.Pipe()
            holder = spawn.Process(target=_workers.holds_queue_lock, args=(q, child))
            holder.start()
            assert parent.poll(30) and parent.recv() == "holding"
            os.kill(holder.pid, signal.SIGKILL)
            holder.join()
            healthy = run_worker(_workers.finishing_local, q, 200, timeout=60)
            stuck = run_worker(_workers.stuck_local, q, 0.3, timeout=60)
        finally:
            server.stop()
        assert healthy.exitcode == 0
        assert stuck.exitcode == -signal.SIGKILL
        assert reap_pids(events) == [stuck.pid]

    def test_a_torn_message_costs_only_itself(self, events: EventLog) -> None:
        """A writer dies part way through a long message: it is refused as torn, and the requests
        written after it (a release among them) still count: nobody is killed for a lost release."""
        q = spawn.Queue()
        server = hangwatch.LocalTimerServer(q, max_interval=10)
        server.start()
        try:
            torn = run_worker(_workers.tears_a_frame, q)
            assert torn.exitcode == -signal.SIGKILL
            lingering = run_worker(_workers.releases_then_lingers, "local", q, 0.5, 1.5, timeout=60)
            stuck = run_worker(_workers.stuck_local, q, 0.3, timeout=60)
        finally:
            server.stop()
        assert lingering.exitcode == 0
        assert stuck.exitcode == -signal.SIGKILL
        assert reap_pids(events) == [stuck.pid]
        (bad,) = events.named("bad request")
        assert "incomplete" in str(bad.details)


@pytest.mark.parametrize("kind", ["fifo", "shm"])
def test_a_server_killed_under_its_clients(kind: str, tmp_path: Path) -> None:
    """The server process is SIGKILLed while a client is inside a block: the client gets
    ServerUnavailableError promptly (when it leaves the block on the FIFO, which must send the release;
    at its next block on shared memory, whose release is a store); a new server on the same path
    then serves new clients."""
    address = str(tmp_path / ("timer.fifo" if kind == "fifo" else "timer.sock"))
    ready = spawn.Event()
    server_process = spawn.Process(target=_workers.serve, args=(kind, address, ready))
    server_process.start()
    assert ready.wait(30)
    parent, child = spawn.Pipe()
    client = spawn.Process(target=_workers.outlives_its_server, args=(kind, address, child))
    client.start()
    try:
        assert parent.poll(30) and parent.recv() == "inside"
        os.kill(server_process.pid, signal.SIGKILL)
        server_process.join()
        if kind == "shm":
            time.sleep(1.5)  # the heartbeat goes stale after a second: how a client tells a dead server
        parent.send("killed")
        assert parent.poll(30)
        outcomes = dict((where, (what, took)) for where, what, took in parent.recv())
    finally:
        client.join(30)
        if client.is_alive():
            client.kill()
            client.join()
    expected = {
        "fifo": ("ServerUnavailableError", "ServerUnavailableError"),
        "shm": ("no error", "ServerUnavailableError"),
    }
    assert (outcomes["left"][0], outcomes["next"][0]) == expected[kind], outcomes
    assert outcomes["left"][1] < 5 and outcomes["next"][1] < 5  # prompt: no send_timeout wait
    server: Any = hangwatch.FileTimerServer(address) if kind == "fifo" else hangwatch.SharedMemoryTimerServer(address)
    server.start()
    try:
        worker = run_worker(
            _workers.stuck_file if kind == "fifo" else _workers.shm_stuck,
            address,
            0.3,
            *((9,) if kind == "fifo" else ("after-restart",)),
        )
    finally:
        server.stop()
    assert worker.exitcode == -signal.SIGKILL
