"""A training loop whose timeout was picked by guesswork, and the deadline hangwatch learns for it.

Run (about 40 s; the worker hangs once, after 120 healthy steps):

    hangwatch run --max-restarts 1 --learn-timeouts --timeout-floor 10 examples/learned_deadlines.py

Each step takes about 0.1 s and is guarded with ``after=600``: the kind of figure picked
so that a healthy job never dies. Without ``--learn-timeouts`` a hang is caught ten
minutes after it started. With it, once a scope has seen its warm-up (100 blocks), its
blocks get ``min(600, max(floor, 3 x the slowest step seen))``: here the floor, 10 s. The
hang is caught 10 s after it started, the report says it was the learned deadline, and
the end-of-run table shows each scope's figures and what was learned. What was learned
is kept when the group restarts; ``--timeouts-file FILE`` carries it to the next run.

Options: ``--steps N`` (default 200), ``--step S`` seconds (default 0.1),
``--hang-at N`` (default 120; the step rank 0 hangs in on the first attempt).
"""

from __future__ import annotations

import argparse
import os
import time

import hangwatch


def train_step(rank: int, attempt: int, step: int, options: argparse.Namespace) -> None:
    """Stands for the forward and backward pass of one batch."""
    if rank == 0 and attempt == 0 and step == options.hang_at:
        time.sleep(3600)  # e.g. a read from a dead NFS server that never returns
    time.sleep(options.step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step", type=float, default=0.1)
    parser.add_argument("--hang-at", type=int, default=120)
    options = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for step in range(options.steps):
        with hangwatch.expires(after=600, scope="train_step"):  # 600 s: a guess, "surely enough"
            train_step(rank, attempt, step, options)
        if step % 100 == 99:
            print(f"step {step + 1}/{options.steps}", flush=True)
    print("training finished", flush=True)


if __name__ == "__main__":
    main()
