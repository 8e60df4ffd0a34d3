"""Reading a non-blocking pipe, shared by the transports' server sides."""

from __future__ import annotations

import os
import select
from typing import Any, Callable, Deque, List

__all__ = ["read_available", "take", "wait_and_take"]

_CHUNK = 65536


def read_available(fd: int) -> bytes:
    """Everything the non-blocking pipe ``fd`` holds now, without waiting (b"" if nothing)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        if len(chunk) < _CHUNK:
            break
    return b"".join(chunks)


def take(ready: Deque[Any], size: int) -> List[Any]:
    """Pop up to ``size`` items from the left of ``ready``."""
    out: List[Any] = []
    while ready and len(out) < size:
        out.append(ready.popleft())
    return out


def wait_and_take(fd: int, ready: Deque[Any], refill: Callable[[], None], size: int, timeout: float) -> List[Any]:
    """Up to ``size`` items of ``ready``; when it is empty, ``refill()`` it, waiting up to ``timeout`` for ``fd``."""
    if not ready:
        refill()
        if not ready and timeout > 0:
            select.select([fd], [], [], timeout)
            refill()
    return take(ready, size)
