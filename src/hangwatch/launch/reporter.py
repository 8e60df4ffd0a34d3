"""The launcher's own lines on stderr: each attempt's outcome, hang reports, refused timers, the summary.

Both engines print through it: hangwatch's single-node agent and torch's elastic engine
(:mod:`hangwatch.launch.elastic`, whose node watch reports each worker group of its node).
"""

from __future__ import annotations

import threading
from typing import Set, TextIO

from ..agent import FAILED, SUCCEEDED, Attempt, RunResult
from ..agent.report import LAUNCH_FRAMES, HangReport
from ..events import Event
from ..triage import ranks_text

__all__ = ["Reporter", "counts", "plural"]


class Reporter:
    """Writes the launcher's own lines (attempts, hang reports, refused timers, the summary) to stderr."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self._lock = threading.Lock()
        self._refused: Set[int] = set()

    def say(self, text: str) -> None:
        """One line, ``hangwatch: `` first."""
        with self._lock:
            self.out.write(f"hangwatch: {text}\n")
            self.out.flush()

    def event(self, event: Event) -> None:
        """From the timer servers' threads: a process whose timers are refused is named once."""
        reason = str(event.details.get("reason", ""))
        if event.name != "bad request" or not ("(allowed_pids)" in reason or "(children_only)" in reason):
            return
        pid = event.worker
        with self._lock:
            if pid in self._refused:
                return
            self._refused.add(pid)
        self.say(
            f"pid {pid} is not one of this run's workers nor a descendant of one: its timer "
            f"{event.scope!r} is ignored (was it started outside the run, or did its parent exit?)"
        )

    def attempt(self, attempt: Attempt) -> None:
        """An attempt of the single-node agent as it ends: its outcome, or its hang report and counts."""
        label = f"attempt {attempt.number + 1} of {self.total}"
        if attempt.outcome == SUCCEEDED:
            self.say(f"{label}: all {len(attempt.pids)} workers finished ({attempt.seconds:.1f} s)")
            return
        if attempt.outcome != FAILED:
            self.say(f"{label}: interrupted; every worker was stopped")
            return
        report = attempt.report
        if report is not None:
            self.hang_report(f"{label} failed: ", report)
        else:
            for failure in attempt.failures.values():
                self.say(f"{label}: {failure.describe()}")
                stuck = failure.stuck_at()
                if stuck:
                    self.say(f"  stuck at: {stuck}")
                if failure.stack:
                    with self._lock:
                        for line in failure.stack.rstrip().splitlines():
                            if not any(noise in line for noise in LAUNCH_FRAMES):  # how the worker was started
                                self.out.write(f"    {line}\n")
        self.say(f"  {counts(attempt)}")
        if attempt.number + 1 < self.total:
            self.say(f"stopping the group and starting it again (restart {attempt.number + 1} of {self.total - 1})")

    def hang_report(self, lead: str, report: HangReport) -> None:
        """Print a hang report, its first line after ``lead``."""
        lines = report.render()
        with self._lock:
            self.out.write(f"hangwatch: {lead}{lines[0]}\n")
            for line in lines[1:]:
                self.out.write(line + "\n" if line.startswith("    ") else f"hangwatch: {line}\n")
            self.out.flush()

    def summary(self, result: RunResult, seconds: float) -> None:
        """The run's last lines: how it ended, and each failed attempt's likely cause."""
        workers = sum(1 for a in result.attempts for r in a.reaped if not r.child)
        children = sum(1 for a in result.attempts for r in a.reaped if r.child)
        tried = f"{len(result.attempts)} attempt{'s' if len(result.attempts) != 1 else ''}"
        what = {SUCCEEDED: "succeeded", FAILED: "failed"}.get(result.state, "was interrupted")
        extra = f"; {plural(workers, 'worker', 'workers')} reaped" if workers else ""
        if children:
            extra += f"; {plural(children, 'worker child', 'worker children')} reaped"
        self.say(f"the job {what} after {tried} in {seconds:.1f} s{extra}")
        for attempt in result.attempts:
            report = attempt.report
            if report is not None and report.culprits:
                culprit = report.ranks[report.culprits[0]]
                user = None if culprit.place is None else culprit.place.user
                place = "" if user is None else f" at {user.short()}"
                self.say(
                    f"  attempt {attempt.number + 1}: likely caused by {ranks_text(report.culprits)}{place} "
                    f"(confidence: {report.verdict.confidence})"
                )


def plural(count: int, one: str, many: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{count} {one if count == 1 else many}"


def counts(attempt: Attempt) -> str:
    """``4 timers expired; 3 workers reaped, 1 stopped by the group stop``."""
    parts = [plural(attempt.timers_expired, "timer expired", "timers expired")]
    workers = [r for r in attempt.reaped if not r.child]
    children = [r for r in attempt.reaped if r.child]
    counts = [plural(len(workers), "worker reaped", "workers reaped")]
    if children:
        counts.append(plural(len(children), "worker's child reaped", "workers' children reaped"))
    failed = [f for f in attempt.failures.values() if not f.reaped]
    if failed:
        counts.append(plural(len(failed), "worker failed by itself", "workers failed by themselves"))
    counts.append(f"{len(attempt.stopped)} stopped by the group stop")
    return f"{'; '.join(parts)}; {', '.join(counts)}"
