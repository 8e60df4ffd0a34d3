"""`hangwatch run` and deadlines: per-scope statistics at the end, near misses, learned timeouts, their files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

EXAMPLE = str(Path(__file__).parent.parent / "examples" / "learned_deadlines.py")
HANGWATCH = [sys.executable, "-m", "hangwatch"]


def run(args: List[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HANGWATCH, *args], capture_output=True, text=True, timeout=timeout)


def test_a_hang_is_caught_at_the_learned_deadline_and_the_run_says_so(tmp_path: Path) -> None:
    """The README's worked example, scaled down: steps of 20 ms under after=600, floor 2 s, warm-up 30."""
    events = tmp_path / "events.jsonl"
    learned = tmp_path / "learned.json"
    options = ["--max-restarts", "1", "--learn-timeouts", "--timeout-floor", "2", "--timeout-warmup", "30"]
    job = [EXAMPLE, "--steps", "120", "--step", "0.02", "--hang-at", "100"]
    started = time.monotonic()
    done = run(["run", *options, "--events", str(events), "--timeouts-file", str(learned), *job])
    took = time.monotonic() - started
    out = done.stderr
    assert done.returncode == 0, out
    assert took < 60, "the hang was not caught at its learned deadline (its after was 600 s)"
    assert "learning timeouts: after 30 blocks of a scope" in out
    assert "scope 'train_step': learned deadline 2 s (the floor)" in out
    assert "expired at its learned deadline of 2 s (its after: 600 s)" in out
    assert "likely cause: rank 0" in out and "learned_deadlines.py:31 in train_step" in out
    table = out[out.index("timers by scope") :]
    assert "learned deadline" in table and "train_step" in table and "2 s (the floor; 3 x max" in table
    # The figures: beside the events, and in the timeouts file.
    figures = json.loads((tmp_path / "events.statistics.json").read_text())["scopes"]["train_step"]
    assert figures["blocks"] >= 120 + 100 - 50 and figures["expired"] == 1 and figures["learned_s"] == 2
    assert json.loads(learned.read_text())["scopes"]["train_step"] == figures
    names = [json.loads(line)["name"] for line in events.read_text().splitlines()]
    assert "deadline learned" in names and "timer expired" in names
    expired = next(json.loads(line) for line in events.read_text().splitlines() if '"timer expired"' in line)
    assert expired["details"]["learned"]["deadline_s"] == 2

    # A later run starts from the file: the deadline holds from the first block (no warm-up here).
    again = run(["run", *options, "--timeouts-file", str(learned), EXAMPLE, "--steps", "10", "--step", "0.02"])
    assert again.returncode == 0, again.stderr
    assert f"from {figures['blocks']} blocks" in again.stderr.split("[0]")[0]  # said before the first step ran


def test_statistics_are_kept_by_default_and_near_misses_told_once(tmp_path: Path) -> None:
    """Without any option: the end-of-run table; a scope that comes close to its timeout is named once."""
    script = tmp_path / "close.py"
    script.write_text(
        "import time, hangwatch\n"
        "for _ in range(3):\n"
        "    with hangwatch.expires(after=0.5, scope='close call'):\n"
        "        time.sleep(0.45)\n"
        "for _ in range(50):\n"
        "    with hangwatch.expires(after=30, scope='fine'):\n"
        "        pass\n"
    )
    done = run(["run", str(script)])
    assert done.returncode == 0, done.stderr
    out = done.stderr
    assert out.count("near miss: a block of 'close call'") == 1
    assert "of its 0.5 s timeout" in out
    table = out[out.index("timers by scope") :]
    assert "close call" in table and "fine" in table and " 50 " in table
    quiet = run(["run", "--no-statistics", str(script)])
    assert quiet.returncode == 0 and "timers by scope" not in quiet.stderr and "near miss" not in quiet.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--timeout-floor", "5"], "--timeout-floor set how timeouts are learned: add --learn-timeouts"),
        (["--learn-timeouts", "--timeout-factor", "0.5"], "--timeout-factor: factor must be a finite number >= 1"),
        (["--learn-timeouts", "--timeout-quantile", "2"], "--timeout-quantile: quantile must be a number in [0.5, 1]"),
        (["--learn-timeouts", "--timeout-floor", "0"], "must be a number of seconds in (0,"),
        (["--learn-timeouts", "--no-statistics"], "leave out --no-statistics"),
        (["--statistics", "/proc/no/such/dir/s.json"], "does not exist"),
    ],
)
def test_bad_deadline_options_fail_up_front(tmp_path: Path, options: List[str], message: str) -> None:
    """Each bad option: exit status 2, one line naming it, nothing started."""
    script = tmp_path / "ok.py"
    script.write_text("print('ran')\n")
    done = run(["run", *options, str(script)], timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr and "ran" not in done.stdout


def test_a_timeouts_file_that_is_not_one_is_refused(tmp_path: Path) -> None:
    """A file of something else is not overwritten: the run does not start, and says why."""
    bad = tmp_path / "notes.json"
    bad.write_text('{"my": "notes"}')
    script = tmp_path / "ok.py"
    script.write_text("print('ran')\n")
    done = run(["run", "--learn-timeouts", "--timeouts-file", str(bad), str(script)], timeout=60)
    assert done.returncode == 2 and "is not a file of hangwatch scope statistics" in done.stderr
    assert bad.read_text() == '{"my": "notes"}'
