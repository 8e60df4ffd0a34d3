"""The launcher's own lines on stderr: each attempt's outcome, hang reports, refused timers, the summary.

Both engines print through it: hangwatch's single-node agent and torch's elastic engine
(:mod:`hangwatch.launch.elastic`, whose node watch reports each worker group of its node).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Set, TextIO

from ..agent import FAILED, SUCCEEDED, Attempt, RunResult
from ..agent.report import LAUNCH_FRAMES, HangReport
from ..events import Event
from ..learn import Learning, basis_text, seconds_text
from ..triage import ranks_text

__all__ = ["Reporter", "counts", "plural", "statistics_lines"]


class Reporter:
    """Writes the launcher's own lines (attempts, hang reports, refused timers, the summary) to stderr."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self._lock = threading.Lock()
        self._refused: Set[int] = set()
        self._near: Set[str] = set()  # scopes whose near miss was told

    def say(self, text: str) -> None:
        """One line, ``hangwatch: `` first."""
        with self._lock:
            self.out.write(f"hangwatch: {text}\n")
            self.out.flush()

    def learning(self, learning: Optional[Learning], timeouts_file: Optional[str]) -> None:
        """At the start of a run that learns its timeouts: how (and from which file, if any)."""
        if learning is None:
            return
        basis = (
            "the slowest block seen" if learning.quantile >= 1 else f"the p{learning.quantile * 100:g} of the blocks"
        )
        self.say(
            f"learning timeouts: after {learning.warmup:,} blocks of a scope, its blocks get "
            f"min(after, max({seconds_text(learning.floor)}, {learning.factor:g} x {basis}))"
            + (f"; figures carried in {timeouts_file}" if timeouts_file else "")
        )

    def event(self, event: Event) -> None:
        """From the timer servers' threads: near misses (once per scope), learned deadlines, refused processes."""
        if event.name == "near miss":
            self._near_miss(event)
            return
        if event.name == "deadline learned":
            d = event.details
            floor = " (the floor)" if d.get("deadline_s") == d.get("floor_s") else ""
            self.say(
                f"scope {event.scope!r}: learned deadline {seconds_text(d.get('deadline_s'))}{floor}, from "
                f"{d.get('blocks', 0):,} blocks ({basis_text(d)}); its blocks asked "
                f"for {seconds_text(d.get('after_s'))}"
            )
            return
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

    def _near_miss(self, event: Event) -> None:
        scope = str(event.scope)
        with self._lock:
            if scope in self._near:
                return
            self._near.add(scope)
        d = event.details
        rank = f" (rank {d['rank']})" if "rank" in d else ""
        budget = "learned deadline" if "learned" in d else "timeout"
        self.say(
            f"near miss: a block of {scope!r}{rank} took {seconds_text(d.get('duration_s'))} of its "
            f"{seconds_text(d.get('timeout_s'))} {budget} ({float(d.get('used', 0)) * 100:.0f}%); if that is "
            f"normal for it, give it more time before a kill does it for you (told once per scope)"
        )

    def attempt(self, attempt: Attempt) -> None:
        """An attempt of the single-node agent as it ends: its outcome, or its hang report and counts."""
        label = f"attempt {attempt.number + 1} of {self.total}"
        if attempt.outcome == SUCCEEDED:
            n = len(attempt.pids)
            who = "the worker finished" if n == 1 else f"all {n} workers finished"
            self.say(f"{label}: {who} ({attempt.seconds:.1f} s)")
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
        self.statistics(result.statistics)

    def statistics(self, figures: Dict[str, Dict[str, Any]], where: str = "every rank, every attempt") -> None:
        """The per-scope table at the end of a run."""
        lines = statistics_lines(figures)
        if not lines:
            return
        with self._lock:
            self.out.write(f"hangwatch: timers by scope ({where}):\n")
            for line in lines:
                self.out.write(f"hangwatch:   {line}\n")
            self.out.flush()


_MAX_SCOPES_SHOWN = 20


def statistics_lines(figures: Dict[str, Dict[str, Any]]) -> List[str]:
    """The end-of-run table: one line per scope (the busiest first, at most 20), columns aligned."""
    if not figures:
        return []
    learning = any("learned_s" in f for f in figures.values())
    head = ["scope", "blocks", "p50", "p99", "max", "timeout", "closest call", "expired"]
    if learning:
        head.append("learned deadline")
    busiest = sorted(figures.items(), key=lambda item: (-item[1].get("blocks", 0), item[0]))
    rows = [head]
    for scope, f in busiest[:_MAX_SCOPES_SHOWN]:
        shown = scope if len(scope) <= 40 else "..." + scope[-37:]
        closest = f.get("closest_call")
        row = [
            shown,
            f"{f.get('blocks', 0):,}",
            seconds_text(f.get("p50_s")),
            seconds_text(f.get("p99_s")),
            seconds_text(f.get("max_s")),
            seconds_text(f.get("timeout_s")),
            "-" if closest is None else f"{closest * 100:.1f}%",
            str(f.get("expired", 0)),
        ]
        if learning:
            found = f.get("learned")
            if found:
                floor = "the floor; " if found["deadline_s"] == found["floor_s"] else ""
                row.append(f"{seconds_text(found['deadline_s'])} ({floor}{basis_text(found)})")
            elif f.get("learnable") is False:
                row.append("off (learn=False)")
            else:
                row.append("not yet (warm-up)")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]
    if len(busiest) > _MAX_SCOPES_SHOWN:
        lines.append(f"... and {len(busiest) - _MAX_SCOPES_SHOWN} more scopes (all of them in the statistics file)")
    return lines


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
