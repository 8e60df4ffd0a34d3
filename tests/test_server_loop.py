"""The watchdog loop of TimerServer: a user's own subclass pair works; start/stop; clocks."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Dict, List, Set

import pytest

import hangwatch
from hangwatch import RequestQueue, TimerClient, TimerRequest, TimerServer

from conftest import wait_for


class InMemoryQueue(RequestQueue):
    """A user's queue with no fileno(): the loop must still serve it and stop promptly."""

    def __init__(self) -> None:
        self.q: queue.Queue[TimerRequest] = queue.Queue()

    def size(self) -> int:
        return self.q.qsize()

    def get(self, size: int, timeout: float) -> List[TimerRequest]:
        out: List[TimerRequest] = []
        try:
            out.append(self.q.get(timeout=timeout) if timeout > 0 else self.q.get_nowait())
            while len(out) < size:
                out.append(self.q.get_nowait())
        except queue.Empty:
            pass
        return out


class ThreadClient(TimerClient):
    """A user's client whose workers are named strings."""

    def __init__(self, q: InMemoryQueue, worker: str) -> None:
        self.q, self.worker = q, worker

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.q.q.put(TimerRequest(self.worker, scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        self.q.q.put(TimerRequest(self.worker, scope_id, -1))


class DictServer(TimerServer):
    """A user's server written the way torch's docs describe: a dict of timers by (worker, scope)."""

    def __init__(self, q: InMemoryQueue, max_interval: float, reap_result: Any = True) -> None:
        super().__init__(q, max_interval)
        self.timers: Dict[tuple, TimerRequest] = {}
        self.reaped: List[str] = []
        self.reap_result = reap_result

    def register_timers(self, timer_requests: List[TimerRequest]) -> None:
        for r in timer_requests:
            if r.expiration_time < 0:
                self.timers.pop((r.worker_id, r.scope_id), None)
            else:
                self.timers[(r.worker_id, r.scope_id)] = r

    def clear_timers(self, worker_ids: Set[Any]) -> None:
        for key in list(self.timers):
            if key[0] in worker_ids:
                del self.timers[key]

    def get_expired_timers(self, deadline: float) -> Dict[Any, List[TimerRequest]]:
        out: Dict[Any, List[TimerRequest]] = {}
        for r in self.timers.values():
            if r.expiration_time <= deadline:
                out.setdefault(r.worker_id, []).append(r)
        return out

    def _reap_worker(self, worker_id: Any) -> bool:
        self.reaped.append(worker_id)
        if isinstance(self.reap_result, Exception):
            raise self.reap_result
        if callable(self.reap_result):
            return bool(self.reap_result())
        return bool(self.reap_result)


class TestUserSubclass:
    def test_custom_pair_reaps_expired_workers_only(self) -> None:
        """A user's subclass pair gets the loop: the worker that overstays is reaped, the other is not."""
        q = InMemoryQueue()
        server = DictServer(q, max_interval=0.05)
        server.start()
        try:
            with hangwatch.expires(after=5, scope="ok", client=ThreadClient(q, "good")):
                with hangwatch.expires(after=0.1, scope="slow", client=ThreadClient(q, "bad")):
                    assert wait_for(lambda: server.reaped, 5)
            assert server.reaped == ["bad"]
            assert wait_for(lambda: not server.timers, 2)
        finally:
            server.stop()

    def test_exception_in_reap_counts_as_reaped(self) -> None:
        """An exception from _reap_worker clears the worker's timers (torch's contract)."""
        q = InMemoryQueue()
        server = DictServer(q, max_interval=0.05, reap_result=RuntimeError("broken reaper"))
        server.start()
        try:
            ThreadClient(q, "w").acquire("s", time.time())
            assert wait_for(lambda: server.reaped and not server.timers, 5)
            time.sleep(0.3)
            assert server.reaped == ["w"]
        finally:
            server.stop()

    def test_false_from_reap_retries_later(self) -> None:
        """_reap_worker returning False keeps the timers and tries again in a later round."""
        attempts = iter([False, False, True])
        q = InMemoryQueue()
        server = DictServer(q, max_interval=0.05, reap_result=lambda: next(attempts))
        server.start()
        try:
            ThreadClient(q, "w").acquire("s", time.time())
            assert wait_for(lambda: len(server.reaped) == 3 and not server.timers, 5)
        finally:
            server.stop()

    def test_stop_is_prompt_with_an_unwakeable_queue(self) -> None:
        """stop() returns well under max_interval even when the queue cannot be woken."""
        server = DictServer(InMemoryQueue(), max_interval=60)
        server.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 2


class TestLifecycle:
    def test_builtin_stop_is_immediate(self) -> None:
        """A built-in server with max_interval=60 stops at once (it is woken, not polled)."""
        import multiprocessing as mp

        server = hangwatch.LocalTimerServer(mp.get_context("spawn").Queue(), max_interval=60)
        server.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 1
        assert server._watchdog_thread is None

    def test_start_twice_is_an_error(self) -> None:
        """Starting a running server raises instead of starting a second watchdog."""
        server = DictServer(InMemoryQueue(), max_interval=0.1)
        server.start()
        try:
            with pytest.raises(RuntimeError, match="already running"):
                server.start()
        finally:
            server.stop()

    def test_start_returns_at_once_and_thread_is_daemon(self) -> None:
        """start() does not block; the default watchdog is a daemon thread."""
        server = DictServer(InMemoryQueue(), max_interval=60)
        t0 = time.monotonic()
        server.start()
        try:
            assert time.monotonic() - t0 < 1
            assert server._watchdog_thread is not None and server._watchdog_thread.daemon
        finally:
            server.stop()

    @pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "10", None])
    def test_max_interval_is_validated(self, bad: object) -> None:
        """max_interval must be a finite number > 0; the error shows the value."""
        with pytest.raises(ValueError, match=r"max_interval must be a finite number of seconds > 0 \(got"):
            DictServer(InMemoryQueue(), max_interval=bad)  # type: ignore[arg-type]

    def test_progress_time_advances_while_idle(self) -> None:
        """get_last_progress_time() moves on while the watchdog idles (torch's agent checks it)."""
        server = DictServer(InMemoryQueue(), max_interval=0.1)
        server.start()
        try:
            first = server.get_last_progress_time()
            assert wait_for(lambda: server.get_last_progress_time() > first, 3)
        finally:
            server.stop()


class TestClocks:
    def test_wall_clock_jump_after_receipt_changes_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Deadlines are monotonic once received: the wall clock jumping an hour expires nothing."""
        import multiprocessing as mp
        import subprocess

        child = subprocess.Popen(["sleep", "30"])
        try:
            server = hangwatch.LocalTimerServer(mp.get_context("spawn").Queue())
            server.register_timers([TimerRequest(child.pid, "s", time.time() + 30)])
            real_time = time.time
            monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
            assert server.get_expired_timers(time.time()) == {}
            monkeypatch.setattr(time, "time", real_time)
            assert list(server.get_expired_timers(time.time() + 31)) == [child.pid]
            server.close_pins()
        finally:
            child.kill()
            child.wait()


def test_watchdog_survives_a_failing_round() -> None:
    """An exception inside a round is logged and the loop goes on serving."""
    q = InMemoryQueue()

    class Flaky(DictServer):
        rounds = 0

        def register_timers(self, timer_requests: List[TimerRequest]) -> None:
            Flaky.rounds += 1
            if Flaky.rounds == 2:
                raise ValueError("bad round")
            super().register_timers(timer_requests)

    server = Flaky(q, max_interval=0.02)
    server.start()
    try:
        assert wait_for(lambda: Flaky.rounds > 2, 5)
        ThreadClient(q, "w").acquire("s", time.time())
        assert wait_for(lambda: server.reaped == ["w"], 5)
    finally:
        server.stop()
    assert not any(t.name.startswith("hangwatch-Flaky") for t in threading.enumerate())
