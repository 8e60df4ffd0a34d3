"""Heartbeats: every beat re-arms the timer; a missed beat is reaped like an expired block, on every pair."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest

import hangwatch

import _workers
from conftest import EventLog


def _server(kind: str, tmp_path: Path) -> Tuple[Any, Any]:
    if kind == "fifo":
        server: Any = hangwatch.FileTimerServer(str(tmp_path / "t.fifo"))
        address: Any = server.file_path
    elif kind == "shm":
        server = hangwatch.SharedMemoryTimerServer(str(tmp_path / "t.sock"))
        address = server.socket_path
    else:
        address = mp.get_context("spawn").Queue()
        server = hangwatch.LocalTimerServer(address, max_interval=0.05)
    server.start()
    return server, address


@pytest.fixture(params=["fifo", "shm", "local"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tuple[str, Any, Any]]:
    server, address = _server(str(request.param), tmp_path)
    try:
        yield str(request.param), server, address
    finally:
        server.stop()


def _run(kind: str, address: Any, beats: int, interval: float, timeout: float, then: str) -> Tuple[Any, float]:
    ctx = mp.get_context("spawn")
    receiver, marks = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_workers.heartbeats, args=(kind, address, beats, interval, timeout, then, marks))
    p.start()
    marks.close()
    assert receiver.poll(60), "the worker never beat"
    last_beat = receiver.recv()
    p.join(30)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("the worker was not reaped within 30 s of its last beat")
    return p, last_beat


def test_a_missed_beat_is_reaped_with_its_stack(served: Tuple[str, Any, Any], events: EventLog) -> None:
    """Beats every 50 ms with timeout 0.5 s keep it alive for a second; the first missed one reaps it."""
    kind, _, address = served
    p, last_beat = _run(kind, address, 20, 0.05, 0.5, "stall")
    assert p.exitcode == -9
    assert time.monotonic() - last_beat >= 0.5
    expired = events.named("timer expired")
    assert [e.scope for e in expired] == ["loop"]
    kill = events.named("kill worker process")[0]
    assert "heartbeats" in kill.details.get("stack", "")


def test_a_worker_that_holds_the_gil_after_its_beat_is_reaped(served: Tuple[str, Any, Any], events: EventLog) -> None:
    """The beat reached the server before the worker froze in C code holding the GIL: it is still reaped."""
    kind, _, address = served
    p, _ = _run(kind, address, 3, 0.02, 0.5, "gil")
    assert p.exitcode == -9
    assert [e.scope for e in events.named("timer expired")] == ["loop"]


def test_a_stopped_heartbeat_never_expires(served: Tuple[str, Any, Any], events: EventLog) -> None:
    """stop() releases the timer: sleeping three timeouts afterwards is fine."""
    kind, _, address = served
    p, _ = _run(kind, address, 5, 0.02, 0.3, "stop")
    assert p.exitcode == 0
    assert events.named("timer expired") == []


def test_heartbeat_checks_its_arguments() -> None:
    """A bad scope or timeout is refused up front; without a client the beat says how to configure one."""
    hangwatch.configure(None)
    with pytest.raises(TypeError, match="scope must be a str"):
        hangwatch.heartbeat(3, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite number"):
        hangwatch.heartbeat("loop", float("nan"))
    with pytest.raises(RuntimeError, match="Configure timer client"):
        hangwatch.heartbeat("loop", 1)


def test_a_heartbeat_is_a_context_manager(served: Tuple[str, Any, Any], events: EventLog) -> None:
    """Leaving the with block stops the heartbeat: the worker outlives its timeout three times over."""
    kind, _, address = served
    p = mp.get_context("spawn").Process(target=_workers.heartbeat_in_with, args=(kind, address, 0.3))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert events.named("timer expired") == []
