"""What the agent runs: :class:`WorkerSpec`, with torch's field names and order."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple, Union

__all__ = ["WorkerSpec"]


@dataclasses.dataclass
class WorkerSpec:
    """What to run in each worker, how many, and how often to restart the group (torch's names and order).

    Args:
        role: the workers' role name (``ROLE_NAME``).
        local_world_size: how many workers (ranks 0..n-1).
        rdzv_handler: torch's rendezvous handler; hangwatch's agent runs one node and takes none.
        fn: deprecated alias of a function ``entrypoint`` (torch's).
        entrypoint: a function (run in a ``multiprocessing`` child; its return value is
            reported) or a command (run with ``args`` as its arguments).
        args: the arguments of ``entrypoint``.
        max_restarts: how many times the group is started again after a failure.
        monitor_interval: the longest wait of the supervisor loop between checks, in seconds
            (worker exits and signals wake it at once).
        master_port: ``MASTER_PORT`` for the workers (default: a free port).
        master_addr: ``MASTER_ADDR`` for the workers (default ``127.0.0.1``).
        local_addr: accepted for torch compatibility; unused on one node.

    Raises:
        ValueError: a field is out of range, or both or neither of ``fn``/``entrypoint`` is given.
    """

    role: str = "default"
    local_world_size: int = 1
    rdzv_handler: Any = None
    fn: Optional[Callable[..., Any]] = None
    entrypoint: Union[Callable[..., Any], str, None] = None
    args: Tuple[Any, ...] = ()
    max_restarts: int = 3
    monitor_interval: float = 0.1
    master_port: Optional[int] = None
    master_addr: Optional[str] = None
    local_addr: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.local_world_size, bool) or not isinstance(self.local_world_size, int):
            raise ValueError(f"local_world_size must be an int >= 1 (got {self.local_world_size!r})")
        if self.local_world_size < 1:
            raise ValueError(f"local_world_size must be an int >= 1 (got {self.local_world_size!r})")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0 (got {self.max_restarts!r})")
        interval = self.monitor_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval < 3600:
            raise ValueError(f"monitor_interval must be a number of seconds > 0 (got {interval!r})")
        if self.rdzv_handler is not None:
            raise ValueError(
                "hangwatch's LocalElasticAgent runs the workers of one node and takes no rdzv_handler; for "
                "multi-node jobs run 'hangwatch run --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...' "
                "on every node (torch's elastic engine, with hangwatch's timer servers)"
            )
        if self.fn is not None and self.entrypoint is not None:
            raise ValueError("give either entrypoint or fn (its deprecated alias), not both")
        if self.entrypoint is None:
            self.entrypoint = self.fn
        if self.entrypoint is None:
            raise ValueError("entrypoint must be a function or a command (got None)")
        if not callable(self.entrypoint) and not isinstance(self.entrypoint, str):
            raise ValueError(f"entrypoint must be a function or a command string (got {self.entrypoint!r})")
        self.args = tuple(self.args)
