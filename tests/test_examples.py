"""The examples and the demo run as documented (they are what a newcomer tries first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_local_timer_example_restarts_the_group() -> None:
    """torch's documented example, corrected: rank 2 is reaped on attempt 0, the group finishes on attempt 1."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "local_timer_example.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "attempt 0: rank 2" in done.stdout and "killed by SIGKILL" in done.stdout
    assert "the group finished on attempt 1" in done.stdout
    assert "in trainer_func" in done.stderr  # the stack in the reap event


def test_file_timer_example_cleans_up_on_sigterm() -> None:
    """The FIFO example's stuck worker asks for SIGTERM and exits through its own handler."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "file_timer_example.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "got SIGTERM while stuck, cleaning up" in done.stdout + done.stderr


def test_demo_names_the_stuck_rank_not_the_ranks_waiting_for_it() -> None:
    """`hangwatch demo`: rank 2 named as the cause with its own line, the others waiting in all_reduce, recovery."""
    done = subprocess.run([sys.executable, "-m", "hangwatch", "demo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stderr
    assert "likely cause: rank 2 (pid" in out and "at train.py:24 in load_batch (confidence: high)" in out
    assert "train.py:24: time.sleep(3600)" in out
    assert "ranks 0, 1 and 3: waiting in all_reduce (train.py:32), called from train.py:43 in main" in out
    assert 'train.py", line 24 in load_batch' in out
    assert "fate: " in out and "timers expired" in out
    assert "succeeded after 2 attempts" in out
    assert out.count("training finished") == 4
