"""Evidence of a whole worker group: every rank's stack, taken once, before anyone is signalled.

A hang in a distributed job shows in every rank, and the first timer to expire is as
likely a bystander's as the culprit's. So at the first expiry in a group (or the first
failure the agent sees), :class:`GroupEvidence` takes the stacks of every process of the
group, in parallel, bounded in time, in a thread of its own (a read of a worker's file
never runs on a watchdog's thread):

1. The processes: each rank's worker and its live descendants (DataLoader workers,
   helpers), found in one pass over /proc and pinned by pidfd (a pid reused meanwhile is
   never signalled: its start time must match what the pass saw).
2. The Python stacks: a process whose open files include hangwatch's stack-dump file
   (a memfd named ``hangwatch-stack-SIG...``) and which catches that signal (``SigCgt``
   in /proc) is sent the signal and its faulthandler dump read, as the servers do for
   one worker. A process forked from a worker shares its parent's file: those are dumped
   one after the other, every other process at the same time. A process without such a
   file is never sent a signal.
3. Native stacks, optionally (:mod:`hangwatch._native`): pystack on every process, ranks
   first, until the native deadline; it also gives the Python stack of a process that
   has no dump handler.

Waiters (the timer servers holding a reap, the agent) wait on :attr:`GroupEvidence.done`
or until :meth:`GroupEvidence.deadline`; the collection never outlasts it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ._native import INSTALL_HINT, NativeSampler
from ._reaper import DumpReader, ProcessPin, ancestor_in, process_state, processes, signal_name, start_time
from ._stacks import ThreadStack, main_thread, parse_faulthandler, parse_pystack

__all__ = ["GroupEvidence", "GroupSnapshot", "ProcessEvidence", "dump_channel_of"]

logger = logging.getLogger("hangwatch")

_MEMFD = re.compile(r"^/memfd:hangwatch-stack-(SIG[A-Z0-9]+) \(deleted\)$")
_POLL = 0.001
# Beyond the collection's own bounds, how long a waiter allows for the thread to finish.
_SLACK = 0.5


def _caught(pid: int) -> int:
    """The mask of signals ``pid`` has a handler for (``SigCgt`` in /proc/PID/status), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def dump_channel_of(pid: int) -> Optional[Tuple[int, int, Tuple[int, int]]]:
    """``(signal, fd, file identity)`` of the hangwatch stack-dump file ``pid`` has open, or None.

    Only a file the process holds open under hangwatch's memfd name, for a signal the
    process catches, counts: a process that would die of the signal is never named.
    """
    base = f"/proc/{pid}/fd"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    caught = _caught(pid)
    for entry in entries:
        try:
            match = _MEMFD.match(os.readlink(f"{base}/{entry}"))
        except OSError:
            continue
        if match is None:
            continue
        try:
            signum = int(signal.Signals[match.group(1)])
        except KeyError:
            continue
        if not caught & (1 << (signum - 1)):
            continue
        try:
            st = os.stat(f"{base}/{entry}")
        except OSError:
            continue
        return signum, int(entry), (st.st_dev, st.st_ino)
    return None


@dataclass
class ProcessEvidence:
    """What was learned of one process of the group.

    Attributes:
        pid: the process.
        rank: the rank of the worker it is, or descends from.
        parent: for a worker's descendant, its parent's pid; None for a rank's own process.
        state: its scheduler state when the stacks were taken.
        python: its faulthandler dump (Python frames, every thread), if it gave one.
        native: pystack's output (native and Python frames, every thread), if taken.
        notes: why a part is missing.
    """

    pid: int
    rank: int
    parent: Optional[int] = None
    state: str = "unknown"
    python: Optional[str] = None
    native: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def threads(self) -> List[ThreadStack]:
        """Its threads: pystack's when it saw Python frames on the main thread (the most complete), else the dump's."""
        native = parse_pystack(self.native, self.pid) if self.native else []
        main = main_thread(native)
        if main is not None and main.python_frames:
            return native
        python = parse_faulthandler(self.python) if self.python else []
        if python:
            return python + [t for t in native if not t.main]
        return native

    def to_dict(self) -> Dict[str, Any]:
        """As JSON-compatible values."""
        return {
            "pid": self.pid,
            "rank": self.rank,
            "parent": self.parent,
            "state": self.state,
            "stack": self.python,
            "native": self.native,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessEvidence:
        """From :meth:`to_dict`'s values (another node's); ValueError when they are malformed."""
        pid, rank, parent = data.get("pid"), data.get("rank"), data.get("parent")
        if not isinstance(pid, int) or not isinstance(rank, int) or not (parent is None or isinstance(parent, int)):
            raise ValueError(f"a process needs int pid and rank (got {data!r:.200})")
        texts = [data.get(k) for k in ("state", "stack", "native")]
        if not all(t is None or isinstance(t, str) for t in texts):
            raise ValueError("a process's state, stack and native must be strings")
        notes = data.get("notes") or []
        return cls(pid, rank, parent, texts[0] or "unknown", texts[1], texts[2], [str(n) for n in notes])


@dataclass
class GroupSnapshot:
    """Every process of a worker group at one moment.

    Attributes:
        members: each rank's worker pid.
        processes: what was learned of each process (the workers and their descendants), by pid.
        trigger: what started the collection (``rank``, ``pid``, ``scope``, ``reason``).
        taken_at: when (``time.time()``).
        seconds: how long the collection took.
        native_note: why there are no native frames, if there are none (not installed, not permitted).
    """

    members: Dict[int, int]
    processes: Dict[int, ProcessEvidence]
    trigger: Dict[str, Any]
    taken_at: float
    seconds: float
    native_note: Optional[str] = None

    def descendants(self, rank: int) -> List[ProcessEvidence]:
        """The descendants of rank ``rank``'s worker, by pid."""
        return sorted(
            (p for p in self.processes.values() if p.rank == rank and p.parent is not None), key=lambda p: p.pid
        )

    def to_dict(self) -> Dict[str, Any]:
        """As JSON-compatible values."""
        return {
            "trigger": dict(self.trigger),
            "taken_at": self.taken_at,
            "seconds": round(self.seconds, 6),
            "native_note": self.native_note,
            "members": {str(rank): pid for rank, pid in sorted(self.members.items())},
            "processes": [p.to_dict() for p in sorted(self.processes.values(), key=lambda p: (p.rank, p.pid))],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GroupSnapshot:
        """From :meth:`to_dict`'s values (another node's); ValueError when they are malformed."""
        try:
            members = {int(rank): int(pid) for rank, pid in dict(data["members"]).items()}
            processes = [ProcessEvidence.from_dict(p) for p in data["processes"]]
            trigger = dict(data.get("trigger") or {})
            taken_at, seconds = float(data["taken_at"]), float(data["seconds"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a group snapshot: {exc}") from None
        note = data.get("native_note")
        return cls(members, {p.pid: p for p in processes}, trigger, taken_at, seconds, note if note else None)


class _Target:
    __slots__ = ("channel", "pid", "pin", "reader")

    def __init__(self, pid: int, pin: ProcessPin, channel: Tuple[int, int, Tuple[int, int]]) -> None:
        self.pid = pid
        self.pin = pin
        self.channel = channel
        self.reader: Optional[DumpReader] = None


class GroupEvidence:
    """Takes the stacks of a worker group once, at the first expiry or failure, before anyone is signalled.

    Args:
        members: each rank's worker pid (``{rank: pid}``).
        dump_timeout: the longest wait for the faulthandler dumps, in seconds.
        native: the native sampler, or None for Python frames only.
        native_timeout: the longest the native sampler may run, after the dumps, in seconds.
        native_note: why there is no native sampler, for the report (e.g. how to install it).
        descendants: take the stacks of the members' descendants too (a server reaping one
            worker outside any group asks for the worker's alone).
        pin: how a process is pinned and signalled (tests pass a recorder).
        then: called with the snapshot before the collection counts as done (so before any
            reap that waits for it): a multi-node launcher shares it with the other nodes and
            waits, at most ``then_timeout`` seconds, for theirs.
        then_timeout: the longest ``then`` may take, in seconds (added to :meth:`deadline`).
    """

    def __init__(
        self,
        members: Mapping[int, int],
        *,
        dump_timeout: float = 1.0,
        native: Optional[NativeSampler] = None,
        native_timeout: float = 3.0,
        native_note: Optional[str] = INSTALL_HINT,
        descendants: bool = True,
        pin: Callable[[int], ProcessPin] = ProcessPin,
        then: Optional[Callable[[GroupSnapshot], None]] = None,
        then_timeout: float = 0.0,
    ) -> None:
        self.members = dict(members)
        self._then = then
        self._then_timeout = then_timeout if then is not None else 0.0
        self._descendants = descendants
        self._ranks = {pid: rank for rank, pid in self.members.items()}
        self._dump_timeout = dump_timeout
        self._native = native
        self._native_timeout = native_timeout
        self._native_note = None if native is not None else native_note
        self._new_pin = pin
        self._lock = threading.Lock()
        self._started_at: Optional[float] = None
        self._done = threading.Event()
        self._callbacks: List[Callable[[], None]] = []
        self.snapshot: Optional[GroupSnapshot] = None
        self.trigger: Dict[str, Any] = {}  # what started the collection, once started

    # ----------------------------------------------------------------- membership

    def rank_of(self, pid: int) -> Optional[int]:
        """The rank whose worker ``pid`` is or descends from (following /proc's parent links), or None."""
        rank = self._ranks.get(pid)
        if rank is None:
            ancestor = ancestor_in(pid, self._ranks)
            rank = None if ancestor is None else self._ranks[ancestor]
        return rank

    # ----------------------------------------------------------------- collection

    @property
    def started(self) -> bool:
        """Whether the collection was started."""
        return self._started_at is not None

    @property
    def done(self) -> bool:
        """Whether the collection finished (:attr:`snapshot` is then set)."""
        return self._done.is_set()

    def deadline(self) -> Optional[float]:
        """When (``time.monotonic()``) the collection is over at the latest; None before it started."""
        if self._started_at is None:
            return None
        native = self._native_timeout if self._native is not None else 0.0
        return self._started_at + self._dump_timeout + native + self._then_timeout + _SLACK

    def collect(self, **trigger: Any) -> bool:
        """Start the collection (once); ``trigger`` says why (``rank``, ``pid``, ``scope``, ``reason``).

        Returns:
            True if this call started it, False if it had started already.
        """
        with self._lock:
            if self._started_at is not None:
                return False
            self._started_at = time.monotonic()
            self.trigger = dict(trigger)
        thread = threading.Thread(target=self._run, args=(dict(trigger),), name="hangwatch-group-evidence", daemon=True)
        thread.start()
        return True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the collection is done (at most until its deadline, or ``timeout``); True if done."""
        deadline = self.deadline()
        if deadline is None:
            return False
        left = deadline - time.monotonic()
        return self._done.wait(max(0.0, left if timeout is None else min(timeout, left)))

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the collection is done (at once if it is): e.g. to wake a watchdog."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def _run(self, trigger: Dict[str, Any]) -> None:
        started = time.monotonic()
        wall = time.time()
        found: Dict[int, ProcessEvidence] = {}
        try:
            pins = self._enumerate(found)
            try:
                self._dump_python(found, pins, started + self._dump_timeout)
            finally:
                for pin in pins.values():
                    pin.close()
            for evidence in found.values():
                evidence.state = process_state(evidence.pid)
            if self._native is not None:
                order = sorted(found, key=lambda pid: (found[pid].parent is not None, found[pid].rank, pid))
                limit = time.monotonic() + self._native_timeout
                for pid, (text, note) in self._native.sample(order, limit).items():
                    found[pid].native = text
                    if note:
                        found[pid].notes.append(note)
        except Exception as exc:  # the report must still come: say what failed
            logger.exception("hangwatch: taking the worker group's stacks failed")
            trigger = {**trigger, "error": f"{type(exc).__name__}: {exc}"}
        snapshot = GroupSnapshot(
            dict(self.members), found, trigger, wall, time.monotonic() - started, self._native_note
        )
        if self._then is not None:
            try:
                self._then(snapshot)
            except Exception:
                logger.exception("hangwatch: sharing the worker group's stacks failed")
        with self._lock:
            self.snapshot = snapshot
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("hangwatch: a callback of the group's stacks raised")

    def _enumerate(self, found: Dict[int, ProcessEvidence]) -> Dict[int, ProcessPin]:
        """The live workers and their descendants (one pass over /proc), each pinned."""
        children: Dict[int, List[Tuple[int, int]]] = {}
        starts: Dict[int, int] = {}
        if self._descendants:
            for pid, fields in processes():
                if fields[0] in (b"Z", b"X"):
                    continue
                children.setdefault(int(fields[1]), []).append((pid, int(fields[19])))
                starts[pid] = int(fields[19])
        else:
            for pid in self.members.values():
                started = start_time(pid)
                if started is not None:
                    starts[pid] = started
        pins: Dict[int, ProcessPin] = {}
        queue: List[Tuple[int, int, Optional[int]]] = [
            (pid, rank, None) for rank, pid in sorted(self.members.items()) if pid in starts
        ]
        while queue:
            pid, rank, parent = queue.pop(0)
            if pid in found:
                continue
            evidence = ProcessEvidence(pid, rank, parent)
            found[pid] = evidence
            try:
                pin = self._new_pin(pid)
            except (OSError, OverflowError, ValueError) as exc:
                evidence.notes.append(f"could not be pinned ({exc})")
                continue
            if start_time(pid) != starts.get(pid):  # the pid now names a later process: leave it alone
                pin.close()
                del found[pid]
                continue
            pins[pid] = pin
            queue.extend((child, rank, pid) for child, _ in children.get(pid, ()))
        return pins

    def _dump_python(self, found: Dict[int, ProcessEvidence], pins: Dict[int, ProcessPin], deadline: float) -> None:
        """Ask every process with a dump channel for its stack: one file at a time, every file at once."""
        chains: Dict[Tuple[int, int], List[_Target]] = {}
        for pid, pin in pins.items():
            channel = dump_channel_of(pid)
            if channel is None:
                found[pid].notes.append("no Python stack dump: hangwatch's dump handler is not registered in it")
                continue
            chains.setdefault(channel[2], []).append(_Target(pid, pin, channel))
        active: List[Tuple[_Target, List[_Target]]] = []
        for chain in chains.values():
            self._start_next(chain, found, active)
        try:
            while active and time.monotonic() < deadline:
                time.sleep(_POLL)
                for target, chain in list(active):
                    assert target.reader is not None
                    if target.reader.settled():
                        found[target.pid].python = target.reader.read()
                        active.remove((target, chain))
                        target.reader.close()
                        self._start_next(chain, found, active)
        finally:
            for target, chain in active:
                assert target.reader is not None
                text = target.reader.read()
                target.reader.close()
                if text:
                    found[target.pid].python = text
                else:
                    found[target.pid].notes.append(
                        f"no stack within {self._dump_timeout:g} s (worker state: {process_state(target.pid)})"
                    )
                for rest in chain:
                    found[rest.pid].notes.append("no time was left to ask it for its Python stack")

    @staticmethod
    def _start_next(
        chain: List[_Target], found: Dict[int, ProcessEvidence], active: List[Tuple[_Target, List[_Target]]]
    ) -> None:
        while chain:
            target = chain.pop(0)
            signum, fd, _ = target.channel
            try:
                reader = DumpReader(target.pid, fd)
            except (OSError, ValueError) as exc:
                found[target.pid].notes.append(f"no Python stack: cannot open its dump file ({exc})")
                continue
            try:
                target.pin.send_signal(signum)
            except OSError as exc:
                reader.close()
                found[target.pid].notes.append(f"no Python stack: sending {signal_name(signum)} failed ({exc})")
                continue
            target.reader = reader
            active.append((target, chain))
            return
