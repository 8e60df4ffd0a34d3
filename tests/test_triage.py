"""Who hung, who waited: the stack parsers and the classification, on stacks recorded from real hangs.

The files in tests/data/stacks were taken by hangwatch from real processes: a CPU DDP job
(gloo, 4 ranks) whose rank 1 slept inside its step while the others waited in backward()
(faulthandler dumps and pystack output of a bystander and of the culprit), and two ranks of
a plain ``dist.all_reduce`` (pystack output of a rank waiting in it and of one sleeping).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest

from hangwatch._stacks import Frame, ThreadStack, main_thread, parse_faulthandler, parse_pystack, short_function
from hangwatch.triage import COLLECTIVE, DATA, classify, is_library, place_of, ranks_text, user_frame

DATA_DIR = Path(__file__).parent / "data" / "stacks"


def recorded(name: str, kind: str = "pystack") -> List[ThreadStack]:
    """The threads of a recorded dump: ``NAME.faulthandler.txt``, or ``NAME.PID.pystack.txt`` (kind ``pystack``)."""
    if kind == "faulthandler":
        return parse_faulthandler((DATA_DIR / f"{name}.faulthandler.txt").read_text())
    (path,) = DATA_DIR.glob(f"{name}.*.pystack.txt")
    pid = int(path.name.split(".")[1])
    return parse_pystack(path.read_text(), pid)


def dump(*threads: Tuple[str, Sequence[Tuple[str, int, str]]]) -> List[ThreadStack]:
    """A faulthandler dump of these threads (the last is the main thread), each frame (file, line, function)."""
    text = ""
    for i, (ident, frames) in enumerate(threads):
        head = "Current thread" if i == len(threads) - 1 else "Thread"
        text += f"{head} {ident} (most recent call first):\n"
        text += "".join(f'  File "{f}", line {n} in {fn}\n' for f, n, fn in frames) + "\n"
    return parse_faulthandler(text)


def main_at(file: str, line: int, func: str, *callers: Tuple[str, int, str]) -> List[ThreadStack]:
    return dump(("0x01", [(file, line, func), *callers]))


TRAIN = "/home/user/job/train.py"
LIB = "/usr/lib/python3/site-packages/lib/io.py"


class TestParsers:
    def test_faulthandler_dump_lists_threads_with_the_main_thread_last(self) -> None:
        """Frames come innermost first; only the last thread listed is the main thread."""
        threads = dump(("0x02", [("/x/worker.py", 5, "loop")]), ("0x01", [(TRAIN, 44, "step"), (TRAIN, 60, "main")]))
        assert [t.main for t in threads] == [False, True]
        main = main_thread(threads)
        assert main is not None and main.ident == "0x01"
        assert [f.short() for f in main.frames] == ["train.py:44 in step", "train.py:60 in main"]

    def test_recorded_faulthandler_dump(self) -> None:
        """The DDP bystander's dump: one thread, innermost frame in torch's autograd, then the user's line."""
        (main,) = recorded("ddp_bystander", "faulthandler")
        assert main.main and main.frames[0].func == "_engine_run_backward" and main.frames[0].line == 979
        assert any(f.file == "train.py" and f.line == 26 for f in main.frames)

    def test_a_cut_or_odd_dump_keeps_what_it_holds(self) -> None:
        """Unknown lines, a truncation marker and a dump cut mid-line are skipped, never raised on."""
        text = (
            "Current thread 0x01 (most recent call first):\n"
            '  File "/a.py", line 3 in f\n  ...\n  File "/b.py", line ??? in g\n  File "/c.p'
        )
        (main,) = parse_faulthandler(text)
        assert [(f.file, f.line) for f in main.frames] == [("/a.py", 3), ("/b.py", 0)]
        assert parse_faulthandler("") == [] and parse_faulthandler("garbage\n") == []

    def test_recorded_pystack_output(self) -> None:
        """pystack: the main thread is the pid's; native frames are short names with their library."""
        threads = recorded("allreduce_bystander")
        main = main_thread(threads)
        assert main is not None and main.ident == "3655" and main.name == "python"
        natives = [f for f in main.frames if f.native]
        assert natives[0].library.endswith("libc.so.6")
        assert any(f.func == "c10d::Work::wait" and f.library.endswith("libtorch_cpu.so") for f in natives)
        assert main.python_frames[0].func == "all_reduce" and main.python_frames[0].file.endswith("distributed_c10d.py")
        gloo = [t for t in threads if t.name == "pt_gloo_runloop"]
        assert any(f.func == "gloo::allreduce" for t in gloo for f in t.frames)

    @pytest.mark.parametrize(
        ("raw", "short"),
        [
            ("c10d::Work::wait(std::chrono::duration<long, std::ratio<1l, 1000l> >)", "c10d::Work::wait"),
            ("gloo::(anonymous namespace)::allreduce(gloo::detail::AllreduceOptionsImpl const&)", "gloo::allreduce"),
            ("pthread_cond_wait@@GLIBC_2.3.2", "pthread_cond_wait"),
            ("pymain_run_file (inlined)", "pymain_run_file"),
            ("foo() const", "foo"),
            ("???", "???"),
        ],
    )
    def test_native_names_are_shortened(self, raw: str, short: str) -> None:
        """Argument lists, symbol versions and markers are dropped from C/C++ names."""
        assert short_function(raw) == short


class TestUserFrame:
    def test_library_code_is_told_from_the_users(self) -> None:
        """site-packages, the standard library, hangwatch and frozen modules are library code; the job is not."""
        import os as os_module

        import hangwatch

        assert is_library("/venv/lib/python3.11/site-packages/torch/autograd/graph.py")
        assert is_library("/usr/lib/python3/dist-packages/numpy/core.py")
        assert is_library(os_module.__file__)
        assert is_library(hangwatch.__file__)
        assert is_library("<frozen runpy>")
        assert not is_library(TRAIN) and not is_library("train.py")

    def test_the_innermost_frame_of_the_users_code(self) -> None:
        """Skips library frames and native frames to the user's own."""
        frames = [Frame("wait", LIB, 9), Frame("pthread_cond_wait", "", native=True), Frame("step", TRAIN, 44)]
        found = user_frame(frames)
        assert found is not None and found.line == 44


class TestPlace:
    def test_a_bystander_in_ddp_backward_with_native_frames_waits_in_c10d(self) -> None:
        """pystack's frames show the wait under backward(): c10d's reducer, and gloo's all-reduce in its thread."""
        place = place_of(recorded("ddp_bystander"))
        assert place.kind == COLLECTIVE
        assert place.waits_in is not None and place.waits_in.func == "c10d::Reducer::finalize_backward"
        assert place.user is not None and (place.user.file, place.user.line) == ("train.py", 26)
        assert any(n.startswith("gloo::allreduce (libtorch_cpu.so) in thread pt_gloo_runloop") for n in place.busy)
        assert place.describe().startswith("waiting in c10d::Reducer::finalize_backward (libtorch_cpu.so)")
        assert place.describe().endswith("called from train.py:26 in main")

    def test_the_same_bystander_from_python_frames_alone_is_not_known_to_wait(self) -> None:
        """Without native frames DDP's wait is inside backward(): the place is that line, no collective named."""
        place = place_of(recorded("ddp_bystander", "faulthandler"))
        assert place.kind is None
        assert place.frame is not None and place.frame.func == "_engine_run_backward"
        assert place.describe() == "at train.py:26 in main (in graph.py:979 in _engine_run_backward)"

    def test_a_users_own_barrier_counts_as_a_collective_called_from_its_caller(self) -> None:
        """A function named like a collective waits in it; 'called from' is the user's frame outside it."""
        place = place_of(main_at(TRAIN, 32, "all_reduce", (TRAIN, 43, "main")))
        assert place.kind == COLLECTIVE
        assert place.describe() == "waiting in all_reduce (train.py:32), called from train.py:43 in main"

    def test_ddp_forward_waits_in_a_collective(self) -> None:
        """DDP's own Python code (its forward's broadcast) blocks only on collectives."""
        ddp = "/v/lib/python3.11/site-packages/torch/nn/parallel/distributed.py"
        place = place_of(main_at(ddp, 1775, "_pre_forward", (ddp, 1850, "forward"), (TRAIN, 14, "main")))
        assert place.kind == COLLECTIVE
        assert place.describe() == "waiting in _pre_forward (distributed.py:1775), called from train.py:14 in main"

    def test_a_rank_waiting_for_its_dataloader(self) -> None:
        """Frames of torch.utils.data: waiting for a DataLoader worker, not in a collective."""
        place = place_of(
            main_at("/v/site-packages/torch/utils/data/dataloader.py", 1133, "_try_get_data", (TRAIN, 12, "main"))
        )
        assert place.kind == DATA and "DataLoader" in place.describe()


def _threads_of(*names: str, kind: str = "pystack") -> List[Optional[List[ThreadStack]]]:
    return [recorded(name, kind) for name in names]


class TestClassify:
    def test_ddp_hang_with_native_frames_names_the_rank_not_in_the_collective(self) -> None:
        """Three ranks wait in c10d under backward(), one sleeps in its step: that one, with high confidence."""
        ranks = dict(zip(range(4), _threads_of("ddp_bystander", "ddp_culprit", "ddp_bystander", "ddp_bystander")))
        verdict = classify(ranks)
        assert verdict.culprits == (1,) and verdict.confidence == "high"
        assert verdict.reason.startswith("ranks 0, 2 and 3 wait in c10d::Reducer::finalize_backward for the others")
        assert [g.ranks for g in verdict.groups] == [(0, 2, 3), (1,)]
        assert verdict.places[1].describe() == "at train.py:23 in main"

    def test_ddp_hang_from_python_frames_alone_names_the_odd_one_out(self) -> None:
        """No collective visible in Python frames: the rank outside the majority, with medium confidence."""
        fh = _threads_of("ddp_bystander", "ddp_culprit", kind="faulthandler")
        verdict = classify({0: fh[0], 1: fh[1], 2: fh[0], 3: fh[0]})
        assert verdict.culprits == (1,) and verdict.confidence == "medium"
        assert "the odd one out" in verdict.reason

    def test_whichever_timer_fired_first_does_not_matter(self) -> None:
        """The verdict depends on the stacks only: any rank order gives the same culprit."""
        fh = _threads_of("ddp_bystander", "ddp_culprit", kind="faulthandler")
        for culprit in range(4):
            ranks = {r: fh[1] if r == culprit else fh[0] for r in range(4)}
            assert classify(ranks).culprits == (culprit,)

    def test_two_ranks_one_in_all_reduce(self) -> None:
        """Two ranks: the one waiting in all_reduce accuses the other (no majority needed)."""
        verdict = classify(dict(zip(range(2), _threads_of("allreduce_bystander", "sleep_culprit"))))
        assert verdict.culprits == (1,) and verdict.confidence == "medium"
        assert verdict.places[0].kind == COLLECTIVE and verdict.places[1].kind is None

    def test_all_in_the_same_place_outside_a_collective(self) -> None:
        """Every rank at the same line: no culprit; the cause is something they share."""
        same = main_at(LIB, 9, "read", (TRAIN, 30, "load"))
        verdict = classify({0: same, 1: same, 2: same})
        assert verdict.culprits == () and verdict.confidence == "none"
        assert "every rank is at train.py:30 in load" in verdict.reason and "share" in verdict.reason

    def test_all_waiting_in_the_same_collective(self) -> None:
        """Every rank in the same collective: the rank they wait for is not among them."""
        same = main_at(TRAIN, 32, "all_reduce", (TRAIN, 43, "main"))
        verdict = classify({0: same, 1: same})
        assert verdict.culprits == () and "not among these" in verdict.reason

    def test_all_in_different_places(self) -> None:
        """No group stands out: no culprit, and the verdict says so."""
        verdict = classify({r: main_at(TRAIN, 10 + r, f"f{r}") for r in range(3)})
        assert verdict.culprits == () and verdict.confidence == "none"
        assert len(verdict.groups) == 3 and "no group stands out" in verdict.reason

    def test_mismatched_collectives(self) -> None:
        """Three ranks in all_reduce, one in broadcast: every rank waits, the odd collective stands out."""
        reduce = main_at(TRAIN, 40, "all_reduce", (TRAIN, 80, "main"))
        broadcast = main_at(TRAIN, 50, "broadcast", (TRAIN, 90, "main"))
        verdict = classify({0: reduce, 1: reduce, 2: broadcast, 3: reduce})
        assert verdict.culprits == (2,) and verdict.reason.startswith("wait in different collectives")

    def test_the_main_thread_decides(self) -> None:
        """A helper thread in a collective does not make the rank a waiter; its main thread's place counts."""
        helper_in_collective = dump(
            ("0x02", [("/v/site-packages/torch/distributed/distributed_c10d.py", 3252, "all_reduce")]),
            ("0x01", [(TRAIN, 44, "step"), (TRAIN, 60, "main")]),
        )
        waiter = main_at(
            "/v/site-packages/torch/distributed/distributed_c10d.py", 3252, "all_reduce", (TRAIN, 50, "main")
        )
        verdict = classify({0: waiter, 1: helper_in_collective, 2: waiter})
        assert verdict.culprits == (1,) and verdict.places[1].describe() == "at train.py:44 in step"

    def test_a_rank_that_ended_is_the_culprit(self) -> None:
        """A rank that exited on its own while the others ran: that rank, with high confidence."""
        waiter = main_at(TRAIN, 32, "all_reduce", (TRAIN, 43, "main"))
        verdict = classify({0: waiter, 1: None, 2: waiter}, ended={1: "exited with status 1"})
        assert verdict.culprits == (1,) and verdict.confidence == "high"
        assert verdict.reason.startswith("rank 1 exited with status 1") and verdict.unknown == ()

    def test_a_rank_that_finished_while_the_others_wait_in_a_collective(self) -> None:
        """Finished early while every other rank waits in a collective: it never entered it."""
        waiter = main_at(TRAIN, 32, "all_reduce", (TRAIN, 43, "main"))
        verdict = classify({0: waiter, 1: None, 2: waiter}, finished=[1])
        assert verdict.culprits == (1,) and verdict.confidence == "medium"
        elsewhere = main_at(TRAIN, 5, "load")
        assert classify({0: elsewhere, 1: None}, finished=[1]).culprits == (0,)

    def test_a_rank_without_a_stack_may_be_the_one(self) -> None:
        """Everyone with a stack in one place and one rank without: that rank, with low confidence."""
        same = main_at(TRAIN, 32, "all_reduce", (TRAIN, 43, "main"))
        verdict = classify({0: same, 1: same, 2: None})
        assert verdict.culprits == (2,) and verdict.confidence == "low" and verdict.unknown == (2,)

    def test_one_rank(self) -> None:
        """A one-rank job: that rank, wherever it is."""
        verdict = classify({0: main_at(TRAIN, 5, "load")})
        assert verdict.culprits == (0,) and verdict.confidence == "high"

    def test_ranks_text(self) -> None:
        """Rank lists read as English."""
        assert ranks_text([2]) == "rank 2"
        assert ranks_text([3, 0]) == "ranks 0 and 3"
        assert ranks_text([0, 2, 3]) == "ranks 0, 2 and 3"
