"""A cgroup of the run's own: everything the workers start stays in it, whatever session or environment.

Process groups, a child subreaper and an environment token each miss something: a child
that leaves its process group and clears its environment, a fork that never execs. A
cgroup v2 holds every descendant of a process moved into it, by the kernel's own
bookkeeping; ``cgroup.kill`` (Linux 5.14+) kills them all at once. Where the unified
hierarchy is mounted and this process may create a cgroup under its own (root, or a
delegated subtree), the agent puts each worker into a new cgroup of the run, and the
keeper kills what is left in it if the agent dies. Elsewhere :meth:`RunCgroup.create`
returns None and the other means stand alone.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import List, Optional

__all__ = ["ENV_CGROUP", "RunCgroup", "join_from_env", "kill_cgroup", "remove_cgroup"]

ENV_CGROUP = "HANGWATCH_CGROUP"

logger = logging.getLogger("hangwatch.agent")


def _unified_mount() -> Optional[str]:
    """Where the cgroup v2 hierarchy is mounted (from /proc/self/mountinfo), or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None


def _own_cgroup() -> Optional[str]:
    """This process's cgroup v2 path (``0::/path`` in /proc/self/cgroup), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def join_from_env() -> None:
    """In a worker, before any of its own code runs: move this process into the run's cgroup, if it has one.

    The agent moves each worker in right after starting it, but a forked worker may start
    children before that; joining first closes the gap. Errors are ignored: the agent's
    move, the process groups and the token remain.
    """
    path = os.environ.get(ENV_CGROUP)
    if not path:
        return
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass


def cgroup_pids(path: str) -> List[int]:
    """The processes in cgroup ``path`` (an empty list if it is gone)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def kill_cgroup(path: str, timeout: float = 10.0) -> List[int]:
    """SIGKILL every process in cgroup ``path`` until none is left (bounded); return the pids seen there."""
    seen: List[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = cgroup_pids(path)
        if not pids:
            break
        seen.extend(p for p in pids if p not in seen)
        try:
            with open(os.path.join(path, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:  # no cgroup.kill before Linux 5.14: one by one (a fork between passes is caught next pass)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        time.sleep(0.02)
    return seen


def remove_cgroup(path: str, timeout: float = 5.0) -> bool:
    """Remove the (emptied) cgroup ``path``; True when it is gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:  # EBUSY: its last process is exiting
                return False
        time.sleep(0.02)


class RunCgroup:
    """A cgroup v2 of the run, under this process's own; see the module docstring.

    Args:
        path: the cgroup's directory.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._warned = False

    @classmethod
    def create(cls, name: str) -> Optional[RunCgroup]:
        """Create the cgroup ``name`` under this process's own; None where that cannot be done here."""
        mount, own = _unified_mount(), _own_cgroup()
        if mount is None or own is None:
            return None
        path = os.path.join(mount, own.lstrip("/"), name)
        try:
            os.mkdir(path, 0o755)
        except OSError as exc:
            logger.debug("no cgroup for the run (%s): process groups and the run token only", exc)
            return None
        group = cls(path)
        if not os.path.exists(os.path.join(path, "cgroup.procs")):
            group.remove()
            return None
        return group

    def add(self, pid: int) -> bool:
        """Move process ``pid`` into the cgroup (its later children are born there); False if it could not be."""
        try:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(pid))
            return True
        except OSError as exc:
            if exc.errno != errno.ESRCH and not self._warned:
                self._warned = True
                logger.warning("hangwatch: could not move pid %d into the run's cgroup %s: %s", pid, self.path, exc)
            return False

    def pids(self) -> List[int]:
        """The processes in the cgroup."""
        return cgroup_pids(self.path)

    def kill(self) -> List[int]:
        """Kill every process in the cgroup; return their pids."""
        return kill_cgroup(self.path)

    def remove(self) -> bool:
        """Remove the cgroup (it must be empty); True when it is gone."""
        return remove_cgroup(self.path)
