"""Native frames, optionally: run ``pystack`` on a process, bounded in time.

A worker stuck in C or C++ (gloo, NCCL, CUDA, a C extension) shows only Python frames in
a :mod:`faulthandler` dump. ``pystack remote --native-all`` (``pip install
'hangwatch[native]'``) reads the process's memory through ptrace and shows every thread
with its C/C++ frames interleaved with the Python ones, including the threads the
interpreter does not know (gloo's ring all-reduce, NCCL's watchdog).

Why pystack and not py-spy (both on the package index, both tried here on a rank of a
gloo job waiting in ``all_reduce``): pystack shows the library's own threads
(``--native-all``), so the report can name ``gloo::allreduce`` itself, where py-spy shows
only the threads the interpreter knows (``c10d::Work::wait`` on the main thread); and
pystack took 0.35-0.5 s on a torch process where py-spy took 0.7-0.8 s. py-spy's JSON
output would have spared a parser; pystack's text is parsed by :mod:`hangwatch._stacks`.

The sampler runs as a separate process (``python -m pystack``), with its output in a
temporary file (a full pipe can never block it), and is killed when it overruns its
deadline: a sampler that hangs never holds up a reap for longer than that.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Dict, List, Optional, Tuple

__all__ = ["INSTALL_HINT", "NativeSampler", "native_available"]

INSTALL_HINT = "for C/C++ frames (gloo, NCCL, C extensions): pip install 'hangwatch[native]' (pystack)"


def sampler_for(mode: str) -> Tuple[Optional[NativeSampler], Optional[str]]:
    """For ``native_stacks`` ``"auto"`` or ``"off"``: the sampler to use (None: none), and why there is none."""
    if mode != "auto":
        return None, None
    if native_available():
        return NativeSampler(), None
    return None, INSTALL_HINT


def native_available() -> bool:
    """Whether the native sampler (pystack) is installed, on a system where it runs (Linux)."""
    return sys.platform.startswith("linux") and importlib.util.find_spec("pystack") is not None


class _Run:
    __slots__ = ("out", "pid", "popen")

    def __init__(self, pid: int, popen: subprocess.Popen[bytes], out: IO[bytes]) -> None:
        self.pid = pid
        self.popen = popen
        self.out = out


class NativeSampler:
    """Samples the native and Python stacks of processes with pystack, a few at a time, within a deadline.

    Args:
        concurrency: how many samplers run at once (default: the number of CPUs, at least 2).
        command: the sampler's command line before the pid (tests pass another program).
    """

    def __init__(self, concurrency: Optional[int] = None, command: Optional[List[str]] = None) -> None:
        self._concurrency = max(2, concurrency or os.cpu_count() or 2)
        self._command = command or [sys.executable, "-m", "pystack", "remote", "--native-all", "--no-color"]

    def sample(self, pids: List[int], deadline: float) -> Dict[int, Tuple[Optional[str], Optional[str]]]:
        """Sample ``pids`` (in this order of priority) until ``deadline`` (``time.monotonic()``).

        Returns:
            ``{pid: (stack text or None, note or None)}``: a note says why there is no stack
            (the sampler failed, or did not finish in time) for every pid asked for.
        """
        results: Dict[int, Tuple[Optional[str], Optional[str]]] = {}
        waiting = list(pids)
        running: List[_Run] = []
        try:
            while waiting or running:
                while waiting and len(running) < self._concurrency and time.monotonic() < deadline:
                    pid = waiting.pop(0)
                    try:
                        running.append(self._start(pid))
                    except OSError as exc:
                        results[pid] = (None, f"the native sampler could not start ({exc})")
                for run in [r for r in running if r.popen.poll() is not None]:
                    running.remove(run)
                    results[run.pid] = self._finish(run)
                if time.monotonic() >= deadline:
                    break
                if running:
                    time.sleep(0.01)
        finally:
            for run in running:
                _kill(run.popen)
                run.out.close()
                results[run.pid] = (None, "the native sampler did not finish in time")
            for pid in waiting:
                results.setdefault(pid, (None, "no time was left for the native sampler"))
        return results

    def _start(self, pid: int) -> _Run:
        out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _finish, or below on failure
        try:
            popen = subprocess.Popen(
                [*self._command, str(pid)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: killed whole if it overruns
            )
        except BaseException:
            out.close()
            raise
        return _Run(pid, popen, out)

    @staticmethod
    def _finish(run: _Run) -> Tuple[Optional[str], Optional[str]]:
        with run.out:
            run.out.seek(0)
            text = run.out.read(1 << 21).decode("utf-8", "replace")
        if run.popen.returncode == 0 and "Traceback for thread" in text:
            return text, None
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")
        if "ptrace" in text.lower() or "not permitted" in text.lower():
            last += " (the sampler needs ptrace: run as root, or set kernel.yama.ptrace_scope to 0)"
        return None, f"the native sampler failed: {last[:300]}"


def _kill(popen: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(5)
    except subprocess.TimeoutExpired:
        pass
