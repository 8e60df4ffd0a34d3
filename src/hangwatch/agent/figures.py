"""A run's per-scope figures and learned deadlines: one table for every server and attempt, and its files.

The agent (one node) and the multi-node launcher (each node) make one
:class:`~hangwatch.ScopeStatistics` per run and hand it to all their timer servers, so
what the FIFO and shared-memory servers measure adds up, and what was learned survives
a restart of the worker group. Two files, both optional:

- the statistics file: this run's figures (of every rank: on many nodes, those the other
  nodes shared too), written after every attempt and at the end;
- the timeouts file: figures carried across runs: read at the start when it exists (a
  run that learns has its deadlines from its first block), written back after every
  attempt with this run's blocks added.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Union

from ..learn import LearnedDeadline, Learning, ScopeStatistics, statistics_table

__all__ = ["RunFigures", "check_figure_files", "statistics_path_for"]

logger = logging.getLogger("hangwatch.agent")


def statistics_path_for(events_file: str) -> str:
    """Where the statistics go beside an events file: ``run/events.jsonl`` -> ``run/events.statistics.json``."""
    stem, extension = os.path.splitext(events_file)
    return (stem if extension else events_file) + ".statistics.json"


def _check_writable(path: str, what: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"the {what} {path}: its directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the {what} {path}: its directory {folder} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"the {what} {path} is a directory")


def check_figure_files(statistics_file: Optional[str], timeouts_file: Optional[str]) -> None:
    """Before a run starts: each file can be written, and a timeouts file that exists can be read.

    Raises:
        ValueError: what is wrong with which file.
    """
    if statistics_file is not None:
        _check_writable(statistics_file, "statistics file")
    if timeouts_file is not None:
        _check_writable(timeouts_file, "timeouts file")
        if os.path.exists(timeouts_file):
            try:
                ScopeStatistics().load(timeouts_file)
            except OSError as exc:
                raise ValueError(f"cannot read the timeouts file {timeouts_file}: {exc.strerror or exc}") from None


class RunFigures:
    """The run's statistics table (None when statistics are off) and its two files.

    Args:
        statistics: keep per-scope figures: True, or a table of the caller's.
        learn: learn deadlines (implies statistics).
        statistics_file: where this run's figures are written (after every attempt).
        timeouts_file: figures carried across runs: loaded by :meth:`load`, written by :meth:`save`.
        on_learned: told when a scope gets its first learned deadline (see :class:`ScopeStatistics`).

    Raises:
        TypeError: a bad ``statistics`` or ``learn``.
        ValueError: ``learn`` disagrees with a given table's learning.
    """

    def __init__(
        self,
        statistics: Union[bool, ScopeStatistics],
        learn: Optional[Learning],
        statistics_file: Optional[str] = None,
        timeouts_file: Optional[str] = None,
        on_learned: Optional[Callable[[str, LearnedDeadline, float], None]] = None,
    ) -> None:
        files = timeouts_file is not None or statistics_file is not None
        self.table = statistics_table(statistics, learn, wanted=files, on_learned=on_learned)
        self.statistics_file = statistics_file
        self.timeouts_file = timeouts_file

    def load(self) -> int:
        """Add the timeouts file's figures to the table (when it exists); how many scopes it held.

        Raises:
            ValueError: the file is not saved statistics.
        """
        if self.table is None or self.timeouts_file is None or not os.path.exists(self.timeouts_file):
            return 0
        return self.table.load(self.timeouts_file)

    def save(self) -> Optional[str]:
        """Write both files; None, or what could not be written (the run goes on)."""
        if self.table is None:
            return None
        problems = []
        for path, loaded in ((self.statistics_file, False), (self.timeouts_file, True)):
            if path is None:
                continue
            try:
                self.table.save(path, loaded=loaded)
            except OSError as exc:
                logger.warning("could not write the figures to %s: %s", path, exc)
                problems.append(f"could not write {path}: {exc.strerror or exc}")
        return "; ".join(problems) or None

    def figures(self) -> Dict[str, Dict[str, Any]]:
        """Each scope's figures of this run (every rank; empty when statistics are off), learned deadlines included."""
        return {} if self.table is None else self.table.figures(loaded=False)
