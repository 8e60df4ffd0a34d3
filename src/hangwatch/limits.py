"""What one client may cost a timer server: the caps, their defaults, and what happens at each.

A server serves many workers, and a broken or hostile one must not be able to take the
server from the others: not its memory, not its descriptors, not its watchdog's time,
not its event file. Beyond each cap the server refuses what was asked, reports it (a
``limit reached`` or ``bad request`` event, themselves rate-limited), and goes on serving
everyone else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """The caps of a built-in timer server (pass ``limits=Limits(...)`` to change one).

    Attributes:
        timers_per_worker: timers one worker may hold at once (FIFO and queue pairs; the
            shared-memory pair's cap is its ``max_slots``). A new scope beyond it is refused.
        connections_per_process: connections one process may hold on the shared-memory
            socket (a process registers once; a forked child registers as itself).
        waiting_connections: connections that have not yet said hello (shared memory).
        hello_timeout: seconds a connection may stay without saying hello before it is closed.
        workers: processes registered at once on the shared-memory socket.
        refusal_events_per_second: ``bad request`` and ``limit reached`` events written per
            second, after a burst of five seconds' worth (at least 100); the ones left out are
            counted on the next one written (``suppressed``). None: every one is written.

    Raises:
        ValueError: a cap is not a positive number.
    """

    timers_per_worker: int = 16384
    connections_per_process: int = 8
    waiting_connections: int = 64
    hello_timeout: float = 5.0
    workers: int = 4096
    refusal_events_per_second: Optional[float] = 20.0

    def __post_init__(self) -> None:
        for name in ("timers_per_worker", "connections_per_process", "waiting_connections", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 (got {value!r})")
        for name in ("hello_timeout", "refusal_events_per_second"):
            value = getattr(self, name)
            if value is None and name == "refusal_events_per_second":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0 (got {value!r})")
