"""The base of the built-in servers: torch's extension points on one deadline book, workers by pid.

Deadlines arrive as wall-clock ``expiration_time`` values (torch's wire format) and are
turned into ``time.monotonic()`` deadlines on receipt, so a later wall-clock jump
changes nothing. Each worker is pinned (see :mod:`hangwatch._reaper`) when its first
timer arrives; its exit drops its timers at once.

Reaping is a small state machine per worker, driven by the watchdog loop so that no
step blocks it: collect the stack (if the worker registered a dump handler), send the
policy's first signal, wait (the worker's exit ends the reap at once), send the next,
and report a worker that outlives the last signal.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple, Union

from ._deadlines import DeadlineBook
from ._evidence import GroupEvidence
from ._reaper import (
    ProcessPin,
    ReapPolicy,
    ancestor_in,
    check_policy,
    child_below,
    process_state,
    refuse_target,
    signal_name,
    start_time,
)
from ._worker import WorkerInfo, parse_identity
from .api import RequestQueue, TimerRequest, TimerServer
from .events import EventEmitter, EventSink, JsonLinesSink
from .learn import LearnedDeadline, Learning, ScopeStatistics, statistics_table
from .limits import Limits

__all__ = ["PidTimerServer"]

logger = logging.getLogger("hangwatch")

# How long before retrying a signal that failed for a reason other than permissions or exit.
_SIGNAL_RETRY = 1.0
# For pins without a descriptor to watch: how often a worker being reaped is checked for its exit.
_POLLED_EXIT_CHECK = 0.05


_GIVE_WAY = 0.0002  # seconds the watchdog sleeps after a round while a reap waits for stacks
_NUMBER_TYPES = (int, float)
_NEAR_MISS_EVERY = 60.0  # seconds between two near-miss events of one scope
_INF = math.inf


class _Held(NamedTuple):
    """What the book keeps with a timer whose deadline was learned (shorter than its ``after``)."""

    learned: LearnedDeadline
    wall_deadline: float  # the learned deadline, in time.time() seconds
    after_s: float  # the timeout the block asked for (its deadline minus its arrival)

    def details(self) -> Dict[str, Any]:
        """For events: the learned deadline, the figures it came from, and the block's own timeout."""
        return {"learned": {**self.learned.to_dict(), "after_s": round(self.after_s, 3)}}


class _Reap:
    """One worker being reaped: where it is in its policy."""

    __slots__ = (
        "first_signal_at",
        "held",
        "last_signal",
        "next_at",
        "own",
        "pid",
        "pin",
        "policy",
        "request",
        "scopes",
        "stack",
        "stack_note",
        "step",
        "waits_for",
    )

    def __init__(self, pid: int, pin: ProcessPin, request: TimerRequest, policy: ReapPolicy) -> None:
        self.pid = pid
        self.pin = pin
        self.request = request
        self.policy = policy
        self.scopes: List[str] = []
        self.step = 0
        self.next_at = 0.0
        self.stack: Optional[str] = None
        self.stack_note: Optional[str] = None
        self.first_signal_at: Optional[float] = None
        self.last_signal = 0
        self.waits_for: Optional[GroupEvidence] = None  # the stacks this reap waits for (its group's, or its own)
        self.own: Optional[GroupEvidence] = None  # the collection of this worker's stack alone, once asked
        self.held: Optional[_Held] = None  # the expired timer's learned deadline, if it had one

    def deadline(self) -> float:
        """The expired timer's deadline in ``time.time()`` seconds (the learned one, if it had one)."""
        return self.request.expiration_time if self.held is None else self.held.wall_deadline

    def evidence(self) -> Dict[str, Any]:
        """The stack for the event, or why there is none."""
        if self.stack is not None:
            return {"stack": self.stack}
        if self.stack_note is not None:
            return {"stack_note": self.stack_note}
        return {}


def _check_pids(pids: Optional[Iterable[int]]) -> Optional[frozenset[int]]:
    if pids is None:
        return None
    checked = frozenset(pids)
    bad = [p for p in checked if isinstance(p, bool) or not isinstance(p, int) or p <= 1]
    if bad:
        raise ValueError(f"allowed_pids must be worker pids > 1 (got {sorted(bad, key=repr)!r})")
    return checked


class PidTimerServer(TimerServer):
    """A :class:`TimerServer` whose workers are processes on this host, identified by pid.

    Args:
        request_queue: where requests arrive.
        max_interval: the longest one wait of the loop, in seconds.
        daemon: whether the watchdog thread is a daemon thread.
        log_event: torch's event callback (see :mod:`hangwatch.events`).
        reap_policy: how workers are reaped unless their request says otherwise
            (default: stack dump if registered, then SIGKILL, as torch).
        allowed_pids: if given, only these pids are ever pinned or signalled; requests
            naming another pid are refused (see :meth:`set_allowed_pids`).
        children_only: accept only this process's children and their descendants (a
            launcher such as torch's agent starts every worker as its direct child): a
            request naming any other pid is refused. Checked through /proc's parent links
            when a process's first timer arrives; a descendant's events name the child it
            descends from (``descendant_of``). Applies together with ``allowed_pids``.
        event_file: append every event to this file as JSON lines.
        on_event: called with every :class:`~hangwatch.Event` (from the watchdog thread).
        limits: what one client may cost this server (default :class:`~hangwatch.Limits`).
        pin: how a worker is pinned and signalled (default :class:`ProcessPin`); tests
            pass a recorder.
        statistics: keep per-scope figures of the released blocks (see
            :meth:`scope_statistics`): True for a table of this server's own, or a
            :class:`~hangwatch.ScopeStatistics` to share with other servers (and attempts).
            The server then notes when each acquire arrived (about 40 bytes more per active
            timer).
        near_miss: with ``statistics``, a block released after using more than this fraction
            of its budget gives a ``near miss`` event (at most one per scope a minute, with
            the count of the others); None for none.
        learn: learn each scope's deadline from its blocks (see :class:`~hangwatch.Learning`):
            a block then gets ``min(after, max(floor, factor x quantile))``. Implies
            statistics; to share what is learned, give ``statistics=ScopeStatistics(learning)``
            instead.

    Raises:
        ValueError: ``max_interval`` is not a finite number > 0, or ``allowed_pids`` holds a pid <= 1.
    """

    def __init__(
        self,
        request_queue: RequestQueue,
        max_interval: float,
        daemon: bool = True,
        log_event: Optional[Callable[[str, Any], None]] = None,
        *,
        reap_policy: Optional[ReapPolicy] = None,
        allowed_pids: Optional[Iterable[int]] = None,
        children_only: bool = False,
        event_file: Union[str, os.PathLike[str], None] = None,
        on_event: Optional[EventSink] = None,
        limits: Optional[Limits] = None,
        pin: Callable[[int], ProcessPin] = ProcessPin,
        statistics: Union[bool, ScopeStatistics] = False,
        near_miss: Optional[float] = 0.8,
        learn: Optional[Learning] = None,
    ) -> None:
        super().__init__(request_queue, max_interval, daemon)
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a hangwatch.Limits (got {limits!r})")
        self._limits = limits or Limits()
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable (got {on_event!r})")
        self._reap_policy = check_policy(reap_policy) or ReapPolicy()
        self._allowed = _check_pids(allowed_pids)
        self._descendants = False
        self._children_only = bool(children_only)
        self._lineage: Dict[int, int] = {}  # a pinned descendant of an allowed pid -> that pid
        self._ranks: Dict[int, int] = {}  # a pinned worker -> the rank it said it has
        self._applied: Dict[int, object] = {}  # a pinned worker -> the identity field last applied (see _register)
        self._group: Optional[GroupEvidence] = None
        self._new_pin = pin
        self._book: DeadlineBook[int, TimerRequest] = DeadlineBook()
        self._pins: Dict[int, ProcessPin] = {}
        self._polled_pins: Dict[int, ProcessPin] = {}  # pins without a descriptor to watch (no pidfd)
        self._dump_handlers: Set[int] = set()  # pids that registered a stack-dump handler
        self._reaps: Dict[int, _Reap] = {}
        sinks: List[EventSink] = []
        if event_file is not None:
            sinks.append(JsonLinesSink(event_file))
        if on_event is not None:
            sinks.append(on_event)
        self._events = EventEmitter(log_event, sinks, rate=self._limits.refusal_events_per_second)
        self._request_count = 0
        if near_miss is not None and (
            isinstance(near_miss, bool) or not isinstance(near_miss, (int, float)) or not 0 < near_miss <= 1
        ):
            raise ValueError(f"near_miss must be a fraction in (0, 1], or None (got {near_miss!r})")
        self._stats = statistics_table(statistics, learn)
        self._learning = None if self._stats is None else self._stats.learning
        self._applied_learn: Dict[int, Optional[bool]] = {}  # a pinned worker -> the learn choice of _applied's field
        self._table_full_told = False
        self._near_miss = near_miss
        self._near_miss_told: Dict[str, Tuple[float, int]] = {}  # scope -> (when told, misses left untold)
        self._received = 0.0  # monotonic time the current batch of requests arrived

    # ----------------------------------------------------------------- configuration

    def set_allowed_pids(self, pids: Optional[Iterable[int]], *, descendants: bool = False) -> None:
        """Reap only these worker pids from now on (None: any pid that passes the safety checks).

        Thread-safe. The agent calls it with each new worker group. A request naming another
        pid is refused (``bad request``); an expired worker no longer on the list is not
        signalled (``reap refused``).

        Args:
            pids: the worker pids, or None for any.
            descendants: also accept the live descendants of these pids (a worker's
                DataLoader workers, its helpers), checked through /proc's parent links when
                their first timer arrives; their events name the worker they descend from
                (``descendant_of``).

        Raises:
            ValueError: a pid is not an int > 1.
        """
        self._descendants = bool(descendants)
        self._allowed = _check_pids(pids)

    def set_group(self, group: Optional[GroupEvidence]) -> None:
        """Take the whole group's stacks at its first expiry, before any of its processes is signalled.

        Thread-safe. With a group set, the first expired timer of one of its processes (a
        worker or a descendant) starts :meth:`GroupEvidence.collect`, and every reap of the
        group's processes waits for it (up to its deadline) before its first signal; their
        stacks come from it. Later expiries are reaped as usual. The agent sets one group
        per start of its workers.
        """
        self._group = group

    @property
    def children_only(self) -> bool:
        """Whether only this process's children and their descendants may be reaped."""
        return self._children_only

    def rank_of(self, pid: int) -> Optional[int]:
        """The rank a pinned worker said it has (its ``RANK``), or None."""
        return self._ranks.get(pid)

    @property
    def allowed_pids(self) -> Optional[frozenset[int]]:
        """The pids this server may reap, or None for any (subject to the safety checks)."""
        return self._allowed

    @property
    def reap_policy(self) -> ReapPolicy:
        """How workers are reaped unless their request chooses otherwise."""
        return self._reap_policy

    def _default_policy(self, request: TimerRequest) -> ReapPolicy:
        """The policy of a request that did not choose one: the server's (the FIFO server reads its signal)."""
        return self._reap_policy

    def _policy_of(self, request: TimerRequest) -> ReapPolicy:
        ext = getattr(request, "hangwatch", None)
        if ext is not None:
            try:
                chosen = parse_identity(ext).policy
            except ValueError:  # refused on receipt; cannot be here
                chosen = None
            if isinstance(chosen, ReapPolicy):
                return chosen
            if chosen == "server":
                return self._reap_policy
        return self._default_policy(request)

    # ----------------------------------------------------------------- torch's extension points

    def register_timers(self, timer_requests: List[TimerRequest]) -> None:
        """Apply acquires and releases; refuse (with a ``bad request`` event) what is malformed."""
        if not timer_requests:
            return
        # One offset for the batch: the wall clock at receipt maps onto the monotonic clock.
        self._received = received = time.monotonic()
        offset = received - time.time()
        for request in timer_requests:
            self._request_count += 1
            try:
                self._register(request, offset)
            except Exception as exc:  # contained to this request: the others of the round still count
                logger.exception("hangwatch: applying a timer request failed: %r", request)
                self._events.emit("bad request", reason=f"could not be applied ({type(exc).__name__}: {exc})")

    def _register(self, request: TimerRequest, offset: float) -> None:
        """Apply one request (``offset``: monotonic minus wall-clock time at receipt)."""
        book = self._book
        try:
            pid = request.worker_id
            scope = request.scope_id
            expiration = request.expiration_time
        except AttributeError:
            self._events.emit("bad request", reason=f"not a TimerRequest: {request!r}")
            return
        # What every client sends (exact int, str, int or float) is checked in one step.
        if not (type(pid) is int and type(scope) is str and type(expiration) in _NUMBER_TYPES) and not self._typed(
            request, pid, scope, expiration
        ):
            return
        if expiration < 0:
            held = book.take(pid, scope)
            if held is not None and held[1] is not None:  # a start is kept only with statistics
                self._count_block(pid, scope, held[0], held[1], held[2])
            return
        if not -_INF < expiration < _INF:  # inf or nan
            self._events.emit("bad request", worker=pid, scope=scope, reason=f"expiration_time is {expiration!r}")
            return
        ext = getattr(request, "hangwatch", None)
        learn: Optional[bool] = None
        # The transports hand out one object per distinct identity field: the one this pinned
        # worker sent last was decoded and applied already.
        if ext is None or ext is not self._applied.get(pid):
            info: Optional[WorkerInfo] = None
            if ext is not None:
                try:
                    info = parse_identity(ext)
                except ValueError as exc:
                    self._events.emit("bad request", worker=pid, scope=scope, reason=str(exc))
                    return
            if pid not in self._pins and not self._pin(pid, scope, info):
                return
            if info is not None:
                learn = info.learn
                if info.rank is not None:
                    self._ranks[pid] = info.rank
                if info.dump_signal:
                    self._dump_handlers.add(pid)
                if info.policy is None or info.policy == "server":  # a policy is checked again at a reap
                    self._applied[pid] = ext
                    self._applied_learn[pid] = learn
        elif self._learning is not None:
            learn = self._applied_learn.get(pid)
        cap = self._limits.timers_per_worker
        if book.count_of(pid) >= cap and not book.holds(pid, scope):
            self._events.emit(
                "limit reached",
                worker=pid,
                scope=scope,
                reason=f"the worker holds {cap} timers, the most one worker may (Limits.timers_per_worker); "
                f"this new one is refused",
            )
            return
        if self._stats is None:
            book.set(pid, scope, expiration + offset, request)
            return
        deadline = expiration + offset
        note: Optional[_Held] = None
        learning = self._learning
        if learning is not None and (learning.default if learn is None else learn):
            self._stats.mark_learnable(scope)
            learned = self._stats.learned(scope)
            if learned is not None and self._received + learned.seconds < deadline:
                cut = self._received + learned.seconds
                note = _Held(learned, cut - offset, deadline - self._received)
                deadline = cut
        book.set(pid, scope, deadline, request, self._received if self._measures_blocks else None, note)

    # Whether this server measures blocks itself, from the arrival of acquire and release (the
    # shared-memory server's clients measure and report their own blocks instead).
    _measures_blocks = True

    def _count_block(self, pid: int, scope: str, deadline: float, start: float, note: Optional[_Held]) -> None:
        """A held block was released: add it to its scope's figures; a near miss says so."""
        assert self._stats is not None
        duration, budget = self._received - start, deadline - start
        used = self._stats.add(scope, duration, budget, None if note is None else note.after_s)
        if used is None:
            self._table_full(pid, scope)
            return
        if note is None:
            self._near(pid, scope, used, duration, budget)
        else:
            self._near(pid, scope, used, duration, budget, note.details())

    def _table_full(self, pid: int, scope: str) -> None:
        """A block of a new scope was not counted: the statistics table is full (said once)."""
        if self._table_full_told:
            return
        self._table_full_told = True
        assert self._stats is not None
        self._events.emit(
            "limit reached",
            worker=pid,
            scope=scope,
            reason=f"the statistics track {self._stats.max_scopes} scopes, the most they may "
            f"(ScopeStatistics.max_scopes); blocks of further scopes are not counted or learned",
        )

    def _near(
        self, pid: int, scope: str, used: float, duration: float, budget: float, extra: Optional[Dict[str, Any]] = None
    ) -> None:
        """A released block used ``used`` of its budget: past ``near_miss``, a ``near miss`` event (rate-limited)."""
        if self._near_miss is None or used <= self._near_miss:
            return
        now = time.monotonic()
        told, untold = self._near_miss_told.get(scope, (-math.inf, 0))
        if now - told < _NEAR_MISS_EVERY:
            self._near_miss_told[scope] = (told, untold + 1)
            return
        self._near_miss_told[scope] = (now, 0)
        self._events.emit(
            "near miss",
            worker=pid,
            scope=scope,
            duration_s=round(duration, 6),
            timeout_s=round(budget, 6),
            used=round(used, 4),
            **({"suppressed": untold} if untold else {}),
            **(extra or {}),
            **self._rank_details(pid),
        )

    def scope_statistics(self) -> Dict[str, Dict[str, Any]]:
        """Each scope's figures so far: blocks, duration p50/p99/max, timeout, closest call, expiries.

        Durations are measured by the server, from the arrival of an acquire to the arrival
        of its release, so they work for any client, torch's included (the shared-memory
        server's clients measure their own blocks). See
        :meth:`hangwatch.ScopeStatistics.figures` for the fields; a shared table holds every
        server's blocks.

        Raises:
            RuntimeError: the server was made without ``statistics`` or ``learn``.
        """
        if self._stats is None:
            raise RuntimeError(f"{type(self).__name__} keeps no statistics; make it with statistics=True")
        return self._stats.figures()

    @property
    def statistics(self) -> Optional[ScopeStatistics]:
        """The server's statistics table (shared, if it was given one), or None."""
        return self._stats

    def _typed(self, request: TimerRequest, pid: Any, scope: Any, expiration: Any) -> bool:
        """Whether a request's fields have usable types (subclasses of int, str, float); else refuse it."""
        if isinstance(pid, bool) or not isinstance(pid, int):
            self._events.emit("bad request", request=request, reason=f"worker_id must be a pid, an int (got {pid!r})")
            return False
        if not isinstance(scope, str) or isinstance(expiration, bool) or not isinstance(expiration, (int, float)):
            self._events.emit(
                "bad request",
                worker=pid,
                request=request,
                reason=f"scope_id must be a str and expiration_time a number (got {request!r})",
            )
            return False
        return True

    def clear_timers(self, worker_ids: Set[Any]) -> None:
        """Remove every timer of the given workers."""
        for worker_id in worker_ids:
            self._book.drop_worker(worker_id)

    def get_expired_timers(self, deadline: float) -> Dict[Any, List[TimerRequest]]:
        """The timers expired at ``deadline`` (``time.time()`` seconds), by pid, earliest first."""
        return self._book.expired(deadline + (time.monotonic() - time.time()))

    def _reap_worker(self, worker_id: Any) -> bool:
        """Kill the worker with SIGKILL through its pin, at once; True when done (or it is already gone)."""
        return self._signal_now(worker_id, int(signal.SIGKILL))

    def _next_deadline(self) -> Optional[float]:
        deadline = self._book.next_deadline()
        if self._reaps:
            step = min(job.next_at for job in self._reaps.values())
            if self._polled_pins:
                step = min(step, time.monotonic() + _POLLED_EXIT_CHECK)
            deadline = step if deadline is None else min(deadline, step)
        return None if deadline is None else deadline - time.monotonic()

    # ----------------------------------------------------------------- reaping

    def _reap_expired(self, worker_id: Any, expired_timers: List[TimerRequest]) -> bool:
        now = time.time()
        expired = sorted(expired_timers, key=lambda r: r.expiration_time)
        notes: Dict[str, _Held] = {}
        for request in expired:
            deadline = request.expiration_time
            details = self._rank_details(worker_id)
            if self._stats is not None:
                self._stats.expired(request.scope_id)
                held = self._book.note_of(worker_id, request.scope_id)
                if isinstance(held, _Held):
                    notes[request.scope_id] = held
                    deadline = held.wall_deadline
                    details.update(held.details())
            self._events.emit(
                "timer expired",
                worker=worker_id,
                scope=request.scope_id,
                request=request,
                late_s=round(now - deadline, 6),
                **details,
            )
        if worker_id in self._reaps:
            return True  # already being reaped
        allowed = self._allowed
        if allowed is not None and worker_id not in allowed and self._lineage.get(worker_id) not in allowed:
            self._events.emit(
                "reap refused",
                worker=worker_id,
                scopes=[r.scope_id for r in expired],
                reason="not one of this server's workers (allowed_pids); not signalled",
            )
            return True
        chosen, policy = expired[0], self._policy_of(expired[0])
        if not policy.signals:  # the first timer with a signal decides, as torch's
            for request in expired[1:]:
                candidate = self._policy_of(request)
                if candidate.signals:
                    chosen, policy = request, candidate
                    break
        pin = self._pins.get(worker_id)
        if pin is None:
            if not self._pin(worker_id, chosen.scope_id, None, refusal="reap failed"):
                return True
            pin = self._pins[worker_id]
        job = _Reap(worker_id, pin, chosen, policy)
        job.scopes = [r.scope_id for r in expired]
        job.held = notes.get(chosen.scope_id)
        self._reaps[worker_id] = job
        group = self._group
        if group is not None and not group.done:
            rank = group.rank_of(worker_id)
            if rank is not None:
                scope = chosen.scope_id
                learned = None if job.held is None else job.held.details()["learned"]
                group.collect(pid=worker_id, rank=rank, scope=scope, reason=f"timer {scope!r} expired", learned=learned)
                self._await_evidence(job, group)
                return True
        self._start_evidence(job)
        return True

    def _start_evidence(self, job: _Reap) -> None:
        """Ask the worker for its stack (when the policy wants one and it registered a handler), else signal it.

        The stack is taken by an evidence collector on a thread of its own: opening and
        reading a file of the worker's never happens on the watchdog's thread (a worker
        could put a file there that blocks in the kernel).
        """
        if not job.policy.dump:
            self._next_step(job)
            return
        if job.pid not in self._dump_handlers:
            job.stack_note = "no stack: the worker registered no dump handler (e.g. a torch client)"
            self._next_step(job)
            return
        evidence = GroupEvidence(
            {0: job.pid},
            dump_timeout=job.policy.dump_timeout,
            native=None,
            native_note=None,
            descendants=False,
            pin=self._new_pin,
        )
        evidence.collect(pid=job.pid, scope=job.request.scope_id, reason="timer expired")
        job.own = evidence
        self._await_evidence(job, evidence)

    def _await_evidence(self, job: _Reap, evidence: GroupEvidence) -> None:
        """Hold the reap until ``evidence`` is taken (or its time is up); the watchdog is woken when it is."""
        job.waits_for = evidence
        job.next_at = evidence.deadline() or time.monotonic()
        evidence.on_done(self._wake)

    def _after_evidence(self, job: _Reap, evidence: GroupEvidence) -> None:
        """The stacks are taken (or their time is up): the worker's comes from them; then the first signal."""
        job.waits_for = None
        snapshot = evidence.snapshot
        if snapshot is None and evidence is not job.own:
            self._start_evidence(job)  # the group's stacks did not come in time: ask for this worker's alone
            return
        found = snapshot.processes.get(job.pid) if snapshot is not None else None
        if found is not None and found.python:
            job.stack = found.python
        elif found is not None and found.notes:
            job.stack_note = "; ".join(found.notes)
        else:
            job.stack_note = "no stack: it was not taken in time"
        self._next_step(job)

    def _advance_reaps(self) -> None:
        """Move each reap whose next step is due."""
        if not self._reaps:
            return
        now = time.monotonic()
        due = [j for j in self._reaps.values() if j.next_at <= now or (j.waits_for is not None and j.waits_for.done)]
        for job in due:
            if job.pid not in self._reaps:
                continue  # ended by an earlier step of this round
            if job.waits_for is not None:
                self._after_evidence(job, job.waits_for)
            else:
                self._next_step(job)

    def _next_step(self, job: _Reap) -> None:
        """Send the policy's next signal, or end the reap."""
        policy = job.policy
        if job.step >= len(policy.signals):
            self._end_reap(job)
            return
        signum = policy.signals[job.step]
        try:
            job.pin.send_signal(signum)
        except ProcessLookupError:
            self._worker_gone(job.pid)
            return
        except PermissionError as exc:
            self._events.emit(
                "reap failed", worker=job.pid, scope=job.request.scope_id, signal=signal_name(signum), reason=str(exc)
            )
            self._drop_reap(job)
            return
        except OSError as exc:
            self._events.emit(
                "reap failed",
                worker=job.pid,
                scope=job.request.scope_id,
                signal=signal_name(signum),
                reason=f"{exc}; will retry",
            )
            job.next_at = time.monotonic() + _SIGNAL_RETRY
            return
        details: Dict[str, Any] = {"signal": signal_name(signum), "step": f"{job.step + 1}/{len(policy.signals)}"}
        if job.step == 0:
            job.first_signal_at = time.monotonic()
            details["late_s"] = round(time.time() - job.deadline(), 6)
            if job.held is not None:
                details.update(job.held.details())
            if len(job.scopes) > 1:
                details["scopes"] = job.scopes
            if job.pid in self._lineage:
                details["descendant_of"] = self._lineage[job.pid]
            details.update(self._rank_details(job.pid))
            details.update(job.evidence())
        else:
            details["reason"] = f"still alive {policy.grace:g} s after {signal_name(job.last_signal)}"
        job.step += 1
        job.last_signal = signum
        job.next_at = time.monotonic() + (policy.grace if job.step < len(policy.signals) else policy.exit_wait())
        self._events.emit(
            "kill worker process", worker=job.pid, scope=job.request.scope_id, request=job.request, **details
        )
        if job.step == 1:
            self._after_first_signal(job.pid, signum)

    def _end_reap(self, job: _Reap) -> None:
        """Every signal was sent (or none was asked for) and the worker is still alive: say so."""
        if not job.policy.signals:
            details: Dict[str, Any] = {"scopes": job.scopes, "reason": "the expired timer asked for no signal"}
            details.update(job.evidence())
            self._events.emit("expired, not signalled", worker=job.pid, scope=job.request.scope_id, **details)
        else:
            self._events.emit(
                "reap failed",
                worker=job.pid,
                scope=job.request.scope_id,
                signal=signal_name(job.last_signal),
                reason=(
                    f"still alive {job.policy.exit_wait():g} s after {signal_name(job.last_signal)}; "
                    f"state: {process_state(job.pid)}"
                ),
            )
        self._drop_reap(job)

    def _drop_reap(self, job: _Reap) -> None:
        self._reaps.pop(job.pid, None)

    def _after_first_signal(self, pid: int, signum: int) -> None:
        """Called after a reap sent its first signal (FileTimerServer's opt-in self-kill hooks here)."""

    def _signal_now(self, pid: Any, signum: int) -> bool:
        """Send one signal through the worker's pin at once (torch's ``_reap_worker``); True unless to retry."""
        pin = self._pins.get(pid)
        if pin is None:
            if not self._pin(pid, None, None, refusal="reap failed"):
                return True
            pin = self._pins[pid]
        try:
            pin.send_signal(signum)
        except ProcessLookupError:
            self._worker_gone(pid)
            return True
        except PermissionError as exc:
            self._events.emit("reap failed", worker=pid, signal=signal_name(signum), reason=str(exc))
            return True
        except OSError as exc:
            self._events.emit("reap failed", worker=pid, signal=signal_name(signum), reason=f"{exc}; will retry")
            return False
        self._events.emit("kill worker process", worker=pid, signal=signal_name(signum))
        return True

    # ----------------------------------------------------------------- worker identity

    def _pin(self, pid: Any, scope: Optional[str], info: Optional[WorkerInfo], refusal: str = "bad request") -> bool:
        """Validate ``pid``, pin it and watch for its exit; False (with an event) if it must not or cannot be."""
        reason = refuse_target(pid)
        allowed = self._allowed
        ancestor: Optional[int] = None
        if reason is None and allowed is not None and pid not in allowed:
            ancestor = ancestor_in(pid, allowed) if self._descendants else None
            if ancestor is None:
                what = "workers nor a descendant of one" if self._descendants else "workers"
                reason = f"pid {pid} is not one of this server's {what} (allowed_pids)"
                self._refused(pid, reason)
        if reason is None and self._children_only:
            child = child_below(pid, os.getpid())
            if child is None:
                reason = (
                    f"pid {pid} is neither a child of this server's process (pid {os.getpid()}) nor a "
                    f"descendant of one (children_only)"
                )
                self._refused(pid, reason)
            elif child != pid and ancestor is None:
                ancestor = child
        if reason is None:
            try:
                pin = self._new_pin(pid)
            except ProcessLookupError:
                self._events.emit("worker exited", worker=pid, scope=scope, reason="not running; never signalled")
                return False
            except (OSError, OverflowError, ValueError) as exc:  # EPERM, ENOENT (a thread), EMFILE, ...
                reason = f"cannot watch process {pid}: {exc}"
            else:
                if info is not None and not self._same_process(pin, info):
                    pin.close()
                    self._events.emit(
                        "worker exited",
                        worker=pid,
                        scope=scope,
                        reason="the requesting process already exited and its pid now belongs to another "
                        "process (start times or pidfd identities differ); that process is never signalled",
                    )
                    return False
                self._pins[pid] = pin
                if ancestor is not None:
                    self._lineage[pid] = ancestor
                if pin.fileno() >= 0:
                    self._watch_fd(pin.fileno(), lambda: self._worker_gone(pid))
                else:
                    self._polled_pins[pid] = pin
                return True
        self._events.emit(refusal, worker=pid, scope=scope, reason=reason)
        return False

    def _between_rounds(self) -> None:
        """While a reap waits for stacks, give the interpreter's lock away for a moment after each round.

        The threads taking the stacks need the lock for every step of their wait; a watchdog
        draining a flood of requests would hold it for the interpreter's whole switch interval
        (5 ms) each time, so that a dump that takes a millisecond took over 100 ms under load.
        """
        for job in self._reaps.values():
            if job.waits_for is not None and not job.waits_for.done:
                time.sleep(_GIVE_WAY)
                return

    def _rank_details(self, pid: int) -> Dict[str, int]:
        """``{"rank": N}`` for a worker that said its rank (a descendant: its worker's), else nothing."""
        rank = self._ranks.get(pid)
        if rank is None and pid in self._lineage:
            rank = self._ranks.get(self._lineage[pid])
        return {} if rank is None else {"rank": rank}

    def _refused(self, pid: int, reason: str) -> None:
        """Called when a request of ``pid`` is refused by the allow-list (the shared-memory server tells its client)."""

    @staticmethod
    def _same_process(pin: ProcessPin, info: WorkerInfo) -> bool:
        """Whether the pinned process is the one that sent the request (by its start time and pidfd inode)."""
        if info.start is not None:
            actual = start_time(pin.pid)
            if actual is not None and actual != info.start:  # unreadable /proc (hidepid): the pidfd inode decides
                return False
        if info.pidfd_ino is not None:
            inode = pin.identity()
            if inode >= 0 and inode != info.pidfd_ino:
                return False
        return True

    def _release_pin(self, pid: int) -> None:
        """Forget the worker's pin: stop watching it and close it."""
        pin = self._pins.pop(pid, None)
        self._polled_pins.pop(pid, None)
        self._dump_handlers.discard(pid)
        self._lineage.pop(pid, None)
        self._ranks.pop(pid, None)
        self._applied.pop(pid, None)
        self._applied_learn.pop(pid, None)
        if pin is not None:
            if pin.fileno() >= 0:
                self._unwatch_fd(pin.fileno())
            pin.close()

    def _worker_gone(self, pid: int) -> None:
        """The worker exited: end its reap, drop its timers and its pin."""
        job = self._reaps.pop(pid, None)
        self._release_pin(pid)
        dropped = self._book.drop_worker(pid)
        if job is not None:
            details: Dict[str, Any] = {}
            if job.first_signal_at is not None:
                details["signal"] = signal_name(job.last_signal)
                details["after_s"] = round(time.monotonic() - job.first_signal_at, 6)
            else:
                details["reason"] = "exited before it was signalled"
            self._events.emit("worker reaped", worker=pid, scope=job.request.scope_id, **details)
        elif dropped:
            self._events.emit(
                "worker exited",
                worker=pid,
                scopes=[r.scope_id for r in dropped],
                reason="its timers were dropped; it will not be signalled",
            )

    def _check_pins(self) -> None:
        """Drop the workers that exited (for pins without a descriptor to watch)."""
        for pid, pin in list(self._polled_pins.items()):
            if not pin.alive():
                self._worker_gone(pid)

    def _expire_and_reap(self) -> None:
        self._check_pins()
        self._advance_reaps()
        super()._expire_and_reap()

    # ----------------------------------------------------------------- lifecycle

    def _on_started(self) -> None:
        self._events.emit(
            "watchdog started",
            server=type(self).__name__,
            max_interval=self._max_interval,
            reap_policy=repr(self._reap_policy),
        )

    def _on_stopped(self) -> None:
        self._events.emit("watchdog stopped", server=type(self).__name__)
        self._events.close()

    def close_pins(self) -> None:
        """Release every worker pin (the server forgets its workers' timers and reaps in progress too)."""
        for job in list(self._reaps.values()):
            self._drop_reap(job)
        for pid in list(self._pins):
            self._release_pin(pid)
        for pid in list(self._book.workers()):
            self._book.drop_worker(pid)

    @property
    def active_timers(self) -> int:
        """How many timers are active now."""
        return len(self._book)

    @property
    def request_count(self) -> int:
        """How many requests this server has received."""
        return self._request_count
