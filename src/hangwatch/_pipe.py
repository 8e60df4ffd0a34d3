"""Reading a non-blocking pipe, shared by the transports' server sides."""

from __future__ import annotations

import os
from typing import Any, Deque, List

__all__ = ["read_available", "take"]

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
