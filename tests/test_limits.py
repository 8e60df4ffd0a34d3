"""What one client may cost a server: fairness per round, caps, rate-limited refusals (real processes).

A broken or hostile client must never take the server from the others: each scenario runs
one next to an honest worker that gets stuck, and the honest worker must be reaped on time.
The bounds on lateness are generous (a loaded 2-core machine); what they catch is a delay of
the length of the attack.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Tuple

import pytest

import hangwatch
from hangwatch import FileTimerServer, Limits, LocalTimerServer, SharedMemoryTimerServer

import _workers
from conftest import EventLog, run_worker, wait_for

spawn = mp.get_context("spawn")


def late_s(events: EventLog, pid: int) -> float:
    (kill,) = [e for e in events.named("kill worker process") if e.worker == pid]
    return float(kill.details["late_s"])


def start_attacker(target: Any, *args: Any) -> Tuple[Any, Any]:
    ready = spawn.Event()
    attacker = spawn.Process(target=target, args=(*args, ready))
    attacker.start()
    assert ready.wait(60), "the attacker did not start"
    return attacker, ready


class TestFairness:
    @pytest.mark.parametrize(
        ("attack", "seconds"),
        [(_workers.shm_bind_flood, 8.0), (_workers.shm_slot_flipper, 10.0)],
        ids=["a flood of large bind messages", "a client flipping all of its slots, over and over"],
    )
    def test_an_attacking_client_does_not_delay_an_honest_reap(
        self, tmp_path: Path, events: EventLog, attack: Any, seconds: float
    ) -> None:
        """While one client floods the socket, or flips every slot it could get, a stuck worker is still reaped
        on time (by milliseconds, not by the length of the attack)."""
        server = SharedMemoryTimerServer(str(tmp_path / "t.sock"))
        server.start()
        attacker, _ = start_attacker(attack, server.socket_path, seconds)
        try:
            honest = run_worker(_workers.shm_stuck, server.socket_path, 0.5, "honest", timeout=60)
            assert honest.exitcode == -signal.SIGKILL
            assert late_s(events, honest.pid) < 1.0
        finally:
            attacker.kill()
            attacker.join()
            server.stop()

    def test_stack_dump_files_are_never_opened_on_the_watchdog_thread(self, events: EventLog) -> None:
        """A worker's file is opened by the evidence thread only: one that blocks in the kernel (a stalled
        FUSE file placed at the dump descriptor) could never stall the watchdog."""
        opened: List[Tuple[str, str]] = []
        real_open = os.open

        def spy(path: Any, *args: Any, **kwargs: Any) -> int:
            text = str(path)
            if text.startswith("/proc/") and "/fd/" in text:
                opened.append((threading.current_thread().name, text))
            return real_open(path, *args, **kwargs)

        q = spawn.Queue()
        server = LocalTimerServer(q)
        server.start()
        os.open = spy  # type: ignore[assignment]
        try:
            stuck = run_worker(_workers.stuck_local, q, 0.3)
        finally:
            os.open = real_open  # type: ignore[assignment]
            server.stop()
        assert stuck.exitcode == -signal.SIGKILL
        assert "in stuck_local" in events.named("kill worker process")[0].details["stack"]
        threads = {name for name, _ in opened}
        assert threads == {"hangwatch-group-evidence"}, opened


class TestCaps:
    def test_silent_connections_are_capped_and_closed(self, tmp_path: Path, events: EventLog) -> None:
        """Connections that never say hello (six processes with 8 each, more than the pool holds): beyond the cap
        they are refused, the rest closed after the hello timeout; an honest worker registers and is reaped all
        along. (The cap per process has a test of its own.)"""
        limits = Limits(hello_timeout=1.0, waiting_connections=32)
        server = SharedMemoryTimerServer(str(tmp_path / "t.sock"), limits=limits)
        server.start()
        silent = []
        for count in (8, 8, 8, 8, 8, 8):
            parent, child = spawn.Pipe()
            process = spawn.Process(target=_workers.shm_silent_connections, args=(server.socket_path, count, child))
            process.start()
            silent.append((process, parent))
        try:
            for _, parent in silent:
                assert parent.recv() == "connected"
            honest = run_worker(_workers.shm_stuck, server.socket_path, 0.5, "honest", timeout=60)
            assert honest.exitcode == -signal.SIGKILL
            time.sleep(1.5)
            for _, parent in silent:
                parent.send("go")
            assert [parent.recv() for _, parent in silent] == [0] * 6  # every silent connection was closed
        finally:
            for process, _ in silent:
                process.kill()
                process.join()
            server.stop()
        reasons = [e.details["reason"] for e in events.named("limit reached")]
        assert any("Limits.waiting_connections" in r for r in reasons), reasons
        assert any("no hello within 1 s" in r for r in reasons), reasons

    def test_honest_workers_register_during_a_flood_of_silent_connections(
        self, tmp_path: Path, events: EventLog
    ) -> None:
        """Twelve processes keep opening connections that never say hello (more than the pool holds): workers
        that register meanwhile get in (busy answers are tried again) and are reaped when they get stuck."""
        server = SharedMemoryTimerServer(str(tmp_path / "t.sock"), limits=Limits(waiting_connections=32))
        server.start()
        churners = [start_attacker(_workers.shm_connection_churn, server.socket_path, 15.0)[0] for _ in range(12)]
        try:
            honest = [
                # a long connect_timeout: on a loaded 2-core machine twelve churners can keep the pool busy for
                # over the default second; what matters is that busy answers are tried again until one gets in
                spawn.Process(target=_workers.shm_stuck, args=(server.socket_path, 0.5, "honest", 20.0))
                for _ in range(4)
            ]
            for p in honest:
                p.start()
            for p in honest:
                p.join(60)
            assert [p.exitcode for p in honest] == [-signal.SIGKILL] * 4
        finally:
            for p in churners:
                p.kill()
                p.join()
            server.stop()

    def test_a_process_may_hold_only_so_many_connections(self, tmp_path: Path, events: EventLog) -> None:
        """The ninth registration of one process is refused with a clear error."""
        server = SharedMemoryTimerServer(str(tmp_path / "t.sock"))
        server.start()
        clients = []
        try:
            for _ in range(8):
                client = hangwatch.SharedMemoryTimerClient(server.socket_path)
                client.acquire("s", time.time() + 60)
                clients.append(client)
            with pytest.raises(hangwatch.ServerUnavailableError, match="connections_per_process"):
                hangwatch.SharedMemoryTimerClient(server.socket_path).acquire("s", time.time() + 60)
        finally:
            for client in clients:
                client.close()
            server.stop()
        assert any("connections_per_process" in e.details["reason"] for e in events.named("limit reached"))

    def test_a_fifo_client_may_hold_only_so_many_timers(self, fifo_path: str, events: EventLog) -> None:
        """Beyond timers_per_worker a worker's new scopes are refused; the ones it holds still count."""
        server = FileTimerServer(fifo_path, limits=Limits(timers_per_worker=10))
        server.start()
        worker = spawn.Process(target=_workers.fifo_many_scopes, args=(fifo_path, 50))
        worker.start()
        try:
            assert wait_for(lambda: len(events.named("limit reached")) >= 1, 30)
            assert wait_for(lambda: server.active_timers == 10, 5)
        finally:
            worker.kill()
            worker.join()
            server.stop()
        assert "Limits.timers_per_worker" in events.named("limit reached")[0].details["reason"]

    def test_refusal_events_are_rate_limited_and_counted(self, fifo_path: str, tmp_path: Path) -> None:
        """5,000 bad lines in a burst: a bounded number of events, and the ones left out are counted."""
        path = tmp_path / "events.jsonl"
        server = FileTimerServer(fifo_path, event_file=path)
        server.start()
        fd = os.open(fifo_path, os.O_WRONLY)
        try:
            for i in range(5000):
                os.write(fd, f"garbage {i}\n".encode())
        finally:
            os.close(fd)
        time.sleep(0.5)
        server.stop()
        bad = [json.loads(line) for line in path.read_text().splitlines() if '"bad request"' in line]
        lines = [e for e in bad if "line" in e["details"]]  # the rest: the summary written at the end
        assert len(lines) < 500
        assert len(lines) + sum(e["details"].get("suppressed", 0) for e in bad) == 5000

    def test_accept_failures_do_not_spin(self, tmp_path: Path) -> None:
        """Out of descriptors, accept() fails; the server backs off instead of spinning a core."""
        sock_path = str(tmp_path / "t.sock")
        code = f"""
import os, resource, socket, time, hangwatch
server = hangwatch.SharedMemoryTimerServer({sock_path!r})
server.start()
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print("ready", flush=True)
time.sleep(30)
"""
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        socks = []
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            for _ in range(20):
                s = __import__("socket").socket(__import__("socket").AF_UNIX, __import__("socket").SOCK_SEQPACKET)
                s.connect(sock_path)
                socks.append(s)
            time.sleep(0.5)
            before = _cpu_seconds(proc.pid)
            time.sleep(2.0)
            used = _cpu_seconds(proc.pid) - before
        finally:
            for s in socks:
                s.close()
            proc.kill()
            proc.wait()
        assert used < 0.5, f"the server used {used:.2f} s of CPU in 2 s"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
