"""The agent and the `hangwatch run` launcher: restarts, group stops, signals, no orphans (real processes)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import List

import pytest

import hangwatch
from hangwatch.agent import FAILED, INTERRUPTED, SUCCEEDED, LocalElasticAgent, WorkerSpec

import _workers
from conftest import alive, wait_for

HANGWATCH = [sys.executable, "-m", "hangwatch"]


def gone(pid: int) -> bool:
    """The process is gone (or a zombie nobody will signal)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")


class TestAgent:
    def test_restarts_until_the_group_succeeds(self) -> None:
        """Two failed attempts, then success: three attempts, and each rank's return value."""
        spec = WorkerSpec(local_world_size=2, entrypoint=_workers.fails_until_restart, args=(2,), max_restarts=3)
        result = LocalElasticAgent(spec).run()
        assert result.state == SUCCEEDED and not result.is_failed()
        assert [a.outcome for a in result.attempts] == [FAILED, FAILED, SUCCEEDED]
        assert result.restarts == 2
        assert result.return_values == {0: 0, 1: 10}
        first = result.attempts[0].failures
        assert first and all(f.exitcode == 1 for f in first.values())

    def test_max_restarts_exhausted_reports_failure(self) -> None:
        """A worker that always fails: max_restarts + 1 attempts, then FAILED with its exit status."""
        spec = WorkerSpec(local_world_size=1, entrypoint=_workers.always_fails, max_restarts=1)
        result = LocalElasticAgent(spec).run()
        assert result.state == FAILED and result.is_failed()
        assert len(result.attempts) == 2
        assert result.failures[0].exitcode == 3
        assert result.failures[0].describe().endswith("exited with status 3")

    def test_zero_setup_reaps_a_stuck_worker_and_explains_it(self) -> None:
        """No timer set-up in the worker: it is reaped, the failure names the scope and the stuck function."""
        spec = WorkerSpec(local_world_size=2, entrypoint=_workers.stuck_on_first_attempt, max_restarts=1)
        result = LocalElasticAgent(spec).run()
        assert result.state == SUCCEEDED
        assert result.return_values == {0: "done", 1: "done"}
        failure = result.attempts[0].failures[1]
        assert failure.reaped and failure.scope == "step" and failure.signal == "SIGKILL"
        assert failure.stack is not None and "in hang_in_collective" in failure.stack
        assert failure.stuck_at() is not None and "hang_in_collective" in failure.stuck_at()
        assert failure.late_s is not None and failure.late_s < 5

    def test_seed_usage_with_the_users_own_local_timer_server(self) -> None:
        """torch's documented usage: a LocalTimerServer started by the user, its queue passed through args."""
        ctx = mp.get_context("spawn")
        message_queue = ctx.Queue()
        server = hangwatch.LocalTimerServer(message_queue, max_interval=0.01)
        server.start()
        try:
            spec = WorkerSpec(entrypoint=_workers.seed_trainer, args=(message_queue,), max_restarts=2)
            result = LocalElasticAgent(spec, "spawn").run()
        finally:
            server.stop()
        assert result.state == SUCCEEDED
        assert [a.outcome for a in result.attempts] == [FAILED, SUCCEEDED]
        assert result.attempts[0].failures[0].exitcode == -signal.SIGKILL

    def test_worker_ignoring_sigterm_is_killed_after_the_grace(self, tmp_path: Path) -> None:
        """Stopping the group: a worker that ignores SIGTERM dies by SIGKILL once stop_grace is over."""
        pid_file = tmp_path / "pid"
        spec = WorkerSpec(local_world_size=2, entrypoint=_workers.ignores_sigterm_or_fails, args=(str(pid_file),))
        spec.max_restarts = 0
        t0 = time.monotonic()
        result = LocalElasticAgent(spec, stop_grace=0.5).run()
        assert result.state == FAILED and list(result.failures) == [1]
        pid = int(pid_file.read_text())
        assert gone(pid)
        assert time.monotonic() - t0 < 30

    def test_interrupt_stops_every_worker(self, tmp_path: Path) -> None:
        """interrupt() (what SIGINT/SIGTERM do) ends the run as INTERRUPTED with every worker stopped."""
        pid_file = tmp_path / "pid"
        spec = WorkerSpec(local_world_size=1, entrypoint=_workers.ignores_sigterm_or_fails, args=(str(pid_file),))
        agent = LocalElasticAgent(spec, stop_grace=0.3)

        def interrupt_once_running() -> None:
            wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30)
            agent.interrupt()

        interrupter = threading.Thread(target=interrupt_once_running)
        interrupter.start()
        result = agent.run()
        interrupter.join()
        assert result.state == INTERRUPTED
        assert agent.interrupt_signal == signal.SIGTERM
        assert gone(int(pid_file.read_text()))

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"local_world_size": 0, "entrypoint": "true"}, "local_world_size must be an int >= 1"),
            ({"entrypoint": None}, "entrypoint must be a function or a command"),
            ({"entrypoint": "true", "max_restarts": -1}, "max_restarts must be an int >= 0"),
            ({"entrypoint": "true", "monitor_interval": 0}, "monitor_interval must be"),
            ({"entrypoint": "true", "rdzv_handler": object()}, "takes no rdzv_handler"),
            ({"entrypoint": "true", "fn": print}, "not both"),
        ],
    )
    def test_bad_specs_say_what_is_wrong(self, kwargs: dict, message: str) -> None:
        """Each invalid WorkerSpec is refused with a message naming the problem."""
        with pytest.raises(ValueError, match=message):
            WorkerSpec(**kwargs)


class TestConfigureFromEnv:
    def test_torchrun_file_timer_environment(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Under torchrun with TORCHELASTIC_ENABLE_FILE_TIMER=1, the client targets TORCHELASTIC_TIMER_FILE."""
        path = str(tmp_path / "torchrun.fifo")
        monkeypatch.delenv("HANGWATCH_TIMER_FILE", raising=False)
        monkeypatch.setenv("TORCHELASTIC_ENABLE_FILE_TIMER", "1")
        monkeypatch.setenv("TORCHELASTIC_TIMER_FILE", path)
        previous = hangwatch.get_configured_client()
        try:
            client = hangwatch.configure_from_env()
            assert isinstance(client, hangwatch.FileTimerClient)
            assert client._file_path == path
            assert hangwatch.get_configured_client() is client
        finally:
            if previous is not None:
                hangwatch.configure(previous)

    def test_a_bad_reap_policy_variable_is_named(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """HANGWATCH_REAP_POLICY=garbage: the error names the variable and its value."""
        monkeypatch.setenv("HANGWATCH_REAP_POLICY", "garbage")
        monkeypatch.setenv("HANGWATCH_TIMER_FILE", str(tmp_path / "x.fifo"))
        with pytest.raises(ValueError, match="HANGWATCH_REAP_POLICY='garbage' is not a reap policy"):
            hangwatch.configure_from_env()

    def test_no_server_in_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Outside a launcher: a clear error, or None when not required."""
        for name in ("HANGWATCH_TIMER_FILE", "TORCHELASTIC_ENABLE_FILE_TIMER", "TORCHELASTIC_TIMER_FILE"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(RuntimeError, match="hangwatch run"):
            hangwatch.configure_from_env()
        assert hangwatch.configure_from_env(required=False) is None


def write(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


class TestLauncher:
    @pytest.mark.parametrize(
        "timer, client",
        [("auto", "SharedMemoryTimerClient"), ("shm", "SharedMemoryTimerClient"), ("fifo", "FileTimerClient")],
    )
    def test_script_end_to_end(self, tmp_path: Path, timer: str, client: str) -> None:
        """`hangwatch run --nproc-per-node 2 train.py x`: rank-prefixed output, torchrun's environment, exit 0."""
        script = write(
            tmp_path / "train.py",
            """
            import os, sys
            import hangwatch
            client = hangwatch.configure_from_env()
            with hangwatch.expires(after=30):
                print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], "args", sys.argv[1:],
                      "restart", os.environ["TORCHELASTIC_RESTART_COUNT"], type(client).__name__)
            """,
        )
        done = subprocess.run(
            [*HANGWATCH, "run", "--timer", timer, "--nproc-per-node", "2", str(script), "x"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lines = sorted(line for line in done.stdout.splitlines() if line.startswith("["))
        assert lines == [
            f"[0] rank 0 of 2 args ['x'] restart 0 {client}",
            f"[1] rank 1 of 2 args ['x'] restart 0 {client}",
        ]
        assert "succeeded after 1 attempt" in done.stderr

    @pytest.mark.parametrize("timer, client", [("fifo", "FileTimerClient"), ("off", "None")])
    def test_an_outer_runs_timer_variables_are_never_inherited(self, tmp_path: Path, timer: str, client: str) -> None:
        """Variables of an outer run (or a stale shell) never reach the workers: --timer fifo gets the FIFO of
        this run, --timer off gets none."""
        script = write(
            tmp_path / "which.py",
            """
            import os
            import hangwatch
            client = hangwatch.configure_from_env(required=False)
            print(type(client).__name__ if client else "None", os.environ.get("TORCHELASTIC_TIMER_FILE", "-"))
            """,
        )
        outer = {
            "HANGWATCH_TIMER_SOCKET": str(tmp_path / "outer.sock"),
            "HANGWATCH_TIMER_FILE": str(tmp_path / "outer.fifo"),
            "TORCHELASTIC_ENABLE_FILE_TIMER": "1",
            "TORCHELASTIC_TIMER_FILE": str(tmp_path / "outer.fifo"),
        }
        done = subprocess.run(
            [*HANGWATCH, "run", "--timer", timer, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **outer},
        )
        assert done.returncode == 0, done.stderr
        (line,) = [line for line in done.stdout.splitlines() if line.startswith("[0]")]
        kind, fifo = line.split()[1:]
        assert kind == client and "outer" not in fifo

    def test_module_with_a_stuck_rank_is_reaped_and_restarted(self, tmp_path: Path) -> None:
        """`hangwatch run -m pkg`: a rank stuck in expires is reaped, the summary says where, the rerun succeeds."""
        write(
            tmp_path / "stuckmod.py",
            """
            import os, time
            import hangwatch

            def wait_for_peer():
                time.sleep(3600)

            with hangwatch.expires(after=0.5, scope="collective"):
                if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
                    wait_for_peer()
            print("ok")
            """,
        )
        done = subprocess.run(
            [*HANGWATCH, "run", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "stuckmod"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert "likely cause: rank 1 (pid" in done.stderr and "at stuckmod.py:6 in wait_for_peer" in done.stderr
        assert "fate: rank 1 reaped: timer 'collective' expired; killed by SIGKILL" in done.stderr
        assert "rank 1's main thread" in done.stderr and 'stuckmod.py", line 6 in wait_for_peer' in done.stderr
        assert "succeeded after 2 attempts" in done.stderr

    def test_failure_after_retries_exits_1_and_usage_errors_exit_2(self, tmp_path: Path) -> None:
        """Exit statuses tell failure after every restart (1) from bad usage (2)."""
        script = write(tmp_path / "bad.py", "import sys\nsys.exit(4)\n")
        done = subprocess.run([*HANGWATCH, "run", "--max-restarts", "1", str(script)], capture_output=True, text=True)
        assert done.returncode == 1
        assert "failed after 2 attempts" in done.stderr and "exited with status 4" in done.stderr
        missing = subprocess.run([*HANGWATCH, "run", str(tmp_path / "nope.py")], capture_output=True, text=True)
        assert missing.returncode == 2 and "no such script" in missing.stderr

    def test_no_python_runs_a_command(self, tmp_path: Path) -> None:
        """--no-python: the target is any command, run once per rank."""
        done = subprocess.run(
            [*HANGWATCH, "run", "--nproc-per-node", "2", "--no-python", "sh", "-c", "echo rank=$RANK"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert sorted(line for line in done.stdout.splitlines()) == ["[0] rank=0", "[1] rank=1"]


def _spawner_script(tmp_path: Path) -> Path:
    """A worker that starts a child in its group, one that escapes into its own session, then sleeps."""
    return write(
        tmp_path / "spawner.py",
        f"""
        import os, subprocess, sys, time
        rank = os.environ["RANK"]
        inside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        with open(os.path.join({str(tmp_path)!r}, "dir-" + rank), "w") as f:
            f.write(os.path.dirname(os.environ["HANGWATCH_TIMER_SOCKET"]))
        with open(os.path.join({str(tmp_path)!r}, "pids-" + rank), "w") as f:
            f.write(f"{{os.getpid()}} {{inside.pid}} {{outside.pid}}")
        if rank == "1" and os.path.exists(os.path.join({str(tmp_path)!r}, "fail")):
            time.sleep(0.5)
            sys.exit(1)
        time.sleep(300)
        """,
    )


def _pids(tmp_path: Path, ranks: int) -> List[int]:
    assert wait_for(lambda: all((tmp_path / f"pids-{r}").exists() for r in range(ranks)), 30)
    time.sleep(0.1)
    return [int(p) for r in range(ranks) for p in (tmp_path / f"pids-{r}").read_text().split()]


class TestNoOrphans:
    def test_group_stop_leaves_no_worker_or_worker_child(self, tmp_path: Path) -> None:
        """A failing rank stops the group: workers, their children, and children that left the group are gone."""
        script = _spawner_script(tmp_path)
        (tmp_path / "fail").touch()
        done = subprocess.run(
            [*HANGWATCH, "run", "--nproc-per-node", "2", "--stop-grace", "1", str(script)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        pids = _pids(tmp_path, 2)
        assert len(pids) == 6
        assert [pid for pid in pids if not gone(pid)] == []

    @pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
    def test_signal_to_the_launcher_stops_everything(self, tmp_path: Path, signum: int) -> None:
        """SIGINT/SIGTERM to the launcher: every worker and worker child stops; exit 128 + the signal."""
        script = _spawner_script(tmp_path)
        launcher = subprocess.Popen(
            [*HANGWATCH, "run", "--nproc-per-node", "2", "--stop-grace", "1", str(script)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            pids = _pids(tmp_path, 2)
            launcher.send_signal(signum)
            _, err = launcher.communicate(timeout=60)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
        assert launcher.returncode == 128 + signum, err
        assert "interrupted" in err
        assert [pid for pid in pids if not gone(pid)] == []

    def test_sigkill_to_the_launcher_takes_everything_down(self, tmp_path: Path) -> None:
        """The launcher is SIGKILLed: its workers die with it (PR_SET_PDEATHSIG), and the keeper takes down
        their children, the one that left the workers' session included, then removes the run's timer folder."""
        script = _spawner_script(tmp_path)
        launcher = subprocess.Popen(
            [*HANGWATCH, "run", "--nproc-per-node", "2", str(script)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pids = _pids(tmp_path, 2)
        timer_dir = Path((tmp_path / "dir-0").read_text())
        assert timer_dir.is_dir()
        try:
            launcher.kill()
            launcher.wait()
            assert wait_for(lambda: all(gone(pid) for pid in pids), 20), [pid for pid in pids if not gone(pid)]
            assert wait_for(lambda: not timer_dir.exists(), 20), "the run's timer folder was left behind"
        finally:
            for pid in pids:  # only if the test failed: never leave them running
                if alive(pid) and not gone(pid):
                    os.kill(pid, signal.SIGKILL)

    def test_success_leaves_nothing_behind(self, tmp_path: Path) -> None:
        """A run that succeeds: no worker child outlives it, not even one in its own session."""
        script = write(
            tmp_path / "ok.py",
            f"""
            import os, subprocess, sys
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
            with open(os.path.join({str(tmp_path)!r}, "child-" + os.environ["RANK"]), "w") as f:
                f.write(str(child.pid))
            """,
        )
        done = subprocess.run(
            [*HANGWATCH, "run", "--nproc-per-node", "2", str(script)], capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        children = [int((tmp_path / f"child-{r}").read_text()) for r in range(2)]
        try:
            assert wait_for(lambda: all(gone(pid) for pid in children), 20)
        finally:
            for pid in children:
                if alive(pid) and not gone(pid):
                    os.kill(pid, signal.SIGKILL)


def _cgroups_here() -> str:
    """Why the run cannot have a cgroup here, or "" if it can."""
    from hangwatch._cgroup import RunCgroup

    probe = RunCgroup.create(f"hangwatch-probe-{os.getpid()}")
    if probe is None:
        return "no writable cgroup v2 here (the run's cgroup is off; process groups and the token remain)"
    probe.remove()
    return ""


class TestKeeperGaps:
    def test_a_spawned_function_worker_is_born_with_the_run_token(self, tmp_path: Path) -> None:
        """The token is in /proc/PID/environ, where the keeper reads it (os.environ.update never reaches it)."""
        from hangwatch._keeper import TOKEN_VARIABLE

        pid_file = tmp_path / "pid"
        spec = WorkerSpec(entrypoint=_workers.reports_environ_token, args=(str(pid_file),), max_restarts=0)
        agent = LocalElasticAgent(spec, stop_grace=0.5)
        seen: List[bytes] = []

        def look_then_stop() -> None:
            wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30)
            with open(f"/proc/{pid_file.read_text()}/environ", "rb") as f:
                seen.append(f.read())
            agent.interrupt()

        looker = threading.Thread(target=look_then_stop)
        looker.start()
        agent.run()
        looker.join()
        assert f"{TOKEN_VARIABLE}={agent._token}".encode() in seen[0]
        assert TOKEN_VARIABLE not in os.environ  # set only while the worker was started

    def test_the_token_as_the_first_variable_is_found(self) -> None:
        """A process whose environment starts with the token is swept (the match once needed a NUL before it)."""
        from hangwatch._keeper import TOKEN_VARIABLE, sweep

        token = "firstvariable" + str(os.getpid())
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], env={TOKEN_VARIABLE: token}, start_new_session=True
        )
        try:
            time.sleep(0.2)
            assert proc.pid in sweep(token, {})
            assert proc.wait(10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    @pytest.mark.skipif(bool(_cgroups_here()), reason=_cgroups_here() or "runs")
    def test_a_clean_child_in_its_own_session_dies_with_a_sigkilled_launcher(self, tmp_path: Path) -> None:
        """A worker's child with an empty environment in a session of its own: only the run's cgroup holds it,
        and the keeper kills it when the launcher is SIGKILLed."""
        script = write(
            tmp_path / "clean.py",
            f"""
            import os, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], env={{}},
                                     start_new_session=True)
            with open(os.path.join({str(tmp_path)!r}, "child"), "w") as f:
                f.write(str(child.pid))
            time.sleep(300)
            """,
        )
        launcher = subprocess.Popen(
            [*HANGWATCH, "run", str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        child_file = tmp_path / "child"
        try:
            assert wait_for(lambda: child_file.exists() and child_file.read_text(), 30)
            child = int(child_file.read_text())
            launcher.kill()
            launcher.wait()
            assert wait_for(lambda: gone(child), 20), "the clean child outlived the launcher"
        finally:
            if child_file.exists() and child_file.read_text() and not gone(int(child_file.read_text())):
                os.kill(int(child_file.read_text()), signal.SIGKILL)

    def test_fork_started_workers_do_not_keep_the_keeper_waiting(self, tmp_path: Path) -> None:
        """With the fork start method the workers once inherited the keeper's pipe, so a SIGKILLed agent's keeper
        never swept: a grandchild that left for its own session lived on."""
        pid_file = tmp_path / "grandchild"
        code = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            import _workers
            from hangwatch.agent import LocalElasticAgent, WorkerSpec
            spec = WorkerSpec(entrypoint=_workers.forks_an_escaping_grandchild, args=({str(pid_file)!r},))
            LocalElasticAgent(spec, "fork").run()
            """
        )
        agent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        grandchild = -1
        try:
            assert wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30)
            grandchild = int(pid_file.read_text())
            agent.kill()
            agent.wait()
            assert wait_for(lambda: gone(grandchild), 20), "the grandchild outlived the SIGKILLed agent"
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            if grandchild > 0 and not gone(grandchild):
                os.kill(grandchild, signal.SIGKILL)
