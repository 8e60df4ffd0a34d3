"""``hangwatch demo``: four ranks of a toy training job; one hangs; it is reaped, explained, and the job recovers."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import TextIO

from ..agent import WorkerSpec
from .single import run_single

__all__ = ["run_demo"]


def run_demo(out: TextIO) -> int:
    """Run the demo, writing to ``out``; its exit status."""
    out.write(
        "hangwatch demo: 4 ranks train for 4 steps. Each step loads a batch, then meets the other ranks\n"
        "in all_reduce (no rank leaves it before every rank arrived), guarded by\n"
        "    with hangwatch.expires(after=1.0, scope='train_step'): ...\n"
        "On the first attempt rank 2 hangs reading its batch, so ranks 0, 1 and 3 wait for it in\n"
        "all_reduce, and every rank's timer expires. Watch hangwatch take every rank's stack before\n"
        "signalling any, name rank 2 as the likely cause, and restart the group, which finishes.\n\n"
    )
    out.flush()
    args = argparse.Namespace(
        start_method="spawn",
        reap_policy=None,
        stop_grace=2.0,
        run_id="demo",
        events=None,
        timer="auto",
        native_stacks="auto",
        native_timeout=3.0,
        keep_statistics=True,
        learning=None,
        statistics_file=None,
        timeouts_file=None,
    )
    with tempfile.TemporaryDirectory(prefix="hangwatch-demo-") as folder:
        script = os.path.join(folder, "train.py")
        shutil.copyfile(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_demo.py"), script)
        spec = WorkerSpec(
            local_world_size=4,
            entrypoint=sys.executable,
            args=("-u", "-m", "hangwatch._bootstrap", "--script", script, os.path.join(folder, "sync")),
            max_restarts=2,
        )
        return run_single(spec, args, out, worker_out=out)
