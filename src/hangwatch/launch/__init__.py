"""Launching a job: the ``hangwatch`` command, on one node or many.

One concept per module:

- :mod:`~hangwatch.launch.cli`: the command's entry point (``hangwatch run``, ``hangwatch demo``);
- :mod:`~hangwatch.launch.options`: its options, and which engine a run goes to;
- :mod:`~hangwatch.launch.single`: one node on hangwatch's own agent (:mod:`hangwatch.agent`), no torch;
- :mod:`~hangwatch.launch.elastic`: many nodes on torch's elastic engine, with hangwatch's servers;
- :mod:`~hangwatch.launch.node`: one node's worker groups under torch's engine: evidence and reports;
- :mod:`~hangwatch.launch.exchange`: the nodes share their ranks' stacks through the rendezvous store;
- :mod:`~hangwatch.launch.reporter`: the launcher's own lines;
- :mod:`~hangwatch.launch.demo`: ``hangwatch demo``.

What runs in each worker before the user's code is :mod:`hangwatch._bootstrap`; what stops a
run's leftovers when the launcher is killed is :mod:`hangwatch._keeper` (with the run's
cgroup, :mod:`hangwatch._cgroup`).
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
