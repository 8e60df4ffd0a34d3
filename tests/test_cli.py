"""The `hangwatch` command's first hour: usage errors are one clear line and exit 2, help reads cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

import hangwatch

HANGWATCH = [sys.executable, "-m", "hangwatch"]


def run(args: List[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HANGWATCH, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "ok.py"
    path.write_text("print('ran')\n")
    return str(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--stop-grace", "-5"], "must be a number of seconds in [0, 3600] (got -5)"),
        (["--stop-grace", "nan"], "must be a number of seconds in [0, 3600] (got nan)"),
        (["--stop-grace", "99999"], "must be a number of seconds in [0, 3600] (got 99999)"),
        (["--monitor-interval", "0"], "must be a number of seconds in (0, 3600] (got 0)"),
        (["--max-restarts", "-1"], "must be >= 0 (got -1)"),
        (["--native-timeout", "x"], "must be a number of seconds (got 'x')"),
        (["--reap-policy", ""], "the reap policy is empty"),
        (["--reap-policy", "TERM,1,2"], "one grace period"),
        (["--events", "/proc/no/such/dir/events.jsonl"], "events.jsonl"),
    ],
)
def test_bad_options_fail_up_front_with_one_line(script: str, options: List[str], message: str) -> None:
    """Each bad option: exit status 2, one line saying what is wrong, no traceback, nothing started."""
    done = run(["run", *options, script])
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert options[0].strip("-").split("-")[0] in done.stderr
    assert "ran" not in done.stdout


def test_run_without_a_target_says_what_is_missing() -> None:
    """`hangwatch run` alone says to name the script, not argparse's internal names."""
    done = run(["run"])
    assert done.returncode == 2
    assert "say what to run" in done.stderr and "target_args" not in done.stderr


def test_no_command_prints_help() -> None:
    """`hangwatch` (or `python -m hangwatch`) with no command prints the help and exits 2."""
    done = run([])
    assert done.returncode == 2
    assert "usage: hangwatch" in done.stderr and "Catch stuck worker processes" in done.stderr


def test_version() -> None:
    """`hangwatch --version` prints the version."""
    done = run(["--version"])
    assert done.returncode == 0 and done.stdout.strip() == f"hangwatch {hangwatch.__version__}"


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["demo", "--help"]])
def test_help_has_no_raw_markup(args: List[str]) -> None:
    """The help texts are plain text (no reStructuredText backquotes)."""
    done = run(args)
    assert done.returncode == 0 and "``" not in done.stdout and done.stdout.startswith("usage: hangwatch")
