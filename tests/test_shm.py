"""The shared-memory pair: real processes, a real socket, real shared memory, real signals."""

from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import signal
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from signal import SIGKILL
from typing import Any, Iterator, List

import pytest

import hangwatch
from hangwatch import SharedMemoryTimerClient, SharedMemoryTimerServer
from hangwatch.events import Event

import _workers
from conftest import EventLog, run_worker, wait_for

spawn = mp.get_context("spawn")


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "timer.sock")


@pytest.fixture
def server(sock_path: str) -> Iterator[SharedMemoryTimerServer]:
    srv = SharedMemoryTimerServer(sock_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def kills(events: EventLog, pid: int) -> List[Event]:
    return [e for e in events.named("kill worker process") if e.worker == pid]


class TestReaping:
    def test_a_stuck_worker_is_reaped_with_its_stack(self, server: SharedMemoryTimerServer, events: EventLog) -> None:
        """A worker stuck in a named block is SIGKILLed soon after its deadline; the event shows where it was."""
        p = run_worker(_workers.shm_stuck, server.socket_path, 0.3, "stuck")
        assert p.exitcode == -SIGKILL
        (kill,) = kills(events, p.pid)
        assert kill.scope == "stuck"
        assert "in shm_stuck" in kill.details["stack"]
        assert kill.details["late_s"] < 5  # generous: the benchmark suite measures the milliseconds
        assert wait_for(lambda: server.active_timers == 0, 5)

    def test_default_scope_is_the_callers_file_and_line(
        self, server: SharedMemoryTimerServer, events: EventLog
    ) -> None:
        """Without a scope the timer is named <file>#<line> of the with statement, as torch names it."""
        p = run_worker(_workers.shm_stuck, server.socket_path, 0.3, None)
        assert p.exitcode == -SIGKILL
        (kill,) = kills(events, p.pid)
        path, line = kill.scope.rsplit("#", 1)
        assert path.endswith("_workers.py")
        source = Path(_workers.__file__).read_text().splitlines()
        assert "hangwatch.expires(after=after)" in source[int(line) - 1]

    def test_a_worker_holding_the_gil_is_reaped(self, server: SharedMemoryTimerServer, events: EventLog) -> None:
        """The check-in is done before the body runs, so a worker that then never releases the GIL is still seen."""
        p = run_worker(_workers.shm_stuck_in_regex, server.socket_path, 0.3)
        assert p.exitcode == -SIGKILL
        (kill,) = kills(events, p.pid)
        assert kill.scope == "regex"
        assert "in shm_stuck_in_regex" in kill.details["stack"]

    def test_nested_same_scope_first_release_releases(self, server: SharedMemoryTimerServer) -> None:
        """Re-entering a held scope replaces its timer, and leaving the inner block releases it (torch's rule)."""
        p = run_worker(_workers.shm_nested_same_scope, server.socket_path)
        assert p.exitcode == 0

    def test_healthy_short_blocks_are_never_reaped(self, server: SharedMemoryTimerServer, events: EventLog) -> None:
        """Thousands of blocks, each left before its deadline: no reap, and nothing stays active."""
        p = run_worker(_workers.shm_many_short_blocks, server.socket_path, 20_000)
        assert p.exitcode == 0
        assert not events.named("timer expired")
        assert wait_for(lambda: server.active_timers == 0, 5)

    def test_a_forked_child_registers_as_itself(self, server: SharedMemoryTimerServer, tmp_path: Path) -> None:
        """A child forked from a registered worker gets its own slots: it is reaped, never its parent."""
        pid_file = str(tmp_path / "child.pid")
        p = run_worker(_workers.shm_fork_child_stuck, server.socket_path, pid_file)
        assert p.exitcode == 0  # the parent survived and saw its child die by SIGKILL

    def test_recycled_slots_carry_the_right_names(self, server: SharedMemoryTimerServer, events: EventLog) -> None:
        """Past its slot count a client reuses released slots; the reap names the scope really stuck."""
        p = run_worker(_workers.shm_recycles_slots, server.socket_path, 50)
        assert p.exitcode == -SIGKILL
        (kill,) = kills(events, p.pid)
        assert kill.scope == "last"

    def test_a_block_can_choose_its_reap_policy(self, server: SharedMemoryTimerServer, events: EventLog) -> None:
        """expires(..., client=, reap_policy=) on this client: SIGTERM (ignored), then SIGKILL after the grace."""
        p = run_worker(_workers.shm_policy_per_block, server.socket_path)
        assert p.exitcode == -SIGKILL
        assert [k.details["signal"] for k in kills(events, p.pid)] == ["SIGTERM", "SIGKILL"]


class TestServerGone:
    def test_error_then_reconnect_to_a_new_server(self, sock_path: str, events: EventLog) -> None:
        """After stop() the next block raises ServerUnavailableError at once; a new server on the path works."""
        first = SharedMemoryTimerServer(sock_path)
        first.start()
        parent, child = spawn.Pipe()
        p = spawn.Process(target=_workers.shm_server_gone, args=(sock_path, child))
        p.start()
        second = None
        try:
            assert parent.poll(30) and parent.recv() == "registered"
            first.stop()
            parent.send("stopped")
            assert parent.poll(30)
            outcome = parent.recv()
            assert outcome[0] == "error", outcome
            assert outcome[1] < 2.0
            assert sock_path in outcome[2]
            second = SharedMemoryTimerServer(sock_path)
            second.start()
            parent.send("restarted")
            p.join(30)
            assert p.exitcode == -SIGKILL
        finally:
            if p.is_alive():
                p.kill()
                p.join()
            if second is not None:
                second.stop()
        assert [k.scope for k in kills(events, p.pid)] == ["after-restart"]

    def test_a_stalled_server_does_not_stall_a_block(self, sock_path: str) -> None:
        """The server stops scanning (SIGSTOPped) but its connection stands: a block goes on at once, no error.

        (A stale heartbeat makes the client check its connection; that check once waited for the socket's
        send_timeout and then raised.)"""
        ready = spawn.Event()
        server = spawn.Process(target=_workers.serve, args=("shm", sock_path, ready))
        server.start()
        try:
            assert ready.wait(30)
            client = SharedMemoryTimerClient(sock_path, send_timeout=10)
            with hangwatch.expires(after=60, scope="step", client=client):
                pass
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            time.sleep(1.5)  # the heartbeat goes stale
            t0 = time.monotonic()
            with hangwatch.expires(after=60, scope="step", client=client):
                pass
            elapsed = time.monotonic() - t0
        finally:
            if server.pid is not None:
                os.kill(server.pid, signal.SIGCONT)
            server.kill()
            server.join()
        assert elapsed < 2

    def test_no_server_is_a_clear_error(self, sock_path: str) -> None:
        """A block with no server listening fails with ServerUnavailableError (a BrokenPipeError) naming the path."""
        client = SharedMemoryTimerClient(sock_path, connect_timeout=0.2)
        with pytest.raises(hangwatch.ServerUnavailableError, match="no SharedMemoryTimerServer listens"):
            with hangwatch.expires(after=60, scope="x", client=client):
                pass
        assert issubclass(hangwatch.ServerUnavailableError, BrokenPipeError)


def _raw_register(path: str, hello: Any) -> tuple[socket.socket, bytes, List[int]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(path)
    sock.send(hello if isinstance(hello, bytes) else json.dumps(hello).encode())
    data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
    fds = [struct.unpack("i", payload[:4])[0] for _, _, payload in anc]
    return sock, data, fds


def _hostile(path: str, conn: Any) -> None:
    """Registers by hand and misbehaves: bad messages, bad slot values, an attempt to shrink the file."""
    sock, data, fds = _raw_register(path, {"v": 1, "slots": 16, "mono": time.monotonic()})
    report = {"reply": json.loads(data)}
    try:
        os.ftruncate(fds[0], 0)
        report["truncate"] = "allowed"
    except OSError as exc:
        report["truncate"] = type(exc).__name__
    view = memoryview(mmap.mmap(fds[0], 8 * 24)).cast("d")
    sock.send(json.dumps({"bind": [[8, "nan"], [10, "ten"]]}).encode())
    view[9] = 123.0  # a slot never named, between named ones
    view[8] = float("nan")
    time.sleep(0.3)
    sock.send(b"{not json")
    time.sleep(0.3)
    conn.send(report)
    time.sleep(60)


class TestPaths:
    def test_the_socket_is_created_private_and_never_chmodded_by_path(
        self, sock_path: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The socket gets mode 0600 when it is created; the path is never acted on again (a chmod there could
        follow a symlink another user swapped in)."""
        touched: List[str] = []
        real_chmod = os.chmod
        monkeypatch.setattr(os, "chmod", lambda path, *a, **k: (touched.append(str(path)), real_chmod(path, *a, **k)))
        server = SharedMemoryTimerServer(sock_path)
        try:
            assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
            assert touched == []
        finally:
            server.stop()

    def test_a_missing_directory_is_named(self, tmp_path: Path) -> None:
        """Creating the socket in a directory that does not exist says which path."""
        with pytest.raises(FileNotFoundError, match="its directory does not exist") as info:
            SharedMemoryTimerServer(str(tmp_path / "nope" / "timer.sock"))
        assert str(tmp_path / "nope") in str(info.value)

    def test_a_server_that_sends_an_unsealed_file_is_refused(self, sock_path: str) -> None:
        """A fake server hands out a file it could shrink under the worker (SIGBUS at its next block): the
        client refuses to map it."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(sock_path)
        listener.listen(1)

        def fake_server() -> None:
            conn, _ = listener.accept()
            conn.recv(65536)
            memfd = os.memfd_create("fake")
            os.ftruncate(memfd, 8 * 64)
            conn.sendmsg(
                [json.dumps({"ok": True, "slots": 16}).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", memfd))],
            )
            os.close(memfd)
            time.sleep(1)
            conn.close()

        thread = threading.Thread(target=fake_server)
        thread.start()
        try:
            client = SharedMemoryTimerClient(sock_path)
            with pytest.raises(hangwatch.ServerUnavailableError, match="not sealed"):
                client.acquire("s", time.time() + 60)
        finally:
            thread.join()
            listener.close()


class TestHostileWorkers:
    def test_bad_registrations_are_refused_and_reported(
        self, server: SharedMemoryTimerServer, events: EventLog
    ) -> None:
        """Garbage and wrong versions get an error reply and a bad-request event; the server keeps serving."""
        for hello in (b"garbage", {"v": 99}, {"v": 1, "slots": -1, "mono": 0}, {"v": 1, "slots": 4, "mono": "x"}):
            sock, data, fds = _raw_register(server.socket_path, hello)
            sock.close()
            assert "error" in json.loads(data) and not fds
        assert len([e for e in events.named("bad request") if "registration refused" in e.details["reason"]]) == 4
        p = run_worker(_workers.shm_stuck, server.socket_path, 0.3, "still-served")
        assert p.exitcode == -SIGKILL

    def test_a_misbehaving_worker_harms_only_itself(self, server: SharedMemoryTimerServer, events: EventLog) -> None:
        """Sealed file, unnamed and NaN slots reported, bad message disconnects it; others still reaped."""
        parent, child = spawn.Pipe()
        p = spawn.Process(target=_hostile, args=(server.socket_path, child))
        p.start()
        try:
            assert parent.poll(30)
            report = parent.recv()
            assert report["reply"]["ok"] is True
            assert report["truncate"] == "PermissionError"  # F_SEAL_SHRINK: it cannot make the server fault
            reasons = " | ".join(str(e.details.get("reason")) for e in events.named("bad request") if e.worker == p.pid)
            assert "written before it was named" in reasons
            assert "not finite" in reasons
            assert "disconnected" in reasons
            assert wait_for(lambda: server.registered_workers == 0, 5)
            good = run_worker(_workers.shm_stuck, server.socket_path, 0.3, "good")
            assert good.exitcode == -SIGKILL
            assert p.is_alive()  # never signalled: it held no valid timer
        finally:
            p.kill()
            p.join()

    def test_the_socket_is_private_to_its_user(self, server: SharedMemoryTimerServer) -> None:
        """Mode 0600: no other user can register (checked with a real second user in the stress suite)."""
        assert os.stat(server.socket_path).st_mode & 0o777 == 0o600


class TestServerFile:
    def test_a_live_servers_socket_is_not_taken_over(self, server: SharedMemoryTimerServer) -> None:
        """A second server on a live server's path fails instead of stealing its workers."""
        with pytest.raises(FileExistsError, match="already listening"):
            SharedMemoryTimerServer(server.socket_path)

    def test_a_stale_socket_is_replaced_and_other_files_are_not(self, tmp_path: Path) -> None:
        """A dead server's socket is replaced; a regular file at the path is an error."""
        path = str(tmp_path / "stale.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stale.bind(path)
        stale.close()
        SharedMemoryTimerServer(path).stop()
        assert not os.path.exists(path)
        other = tmp_path / "file"
        other.write_text("data")
        with pytest.raises(FileExistsError, match="not a socket"):
            SharedMemoryTimerServer(str(other))
        assert other.read_text() == "data"

    def test_bad_arguments_say_what_is_wrong(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="scan_interval"):
            SharedMemoryTimerServer(str(tmp_path / "a.sock"), scan_interval=0)
        with pytest.raises(ValueError, match="max_slots"):
            SharedMemoryTimerServer(str(tmp_path / "b.sock"), max_slots=0)
        with pytest.raises(ValueError, match="slots must be"):
            SharedMemoryTimerClient(str(tmp_path / "c.sock"), slots=0)
        with pytest.raises(ValueError, match="after must be"):
            hangwatch.expires(after=-1, scope="s", client=SharedMemoryTimerClient(str(tmp_path / "d.sock")))
