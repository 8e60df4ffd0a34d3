"""The named-pipe pair: a FileTimerServer, workers that send torch's JSON-lines requests.

Run: python examples/file_timer_example.py

The FIFO pair needs no shared queue object: a worker only needs the FIFO's path, so
it works for any process on the host (torchrun sets TORCHELASTIC_TIMER_FILE to it).
Here one worker asks to be reaped with SIGTERM, so it can clean up first.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time

import hangwatch as timer

WORKER = """
import signal, sys, time
import hangwatch as timer

def on_term(signum, frame):
    print("worker: got SIGTERM while stuck, cleaning up", flush=True)
    sys.exit(1)

signal.signal(signal.SIGTERM, on_term)
timer.configure(timer.FileTimerClient(sys.argv[1], signal=signal.SIGTERM))
stuck = sys.argv[2] == "stuck"
for step in range(5):
    with timer.expires(after=1.0, scope="train-step"):
        time.sleep(3600 if stuck and step == 2 else 0.05)
print("worker: finished all steps", flush=True)
"""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="hangwatch-example-") as folder:
        path = os.path.join(folder, "timer.fifo")
        server = timer.FileTimerServer(path, "example-run")  # torch 2.2+'s form; torch 2.1's (no run_id) works too
        server.start()
        try:
            workers = {
                kind: subprocess.Popen([sys.executable, "-c", WORKER, path, kind]) for kind in ("healthy", "stuck")
            }
            started = time.monotonic()
            for kind, proc in workers.items():
                code = proc.wait(timeout=60)
                print(f"{kind} worker (pid {proc.pid}) exited with {code} after {time.monotonic() - started:.2f} s")
            assert workers["healthy"].returncode == 0 and workers["stuck"].returncode == 1
        finally:
            server.stop()


if __name__ == "__main__":
    main()
