"""What a run of the agent tells a program: each attempt, each rank's fate, the hang report."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .._reaper import signal_name
from ..learn import seconds_text

if TYPE_CHECKING:
    from .report import HangReport

__all__ = [
    "FAILED",
    "INTERRUPTED",
    "SUCCEEDED",
    "Attempt",
    "Reaped",
    "RunResult",
    "WorkerFailure",
    "exit_text",
    "learned_text",
]

SUCCEEDED, FAILED, INTERRUPTED = "SUCCEEDED", "FAILED", "INTERRUPTED"


def exit_text(code: Optional[int]) -> str:
    """``killed by SIGKILL`` for -9, ``exited with status 3`` for 3 (statuses as ``multiprocessing`` gives them)."""
    if code is None:
        return "ended (its exit status could not be read)"
    return f"killed by {signal_name(-code)}" if code < 0 else f"exited with status {code}"


def learned_text(learned: Optional[Dict[str, Any]]) -> str:
    """`` at its learned deadline of 0.5 s (after=30 s)`` for a reap's ``learned`` details; empty without."""
    if not learned:
        return ""
    after = learned.get("after_s")
    text = f" at its learned deadline of {seconds_text(learned.get('deadline_s'))}"
    return text if after is None else f"{text} (its after: {seconds_text(after)})"


@dataclasses.dataclass
class Reaped:
    """A process a timer server signalled because its timer expired: a worker, or a worker's descendant.

    Attributes:
        pid: the process.
        rank: the rank of the worker it is, or descends from.
        child: whether it is a descendant of the worker (a DataLoader worker, a helper), not the worker.
        scope: the expired timer's scope.
        late_s: how late after the deadline the first signal was sent.
        signal: the first signal sent (``"SIGKILL"``).
        stack: its all-thread stack dump, if it registered a dump handler.
        learned: when the timer expired at a learned deadline: that deadline and the
            figures it came from (the event's ``learned`` details).
    """

    pid: int
    rank: int
    child: bool = False
    scope: Optional[str] = None
    late_s: Optional[float] = None
    signal: Optional[str] = None
    stack: Optional[str] = None
    learned: Optional[Dict[str, Any]] = None

    def describe(self) -> str:
        """E.g. ``rank 0's child pid 4242 was reaped: timer 'load' expired, signalled 4 ms after its deadline``."""
        who = f"rank {self.rank}'s child pid {self.pid}" if self.child else f"rank {self.rank} (pid {self.pid})"
        late = "" if self.late_s is None else f", signalled {self.late_s * 1000:.0f} ms after its deadline"
        return f"{who} was reaped: timer {self.scope!r} expired{learned_text(self.learned)}{late}"


@dataclasses.dataclass
class WorkerFailure:
    """Why one worker failed by itself (it was reaped, or it exited or died on its own).

    Attributes:
        rank: the worker's rank.
        pid: its process id.
        exitcode: its exit status (negative: killed by that signal), as ``multiprocessing`` reports it;
            None if it could not be read.
        reaped: whether a timer server reaped it (its timer expired).
        scope: the expired timer's scope, for a reaped worker.
        stack: where it was stuck (the all-thread stack dump), for a reaped worker that registered one.
        late_s: how late after the deadline the first signal was sent, for a reaped worker.
        child_reaped: a descendant of this worker that a timer server reaped (the likely reason it failed).
        learned: for a worker reaped at a learned deadline: that deadline and its figures.
    """

    rank: int
    pid: int
    exitcode: Optional[int]
    reaped: bool = False
    scope: Optional[str] = None
    stack: Optional[str] = None
    late_s: Optional[float] = None
    child_reaped: Optional[Reaped] = None
    learned: Optional[Dict[str, Any]] = None

    @property
    def signal(self) -> Optional[str]:
        """The signal that ended the worker (``"SIGKILL"``), or None for an exit."""
        code = self.exitcode
        return signal_name(-code) if code is not None and code < 0 else None

    def how(self) -> str:
        """How the process ended: ``killed by SIGKILL`` or ``exited with status 3``."""
        return exit_text(self.exitcode)

    def fate(self) -> str:
        """What became of it, without who: ``reaped: timer 'step' expired; killed by SIGKILL``."""
        if self.reaped:
            return f"reaped: timer {self.scope!r} expired{learned_text(self.learned)}; {self.how()}"
        child = self.child_reaped
        if child is not None:
            return f"{self.how()} after its child pid {child.pid} was reaped (timer {child.scope!r})"
        return self.how()

    def describe(self) -> str:
        """One line: who, how it ended, and for a reaped worker which timer."""
        if self.reaped:
            late = "" if self.late_s is None else f", signalled {self.late_s * 1000:.0f} ms after its deadline"
            expired = f"timer {self.scope!r} expired{learned_text(self.learned)}"
            return f"rank {self.rank} (pid {self.pid}) was reaped: {expired}{late}; {self.how()}"
        return f"rank {self.rank} (pid {self.pid}) {self.fate()}"

    def stuck_at(self) -> Optional[str]:
        """The innermost frame of the thread the stack dump was taken in, e.g. ``File "x.py", line 3 in f``."""
        if not self.stack:
            return None
        lines = self.stack.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), 0)
        for line in lines[start + 1 :]:
            if line.strip().startswith("File "):
                return line.strip()
        return None


@dataclasses.dataclass
class Attempt:
    """One start of the worker group.

    Attributes:
        number: 0 for the first start, then 1, 2, ... (``TORCHELASTIC_RESTART_COUNT``).
        pids: the workers' pids by rank.
        outcome: ``SUCCEEDED``, ``FAILED`` or ``INTERRUPTED``.
        failures: every worker that failed by itself (reaped, or exited or died on its own), by rank.
        seconds: how long the attempt ran.
        stopped: the workers the agent stopped (the group stop after a failure, or an
            interrupt), by rank, with their exit status.
        reaped: every process a timer server reaped in this attempt (workers and their descendants).
        timers_expired: how many timers of the group's processes expired.
        report: for a failed attempt, every rank's stack taken at the first expiry (or
            failure), grouped, with the likely culprit; None when the stacks could not be
            taken (a one-worker group that exited, or ``timer="off"``).
    """

    number: int
    pids: Dict[int, int]
    outcome: str
    failures: Dict[int, WorkerFailure]
    seconds: float
    stopped: Dict[int, Optional[int]] = dataclasses.field(default_factory=dict)
    reaped: List[Reaped] = dataclasses.field(default_factory=list)
    timers_expired: int = 0
    report: Optional[HangReport] = None


@dataclasses.dataclass
class RunResult:
    """What :meth:`LocalElasticAgent.run` returns (torch's fields, plus the attempts).

    Attributes:
        state: ``SUCCEEDED``, ``FAILED`` (after ``max_restarts`` restarts) or ``INTERRUPTED``.
        return_values: each rank's return value, for function workers that succeeded.
        failures: the failed workers of the last attempt, by rank.
        attempts: every start of the group, in order.
        statistics: each scope's figures over the whole run (every rank and attempt), as
            :meth:`hangwatch.ScopeStatistics.figures` gives them; empty when statistics are off.
    """

    state: str
    return_values: Dict[int, Any]
    failures: Dict[int, WorkerFailure]
    attempts: List[Attempt]
    statistics: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)

    def is_failed(self) -> bool:
        """Whether the run did not succeed."""
        return self.state != SUCCEEDED

    @property
    def restarts(self) -> int:
        """How many times the group was started again."""
        return max(0, len(self.attempts) - 1)

    @property
    def reports(self) -> List[HangReport]:
        """The hang reports of the failed attempts, in order."""
        return [a.report for a in self.attempts if a.report is not None]
