"""FileTimerServer / FileTimerClient: real FIFO, real processes, real signals."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import hangwatch
from hangwatch import FileTimerClient, FileTimerServer, ServerUnavailableError

import _workers
from conftest import EventLog, RecorderPin, run_worker, wait_for

spawn = mp.get_context("spawn")


@pytest.fixture
def server(fifo_path: str):
    srv = FileTimerServer(fifo_path, "test-run")  # default max_interval=10: reaping must not depend on it
    srv.start()
    yield srv
    srv.stop()


class TestReaping:
    def test_stuck_worker_dies_by_sigkill(self, server: FileTimerServer, events: EventLog) -> None:
        """The default client signal is SIGKILL, delivered soon after the deadline."""
        p = run_worker(_workers.stuck_file, server.file_path, 0.5, int(signal.SIGKILL))
        assert p.exitcode == -signal.SIGKILL
        assert events.named("timer expired")[0].details["late_s"] < 3

    def test_client_chooses_the_signal(self, server: FileTimerServer) -> None:
        """FileTimerClient(signal=SIGTERM) gets the worker a SIGTERM."""
        p = run_worker(_workers.stuck_file, server.file_path, 0.3, int(signal.SIGTERM))
        assert p.exitcode == -signal.SIGTERM

    def test_signal_zero_expires_without_killing(self, server: FileTimerServer, events: EventLog) -> None:
        """signal <= 0: the timer expires (an event) but the worker is not signalled."""
        p = spawn.Process(target=_workers.stuck_file, args=(server.file_path, 0.2, 0))
        p.start()
        try:
            assert wait_for(lambda: events.named("expired, not signalled"), 15)
            assert [e.worker for e in events.named("timer expired")] == [p.pid]
            time.sleep(0.3)
            assert p.is_alive()
            assert events.named("kill worker process") == []
            assert server.active_timers == 0
        finally:
            p.kill()
            p.join()

    def test_tight_loop_of_blocks_never_fails(self, server: FileTimerServer) -> None:
        """200,000 blocks in a tight loop (torch's client crashes after ~300): no error, nothing lost."""
        blocks = 200_000
        p = run_worker(_workers.tight_loop_file, server.file_path, blocks, timeout=240)
        assert p.exitcode == 0
        assert wait_for(lambda: server.request_count == 2 * blocks, 30)
        assert server.active_timers == 0


class TestTransport:
    def test_no_server_raises_broken_pipe_promptly(self, tmp_path: Path) -> None:
        """Without a server, the client raises a BrokenPipeError naming the path, within about a second."""
        path = str(tmp_path / "nobody.fifo")
        client = FileTimerClient(path)
        t0 = time.monotonic()
        with pytest.raises(BrokenPipeError, match=r"nobody\.fifo"):
            client.acquire("s", time.time() + 10)
        assert time.monotonic() - t0 < 3
        os.mkfifo(path)  # a FIFO nobody reads
        with pytest.raises(ServerUnavailableError, match="no timer server is reading"):
            client.release("s")

    def test_fifo_is_private_and_marked(self, server: FileTimerServer) -> None:
        """The FIFO is mode 0600 (no one else can write) and carries the hangwatch mark."""
        st = os.stat(server.file_path)
        assert stat.S_ISFIFO(st.st_mode)
        assert stat.S_IMODE(st.st_mode) & 0o777 == 0o600
        assert st.st_mode & stat.S_ISVTX

    def test_existing_regular_file_is_not_replaced(self, tmp_path: Path) -> None:
        """A regular file at the path is an error, and the file is left untouched."""
        path = tmp_path / "data.txt"
        path.write_text("precious")
        with pytest.raises(FileExistsError, match="not a FIFO"):
            FileTimerServer(str(path))
        assert path.read_text() == "precious"

    def test_stale_fifo_is_replaced(self, fifo_path: str) -> None:
        """A FIFO left by an earlier server is replaced, as torch's server does."""
        os.mkfifo(fifo_path)
        srv = FileTimerServer(fifo_path)
        try:
            assert os.stat(fifo_path).st_mode & stat.S_ISVTX
        finally:
            srv.stop()
        assert not os.path.exists(fifo_path)

    def test_full_pipe_waits_for_the_server(self, fifo_path: str) -> None:
        """With the pipe full, the client waits (it does not fail) until the server drains it."""
        srv = FileTimerServer(fifo_path)  # created, not started: nobody drains yet
        client = FileTimerClient(fifo_path, send_timeout=60)
        n = 5000  # ~500 KB: several times what a pipe holds
        errors = []

        def send() -> None:
            try:
                for i in range(n):
                    client.release(f"scope-{i % 10}")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=send)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "the client should be waiting on the full pipe"
        srv.start()
        try:
            t.join(30)
            assert not t.is_alive() and errors == []
            assert wait_for(lambda: srv.request_count == n, 10)
        finally:
            srv.stop()
            client.close()

    def test_full_pipe_wait_is_bounded(self, fifo_path: str) -> None:
        """If the server never drains, the client gives up after send_timeout with a clear error."""
        srv = FileTimerServer(fifo_path)
        client = FileTimerClient(fifo_path, send_timeout=0.5)
        try:
            with pytest.raises(ServerUnavailableError, match="did not drain its pipe") as info:
                for _ in range(10_000):
                    client.release("s")
            assert info.value.errno == errno.ETIMEDOUT
        finally:
            client.close()
            srv.stop()

    def test_server_restart_on_the_same_path(self, fifo_path: str) -> None:
        """Clients of a stopped server get BrokenPipeError; the same client works with a new server."""
        srv = FileTimerServer(fifo_path)
        srv.start()
        client = FileTimerClient(fifo_path, connect_timeout=0.2)
        client.release("a")  # from the server's own process: counted, never registered
        assert wait_for(lambda: srv.request_count == 1, 5)
        srv.stop()
        assert not os.path.exists(fifo_path)
        t0 = time.monotonic()
        with pytest.raises(BrokenPipeError):
            client.release("a")
        assert time.monotonic() - t0 < 3
        srv2 = FileTimerServer(fifo_path)
        srv2.start()
        try:
            client.release("b")
            assert wait_for(lambda: srv2.request_count == 1, 5)
        finally:
            srv2.stop()
            client.close()

    def test_client_inherited_across_fork(self, server: FileTimerServer) -> None:
        """A client created before fork works in the child, which gets its own descriptor."""
        client = FileTimerClient(server.file_path)
        client.acquire("parent", time.time() + 30)
        pid = os.fork()
        if pid == 0:  # the child: acquire and hang; the server must reap this pid
            try:
                client.acquire("child", time.time() + 0.3)
                time.sleep(30)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        client.release("parent")
        client.close()

    def test_keep_open_detection(self, server: FileTimerServer, tmp_path: Path) -> None:
        """The client keeps its descriptor only for a hangwatch server's (marked) FIFO."""
        ours = FileTimerClient(server.file_path)
        ours.release("x")
        assert ours._fd >= 0
        ours.close()
        plain = str(tmp_path / "plain.fifo")
        os.mkfifo(plain, 0o600)  # an unmarked FIFO, as torch's server makes
        reader = os.open(plain, os.O_RDONLY | os.O_NONBLOCK)
        try:
            theirs = FileTimerClient(plain)
            theirs.release("x")
            assert theirs._fd == -1
            assert json.loads(os.read(reader, 4096)) == {
                "version": 1,
                "pid": os.getpid(),
                "scope_id": "x",
                "expiration_time": -1,
                "signal": 0,
            }
        finally:
            os.close(reader)

    def test_oversized_request_is_refused_by_the_client(self, server: FileTimerServer) -> None:
        """A request longer than PIPE_BUF cannot be written atomically: ValueError before sending."""
        with pytest.raises(ValueError, match="PIPE_BUF"):
            FileTimerClient(server.file_path).acquire("s" * 5000, time.time() + 1)


class TestHostileLines:
    def test_bad_lines_are_refused_one_by_one(self, server: FileTimerServer, events: EventLog) -> None:
        """Malformed lines are each refused with a reason; the valid requests around them are kept."""
        child = spawn.Process(target=time.sleep, args=(30,))
        child.start()
        try:
            good = lambda scope: json.dumps(  # noqa: E731
                {"version": 1, "pid": child.pid, "scope_id": scope, "expiration_time": time.time() + 30, "signal": 9}
            ).encode()
            bad = [
                b"{not json",
                b"[1, 2]",
                json.dumps({"pid": child.pid, "scope_id": "s", "expiration_time": 1e12}).encode(),  # no signal
                json.dumps({"pid": "12", "scope_id": "s", "expiration_time": 1e12, "signal": 9}).encode(),
                json.dumps({"pid": child.pid, "scope_id": 5, "expiration_time": 1e12, "signal": 9}).encode(),
                b'{"version": 1, "pid": 5, "scope_id": "s", "expiration_time": NaN, "signal": 9}',
                b'{"version": 1, "pid": 5, "scope_id": "s", "expiration_time": Infinity, "signal": 9}',
                json.dumps({"pid": child.pid, "scope_id": "s", "expiration_time": 1e12, "signal": 999}).encode(),
                json.dumps(
                    {"version": 2, "pid": child.pid, "scope_id": "s", "expiration_time": 1, "signal": 9}
                ).encode(),
                b"\xff\xfe not utf-8",
                b"x" * 5000,
            ]
            ext = lambda hw: json.dumps(  # noqa: E731
                {"pid": child.pid, "scope_id": "s", "expiration_time": 1e12, "signal": 9, "hangwatch": hw}
            ).encode()
            bad += [  # a hangwatch field that is malformed refuses the whole request
                ext(5),
                ext({"start": "yesterday"}),
                ext({"dump_signal": 9, "dump_fd": 3}),  # SIGKILL cannot carry a dump
                ext({"dump_signal": 12}),  # without its descriptor
                ext({"dump_signal": 12, "dump_fd": -4}),
                ext({"reap": [["TERM"], 1, True, 1]}),
                ext({"reap": [[15], -5, True, 1]}),
                ext({"reap": [[15, 0], 1, True, 1]}),
                ext({"reap": "everyone"}),
            ]
            fd = os.open(server.file_path, os.O_WRONLY)
            try:
                os.write(fd, good("before") + b"\n")
                for line in bad:
                    for i in range(0, len(line) + 1, 4000):  # each write <= PIPE_BUF
                        os.write(fd, (line + b"\n")[i : i + 4000])
                os.write(fd, good("after") + b"\n")
            finally:
                os.close(fd)
            assert wait_for(lambda: server.active_timers == 2, 5)
            assert wait_for(lambda: len(events.named("bad request")) == len(bad), 5)
            assert child.is_alive()
        finally:
            child.kill()
            child.join()

    def test_a_torn_line_never_takes_the_next_request_with_it(
        self, server: FileTimerServer, events: EventLog, tmp_path: Path
    ) -> None:
        """A writer that dies mid-line leaves a fragment: the next writer's acquire (a stuck worker) and release
        (a healthy worker) still count; only the fragment is refused."""
        fd = os.open(server.file_path, os.O_WRONLY)
        try:
            # A fragment, then a stuck worker's acquire lands right after it: the worker is still reaped.
            os.write(fd, b'{"version": 1, "pid": 4')
            stuck = run_worker(_workers.stuck_file, server.file_path, 0.3, 9)
            assert stuck.exitcode == -signal.SIGKILL
            # A fragment, then a healthy worker's release: it is not killed at its deadline.
            go = tmp_path / "go"
            healthy = spawn.Process(target=_workers.holds_then_releases, args=(server.file_path, 1.5, str(go), 2.5))
            healthy.start()
            assert wait_for(lambda: server.active_timers == 1, 30)
            os.write(fd, b'{"version": 1, "pid": 4, "scope_id": "x", "expir')
            go.touch()
            healthy.join(30)
            assert healthy.exitcode == 0
            # An over-long fragment (more than PIPE_BUF, no newline), then an acquire: still reaped.
            os.write(fd, b'{"version": 1, "scope_id": "' + b"y" * 3000)
            os.write(fd, b"y" * 3000)
            stuck = run_worker(_workers.stuck_file, server.file_path, 0.3, 9)
            assert stuck.exitcode == -signal.SIGKILL
        finally:
            os.close(fd)
        reasons = [e.details["reason"] for e in events.named("bad request")]
        assert sum("incomplete line" in r for r in reasons) == 2, reasons
        assert sum("longer than PIPE_BUF" in r for r in reasons) == 1, reasons
        assert len(reasons) == 3 and server.active_timers == 0

    @pytest.mark.parametrize(
        ("pid", "reason"),
        [(2**31 + 5, "out of range"), (-(2**40), "must be > 1")],
    )
    def test_a_pid_the_kernel_cannot_take_is_refused_and_the_round_goes_on(
        self, server: FileTimerServer, events: EventLog, pid: int, reason: str
    ) -> None:
        """Pids beyond any pid_max (pidfd_open would raise OverflowError) are refused alone; the stuck worker whose
        acquire came in the same batch is reaped."""
        fd = os.open(server.file_path, os.O_WRONLY)
        try:
            line = {"version": 1, "pid": pid, "scope_id": "s", "expiration_time": time.time() - 1, "signal": 9}
            os.write(fd, (json.dumps(line) + "\n").encode())
            stuck = run_worker(_workers.stuck_file, server.file_path, 0.3, 9)
        finally:
            os.close(fd)
        assert stuck.exitcode == -signal.SIGKILL
        assert wait_for(lambda: any(reason in e.details["reason"] for e in events.named("bad request")), 5)

    def test_a_thread_id_is_refused_not_signalled(self, server: FileTimerServer, events: EventLog) -> None:
        """A request naming a thread of a process (kill() would signal the whole process) is refused; the
        thread's process keeps running."""
        parent, child = spawn.Pipe()
        holder = spawn.Process(target=_workers.reports_a_thread_id, args=(child,))
        holder.start()
        try:
            tid = parent.recv()
            fd = os.open(server.file_path, os.O_WRONLY)
            try:
                line = {"version": 1, "pid": tid, "scope_id": "s", "expiration_time": time.time() - 1, "signal": 9}
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
            assert wait_for(lambda: events.named("bad request"), 5)
            time.sleep(0.3)
            assert holder.is_alive()
            assert f"{tid} is a thread of process {holder.pid}" in events.named("bad request")[0].details["reason"]
        finally:
            holder.kill()
            holder.join()

    @pytest.mark.parametrize("pid", [-1, 0, 1])
    def test_process_group_and_init_pids_are_refused(self, fifo_path: str, events: EventLog, pid: int) -> None:
        """pid -1, 0 and 1 are refused at once: never pinned, never signalled (kill primitives are recorders here)."""
        server = FileTimerServer(fifo_path, pin=RecorderPin)
        server.start()
        fd = os.open(server.file_path, os.O_WRONLY)
        try:
            line = {"version": 1, "pid": pid, "scope_id": "s", "expiration_time": time.time() - 1, "signal": 9}
            os.write(fd, json.dumps(line).encode() + b"\n")
            assert wait_for(lambda: events.named("bad request"), 5)
            time.sleep(0.2)
        finally:
            os.close(fd)
            server.stop()
        assert "must be > 1" in events.named("bad request")[0].details["reason"]
        assert server.active_timers == 0 and events.named("kill worker process") == []
        assert RecorderPin.pinned == [] and RecorderPin.signals == []

    def test_server_never_targets_itself(self, server: FileTimerServer, events: EventLog) -> None:
        """A request naming the server's own pid is refused (torch's server would kill itself)."""
        FileTimerClient(server.file_path).acquire("self", time.time() - 1)  # sent with this (the server's) pid
        assert wait_for(lambda: events.named("bad request"), 5)
        assert "own process" in events.named("bad request")[0].details["reason"]


class TestPaths:
    def test_a_symlink_swapped_in_after_mkfifo_is_never_followed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another user wins the race between creating the FIFO and setting its mode: the victim file is not
        touched, and the server refuses to start on it."""
        victim = tmp_path / "victim"
        victim.write_text("someone's file")
        victim.chmod(0o644)
        path = tmp_path / "timer.fifo"
        real_mkfifo = os.mkfifo

        def mkfifo_then_swap(target: Any, mode: int = 0o666, *args: Any, **kwargs: Any) -> None:
            real_mkfifo(target, mode, *args, **kwargs)
            os.unlink(target)
            os.symlink(victim, target)  # the attacker's move, made deterministic

        monkeypatch.setattr(os, "mkfifo", mkfifo_then_swap)
        with pytest.raises(OSError):
            FileTimerServer(str(path))
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644 and victim.read_text() == "someone's file"

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a FIFO owned by another user")
    def test_the_client_refuses_another_users_fifo(self, tmp_path: Path) -> None:
        """A FIFO at the path that belongs to another user (mode 0666) gets no timer requests."""
        path = str(tmp_path / "theirs.fifo")
        os.mkfifo(path, 0o666)
        os.chown(path, 65534, 65534)
        os.chmod(path, 0o666)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            with pytest.raises(ServerUnavailableError, match="another user's FIFO"):
                FileTimerClient(path).acquire("s", time.time() + 60)
            assert os.read(reader, 4096) == b""
        except BlockingIOError:
            pass  # nothing was written
        finally:
            os.close(reader)

    def test_a_missing_directory_is_named(self, tmp_path: Path) -> None:
        """Creating the FIFO in a directory that does not exist says which path."""
        with pytest.raises(FileNotFoundError, match="its directory does not exist") as info:
            FileTimerServer(str(tmp_path / "nope" / "timer.fifo"))
        assert str(tmp_path / "nope") in str(info.value)


class TestConstructor:
    def test_torch_21_and_22_positional_forms(self, tmp_path: Path) -> None:
        """Both FileTimerServer(path, max_interval, ...) and FileTimerServer(path, run_id, max_interval, ...)."""
        calls = []
        old = FileTimerServer(str(tmp_path / "a"), 3, False, lambda n, r: calls.append(n))
        new = FileTimerServer(str(tmp_path / "b"), "run-7", 4, False)
        kw = FileTimerServer(str(tmp_path / "c"), run_id="r", max_interval=5)
        try:
            assert (old._max_interval, old._daemon, old._run_id) == (3.0, False, "")
            assert (new._max_interval, new._daemon, new._run_id) == (4.0, False, "run-7")
            assert (kw._max_interval, kw._run_id) == (5.0, "r")
            old.start()
            assert calls == ["watchdog started"]
        finally:
            for s in (old, new, kw):
                s.stop()
        with pytest.raises(TypeError, match="multiple values"):
            FileTimerServer(str(tmp_path / "d"), 3, max_interval=4)
        with pytest.raises(TypeError, match="unexpected keyword"):
            FileTimerServer(str(tmp_path / "e"), interval=4)

    def test_stopped_server_cannot_restart(self, fifo_path: str) -> None:
        """After stop() the FIFO is gone; start() says to create a new server."""
        srv = FileTimerServer(fifo_path)
        srv.start()
        srv.stop()
        with pytest.raises(RuntimeError, match="create a new one"):
            srv.start()

    def test_client_validates_its_arguments(self, fifo_path: str) -> None:
        """Bad client settings fail at construction with the value in the message."""
        with pytest.raises(ValueError, match="send_timeout"):
            FileTimerClient(fifo_path, send_timeout=0)
        with pytest.raises(ValueError, match="signal must be a signal number"):
            FileTimerClient(fifo_path, signal="SIGKILL")  # type: ignore[arg-type]


def test_public_names_match_torch() -> None:
    """Every name torch.distributed.elastic.timer documents exists in hangwatch."""
    for name in [
        "configure",
        "expires",
        "TimerRequest",
        "TimerClient",
        "TimerServer",
        "RequestQueue",
        "LocalTimerServer",
        "LocalTimerClient",
        "FileTimerServer",
        "FileTimerClient",
        "FileTimerRequest",
    ]:
        assert hasattr(hangwatch, name), name
