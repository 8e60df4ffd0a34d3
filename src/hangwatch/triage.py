"""Who hung, and who waited: name the likely culprit of a hang from every rank's stack.

In a distributed job a hang shows in every rank: the rank that hung, and the ranks
waiting for it in a collective. Whichever timer expires first says nothing about which is
which. Given each rank's stack (taken at the same moment), :func:`classify` groups the
ranks by where they are stuck and names the likely culprit:

1. A rank that already failed by itself (crashed, exited) while the others still ran;
   or a rank that finished while every other waits in a collective.
2. Else, when some ranks wait in a collective (frames of ``torch.distributed`` or DDP,
   c10d, gloo, NCCL, MPI, or a function named like one: ``all_reduce``, ``barrier``, ...)
   and others do not: the ranks that are not in it. The ones in it are waiting for them.
3. Else, the odd ones out: the ranks outside the largest group, when one group holds more
   ranks than every other.
4. Else no culprit: every rank in the same place (the cause is elsewhere: another node, a
   shared resource), or every rank in a different place.

The verdict says how sure it is (``high``, ``medium``, ``low``, ``none``) and why, in a
sentence. Pure: no processes, no torch; the frames come from :mod:`hangwatch._stacks`.
"""

from __future__ import annotations

import os
import re
import sysconfig
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ._stacks import Frame, ThreadStack, main_thread

__all__ = [
    "COLLECTIVE",
    "DATA",
    "Group",
    "Place",
    "Verdict",
    "classify",
    "is_library",
    "place_of",
    "ranks_text",
    "user_frame",
]

COLLECTIVE = "collective"
DATA = "data"

_LIBRARY_MARKERS = ("/site-packages/", "/dist-packages/")


def _default_roots() -> Tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get("stdlib"), paths.get("platstdlib"), os.path.dirname(os.path.abspath(__file__))}
    found = set()
    for root in roots:
        if root:
            found.add(root.rstrip("/") + "/")
            found.add(os.path.realpath(root).rstrip("/") + "/")
    return tuple(sorted(found))


_ROOTS = _default_roots()


def is_library(path: str, roots: Optional[Sequence[str]] = None) -> bool:
    """Whether a Python frame's file is library code: the standard library, site-packages, hangwatch, or frozen."""
    if not path or path.startswith("<"):
        return True
    if any(marker in path for marker in _LIBRARY_MARKERS):
        return True
    return any(path.startswith(root) for root in (_ROOTS if roots is None else roots))


def user_frame(frames: Iterable[Frame], roots: Optional[Sequence[str]] = None) -> Optional[Frame]:
    """The innermost Python frame of the user's own code (outside :func:`is_library` code), or None."""
    for frame in frames:
        if not frame.native and not is_library(frame.file, roots):
            return frame
    return None


# Functions that are collectives or barriers by name (a word of it), in any library or in the user's own code.
_COLLECTIVE_NAMES = re.compile(
    r"(?i)(^|_)(all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|broadcast|barrier|wait_for_peers|rendezvous)"
    r"(_|$)"
)
# Python code that blocks only on collectives: torch.distributed, and DDP's wrapper (its forward syncs).
_COLLECTIVE_FILES = ("/torch/distributed/", "/torch/nn/parallel/distributed.py")
# Native frames of a collective library (the main thread waiting on the collective).
_NATIVE_COLLECTIVE = re.compile(r"^(c10d::|gloo::|nccl|ncclx|P?MPI_|ucc_|torch::distributed::)|ProcessGroup")
# Native frames that show a collective being carried out (in the library's own threads), best first.
_NATIVE_WORK = (
    re.compile(r"(?i)(allreduce|allgather|broadcast|reduce_?scatter|alltoall|barrier)"),
    re.compile(r"(?i)(waitRecv|waitSend)"),
)


def _collective_frame(
    frames: Sequence[Frame], roots: Optional[Sequence[str]]
) -> Tuple[Optional[str], Optional[Frame], Optional[Frame]]:
    """(kind, Python frame, native frame) of what the thread waits in, or (None, None, None).

    Only the frames up to the innermost frame of the user's own code count (innermost
    first): what the user's code called, or the user's function itself, not its callers.
    """
    native: Optional[Frame] = None
    for frame in frames:
        if frame.native:
            if native is None and _NATIVE_COLLECTIVE.search(frame.func):
                native = frame
            continue
        if any(part in frame.file for part in _COLLECTIVE_FILES) or _COLLECTIVE_NAMES.search(frame.func):
            return COLLECTIVE, frame, native
        if "/torch/utils/data/" in frame.file:
            return (COLLECTIVE, None, native) if native is not None else (DATA, frame, None)
        if not is_library(frame.file, roots):
            break
    return (COLLECTIVE, None, native) if native is not None else (None, None, None)


@dataclass(frozen=True)
class Place:
    """Where one rank is stuck.

    Attributes:
        frame: the innermost Python frame of the main thread (a native one when it has none).
        user: the innermost frame of the user's own code.
        kind: ``"collective"`` (waiting in a collective or barrier), ``"data"`` (waiting
            for a DataLoader worker), or None.
        waits_in: the frame it waits in, for a ``kind``: a Python one where there is one.
        native_wait: the native frame of a collective library it waits in, if the stack has native frames.
        native: the main thread's native frames worth showing: its innermost, and the
            collective frame it waits in.
        busy: the other threads busy in a collective (``gloo::allreduce (libtorch_cpu.so)
            in thread pt_gloo_runloop``).
    """

    frame: Optional[Frame]
    user: Optional[Frame]
    kind: Optional[str] = None
    waits_in: Optional[Frame] = None
    native: Tuple[str, ...] = ()
    busy: Tuple[str, ...] = ()
    native_wait: Optional[Frame] = None

    @property
    def key(self) -> Tuple[object, ...]:
        """What two ranks share when they are stuck in the same place (Python frames: every source has them)."""
        frame, user = self.frame, self.user
        return (
            None if frame is None else (frame.file, frame.line, frame.func, frame.native),
            None if user is None else (user.file, user.line),
        )

    def label(self) -> str:
        """What it waits in (``all_reduce``, ``c10d::Work::wait``), or where it is (``train.py:44 in main``)."""
        if self.waits_in is not None:
            return self.waits_in.func
        where = self.user or self.frame
        return "no Python frame" if where is None else where.short()

    def describe(self) -> str:
        """E.g. ``waiting in all_reduce (distributed_c10d.py:3252), called from train.py:46 in main``."""
        if self.kind is not None and self.waits_in is not None:
            what = "waiting in" if self.kind == COLLECTIVE else "waiting for a DataLoader worker in"
            if self.waits_in.native:
                text = f"{what} {self.waits_in.short()}"
            else:
                where = self.waits_in.short().split(" in ")[0]
                native = "" if self.native_wait is None else f", in {self.native_wait.func}"
                text = f"{what} {self.waits_in.func} ({where}{native})"
            if self.frame is not None and self.frame != self.waits_in and self.frame != self.user:
                text += f", under {self.frame.func}()"
        elif self.user is not None:
            text = f"at {self.user.short()}"
            if self.frame is not None and self.frame != self.user:
                text += f" (in {self.frame.short()})"
            return text
        elif self.frame is not None:
            text = f"at {self.frame.short()}"
        else:
            return "no Python frame"
        if self.user is not None:
            text += f", called from {self.user.short()}"
        return text


def place_of(threads: Sequence[ThreadStack], roots: Optional[Sequence[str]] = None) -> Place:
    """Where a process is stuck, from its threads (the main thread decides; others add native evidence)."""
    main = main_thread(threads)
    frames = main.frames if main is not None else ()
    python = [f for f in frames if not f.native]
    frame = python[0] if python else (frames[0] if frames else None)
    kind, waits_python, waits_native = _collective_frame(frames, roots)
    user = user_frame(python, roots)
    if waits_python is not None and waits_python in python:  # called from: the user's frame outside the wait
        user = user_frame(python[python.index(waits_python) + 1 :], roots)
    notes: List[str] = []
    innermost = next((f for f in frames if f.native and not f.func.startswith("_")), None)
    if innermost is not None and frames[0].native:
        notes.append(innermost.short())
    if waits_native is not None and waits_native.short() not in notes:
        notes.append(waits_native.short())
    busy: List[str] = []
    for thread in threads:
        if thread is main:
            continue
        work = next(
            (
                f
                for pattern in _NATIVE_WORK
                for f in thread.frames
                if f.native and pattern.search(f.func) and _NATIVE_COLLECTIVE.search(f.func)
            ),
            None,
        )
        if work is not None:
            note = f"{work.short()} in thread {thread.name or thread.ident}"
            if note not in busy:
                busy.append(note)
    return Place(frame, user, kind, waits_python or waits_native, tuple(notes), tuple(busy), waits_native)


@dataclass(frozen=True)
class Group:
    """Ranks stuck in the same place."""

    ranks: Tuple[int, ...]
    place: Place


@dataclass(frozen=True)
class Verdict:
    """The classification of a hang.

    Attributes:
        culprits: the ranks that most likely caused it (empty when no rank stands out).
        confidence: ``"high"``, ``"medium"``, ``"low"`` or ``"none"`` (no culprit named).
        reason: why, in one sentence.
        groups: the ranks with a stack, grouped by place, the largest group first.
        places: each rank's place.
        unknown: the ranks without a stack.
        ended: the ranks that had ended by themselves, with how.
    """

    culprits: Tuple[int, ...]
    confidence: str
    reason: str
    groups: Tuple[Group, ...] = ()
    places: Dict[int, Place] = field(default_factory=dict)
    unknown: Tuple[int, ...] = ()
    ended: Dict[int, str] = field(default_factory=dict)


def ranks_text(ranks: Iterable[int]) -> str:
    """``rank 1``, ``ranks 0 and 2``, ``ranks 0, 2 and 3``."""
    items = sorted(ranks)
    if len(items) == 1:
        return f"rank {items[0]}"
    if not items:
        return "no rank"
    return "ranks " + ", ".join(str(r) for r in items[:-1]) + f" and {items[-1]}"


def _verb(ranks: Sequence[int], one: str, many: str) -> str:
    return one if len(ranks) == 1 else many


def classify(
    stacks: Mapping[int, Optional[Sequence[ThreadStack]]],
    *,
    ended: Optional[Mapping[int, str]] = None,
    finished: Iterable[int] = (),
    roots: Optional[Sequence[str]] = None,
) -> Verdict:
    """Name the likely culprit of a hang from the ranks' stacks.

    Args:
        stacks: each rank's threads (see :mod:`hangwatch._stacks`), None for a rank without a stack.
        ended: the ranks that had failed by themselves before the stacks were taken, with how
            (``"exited with status 1"``); they are the culprits.
        finished: the ranks that had finished (exit status 0) before the stacks were taken:
            the culprits when every other rank waits in a collective (they left it).
        roots: where library code lives (default: this interpreter's standard library and hangwatch).

    Returns:
        The :class:`Verdict`.
    """
    ended = dict(ended or {})
    done = sorted(set(finished) - set(ended))
    places = {rank: place_of(threads, roots) for rank, threads in stacks.items() if threads}
    unknown = tuple(
        sorted(rank for rank, threads in stacks.items() if not threads and rank not in ended and rank not in done)
    )
    by_key: Dict[Tuple[object, ...], List[int]] = {}
    for rank in sorted(places):
        by_key.setdefault(places[rank].key, []).append(rank)
    groups = tuple(
        sorted((Group(tuple(r), places[r[0]]) for r in by_key.values()), key=lambda g: (-len(g.ranks), g.ranks))
    )

    def verdict(culprits: Iterable[int], confidence: str, reason: str) -> Verdict:
        return Verdict(tuple(sorted(culprits)), confidence, reason, groups, places, unknown, ended)

    if ended:
        gone = sorted(ended)
        how = "; ".join(f"rank {r} {ended[r]}" for r in gone)
        return verdict(gone, "high", f"{how}, while the other ranks were still running")
    if not places:
        return verdict((), "none", "no rank's stack could be taken")
    if len(places) == 1 and not unknown:
        (rank,) = places
        only = "the only rank" if len(stacks) == 1 else "the only rank still running"
        return verdict((rank,), "high", f"rank {rank} is {only}; it is {places[rank].describe()}")
    waiting = sorted(r for r, p in places.items() if p.kind == COLLECTIVE)
    elsewhere = sorted(r for r in places if r not in waiting)
    if done and waiting and not elsewhere:
        return verdict(
            done,
            "medium",
            f"{ranks_text(done)} finished while {ranks_text(waiting)} "
            f"{_verb(waiting, 'is', 'are')} {places[waiting[0]].describe()}: "
            f"a collective the finished {_verb(done, 'rank', 'ranks')} never entered",
        )
    if waiting and elsewhere:
        confidence = "high" if len(elsewhere) < len(waiting) else "medium"
        return verdict(
            elsewhere,
            confidence,
            f"{ranks_text(waiting)} {_verb(waiting, 'waits', 'wait')} in {places[waiting[0]].label()} for the "
            f"others; {ranks_text(elsewhere)} {_verb(elsewhere, 'is', 'are')} not in it",
        )
    if len(groups) == 1:
        place = groups[0].place.describe()
        if unknown:
            return verdict(
                unknown,
                "low",
                f"every rank with a stack is {place}; {ranks_text(unknown)} gave no stack and may be the cause",
            )
        if groups[0].place.kind == COLLECTIVE:
            reason = (
                f"every rank is {place}: the rank they wait for is not among these "
                f"(another node, or a rank that already left)"
            )
        else:
            reason = f"every rank is {place}: a cause they share (a lock, a file system, a remote service)"
        return verdict((), "none", reason)
    largest = groups[0]
    if len(largest.ranks) >= 2 and len(largest.ranks) > len(groups[1].ranks):
        odd_ranks = [r for g in groups[1:] for r in g.ranks]
        confidence = "medium" if len(odd_ranks) < len(largest.ranks) else "low"
        kind = "wait in different collectives; " if all(p.kind == COLLECTIVE for p in places.values()) else ""
        at = groups[1].place.describe() if len(groups) == 2 else "in other places"
        return verdict(
            odd_ranks,
            confidence,
            f"{kind}{ranks_text(largest.ranks)} {_verb(largest.ranks, 'is', 'are')} {largest.place.describe()}; "
            f"{ranks_text(odd_ranks)} {_verb(odd_ranks, 'is', 'are')} the odd one{'' if len(odd_ranks) == 1 else 's'} "
            f"out, {at}",
        )
    return verdict((), "none", "the ranks are in different places and no group stands out; see each rank's stack")
