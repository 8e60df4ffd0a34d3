"""The workers of ``hangwatch demo``: a few training steps, each guarded by ``expires``.

On the first attempt rank 2 hangs inside its step (as in a collective a peer never
joins); the agent's timer server reaps it, the group restarts and finishes. Nothing
here sets up a timer client: the launcher configured it from the environment.
"""

from __future__ import annotations

import os
import time

import hangwatch

STEPS = 4


def all_reduce(rank: int, restart: int, step: int) -> None:
    """Stands for a collective operation."""
    if rank == 2 and restart == 0 and step == 1:
        time.sleep(3600)  # a peer never shows up
    time.sleep(0.1)


def main() -> None:
    rank = int(os.environ["RANK"])
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    for step in range(STEPS):
        with hangwatch.expires(after=1.0, scope="all_reduce"):
            all_reduce(rank, restart, step)
        print(f"step {step + 1}/{STEPS} done")
    print("training finished")


if __name__ == "__main__":
    main()
