"""Configure a worker's timer client from its environment: under ``hangwatch run`` or torchrun.

The agent tells its workers how to reach its timer server through environment
variables:

- ``HANGWATCH_TIMER_SOCKET``: the shared-memory server of hangwatch's agent (preferred: the
  cheapest check-in);
- ``HANGWATCH_TIMER_FILE``: the FIFO of hangwatch's agent (``hangwatch run``, ``LocalElasticAgent``);
- ``TORCHELASTIC_ENABLE_FILE_TIMER=1`` with ``TORCHELASTIC_TIMER_FILE``: torchrun's file timer
  (torchrun sets these when started with ``TORCHELASTIC_ENABLE_FILE_TIMER=1``);
- ``HANGWATCH_REAP_POLICY`` (optional): the workers' reap policy, e.g. ``TERM,10,KILL``.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from ._reaper import ReapPolicy
from .api import TimerClient, configure
from .file import FileTimerClient
from .shm import SharedMemoryTimerClient

__all__ = ["ENV_REAP_POLICY", "ENV_TIMER_FILE", "ENV_TIMER_SOCKET", "configure_from_env", "timer_file_from_env"]

ENV_TIMER_FILE = "HANGWATCH_TIMER_FILE"
ENV_TIMER_SOCKET = "HANGWATCH_TIMER_SOCKET"
ENV_REAP_POLICY = "HANGWATCH_REAP_POLICY"


def timer_file_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The timer server's FIFO named by the environment, or None."""
    env = os.environ if environ is None else environ
    path = env.get(ENV_TIMER_FILE)
    if path:
        return path
    if env.get("TORCHELASTIC_ENABLE_FILE_TIMER") == "1" and env.get("TORCHELASTIC_TIMER_FILE"):
        return env["TORCHELASTIC_TIMER_FILE"]
    return None


def configure_from_env(required: bool = True) -> Optional[TimerClient]:
    """Configure this worker's timer client from the environment its agent set; return it.

    Works under ``hangwatch run`` and ``LocalElasticAgent`` (a
    :class:`~hangwatch.SharedMemoryTimerClient` for ``HANGWATCH_TIMER_SOCKET`` if set,
    else a :class:`~hangwatch.FileTimerClient` for ``HANGWATCH_TIMER_FILE``) and under
    torchrun started with ``TORCHELASTIC_ENABLE_FILE_TIMER=1`` (``TORCHELASTIC_TIMER_FILE``).

    Args:
        required: raise when the environment names no timer server (else return None).

    Raises:
        RuntimeError: no timer server in the environment and ``required``.
        ValueError: ``HANGWATCH_REAP_POLICY`` is not a valid policy.
    """
    text = os.environ.get(ENV_REAP_POLICY)
    try:
        policy = ReapPolicy.parse(text, allow_empty=False) if text else None
    except ValueError as exc:
        raise ValueError(f"{ENV_REAP_POLICY}={text!r} is not a reap policy: {exc}") from None
    socket_path = os.environ.get(ENV_TIMER_SOCKET)
    if socket_path:
        shm = SharedMemoryTimerClient(socket_path, reap_policy=policy)
        configure(shm)
        return shm
    path = timer_file_from_env()
    if path is None:
        if required:
            raise RuntimeError(
                "no timer server in this environment: run the workers with `hangwatch run`, or under torchrun "
                "with TORCHELASTIC_ENABLE_FILE_TIMER=1 (or set HANGWATCH_TIMER_FILE to a FileTimerServer's path)"
            )
        return None
    client = FileTimerClient(path, reap_policy=policy)
    configure(client)
    return client
