"""The `hangwatch` command's first hour: usage errors are one clear line and exit 2, help reads cleanly."""

from __future__ import annotations

import os
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
        (["--nnodes", "0"], "needs 0 < MIN <= MAX (got '0')"),
        (["--nnodes", "2:x"], "must be a number of nodes N or a range MIN:MAX (got '2:x')"),
        (["--master-port", "70000"], "must be a port number in [0, 65535] (got 70000)"),
        (["--node-rank", "-1"], "must be >= 0 (got -1)"),
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


def test_one_node_gives_the_workers_what_torchrun_gives(tmp_path: Path) -> None:
    """MASTER_ADDR/MASTER_PORT from the launcher's environment, OMP_NUM_THREADS=1 with torchrun's notice,
    sys.argv[0] as typed and __file__ absolute, each line prefixed with the rank."""
    script = tmp_path / "show.py"
    script.write_text(
        "import os, sys\n"
        "print('|'.join([sys.argv[0], __file__, os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'],"
        " os.environ['OMP_NUM_THREADS'], os.environ['RANK']]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(MASTER_ADDR="127.0.0.7", MASTER_PORT="29876")
    done = subprocess.run(
        [*HANGWATCH, "run", "--nproc-per-node", "2", "show.py"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "Setting OMP_NUM_THREADS environment variable for each process to be 1" in done.stderr
    for rank in (0, 1):
        assert f"[{rank}] show.py|{script}|127.0.0.7|29876|1|{rank}" in done.stdout.splitlines(), done.stdout


def test_a_bad_master_port_in_the_environment_is_a_usage_error(script: str) -> None:
    env = {**os.environ, "MASTER_PORT": "http"}
    done = subprocess.run([*HANGWATCH, "run", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert "MASTER_PORT in the environment must be a port number" in done.stderr
