"""Interop with torch.distributed.elastic.timer itself: its clients on our servers, ours on its servers."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import hangwatch

import _workers
from conftest import EventLog, needs_torch, run_worker, wait_for

pytestmark = needs_torch
spawn = mp.get_context("spawn")


def test_torch_file_client_on_our_server(fifo_path: str, events: EventLog) -> None:
    """torch's FileTimerClient talks to hangwatch's FileTimerServer: its stuck worker is reaped by SIGKILL."""
    server = hangwatch.FileTimerServer(fifo_path, "interop")
    server.start()
    try:
        p = run_worker(_workers.torch_stuck_file, fifo_path, 0.5, timeout=60)
        assert p.exitcode == -signal.SIGKILL
        assert [e.scope for e in events.named("kill worker process")] == ["torch-client"]
    finally:
        server.stop()


def test_our_file_client_on_torchs_server(tmp_path: Path) -> None:
    """hangwatch's FileTimerClient talks to torch's FileTimerServer: torch reaps our stuck worker.

    Torch's server runs in its own process because it signals itself after a reap.
    """
    path = str(tmp_path / "torch.fifo")
    torch_server = spawn.Process(target=_workers.torch_file_server, args=(path, 60))
    torch_server.start()
    try:
        assert wait_for(lambda: os.path.exists(path), 60), "torch's server did not create its FIFO"
        worker = run_worker(_workers.stuck_file, path, 0.5, int(signal.SIGKILL), timeout=60)
        assert worker.exitcode == -signal.SIGKILL
    finally:
        if torch_server.is_alive():
            torch_server.kill()
        torch_server.join()


def test_our_client_does_not_hold_torchs_pipe_open(tmp_path: Path) -> None:
    """Against torch's (unmarked) FIFO our client opens and closes per request, so torch's loop keeps going."""
    path = str(tmp_path / "torch.fifo")
    torch_server = spawn.Process(target=_workers.torch_file_server, args=(path, 30))
    torch_server.start()
    try:
        assert wait_for(lambda: os.path.exists(path), 60)
        client = hangwatch.FileTimerClient(path)
        client.release("probe")
        assert client._fd == -1
    finally:
        torch_server.kill()
        torch_server.join()


def test_torch_local_client_on_our_server() -> None:
    """torch's LocalTimerClient puts torch TimerRequests on the queue; our LocalTimerServer reaps from them."""
    q = spawn.Queue()
    server = hangwatch.LocalTimerServer(q)
    server.start()
    try:
        p = run_worker(_workers.torch_stuck_local, q, 0.5, timeout=60)
        assert p.exitcode == -signal.SIGKILL
    finally:
        server.stop()


def test_our_local_client_on_torchs_server() -> None:
    """Our LocalTimerClient's requests are understood by torch's LocalTimerServer."""
    import torch.distributed.elastic.timer as ttimer

    q = spawn.Queue()
    server = ttimer.LocalTimerServer(q, max_interval=0.1)
    server.start()
    try:
        p = run_worker(_workers.stuck_local, q, 0.3, timeout=60)
        assert p.exitcode == -signal.SIGKILL
    finally:
        server.stop()


def test_torchs_documented_usage_with_only_the_import_changed() -> None:
    """The names and call shapes of torch's docs work on hangwatch's module unchanged."""
    import torch.distributed.elastic.timer as ttimer

    for name in ttimer.__all__ if hasattr(ttimer, "__all__") else dir(ttimer):
        if (not name.startswith("_") and name[0].isupper()) or name in ("configure", "expires"):
            assert hasattr(hangwatch, name), f"hangwatch lacks torch's {name}"
    q = spawn.Queue()
    server = hangwatch.LocalTimerServer(q, max_interval=0.01)
    server.start()
    hangwatch.configure(hangwatch.LocalTimerClient(q))
    with hangwatch.expires(after=60):
        time.sleep(0.01)
    server.stop()


def test_configure_from_env_under_torchrun(tmp_path: Path) -> None:
    """Under real torchrun with TORCHELASTIC_ENABLE_FILE_TIMER=1, configure_from_env() reaches torch's server."""
    import subprocess
    import sys
    import textwrap

    marker = tmp_path / "marker"
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, time
            import hangwatch
            client = hangwatch.configure_from_env()
            with open({str(marker)!r}, "w") as f:
                f.write(f"{{os.getpid()}} {{type(client).__name__}}")
            with hangwatch.expires(after=0.5, scope="torchrun-step"):
                time.sleep(60)
            with open({str(marker)!r}, "a") as f:
                f.write(" finished")
            """
        )
    )
    env = {**os.environ, "TORCHELASTIC_ENABLE_FILE_TIMER": "1", "TORCHELASTIC_TIMER_FILE": str(tmp_path / "t.fifo")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    pid, kind = marker.read_text().split()[:2]
    assert kind == "FileTimerClient"
    assert "finished" not in marker.read_text()  # reaped inside the block, long before its 60 s sleep ended
    assert done.returncode != 0  # the worker was killed (and torch's server then signals its own agent)
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10)
