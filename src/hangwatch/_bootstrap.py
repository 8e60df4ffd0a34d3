"""How a worker process starts under hangwatch's agent: die with the agent, then run the user's code.

Run as ``python -m hangwatch._bootstrap --parent PID (--script PATH | --module NAME | --exec CMD) [ARGS...]``.

1. Ask the kernel to SIGKILL this process when the agent dies (``PR_SET_PDEATHSIG``,
   kept across ``exec``), and exit at once if the agent is already gone; let the agent's
   native stack sampler attach to it (``PR_SET_PTRACER``, under Yama).
2. For a Python script or module: configure the timer client from the environment
   (:func:`hangwatch.configure_from_env`), so ``expires`` works with no set-up, then run
   it as ``__main__``, as ``python script.py`` / ``python -m module`` would.
3. For any other command: ``exec`` it.

Under torch's elastic engine (``hangwatch run --nnodes ...``) the launcher sets
``HANGWATCH_TORCH_FILE_TIMER=1`` instead of ``TORCHELASTIC_ENABLE_FILE_TIMER=1`` in its own
environment (torch's agent would start its own, self-killing, timer server on seeing the
latter); the bootstrap turns it into ``TORCHELASTIC_ENABLE_FILE_TIMER=1`` in the worker, so
code written for torchrun's file timer finds it enabled, served by hangwatch's FIFO.
"""

from __future__ import annotations

import builtins
import ctypes
import os
import runpy
import signal
import sys
import types
from typing import List, Optional

from ._cgroup import join_from_env

__all__ = ["ENV_TORCH_FILE_TIMER", "die_with_parent", "let_parent_trace", "main"]

ENV_TORCH_FILE_TIMER = "HANGWATCH_TORCH_FILE_TIMER"

_PR_SET_PDEATHSIG = 1
_PR_SET_PTRACER = 0x59616D61  # Yama: which process (and its descendants) may ptrace this one


def die_with_parent(parent: Optional[int]) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux); exit now if ``parent`` is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the agent died before the death signal was armed


def let_parent_trace(parent: Optional[int]) -> None:
    """Let the agent and its children (the native stack sampler) ptrace this process under Yama (Linux).

    With ``kernel.yama.ptrace_scope`` 1 (the default of many distributions) only an
    ancestor may attach, and the sampler is the agent's child, not the worker's parent.
    Where Yama is absent the call fails harmlessly and changes nothing.
    """
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PTRACER, parent, 0, 0, 0)


def _run_script(target: str, rest: List[str]) -> None:
    """Run a script as ``python script.py`` would: ``sys.argv[0]`` as typed, ``__file__`` absolute, in ``__main__``."""
    path = os.path.abspath(target)
    sys.path[0] = os.path.dirname(path)
    if not os.path.isfile(path):  # a directory or a zip file with a __main__.py
        sys.argv = [target, *rest]
        runpy.run_path(target, run_name="__main__")
        return
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    sys.argv = [target, *rest]
    exec(code, main.__dict__)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    parent: Optional[int] = None
    if len(args) >= 2 and args[0] == "--parent":
        parent = int(args[1])
        args = args[2:]
    if len(args) < 2 or args[0] not in ("--script", "--module", "--exec"):
        sys.exit(
            "usage: python -m hangwatch._bootstrap [--parent PID] (--script PATH | --module NAME | --exec CMD) ..."
        )
    mode, target, rest = args[0], args[1], args[2:]
    die_with_parent(parent)
    let_parent_trace(parent)
    join_from_env()  # into the run's cgroup before anything else runs: all this process starts is born there
    if os.environ.pop(ENV_TORCH_FILE_TIMER, None) == "1":
        os.environ["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    if mode == "--exec":
        try:
            os.execvp(target, [target, *rest])
        except OSError as exc:
            sys.exit(f"hangwatch: cannot run {target!r}: {exc.strerror}")
    from .env import configure_from_env

    configure_from_env(required=False)
    if mode == "--script":
        _run_script(target, rest)
    else:
        sys.argv = [target, *rest]
        sys.path[0] = os.getcwd()
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
