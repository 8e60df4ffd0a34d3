"""Shared test helpers: importable worker functions for spawned processes, event capture, waiting."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, List, Optional, Tuple

import pytest

# Worker functions live in tests/_workers.py; spawned children import it from sys.path,
# which multiprocessing passes on to them.
sys.path.insert(0, str(Path(__file__).parent))

from hangwatch._reaper import ProcessPin
from hangwatch.events import Event

try:
    import torch.distributed.elastic.timer  # noqa: F401

    HAVE_TORCH = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TORCH = False

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed (pip install torch)")


class EventLog(logging.Handler):
    """Collects the Event records the servers log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: List[Event] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.args and isinstance(record.args, tuple) and isinstance(record.args[0], Event):
            self.events.append(record.args[0])

    def named(self, name: str) -> List[Event]:
        return [e for e in self.events if e.name == name]


@pytest.fixture
def events() -> Iterator[EventLog]:
    log = EventLog()
    logger = logging.getLogger("hangwatch.events")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(log)
    try:
        yield log
    finally:
        logger.removeHandler(log)
        logger.setLevel(old)


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last truth."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


@pytest.fixture
def fifo_path(tmp_path: Path) -> str:
    return str(tmp_path / "timer.fifo")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_worker(target: Callable[..., Any], *args: Any, timeout: float = 30, ctx: Optional[Any] = None) -> Any:
    """Run ``target(*args)`` in a child process (spawn by default) to its end; kill it and fail if it overstays."""
    p = (ctx or mp.get_context("spawn")).Process(target=target, args=args)
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"worker {target.__name__} was still running after {timeout} s")
    return p


class RecorderPin(ProcessPin):
    """A kill primitive that records instead of acting: never opens, never signals a process.

    Pass it as a server's ``pin=`` when a test feeds hostile pids outside a PID namespace.
    """

    pinned: ClassVar[List[int]] = []
    signals: ClassVar[List[Tuple[int, int]]] = []

    def __init__(self, pid: int) -> None:  # no super().__init__: nothing is opened
        self.pid = pid
        self._fd = -1
        self._start = None
        RecorderPin.pinned.append(pid)

    def alive(self) -> bool:
        return True

    def send_signal(self, signum: int) -> None:
        RecorderPin.signals.append((self.pid, signum))


@pytest.fixture(autouse=True)
def _fresh_recorder() -> Iterator[None]:
    # Test modules import this file as "conftest" (from sys.path): under --import-mode=importlib that is a
    # second copy beside pytest's own, with its own RecorderPin. Clear the recorders of both.
    for cls in {RecorderPin, getattr(sys.modules.get("conftest"), "RecorderPin", RecorderPin)}:
        cls.pinned.clear()
        cls.signals.clear()
    yield
