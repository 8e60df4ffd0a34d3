"""The ``hangwatch`` command: ``hangwatch run`` (a torchrun-style launcher) and ``hangwatch demo``.

``hangwatch run --nproc-per-node 4 train.py`` starts four workers with torchrun's
environment and timer servers, so ``hangwatch.expires`` works in ``train.py`` with no
set-up. When a worker fails or is reaped, the whole group is stopped and started again,
up to ``--max-restarts`` times. Each line a worker prints is prefixed with its rank. With
torchrun's multi-node options the job runs on torch's elastic engine, with hangwatch's
servers on every node. The exit status tells the outcomes apart: 0 succeeded, 1 failed
after every restart, 128+N interrupted by signal N (130 for Ctrl-C), 2 bad usage.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ..agent.figures import check_figure_files, statistics_path_for
from ..events import JsonLinesSink
from .demo import run_demo
from .options import EXIT_USAGE, check_target, engine_options, learning_for, parser
from .single import run_single, set_omp_threads, spec_for

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``hangwatch`` command; return its exit status."""
    top = parser()
    args = top.parse_args(argv)
    if args.command is None:
        top.print_help(sys.stderr)
        return EXIT_USAGE
    if not sys.platform.startswith("linux"):
        print("hangwatch: the launcher needs Linux (process groups, pidfds, PR_SET_PDEATHSIG)", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "demo":
        return run_demo(sys.stderr)
    problem = check_target(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.events is not None:
            JsonLinesSink(args.events).close()  # an unwritable events file fails now, not silently later
        args.learning = learning_for(args)
        if args.statistics_file is None and args.events is not None and args.keep_statistics:
            args.statistics_file = statistics_path_for(args.events)
        if not args.keep_statistics and (args.statistics_file or args.timeouts_file):
            raise ValueError("--statistics and --timeouts-file write the statistics: leave out --no-statistics")
        check_figure_files(args.statistics_file, args.timeouts_file)
        if engine_options(args):
            from .elastic import run_elastic

            return run_elastic(args, sys.stderr)
        spec = spec_for(args)
    except (ValueError, OSError) as exc:
        print(f"hangwatch run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    set_omp_threads(args.nproc_per_node, sys.stderr)
    return run_single(spec, args, sys.stderr)
