"""The seed's example, written correctly: a LocalTimerServer, spawned workers, one stuck and reaped.

Run: python examples/local_timer_example.py

A group of four workers trains for a few steps, each step guarded by ``expires``.
On the first attempt rank 2 hangs inside its step; the server reaps it within
milliseconds of the deadline, the group is stopped and started again, and the
second attempt finishes. (The full agent with restarts is ``hangwatch.agent``; this
example keeps the restart loop in plain sight.)
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time

import hangwatch as timer  # torch users: this is the only line that changes

WORLD_SIZE = 4
STEP_DEADLINE_S = 1.0


def trainer_func(message_queue: mp.Queue[timer.TimerRequest], rank: int, attempt: int) -> None:
    timer.configure(timer.LocalTimerClient(message_queue))
    for _step in range(5):
        with timer.expires(after=STEP_DEADLINE_S):  # a 1 s deadline per step
            time.sleep(0.05)  # the step's work
            if rank == 2 and attempt == 0:
                time.sleep(3600)  # stuck: a collective that never completes, say


def run_group(ctx: mp.context.SpawnContext, message_queue: mp.Queue[timer.TimerRequest], attempt: int) -> bool:
    workers = [ctx.Process(target=trainer_func, args=(message_queue, rank, attempt)) for rank in range(WORLD_SIZE)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        if any(w.exitcode not in (None, 0) for w in workers):
            for w in workers:
                w.terminate()  # one worker failed: stop the rest of the group
        time.sleep(0.01)
    for rank, w in enumerate(workers):
        w.join()
        code = w.exitcode or 0
        how = "ok" if code == 0 else f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        print(f"  attempt {attempt}: rank {rank} (pid {w.pid}): {how}")
    return all(w.exitcode == 0 for w in workers)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = mp.get_context("spawn")
    message_queue = ctx.Queue()
    server = timer.LocalTimerServer(message_queue)  # default max_interval=60: reaping does not wait for it
    server.start()  # non-blocking
    try:
        for attempt in range(3):
            if run_group(ctx, message_queue, attempt):
                print(f"the group finished on attempt {attempt}")
                return
            print("a worker was reaped: restarting the group")
        raise SystemExit("the group failed three times")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
