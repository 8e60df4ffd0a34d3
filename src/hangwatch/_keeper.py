"""The keeper: a small process that outlives the agent, to take down what the agent's workers left behind.

``PR_SET_PDEATHSIG`` kills each worker when the agent dies, however it dies, but not
the worker's own children: a SIGKILLed agent cannot stop them, and they would run on
as orphans. The agent starts a keeper in a session of its own (so a signal to the
agent's process group or terminal leaves it alone) and holds the write end of a
pipe to it. The keeper does nothing until that pipe reaches end-of-file, which
happens when the agent exits by any path, SIGKILL included. It then SIGKILLs, until
none is left:

- every process carrying the run's token in its environment
  (``HANGWATCH_RUN_TOKEN``, given to every worker; inherited by whatever a worker
  starts, even processes that left its session or daemonized), and
- every member of a worker's process group the agent told it about and has not
  since stopped (a number that now belongs to an unrelated process, as seen from the
  leader's start time, is skipped: the old group is gone, or its number could not have
  been reused; start times count clock ticks, and a number reused within the tick its
  first holder started in would take wrapping the whole pid space in that tick).

The agent stops each group itself on every path it survives; the keeper's sweep
then finds nothing. Then it kills what is left in the run's cgroup, where the agent
could make one (see :mod:`hangwatch._cgroup`: it holds what the token and the groups
miss, such as a child with a clean environment in a session of its own), and last it
removes the agent's folder (its timer FIFO and socket) if the agent could not. A
fork of the agent (a worker started with the fork method) closes its copy of the pipe,
or the keeper would wait for it. Run as ``python -m hangwatch._keeper TOKEN`` with the
pipe on stdin; lines ``+ PGID START`` and ``- PGID`` add and remove groups,
``c HEXPATH`` names the cgroup, ``d HEXPATH DEV INO`` the folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import weakref
from typing import IO, Dict, List, Optional, Set, Tuple

from ._cgroup import kill_cgroup, remove_cgroup
from ._reaper import processes, start_time

__all__ = ["TOKEN_VARIABLE", "Keeper", "main", "sweep"]

TOKEN_VARIABLE = "HANGWATCH_RUN_TOKEN"
_PASSES = 20  # sweeps until none is left: a process may fork while the previous pass kills it
_PAUSE = 0.05


def _marked(pid: int, needle: bytes) -> bool:
    """Whether ``pid``'s environment holds ``needle`` (``\\0NAME=VALUE\\0``), the first variable included."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in b"\0" + f.read()
    except OSError:  # gone, or another user's
        return False


def sweep(token: str, groups: Dict[int, Optional[int]]) -> List[int]:
    """SIGKILL, pass after pass, every process marked with ``token`` or in one of ``groups``; return their pids."""
    me = os.getpid()
    needle = f"\0{TOKEN_VARIABLE}={token}\0".encode()
    live: Set[int] = set()
    for pgid, started in groups.items():
        now = start_time(pgid)
        if now is None or started is None or now == started:
            live.add(pgid)
    killed: List[int] = []
    for _ in range(_PASSES):
        found = []
        for pid, fields in processes():
            if pid in (me, 1) or fields[0] in (b"Z", b"X"):
                continue
            if int(fields[2]) in live or _marked(pid, needle):
                found.append(pid)
        if not found:
            break
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(_PAUSE)
    return killed


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: read group lines from stdin until end-of-file, then sweep."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0]:
        sys.exit("usage: python -m hangwatch._keeper TOKEN   (the agent's pipe on stdin)")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    groups: Dict[int, Optional[int]] = {}
    folders: Dict[str, Tuple[int, int]] = {}
    cgroups: List[str] = []
    for line in sys.stdin.buffer:
        parts = line.split()
        try:
            if len(parts) == 3 and parts[0] == b"+":
                groups[int(parts[1])] = int(parts[2]) if parts[2] != b"-" else None
            elif len(parts) == 2 and parts[0] == b"-":
                groups.pop(int(parts[1]), None)
            elif len(parts) == 4 and parts[0] == b"d":
                folders[os.fsdecode(bytes.fromhex(parts[1].decode()))] = (int(parts[2]), int(parts[3]))
            elif len(parts) == 2 and parts[0] == b"c":
                cgroups.append(os.fsdecode(bytes.fromhex(parts[1].decode())))
        except ValueError:
            continue
    killed = sweep(args[0], groups)
    for path in cgroups:  # everything the workers started, whatever its session or environment
        killed += [pid for pid in kill_cgroup(path) if pid not in killed]
        remove_cgroup(path)
    if killed:
        print(
            f"hangwatch: the agent is gone; killed {len(killed)} leftover worker process(es): {sorted(killed)}",
            file=sys.stderr,
        )
    for folder, identity in folders.items():
        remove_folder(folder, identity)


def remove_folder(folder: str, identity: Tuple[int, int]) -> None:
    """Remove the agent's own folder (its timer FIFO and socket), if it is still that folder and this user's."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != identity or st.st_uid != os.geteuid():
        return
    shutil.rmtree(folder, ignore_errors=True)  # fd-based on Linux: never follows a symlink placed inside


class Keeper:
    """The agent's side: starts the keeper process and tells it about worker groups."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._process = subprocess.Popen(
            [sys.executable, "-m", "hangwatch._keeper", token],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # out of reach of signals to the agent's group or terminal
            close_fds=True,
        )
        assert self._process.stdin is not None
        self._pipe: Optional[IO[bytes]] = self._process.stdin
        _KEEPERS.add(self)

    def _after_fork_in_child(self) -> None:
        """A fork of the agent (a fork-started worker) must not hold the pipe: the keeper waits for its end."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            try:
                raw = pipe.detach()  # type: ignore[attr-defined]
                raw.close()
            except (OSError, ValueError):
                pass

    @property
    def pid(self) -> int:
        """The keeper's pid."""
        return self._process.pid

    def _send(self, line: str) -> None:
        pipe = self._pipe
        if pipe is None:
            return
        try:
            pipe.write(line.encode())
            pipe.flush()
        except (BrokenPipeError, ValueError):
            pass  # the keeper died: the agent still stops its groups itself

    def watch(self, pgid: int) -> None:
        """A worker started, leading process group ``pgid``."""
        started = start_time(pgid)
        self._send(f"+ {pgid} {'-' if started is None else started}\n")

    def hold(self, cgroup: str) -> None:
        """The run's cgroup: what is left in it is killed, and it is removed, when the agent is gone."""
        self._send(f"c {os.fsencode(cgroup).hex()}\n")

    def own(self, folder: str) -> None:
        """The agent's folder (for its timer FIFO and socket): removed if the agent dies without removing it."""
        st = os.lstat(folder)
        self._send(f"d {os.fsencode(folder).hex()} {st.st_dev} {st.st_ino}\n")

    def forget(self, pgids: List[int]) -> None:
        """These groups were stopped: their numbers may go to other processes from now on."""
        self._send("".join(f"- {pgid}\n" for pgid in pgids))

    def close(self, timeout: float = 10.0) -> None:
        """End the keeper (it sweeps once, finding nothing when the agent stopped everything) and wait for it."""
        pipe, self._pipe = self._pipe, None
        try:
            if pipe is not None:
                pipe.close()
        except BrokenPipeError:
            pass
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


_KEEPERS: weakref.WeakSet[Keeper] = weakref.WeakSet()


def _close_keeper_pipes_in_child() -> None:
    for keeper in list(_KEEPERS):
        keeper._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_keeper_pipes_in_child)


if __name__ == "__main__":
    main()
