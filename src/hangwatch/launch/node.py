"""One node of a job on torch's elastic engine: follow its worker groups, take their evidence, report them.

torch's agent (in the launcher's process) starts each worker as a direct child of the
launcher, with torchrun's environment. The :class:`NodeWatch` thread finds those children
(they run ``hangwatch._bootstrap`` with the launcher's pid), groups them by round (a round
is one start of the job's worker groups: its ``MASTER_ADDR:MASTER_PORT``, the same on
every node) and, for each group:

- hands the timer servers a :class:`~hangwatch._evidence.GroupEvidence` of the group's
  ranks, so the first expiry takes every local rank's stack before any is signalled;
- asks the other nodes, through the job's rendezvous store, to take their ranks' stacks at
  that moment too, and answers their asking (:mod:`hangwatch.launch.exchange`);
- when the group has ended (reaped, failed, stopped by torch's agent, or finished), prints
  what became of it: the hang report across every node's ranks, or why the group stopped.

Exit statuses are read without reaping (``waitid`` with ``WNOWAIT``), as torch's agent
must still reap its children; a status torch's agent collected first is reported unknown.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set

from .._evidence import GroupEvidence, GroupSnapshot
from .._native import NativeSampler
from .._pidserver import PidTimerServer
from .._reaper import ProcessPin, signal_name
from ..agent.report import RemoteNode, build_report
from ..agent.results import exit_text, learned_text
from ..agent.workers import children_of
from ..events import Event, EventEmitter
from ..triage import ranks_text
from .exchange import StoreExchange
from .reporter import Reporter, plural

__all__ = ["NodeWatch"]

logger = logging.getLogger("hangwatch.launch")

_TICK = 0.02  # seconds between looks at the children, the store (has another node asked?), the evidence
_SETTLE = 1.0  # a group whose workers are not all seen by then is followed as it is
_REAP_EVENT_WAIT = 0.5  # a killed worker's reap event may trail its death
_SKEW = 1.0  # seconds: what the store holds from before a round started is older (a reused port's round)
_REMOTE_WAIT = 1.0  # the longest a node's first reap waits for the other nodes' stacks (usually tens of ms)
_GATHER = 3.0  # after this node's stacks, the longest wait for the other nodes' (their own dump time)


@dataclass
class _Group:
    """One round's workers on this node."""

    key: str  # this node's group: its round and TORCHELASTIC_RESTART_COUNT
    round: str  # the round, the same on every node: MASTER_ADDR:MASTER_PORT
    number: int  # this node's groups in the order they started, from 0 (TORCHELASTIC_RESTART_COUNT
    # counts only this node's own failures: a restart another node caused does not advance it)
    node: int
    nodes: int
    local_size: int
    seen_at: float
    wall: float = field(default_factory=time.time)  # when it was first seen (time.time())
    members: Dict[int, int] = field(default_factory=dict)  # global rank -> pid
    pins: Dict[int, ProcessPin] = field(default_factory=dict)  # by rank
    status: Dict[int, Optional[int]] = field(default_factory=dict)  # rank -> exit code (-N: signal N)
    ended: Dict[int, float] = field(default_factory=dict)  # rank -> when it was seen ended (time.time())
    evidence: Optional[GroupEvidence] = None
    reaps: Dict[int, Event] = field(default_factory=dict)  # pid -> its first signal's event
    expired: int = 0


def _own_children() -> Set[int]:
    """This process's live children (/proc/self/task/*/children, or a scan of /proc where that is missing)."""
    found: Set[int] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                found.update(int(p) for p in f.read().split())
        return found
    except OSError:
        return children_of(os.getpid())


def _environ(pid: int) -> Dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _is_worker(pid: int, parent: int) -> Optional[bool]:
    """True: one of our workers (it runs the bootstrap with our pid); None: not yet known (not exec'd yet)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if b"hangwatch._bootstrap" in argv:
        return b"--parent" in argv and str(parent).encode() in argv
    return None


def _peek_status(pin: ProcessPin) -> Optional[int]:
    """The exit code of an ended child (-N for signal N), read without reaping it; None if already reaped."""
    fd = pin.fileno()
    if fd < 0 or not hasattr(os, "P_PIDFD"):
        return None
    try:
        info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except OSError:  # ECHILD: torch's agent reaped it first
        return None
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)


class NodeWatch:
    """Follows this node's worker groups under torch's agent (see the module docstring).

    Args:
        servers: the node's timer servers (their events must reach :meth:`record`).
        reporter: where the node's lines go.
        exchange: the job's rendezvous store, or None (one node, or a store that is not a TCPStore).
        dump_timeout: the longest wait for the ranks' faulthandler dumps, in seconds.
        native: the native sampler, or None.
        native_timeout: its longest run, in seconds.
        native_note: why there is no native sampler, for the report.
        events: where the ``hang report`` events go.
        after_group: called after each worker group's report (the launcher saves its figures).
    """

    def __init__(
        self,
        servers: List[PidTimerServer],
        reporter: Reporter,
        exchange: Optional[StoreExchange],
        *,
        dump_timeout: float,
        native: Optional[NativeSampler],
        native_timeout: float,
        native_note: Optional[str],
        events: Optional[EventEmitter],
        after_group: Optional[Callable[[], None]] = None,
    ) -> None:
        self._servers = servers
        self._after_group = after_group
        self._reporter = reporter
        self._exchange = exchange
        self._dump_timeout = dump_timeout
        self._native = native
        self._native_timeout = native_timeout
        self._native_note = native_note
        self._events = events
        self._me = os.getpid()
        self._lock = threading.Lock()
        self._groups: List[_Group] = []
        self._known: Set[int] = set()  # children already sorted (workers or not)
        self._current: Optional[_Group] = None
        self._started = 0  # groups seen so far
        self._stop = threading.Event()
        self._reports: List[threading.Thread] = []
        self._thread = threading.Thread(target=self._loop, name="hangwatch-node-watch", daemon=True)
        self.attempts: List[Dict[str, Any]] = []  # one summary per ended group, for the launcher's last lines

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following: groups still open are reported as they stand."""
        self._stop.set()
        self._thread.join(timeout)
        for thread in list(self._reports):
            thread.join(timeout)

    def record(self, event: Event) -> None:
        """A timer server's event (from its thread): reaps and expiries of this node's workers."""
        if event.name not in ("kill worker process", "timer expired"):
            return
        with self._lock:
            group = self._current
            if group is None:
                return
            if event.name == "timer expired":
                group.expired += 1
            elif "late_s" in event.details:
                group.reaps.setdefault(int(event.worker), event)

    # ----------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wait_for_exits()
            try:
                self._discover()
                self._follow()
            except Exception:  # the watch must outlive one bad look: the job goes on
                logger.exception("hangwatch: the node watch failed once; it goes on")
        with self._lock:
            group = self._current
        if group is not None:
            self._end(group)

    def _wait_for_exits(self) -> None:
        """Sleep a tick, or less when a worker exits: its status is read before torch's agent reaps it."""
        group = self._current
        fds = [] if group is None else [p.fileno() for r, p in group.pins.items() if r not in group.ended]
        fds = [fd for fd in fds if fd >= 0]
        if fds:
            select.select(fds, [], [], _TICK)
        else:
            self._stop.wait(_TICK)

    def _discover(self) -> None:
        for pid in _own_children() - self._known:
            verdict = _is_worker(pid, self._me)
            if verdict is None:
                continue  # not exec'd yet: looked at again next time
            self._known.add(pid)
            if verdict:
                self._join(pid, _environ(pid))
        group = self._current
        if (
            group is not None
            and group.evidence is None
            and (len(group.members) >= group.local_size or time.monotonic() - group.seen_at > _SETTLE)
        ):
            self._arm(group)

    def _join(self, pid: int, env: Dict[str, str]) -> None:
        try:
            rank = int(env["RANK"])
            key = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
            restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
            node = int(env.get("GROUP_RANK", "0"))
            nodes = int(env.get("GROUP_WORLD_SIZE", "1"))
            local_size = int(env.get("LOCAL_WORLD_SIZE", "1"))
        except (KeyError, ValueError):
            logger.warning("hangwatch: worker pid %d lacks torchrun's environment; it is not followed", pid)
            return
        group = self._current
        if group is None or group.key != f"{key}/{restart}":
            if group is not None:
                self._end(group)
            group = _Group(f"{key}/{restart}", key, self._started, node, nodes, local_size, time.monotonic())
            self._started += 1
            with self._lock:
                self._current = group
        try:
            pin = ProcessPin(pid)
        except OSError:
            return  # gone already
        group.members[rank] = pid
        group.pins[rank] = pin
        if group.evidence is not None and not group.evidence.started:
            self._arm(group)  # a late worker: a new evidence with it

    def _arm(self, group: _Group) -> None:
        """The group's evidence, handed to the timer servers: their first expiry takes every rank's stack."""
        shared = self._exchange is not None and group.nodes > 1
        group.evidence = GroupEvidence(
            group.members,
            dump_timeout=self._dump_timeout,
            native=self._native,
            native_timeout=self._native_timeout,
            native_note=self._native_note,
            then=functools.partial(self._share, group) if shared else None,
            then_timeout=_REMOTE_WAIT if shared else 0.0,
        )
        for server in self._servers:
            server.set_group(group.evidence)

    def _follow(self) -> None:
        group = self._current
        if group is None:
            return
        waiting = {rank: pin for rank, pin in group.pins.items() if rank not in group.ended}
        if waiting:
            fds = {pin.fileno(): rank for rank, pin in waiting.items() if pin.fileno() >= 0}
            ready, _, _ = select.select(list(fds), [], [], 0) if fds else ([], [], [])
            for fd in ready:
                group.status[fds[fd]] = _peek_status(group.pins[fds[fd]])
                group.ended[fds[fd]] = time.time()
            for rank, pin in waiting.items():
                if pin.fileno() < 0 and not pin.alive():
                    group.status[rank] = None
                    group.ended[rank] = time.time()
        evidence = group.evidence
        exchange = self._exchange if group.nodes > 1 else None
        if exchange is not None and evidence is not None and not evidence.started and not group.ended:
            asked = exchange.asked(group.round, group.wall - _SKEW)
            if asked is not None and asked.get("node") != group.node:
                why = asked.get("trigger") or "a timer expired"
                evidence.collect(reason=f"node {asked.get('node')} asked: {why}")
        if group.pins and len(group.ended) == len(group.pins):
            self._end(group)

    def _share(self, group: _Group, snapshot: GroupSnapshot) -> None:
        """From the evidence thread, before this node's first reap: publish this node's stacks, ask the other nodes
        for theirs, and wait (at most ``_REMOTE_WAIT``) until they are in, so no rank is signalled before every
        node has seen its ranks as they were."""
        assert self._exchange is not None
        exchange = self._exchange.another()
        exchange.publish(group.round, group.node, {"snapshot": snapshot.to_dict(), "final": False})
        exchange.ask(group.round, group.node, _trigger_text(snapshot.trigger))
        until = time.monotonic() + _REMOTE_WAIT
        exchange.gather(group.round, group.nodes, group.node, until, group.wall - _SKEW, final=False)

    # ----------------------------------------------------------------- the end of a group

    def _end(self, group: _Group) -> None:
        with self._lock:
            if self._current is group:
                self._current = None
            if group in self._groups:
                return
            self._groups.append(group)
        for server in self._servers:
            server.set_group(None)
        thread = threading.Thread(target=self._report, args=(group,), name="hangwatch-node-report", daemon=True)
        self._reports.append(thread)
        thread.start()

    def _report(self, group: _Group) -> None:
        try:
            self._report_group(group)
        except Exception:
            logger.exception("hangwatch: the report of a worker group failed")
        finally:
            for pin in group.pins.values():
                pin.close()
        if self._after_group is not None:
            self._after_group()

    def _fates(self, group: _Group) -> Dict[int, str]:
        fates: Dict[int, str] = {}
        for rank, pid in group.members.items():
            reap = group.reaps.get(pid)
            code = group.status.get(rank)
            if reap is not None:
                expired = f"timer {reap.scope!r} expired{learned_text(reap.details.get('learned'))}"
                fates[pid] = f"reaped: {expired}; killed by {reap.details.get('signal', 'a signal')}"
            elif code == 0:
                fates[pid] = "finished (exit status 0)"
            elif code is None:
                fates[pid] = "ended (its status was collected by torch's agent first)"
            else:
                fates[pid] = exit_text(code)
        for pid, reap in group.reaps.items():
            if pid not in fates:
                fates[pid] = f"reaped: timer {reap.scope!r} expired{learned_text(reap.details.get('learned'))}"
        return fates

    def _report_group(self, group: _Group) -> None:
        deadline = time.monotonic() + _REAP_EVENT_WAIT
        killed = [pid for rank, pid in group.members.items() if (group.status.get(rank) or 0) < 0]
        while killed and time.monotonic() < deadline and not all(pid in group.reaps for pid in killed):
            time.sleep(0.01)
        fates = self._fates(group)
        label = f"node {group.node}, attempt {group.number + 1}"
        ranks = sorted(group.members)
        codes = [group.status.get(r) for r in ranks]
        evidence = group.evidence
        if evidence is not None and evidence.started:
            evidence.wait()
        snapshot = evidence.snapshot if evidence is not None else None
        exchange = self._exchange.another() if self._exchange is not None else None
        remote: List[RemoteNode] = []
        if exchange is not None and group.nodes > 1 and snapshot is not None:
            exchange.publish(
                group.round,
                group.node,
                {"snapshot": snapshot.to_dict(), "fates": {str(k): v for k, v in fates.items()}, "final": True},
            )
            for node, value in sorted(
                exchange.gather(
                    group.round, group.nodes, group.node, time.monotonic() + _GATHER, group.wall - _SKEW
                ).items()
            ):
                try:
                    other = GroupSnapshot.from_dict(value["snapshot"])
                    other_fates = {int(k): str(v) for k, v in dict(value.get("fates") or {}).items()}
                except (KeyError, TypeError, ValueError) as exc:
                    logger.warning("hangwatch: node %d's stacks cannot be read: %s", node, exc)
                    continue
                remote.append(RemoteNode(node, other, other_fates))
        summary: Dict[str, Any] = {"node": group.node, "attempt": group.number, "ranks": ranks, "reaped": []}
        reaped = sorted(r for r, pid in group.members.items() if pid in group.reaps)
        summary["reaped"] = reaped
        if snapshot is not None:
            before = [r for r, when in group.ended.items() if when <= snapshot.taken_at]
            finished = [r for r in before if group.status.get(r) == 0]
            ended = {r: fates[group.members[r]] for r in before if (group.status.get(r) or 0) > 0}
            here = group.node if group.nodes > 1 else None  # one node: ranks are named without it
            report = build_report(group.number, snapshot, fates, ended, finished, node=here, remote=remote)
            self._reporter.hang_report(f"{label} failed: ", report)
            if group.nodes > 1 and not remote:
                why = exchange.error if exchange is not None and exchange.error else "no other node answered in time"
                self._reporter.say(f"  (the other nodes' ranks are not in this report: {why})")
            summary["culprits"] = report.culprits
            summary["confidence"] = report.verdict.confidence
            first = report.ranks[report.culprits[0]] if report.culprits else None
            user = None if first is None or first.place is None else first.place.user
            summary["culprit_place"] = None if user is None else user.short()
            if self._events is not None:
                self._events.emit("hang report", **report.to_dict())
            lates = [
                float(late) * 1000
                for late in (group.reaps[group.members[r]].details.get("late_s") for r in reaped)
                if isinstance(late, (int, float))
            ]
            when = ""
            if lates:
                span = (
                    f"{min(lates):.0f}"
                    if round(min(lates)) == round(max(lates))
                    else f"{min(lates):.0f}-{max(lates):.0f}"
                )
                when = f", first signalled {span} ms after {'its deadline' if len(lates) == 1 else 'their deadlines'}"
            which = ranks_text(reaped) if reaped else "none"
            self._reporter.say(
                f"  {plural(group.expired, 'timer expired', 'timers expired')} on this node; "
                f"{plural(len(reaped), 'rank reaped', 'ranks reaped')} ({which}){when}"
            )
        elif all(code == 0 for code in codes):
            self._reporter.say(f"{label}: all {len(ranks)} workers of this node finished ({ranks_text(ranks)})")
            summary["finished"] = True
        else:
            failed = [r for r in ranks if _failed_by_itself(group.status.get(r))]
            if failed:
                for rank in failed:
                    self._reporter.say(
                        f"{label} failed: rank {rank} (pid {group.members[rank]}) {fates[group.members[rank]]}; "
                        f"torch's agent stopped the others"
                    )
            elif all(code is None or code == 0 for code in codes):
                self._reporter.say(
                    f"{label}: the {plural(len(ranks), 'worker', 'workers')} of this node ended; torch's agent "
                    f"collected {'its exit status' if len(ranks) == 1 else 'their exit statuses'} first"
                )
            else:
                signals = {signal_name(-c) for c in codes if c is not None and c < 0}
                how = f" ({', '.join(sorted(signals))})" if signals else ""
                self._reporter.say(
                    f"{label}: torch's agent stopped this node's {plural(len(ranks), 'worker', 'workers')}{how} "
                    f"while they ran: a worker on another node failed, or the job's membership changed "
                    f"(that node's report says which)"
                )
        with self._lock:
            self.attempts.append(summary)


def _failed_by_itself(code: Optional[int]) -> bool:
    """A non-zero exit, or a signal other than the SIGTERM and SIGKILL of torch's group stop (SIGABRT, SIGSEGV)."""
    if code is None or code == 0:
        return False
    return code > 0 or -code not in (int(signal.SIGTERM), int(signal.SIGKILL))


def _trigger_text(trigger: Dict[str, Any]) -> str:
    """``timer 'step' of rank 3 expired``, or the trigger's reason."""
    if trigger.get("scope") is not None:
        return f"timer {trigger['scope']!r} of rank {trigger.get('rank')} expired{learned_text(trigger.get('learned'))}"
    return str(trigger.get("reason") or "a timer expired")
