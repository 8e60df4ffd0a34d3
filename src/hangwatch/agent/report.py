"""The hang report: every rank's stack at the first expiry, grouped, with the likely culprit.

Built by the agent when an attempt fails, from the group's stacks
(:class:`~hangwatch._evidence.GroupSnapshot`), the classification
(:func:`hangwatch.triage.classify`) and what became of each rank. The launcher prints
:meth:`HangReport.render`; the ``hang report`` event carries :meth:`HangReport.to_dict`.
"""

from __future__ import annotations

import dataclasses
import linecache
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .._evidence import GroupSnapshot, ProcessEvidence
from .._stacks import Frame, ThreadStack, main_thread
from ..triage import DATA, Place, Verdict, classify, place_of, ranks_text
from .results import learned_text

__all__ = ["LAUNCH_FRAMES", "HangReport", "ProcessReport", "RemoteNode", "build_report"]

# Frames of how a worker was started, not of what it ran.
LAUNCH_FRAMES = ("<frozen runpy>", "/runpy.py", "/hangwatch/_bootstrap.py")
_MAX_SHOWN = 3  # culprits (or groups) whose stacks are printed in full


@dataclasses.dataclass
class ProcessReport:
    """One process of the group in the report: a rank's worker, or a worker's descendant.

    Attributes:
        pid: the process.
        rank: the rank of the worker it is, or descends from.
        parent: for a descendant, its parent's pid; None for a rank's worker.
        fate: what became of it (``reaped: timer 'step' expired; killed by SIGKILL``).
        place: where it was stuck when the stacks were taken (None without a stack).
        threads: its threads then (see :mod:`hangwatch._stacks`).
        stack: its faulthandler dump, if it gave one.
        native: its native sampler output, if taken.
        notes: why a part of its evidence is missing.
    """

    pid: int
    rank: int
    parent: Optional[int]
    fate: str
    place: Optional[Place]
    threads: List[ThreadStack]
    stack: Optional[str]
    native: Optional[str]
    notes: List[str]
    node: Optional[int] = None

    def who(self) -> str:
        """``rank 3 (pid 811)``, or ``rank 3 (node 1, pid 811)`` in a report that spans nodes."""
        return f"rank {self.rank} ({'' if self.node is None else f'node {self.node}, '}pid {self.pid})"

    def to_dict(self) -> Dict[str, Any]:
        """As JSON-compatible values."""
        return {
            "pid": self.pid,
            "rank": self.rank,
            "parent": self.parent,
            "fate": self.fate,
            "place": None if self.place is None else self.place.describe(),
            "stack": self.stack,
            "native": self.native,
            "notes": list(self.notes),
            "node": self.node,
        }


@dataclasses.dataclass
class RemoteNode:
    """Another node's ranks, for a report that spans the job's nodes.

    Attributes:
        node: the node's rank (``GROUP_RANK``).
        snapshot: its ranks' stacks, as that node took them.
        fates: what became of its processes, by pid (that node's pids), when it said.
    """

    node: int
    snapshot: GroupSnapshot
    fates: Mapping[int, str]


@dataclasses.dataclass
class HangReport:
    """Every rank of a failed attempt: where each was stuck, who most likely caused it, what became of each.

    Attributes:
        attempt: the attempt's number (0 for the first).
        trigger: what started it (``timer 'step' of rank 2 (pid 811) expired``).
        verdict: the classification: culprits, confidence, reason, groups.
        ranks: each rank's worker.
        children: each rank's descendants that were alive then.
        taken_at: when the stacks were taken (``time.time()``).
        seconds: how long taking them took.
        native_note: why there are no native frames, when there are none.
        nodes: for a report that spans nodes, a line on each other node's ranks (whose
            stacks that node took, and when); empty for one node.
        node: this node's rank in a multi-node job (None on hangwatch's single-node agent).
    """

    attempt: int
    trigger: str
    verdict: Verdict
    ranks: Dict[int, ProcessReport]
    children: Dict[int, List[ProcessReport]]
    taken_at: float
    seconds: float
    native_note: Optional[str] = None
    nodes: List[str] = dataclasses.field(default_factory=list)
    node: Optional[int] = None

    @property
    def culprits(self) -> List[int]:
        """The ranks that most likely caused the hang (empty when none stands out)."""
        return list(self.verdict.culprits)

    def render(self) -> List[str]:
        """The report as lines for a person: headlines, and stack lines indented by four spaces."""
        verdict = self.verdict
        local = {r: p for r, p in self.ranks.items() if p.node == self.node}
        running = [r for r, p in local.items() if p.threads or "it had exited" not in p.notes]
        every = "both" if len(running) == 2 else f"all {len(running)}"
        which = f"{every} ranks" if len(running) == len(local) else f"the {len(running)} running ranks"
        which = "the only running rank" if len(running) == 1 and len(local) > 1 else which
        which = "its only rank" if len(running) == len(local) == 1 else which
        if self.nodes:
            which = f"{which} of this node ({ranks_text(sorted(local))})"
        out = [
            f"{self.trigger}; the stacks of {which} were taken before any was signalled ({self.seconds * 1000:.0f} ms)"
        ]
        out += [f"  {line}" for line in self.nodes]
        if verdict.culprits:
            for rank in verdict.culprits[:_MAX_SHOWN]:
                out += self._culprit(rank, verdict.confidence, first=rank == verdict.culprits[0])
            if len(verdict.culprits) > _MAX_SHOWN:
                out.append(f"  ... and {ranks_text(verdict.culprits[_MAX_SHOWN:])}")
        else:
            out.append(f"no single rank stands out: {verdict.reason}")
        shown = set(verdict.culprits)
        for group in verdict.groups:
            others = [r for r in group.ranks if r not in shown]
            if not others:
                continue
            out.append(f"  {ranks_text(others)}: {group.place.describe()}")
            if group.place.busy:
                out.append(f"    native: {'; '.join(group.place.busy)}")
            if not verdict.culprits and len(shown) < _MAX_SHOWN:
                out += _stack_lines(self.ranks[others[0]].threads, f"rank {others[0]}")
            shown.update(others)
        missing = [r for r in verdict.unknown if r not in verdict.culprits]
        if missing:
            notes = "; ".join(dict.fromkeys(n for r in missing for n in self.ranks[r].notes)) or "no stack"
            out.append(f"  {ranks_text(missing)}: no stack ({notes})")
        by_fate: Dict[str, List[int]] = {}
        for rank in sorted(self.ranks):
            by_fate.setdefault(self.ranks[rank].fate, []).append(rank)
        for fate, ranks in by_fate.items():
            out.append(f"  fate: {ranks_text(ranks)} {fate}")
        if self.native_note:
            out.append(f"  ({self.native_note})")
        return out

    def _culprit(self, rank: int, confidence: str, first: bool) -> List[str]:
        proc = self.ranks[rank]
        place = proc.place
        where = proc.fate if place is None else place.describe()
        out = [f"likely cause: {proc.who()}, {where} (confidence: {confidence})"]
        user = None if place is None else place.user
        if user is not None:
            source = linecache.getline(user.file, user.line).strip()
            if source:
                out.append(f"    {user.file.rsplit('/', 1)[-1]}:{user.line}: {source}")
        if first:
            out.append(f"  why: {self.verdict.reason}")
        out += _stack_lines(proc.threads, f"rank {rank}")
        for child in self.children.get(rank, []):
            where = "no stack" if child.place is None else child.place.describe()
            waits = place is not None and place.kind == DATA
            out.append(f"  rank {rank}'s child pid {child.pid}{' (which it waits for)' if waits else ''}: {where}")
            out += _stack_lines(child.threads, f"child {child.pid}")
        return out

    def to_dict(self) -> Dict[str, Any]:
        """As JSON-compatible values (the ``hang report`` event's details)."""
        verdict = self.verdict
        return {
            "node": self.node,
            "nodes": list(self.nodes),
            "attempt": self.attempt,
            "trigger": self.trigger,
            "culprits": list(verdict.culprits),
            "confidence": verdict.confidence,
            "reason": verdict.reason,
            "groups": [{"ranks": list(g.ranks), "place": g.place.describe()} for g in verdict.groups],
            "ranks": {str(r): p.to_dict() for r, p in sorted(self.ranks.items())},
            "children": {str(r): [c.to_dict() for c in cs] for r, cs in sorted(self.children.items()) if cs},
            "taken_at": self.taken_at,
            "seconds": round(self.seconds, 6),
            "native_note": self.native_note,
        }


def _stack_lines(threads: Sequence[ThreadStack], who: str) -> List[str]:
    """The main thread's Python frames, most recent call first, and its innermost native frames."""
    main = main_thread(threads)
    if main is None:
        return []
    frames = [f for f in main.python_frames if not any(mark in f.file for mark in LAUNCH_FRAMES)]
    out = [f"  {who}'s main thread (most recent call first):"] if frames else []
    out += [f'    File "{f.file}", line {f.line} in {f.func}' for f in frames]
    native: List[Frame] = []
    for frame in main.frames:
        if not frame.native:
            break
        native.append(frame)
    if native:
        shown = [f.short() for f in native if not f.func.startswith("_")][:4] or [native[0].short()]
        out.append(f"    native: {' <- '.join(shown)}")
    return out


def _trigger_text(snapshot: GroupSnapshot) -> str:
    trigger = snapshot.trigger
    scope = trigger.get("scope")
    if scope is None:
        return str(trigger.get("reason", "the group failed"))
    rank, pid = trigger.get("rank"), trigger.get("pid")
    if pid == snapshot.members.get(rank if isinstance(rank, int) else -1):
        who = f"rank {rank} (pid {pid})"
    else:
        who = f"rank {rank}'s child pid {pid}"
    return f"timer {scope!r} of {who} expired{learned_text(trigger.get('learned'))}"


def _process(evidence: ProcessEvidence, fate: str, node: Optional[int] = None) -> ProcessReport:
    threads = evidence.threads()
    return ProcessReport(
        evidence.pid,
        evidence.rank,
        evidence.parent,
        fate,
        place_of(threads) if threads else None,
        threads,
        evidence.python,
        evidence.native,
        list(evidence.notes),
        node,
    )


def build_report(
    attempt: int,
    snapshot: GroupSnapshot,
    fates: Mapping[int, str],
    ended: Optional[Mapping[int, str]] = None,
    finished: Sequence[int] = (),
    *,
    node: Optional[int] = None,
    remote: Sequence[RemoteNode] = (),
) -> HangReport:
    """The report of a failed attempt.

    Args:
        attempt: the attempt's number.
        snapshot: the group's stacks.
        fates: what became of each process, by pid (a worker's descendant missing here
            was stopped with its worker).
        ended: the ranks that had failed by themselves before the stacks were taken, with how.
        finished: the ranks that had finished (exit status 0) before the stacks were taken.
        node: this node's rank, in a multi-node job.
        remote: the other nodes' ranks, in a multi-node job: the culprit is chosen among all.
    """
    ranks: Dict[int, ProcessReport] = {}
    children: Dict[int, List[ProcessReport]] = {}
    lines: List[str] = []
    for part, part_fates, where in [(snapshot, fates, node), *((r.snapshot, r.fates, r.node) for r in remote)]:
        lead = "" if part is snapshot else f"on node {where}: "
        for rank, pid in sorted(part.members.items()):
            if rank in ranks:
                continue  # two nodes claim a rank: the first (this node) is kept
            evidence = part.processes.get(pid) or ProcessEvidence(pid, rank, notes=["it had exited"])
            ranks[rank] = _process(evidence, lead + part_fates.get(pid, "unknown"), where)
            children[rank] = [
                _process(child, lead + part_fates.get(child.pid, "stopped with its worker"), where)
                for child in part.descendants(rank)
            ]
        if part is not snapshot:
            late = part.taken_at - snapshot.taken_at
            when = f"{abs(late) * 1000:.0f} ms {'after' if late >= 0 else 'before'} this node's"
            lines.append(f"{ranks_text(sorted(part.members))} on node {where}: stacks taken by that node, {when}")
    verdict = classify({rank: (p.threads or None) for rank, p in ranks.items()}, ended=ended, finished=finished)
    return HangReport(
        attempt,
        _trigger_text(snapshot),
        verdict,
        ranks,
        children,
        snapshot.taken_at,
        snapshot.seconds,
        snapshot.native_note,
        lines,
        node,
    )
