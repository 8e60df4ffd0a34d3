"""The job of ``hangwatch demo``: a toy data-parallel training loop of 4 ranks.

The launcher copies this file as ``train.py`` into a temporary directory and runs it
in each rank, with that directory's ``sync`` folder as its argument. Each step loads a
batch, then meets the other ranks in ``all_reduce``: a barrier in files that stands for
``torch.distributed.all_reduce`` (no rank leaves it before every rank has entered it).
On the first attempt rank 2 never returns from reading its batch, so the other ranks
wait for it in ``all_reduce``: a collective hang, with no torch needed. Nothing here
sets up a timer client: the launcher configured it from the environment.
"""

import os
import sys
import time

import hangwatch

STEPS = 4


def load_batch(rank: int, attempt: int, step: int) -> None:
    """Reads this rank's shard of the data (here: waits a little)."""
    if rank == 2 and attempt == 0 and step == 1:
        time.sleep(3600)  # a read from a stalled file system: it never returns
    time.sleep(0.05)


def all_reduce(sync_dir: str, rank: int, world: int, step: int) -> None:
    """Waits until every rank has reached this step (stands for torch.distributed.all_reduce)."""
    open(os.path.join(sync_dir, f"step{step}.rank{rank}"), "w").close()
    while sum(name.startswith(f"step{step}.") for name in os.listdir(sync_dir)) < world:
        time.sleep(0.01)


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    sync_dir = os.path.join(sys.argv[1], f"attempt{attempt}")
    os.makedirs(sync_dir, exist_ok=True)
    for step in range(STEPS):
        with hangwatch.expires(after=1.0, scope="train_step"):
            load_batch(rank, attempt, step)
            all_reduce(sync_dir, rank, world, step)
        print(f"step {step + 1}/{STEPS} done")
    print("training finished")


if __name__ == "__main__":
    main()
