"""Who hung, not who waited: the group's stacks at the first expiry, the culprit, each rank's fate (real processes).

Every job here is a real ``hangwatch run`` (or ``LocalElasticAgent``) of real worker
processes. The collective hangs make the bystanders' timers expire first on purpose: the
report must still name the rank that hung, with its own line.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import hangwatch
from hangwatch._evidence import GroupEvidence
from hangwatch._native import NativeSampler, native_available
from hangwatch.agent import FAILED, LocalElasticAgent, WorkerSpec

import _workers
from conftest import needs_torch, wait_for

HANGWATCH = [sys.executable, "-m", "hangwatch"]

# A collective without torch: a barrier in files. Rank 1 never reaches it on the first attempt.
BARRIER_JOB = """\
import os, sys, threading, time
import hangwatch

for _ in range(16):  # like a real job's helper threads: a killed process's threads take a moment to go
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
sync = os.path.join(sys.argv[1], str(attempt))
os.makedirs(sync, exist_ok=True)


def read_shard():
    if rank == 1 and attempt == 0:
        time.sleep(3600)  # the culprit: stuck reading


def barrier(step):
    open(os.path.join(sync, f"{step}.{rank}"), "w").close()
    while sum(n.startswith(f"{step}.") for n in os.listdir(sync)) < world:
        time.sleep(0.01)


def main():
    for step in range(2):
        # The bystanders' timers are the short ones: they expire first.
        with hangwatch.expires(after=5.0 if rank == 1 else 0.5, scope="step"):
            read_shard()
            barrier(step)
    print("done")


main()
"""


def run_job(tmp_path: Path, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(script))
    return subprocess.run(
        [*HANGWATCH, "run", "--events", str(tmp_path / "events.jsonl"), *args, str(job), str(tmp_path / "sync")],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def events(tmp_path: Path, name: str) -> List[Dict[str, Any]]:
    path = tmp_path / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["name"] == name]


def line_of(script: str, text: str) -> int:
    """The line number of the first line of ``script`` that is ``text``, or else contains it."""
    lines = textwrap.dedent(script).splitlines()
    exact = [i for i, line in enumerate(lines, 1) if line.strip() == text]
    return exact[0] if exact else next(i for i, line in enumerate(lines, 1) if text in line)


class TestCollectiveHang:
    def test_the_culprit_is_named_even_though_the_bystanders_expired_first(self, tmp_path: Path) -> None:
        """Ranks 0 and 2 wait in the barrier and expire first; the report names rank 1 at its own line."""
        done = run_job(tmp_path, BARRIER_JOB, "--nproc-per-node", "3", "--max-restarts", "1", "--stop-grace", "1")
        err = done.stderr
        assert done.returncode == 0, err
        sleep_line = line_of(BARRIER_JOB, "time.sleep(3600)")
        assert "likely cause: rank 1 (pid" in err and f"at job.py:{sleep_line} in read_shard" in err, err
        barrier_line, call_line = line_of(BARRIER_JOB, "time.sleep(0.01)"), line_of(BARRIER_JOB, "barrier(step)")
        assert (
            f"ranks 0 and 2: waiting in barrier (job.py:{barrier_line}), called from job.py:{call_line} in main" in err
        )
        assert "ranks 0 and 2 wait in barrier for the others; rank 1 is not in it" in err
        # Each rank's fate, and counts that add up: the bystanders reaped, the culprit stopped with the group.
        assert "fate: ranks 0 and 2 reaped: timer 'step' expired; killed by SIGKILL" in err
        assert "fate: rank 1 stopped by the group stop; killed by SIGTERM" in err
        assert "2 timers expired; 2 workers reaped, 1 stopped by the group stop" in err
        assert "attempt 1: likely caused by rank 1" in err and "succeeded after 2 attempts" in err

    def test_the_stacks_are_taken_before_anyone_is_signalled_and_kept(self, tmp_path: Path) -> None:
        """The hang report event holds every rank's stack, and every kill came after the stacks were taken."""
        done = run_job(tmp_path, BARRIER_JOB, "--nproc-per-node", "3", "--stop-grace", "1")
        assert done.returncode == 1, done.stderr
        (report,) = events(tmp_path, "hang report")
        details = report["details"]
        assert details["culprits"] == [1] and details["confidence"] == "high"
        assert [g["ranks"] for g in details["groups"]] == [[0, 2], [1]]
        stacks = {int(r): p["stack"] for r, p in details["ranks"].items()}
        assert "in read_shard" in stacks[1] and all("in barrier" in stacks[r] for r in (0, 2))
        taken_until = details["taken_at"] + details["seconds"]
        kills = events(tmp_path, "kill worker process")
        assert len(kills) == 2 and all(kill["time"] >= taken_until - 0.01 for kill in kills)
        assert {kill["details"]["stack"] == stacks[0] or kill["details"]["stack"] == stacks[2] for kill in kills} == {
            True
        }

    def test_the_agent_returns_the_same_report_to_a_program(self, tmp_path: Path) -> None:
        """LocalElasticAgent.run(): the attempt's report, failures, stopped ranks and counts, for programs."""
        spec = WorkerSpec(local_world_size=3, entrypoint=_workers.barrier_job, args=(str(tmp_path),), max_restarts=0)
        result = LocalElasticAgent(spec, stop_grace=1.0).run()
        assert result.state == FAILED
        (attempt,) = result.attempts
        report = attempt.report
        assert report is not None and report.culprits == [1]
        assert report.ranks[1].place is not None and report.ranks[1].place.describe().startswith("at _workers.py:")
        assert "in stuck_reading" in (report.ranks[1].stack or "")
        assert all("in file_barrier" in (report.ranks[r].stack or "") for r in (0, 2))
        assert sorted(attempt.failures) == [0, 2] and all(f.reaped for f in attempt.failures.values())
        assert attempt.stopped == {1: -15} and attempt.timers_expired == 2
        assert [r.rank for r in sorted(attempt.reaped, key=lambda r: r.rank)] == [0, 2]
        assert result.reports == [report]


class TestFailureAndChildren:
    def test_a_rank_that_crashes_while_the_others_wait(self, tmp_path: Path) -> None:
        """No timer expired: a rank exits with an error; the others' stacks say they were waiting for it."""
        crash = (  # once the others wait in the barrier (they start at different times), rank 1 fails
            "while sum(n.startswith('0.') for n in os.listdir(sync)) < world - 1: time.sleep(0.01)\n"
            "        raise SystemExit(3)"
        )
        script = BARRIER_JOB.replace("time.sleep(3600)  # the culprit: stuck reading", crash)
        script = script.replace("else 0.5", "else 30.0")  # no timer expires: the failure alone triggers
        done = run_job(tmp_path, script, "--nproc-per-node", "3", "--stop-grace", "1")
        err = done.stderr
        assert done.returncode == 1, err
        assert "rank 1 (pid" in err and "exited with status 3; the stacks of the 2 running ranks were taken" in err
        assert "likely cause: rank 1 (pid" in err and "exited with status 3 (confidence: high)" in err
        assert "ranks 0 and 2: waiting in barrier" in err
        assert "fate: ranks 0 and 2 stopped by the group stop; killed by SIGTERM" in err

    def test_a_workers_child_is_reaped_and_reported_with_its_rank(self, tmp_path: Path) -> None:
        """A worker's forked helper holds its own timer: it is reaped (a descendant is allowed) and named by rank."""
        script = """\
        import os, sys, time
        import hangwatch

        helper = os.fork()
        if helper == 0:
            with hangwatch.expires(after=0.5, scope="helper"):
                time.sleep(3600)  # the helper hangs
            os._exit(0)
        _, status = os.waitpid(helper, 0)
        sys.exit(3 if os.WIFSIGNALED(status) else 0)
        """
        done = run_job(tmp_path, script, "--nproc-per-node", "1")
        err = done.stderr
        assert done.returncode == 1, err
        (kill,) = events(tmp_path, "kill worker process")
        child = kill["worker"]
        assert kill["scope"] == "helper" and kill["details"]["descendant_of"] != child
        assert f"timer 'helper' of rank 0's child pid {child} expired" in err
        assert f"fate: rank 0 exited with status 3 after its child pid {child} was reaped (timer 'helper')" in err
        assert "1 worker's child reaped" in err and events(tmp_path, "bad request") == []

    def test_a_process_outside_the_group_is_told_its_timers_are_refused(self, tmp_path: Path) -> None:
        """Not a worker nor a worker's descendant: the client warns on stderr, the launcher names it once."""
        script = """\
        import os, sys, time
        with open(os.path.join(sys.argv[1] + ".socket"), "w") as f:
            f.write(os.environ["HANGWATCH_TIMER_SOCKET"])
        while not os.path.exists(sys.argv[1] + ".go"):
            time.sleep(0.05)
        """
        job = tmp_path / "job.py"
        job.write_text(textwrap.dedent(script))
        sync = tmp_path / "sync"
        launcher = subprocess.Popen(
            [*HANGWATCH, "run", str(job), str(sync)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            socket_file = Path(str(sync) + ".socket")
            assert wait_for(lambda: socket_file.exists() and socket_file.read_text(), 30)
            outsider = subprocess.run(
                [sys.executable, "-c", OUTSIDER],
                env={**os.environ, "HANGWATCH_TIMER_SOCKET": socket_file.read_text()},
                capture_output=True,
                text=True,
                timeout=60,
            )
            Path(str(sync) + ".go").touch()
            _, err = launcher.communicate(timeout=60)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
        assert outsider.returncode == 0, outsider.stderr
        warnings = [line for line in outsider.stderr.splitlines() if "refused the timers of this process" in line]
        assert len(warnings) == 1 and "nor a descendant of one" in warnings[0], outsider.stderr
        named = [line for line in err.splitlines() if "is not one of this run's workers" in line]
        assert len(named) == 1 and "timer 'outside'" in named[0], err
        assert launcher.returncode == 0


OUTSIDER = """
import time
import hangwatch
hangwatch.configure_from_env()
for _ in range(20):
    with hangwatch.expires(after=30, scope="outside"):
        time.sleep(0.05)
"""


@needs_torch
class TestTorch:
    def test_gloo_ddp_hang_names_the_rank_that_hung(self, tmp_path: Path) -> None:
        """A CPU DDP job: rank 1 sleeps in its step, the others block in DDP's collective; rank 1 is named."""
        script = """\
        import os, sys, time
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        import hangwatch

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        model = DDP(torch.nn.Linear(8, 2))
        for step in range(3):
            with hangwatch.expires(after=30.0 if rank == 1 else 2.0, scope="train_step"):
                if rank == 1 and step == 1:
                    time.sleep(3600)  # the culprit
                model(torch.randn(4, 8)).sum().backward()
        """
        done = run_job(tmp_path, script, "--nproc-per-node", "3", "--stop-grace", "2", timeout=300)
        err = done.stderr
        assert done.returncode == 1, err
        line = line_of(script, "time.sleep(3600)")
        backward = line_of(script, ".backward()")
        assert "likely cause: rank 1 (pid" in err and f"at job.py:{line} in <module>" in err, err
        (report,) = events(tmp_path, "hang report")
        details = report["details"]
        assert details["culprits"] == [1]
        groups = {tuple(g["ranks"]): g["place"] for g in details["groups"]}
        assert groups[(0, 2)].endswith(f"called from job.py:{backward} in <module>"), groups
        if native_available():  # CI installs the native extra: the bystanders' C++ wait is named
            assert details["confidence"] == "high"
            assert groups[(0, 2)].startswith("waiting in ") and "c10d::" in groups[(0, 2)], groups
            native = details["ranks"]["0"]["native"]
            assert "gloo::" in native and "c10d::" in native
            assert "native: gloo::" in err and "(libtorch_cpu.so) in thread pt_gloo_runloop" in err
        else:
            assert "pip install 'hangwatch[native]'" in err

    def test_dataloader_worker_hang_shows_the_childs_stack(self, tmp_path: Path) -> None:
        """The rank waits on its DataLoader worker, stuck in __getitem__: the report shows the child's stack."""
        script = """\
        import time
        import torch
        from torch.utils.data import DataLoader, Dataset
        import hangwatch


        class Slow(Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                time.sleep(3600)  # a sample that never loads
                return torch.zeros(1)


        loader = iter(DataLoader(Slow(), num_workers=1))
        with hangwatch.expires(after=2.0, scope="next_batch"):
            next(loader)
        """
        done = run_job(tmp_path, script, timeout=300)
        err = done.stderr
        assert done.returncode == 1, err
        assert "likely cause: rank 0 (pid" in err and "waiting for a DataLoader worker in" in err, err
        line = line_of(script, "time.sleep(3600)")
        assert "rank 0's child pid" in err and f"(which it waits for): at job.py:{line} in __getitem__" in err
        assert f'job.py", line {line} in __getitem__' in err

    def test_a_dataloader_workers_own_timer_is_enforced(self, tmp_path: Path) -> None:
        """expires() inside __getitem__: the DataLoader worker is reaped, and the rank's failure says so."""
        script = """\
        import time
        import torch
        from torch.utils.data import DataLoader, Dataset
        import hangwatch


        class Slow(Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                with hangwatch.expires(after=1.0, scope="load_sample"):
                    time.sleep(3600)
                return torch.zeros(1)


        for batch in DataLoader(Slow(), num_workers=1):
            pass
        """
        started = time.monotonic()
        done = run_job(tmp_path, script, timeout=300)
        err = done.stderr
        assert done.returncode == 1, err
        (kill,) = events(tmp_path, "kill worker process")
        child = kill["worker"]
        assert kill["scope"] == "load_sample" and "in __getitem__" in kill["details"]["stack"]
        assert f"timer 'load_sample' of rank 0's child pid {child} expired" in err
        assert f"after its child pid {child} was reaped (timer 'load_sample')" in err
        assert time.monotonic() - started < 120


def test_a_native_sampler_that_hangs_is_cut_off(tmp_path: Path) -> None:
    """The native stage is bounded: a sampler that never returns costs its timeout, and the report still comes."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sampler = NativeSampler(command=[sys.executable, "-c", "import time; time.sleep(60)", "--"])
        group = GroupEvidence({0: sleeper.pid}, native=sampler, native_timeout=0.5)
        started = time.monotonic()
        group.collect(reason="test")
        assert group.wait()
        assert time.monotonic() - started < 5
        assert group.snapshot is not None
        (evidence,) = group.snapshot.processes.values()
        assert evidence.native is None and "did not finish in time" in " ".join(evidence.notes)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_reap_waits_for_the_groups_stacks_only_until_their_deadline(events: Any) -> None:
    """Stacks that never come (a collection stuck in the kernel, say) delay the reap to the group's deadline only;
    the worker's own stack is then taken as usual."""
    release = threading.Event()

    class NeverDone(GroupEvidence):
        def _run(self, trigger: Dict[str, Any]) -> None:
            release.wait(60)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = hangwatch.LocalTimerServer(queue, max_interval=0.05)
    worker = ctx.Process(target=_workers.stuck_local, args=(queue, 0.3))
    worker.start()
    try:
        assert worker.pid is not None
        group = NeverDone({0: worker.pid}, dump_timeout=0.2)
        server.set_group(group)
        server.start()
        worker.join(30)
        assert not worker.is_alive()
    finally:
        release.set()
        server.stop()
        if worker.is_alive():
            worker.kill()
            worker.join()
    (kill,) = [e for e in events.named("kill worker process") if e.worker == worker.pid]
    assert group.started and not group.done
    assert 0.6 <= kill.details["late_s"] < 5  # dump_timeout 0.2 s + 0.5 s of slack, then its own dump
    assert "in stuck_local" in kill.details["stack"]
