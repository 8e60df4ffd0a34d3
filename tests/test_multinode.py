"""Multi-node jobs on torch's elastic engine: two launchers on loopback play two nodes.

Each test starts real ``hangwatch run --nnodes 2`` launchers (c10d rendezvous on a free
port, 2 workers each, gloo), as a user would on two machines. They need torch; without it
they skip (CI installs it, so they run there).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

torch = pytest.importorskip("torch", reason="multi-node runs use torch's elastic engine (pip install torch)")

LAUNCH_TIMEOUT = 240  # seconds: generous on a loaded 2-core machine (a rendezvous, a restart, gloo start-up)

# A DDP-like job: every step meets the other ranks in all_reduce inside a timer. On the first
# attempt, the rank named by STUCK_RANK hangs before the all_reduce (the others wait for it).
TRAIN = """
import os, sys, time
import torch
import torch.distributed as dist
import hangwatch

dist.init_process_group("gloo")
rank = dist.get_rank()
print(f"rank {rank} pid {os.getpid()} attempt {os.environ['TORCHELASTIC_RESTART_COUNT']}", flush=True)
stuck = int(os.environ.get("STUCK_RANK", "-1"))
marker = sys.argv[1]
t = torch.ones(4)
for step in range(3):
    patient = str(rank) in os.environ.get("PATIENT_RANKS", "").split(",")
    with hangwatch.expires(after=600 if patient else 3, scope="train_step"):
        if rank == stuck and step == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(3600)  # stuck: a read that never returns
        dist.all_reduce(t)
    time.sleep(0.1)
dist.destroy_process_group()
print(f"rank {rank} done", flush=True)
"""

# Every rank registers with torch's own FileTimerClient, as code written for torchrun does.
TORCH_CLIENT = """
import os, sys, time
import torch.distributed.elastic.timer as timer

rank = int(os.environ["RANK"])
assert os.environ.get("TORCHELASTIC_ENABLE_FILE_TIMER") == "1", "the worker must see the file timer enabled"
timer.configure(timer.FileTimerClient(os.environ["TORCHELASTIC_TIMER_FILE"]))
marker = sys.argv[1]
with timer.expires(after=1, scope="torch_step"):
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(3600)
print(f"rank {rank} done", flush=True)
"""

# Every rank says its pid, then waits (no timer) until the launcher is gone.
IDLE = """
import os, time
print(f"rank {os.environ['RANK']} pid {os.getpid()}", flush=True)
time.sleep(600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher(script: Path, port: int, *options: str, env: Optional[dict] = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "hangwatch", "run", "--nnodes", "2", "--nproc-per-node", "2"]
    argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test{port}"]
    argv += ["--native-stacks", "off", *options, str(script), str(script.parent / "marker")]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=str(script.parent),
        start_new_session=True,  # the test can stop all of a launcher's processes if it hangs
    )


def finish(launchers: List[subprocess.Popen[str]], timeout: float = LAUNCH_TIMEOUT) -> List[Tuple[int, str]]:
    """Each launcher's exit status and output; a launcher still running at the timeout is killed, and fails the test."""
    results = []
    deadline = time.monotonic() + timeout
    for process in launchers:
        try:
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in launchers:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            out, _ = process.communicate()
            pytest.fail(f"a launcher did not finish within {timeout} s; its output:\n{out}")
        results.append((process.returncode, out))
    return results


def job(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "train.py"
    script.write_text(text)
    return script


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_rank_stuck_on_one_node_is_reaped_explained_on_both_and_the_job_recovers(tmp_path: Path) -> None:
    script = job(tmp_path, TRAIN)
    port = free_port()
    env = {"STUCK_RANK": "3"}  # on node 1
    nodes = [launcher(script, port, "--max-restarts", "1", env=env) for _ in range(2)]
    results = finish(nodes)
    outputs = "\n".join(out for _, out in results)
    assert [code for code, _ in results] == [0, 0], outputs
    for _, out in results:
        # each node's report names rank 3 on node 1, wherever it is printed
        assert re.search(r"likely cause: rank 3 \(node 1, pid \d+\), at train\.py:\d+", out), out
        assert "the job succeeded" in out, out
        assert "rank 0 done" in out or "rank 2 done" in out, out
    late = [int(ms) for ms in re.findall(r"first signalled (?:\d+-)?(\d+) ms after", outputs)]
    assert late, outputs
    assert max(late) < 3000, outputs  # milliseconds in practice; generous for a loaded machine
    assert outputs.count("done") == 4, outputs


def test_a_node_whose_timers_did_not_expire_takes_its_stacks_when_asked_and_says_why_it_restarts(
    tmp_path: Path,
) -> None:
    """Ranks 0 and 1 (node 0) wait with long timers: only node 1's expire. Node 0 is asked through the rendezvous
    store, takes its ranks' stacks then, and its report says who asked and names rank 3 on node 1."""
    script = job(tmp_path, TRAIN)
    port = free_port()
    env = {"STUCK_RANK": "3", "PATIENT_RANKS": "0,1"}
    nodes = [launcher(script, port, "--max-restarts", "1", env=env) for _ in range(2)]
    results = finish(nodes)
    outputs = "\n".join(out for _, out in results)
    assert [code for code, _ in results] == [0, 0], outputs
    node0 = next(out for _, out in results if "node 0, attempt 1" in out)
    assert re.search(r"node 0, attempt 1 failed: node 1 asked: timer 'train_step' of rank [23] expired", node0), node0
    assert re.search(r"likely cause: rank 3 \(node 1, pid \d+\)", node0), node0
    assert "0 timers expired on this node; 0 ranks reaped (none)" in node0, node0


def test_without_restarts_both_nodes_fail_and_report_the_reaped_rank(tmp_path: Path) -> None:
    script = job(tmp_path, TRAIN)
    port = free_port()
    nodes = [launcher(script, port, "--max-restarts", "0", env={"STUCK_RANK": "3"}) for _ in range(2)]
    results = finish(nodes)
    outputs = "\n".join(out for _, out in results)
    assert [code for code, _ in results] == [1, 1], outputs
    assert re.search(r"ranks 2 and 3 reaped: timer 'train_step' expired", outputs), outputs
    assert outputs.count("the job failed") == 2, outputs


def test_sigkill_of_a_launcher_leaves_nothing_of_its_node_running(tmp_path: Path) -> None:
    script = job(tmp_path, IDLE)
    port = free_port()
    nodes = [launcher(script, port) for _ in range(2)]
    pids = {}
    seen = ""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        fds = []
        for node in nodes:
            assert node.stdout is not None
            fds.append(node.stdout.fileno())
            os.set_blocking(fds[-1], False)
        while len(pids) < 4 and time.monotonic() < deadline:
            for index, fd in enumerate(fds):
                try:
                    chunk = os.read(fd, 65536).decode(errors="replace")
                except BlockingIOError:
                    continue
                seen += chunk
                for rank, pid in re.findall(r"rank (\d) pid (\d+)", chunk):
                    pids[int(rank)] = (index, int(pid))
            time.sleep(0.1)
        assert len(pids) == 4, seen
        victim = pids[0][0]  # the node of rank 0
        nodes[victim].kill()  # SIGKILL: no handler of the launcher runs
        nodes[victim].wait()
        own = [pid for node, pid in pids.values() if node == victim]
        end = time.monotonic() + 30
        while any(alive(pid) for pid in own) and time.monotonic() < end:
            time.sleep(0.1)
        assert not [pid for pid in own if alive(pid)], f"workers of the killed node still run: {own}"
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    survivors = [pid for _, pid in pids.values() if alive(pid)]
    assert not survivors, f"workers outlived both launchers: {survivors}"


def test_torchs_own_file_timer_client_is_served_by_hangwatch_and_its_agent_survives(tmp_path: Path) -> None:
    script = job(tmp_path, TORCH_CLIENT)
    argv = [sys.executable, "-m", "hangwatch", "run", "--nnodes", "1", "--standalone", "--nproc-per-node", "2"]
    argv += ["--max-restarts", "1", "--native-stacks", "off", str(script), str(tmp_path / "marker")]
    env = {**os.environ, "TORCHELASTIC_ENABLE_FILE_TIMER": "1"}  # as a torchrun user would have it
    done = subprocess.run(argv, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env, cwd=str(tmp_path))
    out = done.stdout + done.stderr
    # torch's own server would have SIGKILLed the launcher itself (exit -9) after reaping rank 1
    assert done.returncode == 0, out
    assert re.search(r"rank 1 \(pid \d+\)", out) and "timer 'torch_step' of rank 1" in out, out
    assert out.count("rank 1 done") == 1, out  # the attempt after the reap


# Only node 0's ranks run steps; node 1's ranks wait, then hang on the first attempt in a step of their own:
# what they are caught at was learned from the other node's ranks.
LEARN_ACROSS = """
import os, sys, time
import hangwatch

if os.environ["GROUP_RANK"] == "0":
    for _ in range(40):
        with hangwatch.expires(after=600, scope="step"):
            time.sleep(0.01)
    time.sleep(12)
elif os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    time.sleep(8)  # node 0's figures reach this node meanwhile (shared every 2 s)
    with hangwatch.expires(after=600, scope="step"):
        time.sleep(3600)
print(f"rank {os.environ['RANK']} done", flush=True)
"""


def test_every_node_learns_from_every_rank_of_the_job(tmp_path: Path) -> None:
    """A node whose own ranks ran no step catches a hang at the deadline learned from the other node's ranks."""
    script = job(tmp_path, LEARN_ACROSS)
    port = free_port()
    options = ["--max-restarts", "1", "--learn-timeouts", "--timeout-floor", "1", "--timeout-warmup", "30"]
    results = finish([launcher(script, port, *options) for _ in range(2)])
    outputs = "\n".join(out for _, out in results)
    assert [code for code, _ in results] == [0, 0], outputs
    caught = [out for _, out in results if "expired at its learned deadline of 1 s (its after: 600 s)" in out]
    assert len(caught) == 2, outputs  # the node of the hung ranks reports it, and so does the other
    assert outputs.count("scope 'step': learned deadline 1 s (the floor)") == 2, outputs
    assert "timers by scope (every node's ranks, every worker group)" in outputs, outputs
    assert "reaped: timer 'step' expired at its learned deadline of 1 s (its after: 600 s)" in outputs, outputs


def test_without_torch_the_multinode_options_exit_2_and_say_to_install_it(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named torch (hidden by the test)')\n")
    script = tmp_path / "ok.py"
    script.write_text("print('ran')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "hangwatch", "run", "--nnodes", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "--nnodes" in done.stderr and "pip install torch" in done.stderr, done.stderr
    assert "ran" not in done.stdout
