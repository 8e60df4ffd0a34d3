"""Worker bodies run in child processes by the tests (importable by spawned children)."""

from __future__ import annotations

import time
from typing import Any

import hangwatch


def stuck_local(q: Any, after: float) -> None:
    hangwatch.configure(hangwatch.LocalTimerClient(q))
    with hangwatch.expires(after=after):
        time.sleep(60)


def finishing_local(q: Any, blocks: int) -> None:
    hangwatch.configure(hangwatch.LocalTimerClient(q))
    for _ in range(blocks):
        with hangwatch.expires(after=30):
            pass
    with hangwatch.expires(after=30):
        time.sleep(0.2)


def exits_holding_local(q: Any, after: float) -> None:
    client = hangwatch.LocalTimerClient(q)
    client.acquire("held", time.time() + after)
    # leaves without releasing


def _recurse(depth: int, afters: list) -> None:
    with hangwatch.expires(after=afters[depth]):
        if depth + 1 < len(afters):
            _recurse(depth + 1, afters)
        else:
            time.sleep(0.05)


def recursion_local(q: Any, outer_sleep: float) -> None:
    """Outer acquire 30 s; inner (same default scope) 0.3 s, released at once; then the outer runs on."""
    hangwatch.configure(hangwatch.LocalTimerClient(q))
    with hangwatch.expires(after=30):  # a different scope: stays protected
        _recurse(0, [30, 0.3])
        time.sleep(outer_sleep)


def recursion_stuck_local(q: Any) -> None:
    """The inner acquire (same scope) shortens the deadline, and the inner block gets stuck."""
    hangwatch.configure(hangwatch.LocalTimerClient(q))

    def go(depth: int) -> None:
        with hangwatch.expires(after=30 if depth == 0 else 0.3):
            if depth == 0:
                go(1)
            else:
                time.sleep(60)

    go(0)


def stuck_file(path: str, after: float, signum: int) -> None:
    hangwatch.configure(hangwatch.FileTimerClient(path, signal=signum))
    with hangwatch.expires(after=after):
        time.sleep(60)


def tight_loop_file(path: str, blocks: int) -> None:
    client = hangwatch.FileTimerClient(path)
    for _ in range(blocks):
        with hangwatch.expires(after=60, scope="s", client=client):
            pass


def torch_stuck_file(path: str, after: float) -> None:
    import torch.distributed.elastic.timer as ttimer

    ttimer.configure(ttimer.FileTimerClient(path))
    with ttimer.expires(after=after, scope="torch-client"):
        time.sleep(60)


def torch_file_server(path: str, seconds: float) -> None:
    """Torch's own FileTimerServer (2.2+ form); it signals its own process after a reap."""
    import torch.distributed.elastic.timer as ttimer

    server = ttimer.FileTimerServer(path, "interop", max_interval=0.5)
    server.start()
    time.sleep(seconds)
    server.stop()


def torch_stuck_local(q: Any, after: float) -> None:
    import torch.distributed.elastic.timer as ttimer

    ttimer.configure(ttimer.LocalTimerClient(q))
    with ttimer.expires(after=after, scope="torch-local"):
        time.sleep(60)
