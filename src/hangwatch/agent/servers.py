"""A run's timer servers, and the variables that tell its workers where they are.

Shared by hangwatch's single-node agent and the multi-node launcher on torch's engine:
``"auto"`` runs a :class:`~hangwatch.FileTimerServer` (torch's clients, torchrun's
``TORCHELASTIC_TIMER_FILE``) and a :class:`~hangwatch.SharedMemoryTimerServer` (which
:func:`~hangwatch.configure_from_env` prefers); ``"fifo"`` or ``"shm"`` only that one;
``"off"`` none.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from .._pidserver import PidTimerServer
from ..env import ENV_TIMER_FILE, ENV_TIMER_SOCKET
from ..file import FileTimerServer
from ..shm import SharedMemoryTimerServer

__all__ = ["TIMER_MODES", "server_variables", "start_timer_servers"]

TIMER_MODES = ("auto", "fifo", "shm", "off")


def start_timer_servers(mode: str, folder: str, run_id: str, **options: Any) -> List[PidTimerServer]:
    """Start the servers of ``mode`` in ``folder`` (``timer.fifo``, ``timer.sock``), each with ``options``."""
    servers: List[PidTimerServer] = []
    try:
        if mode in ("auto", "fifo"):
            servers.append(FileTimerServer(os.path.join(folder, "timer.fifo"), run_id, **options))
        if mode in ("auto", "shm"):
            servers.append(SharedMemoryTimerServer(os.path.join(folder, "timer.sock"), **options))
        for server in servers:
            server.start()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def server_variables(servers: List[PidTimerServer]) -> Dict[str, Optional[str]]:
    """``HANGWATCH_TIMER_FILE``, ``TORCHELASTIC_TIMER_FILE`` and ``HANGWATCH_TIMER_SOCKET`` for ``servers``.

    A variable with no server of its kind is None: removed, so a worker never inherits an
    outer run's.
    """
    found: Dict[str, Optional[str]] = {ENV_TIMER_FILE: None, "TORCHELASTIC_TIMER_FILE": None, ENV_TIMER_SOCKET: None}
    for server in servers:
        if isinstance(server, FileTimerServer):
            found[ENV_TIMER_FILE] = found["TORCHELASTIC_TIMER_FILE"] = server.file_path
        elif isinstance(server, SharedMemoryTimerServer):
            found[ENV_TIMER_SOCKET] = server.socket_path
    return found
