"""Hostile pids and forced pid reuse, inside a private PID namespace where nothing else can be hit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest


def _namespace_problem() -> str:
    """Why these tests cannot run here, or "" if they can."""
    if not sys.platform.startswith("linux"):
        return "PID namespaces are Linux-only"
    if os.geteuid() != 0:
        return "a private PID namespace needs root (unshare --pid)"
    if shutil.which("unshare") is None:
        return "the unshare tool (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare --pid failed here: {probe.stderr.decode(errors='replace').strip()}"
    return ""


_PROBLEM = _namespace_problem()
pytestmark = pytest.mark.skipif(bool(_PROBLEM), reason=_PROBLEM or "runs")


def run_scenario(name: str, tmp_path: Path) -> Dict[str, Any]:
    script = Path(__file__).with_name("_pidns.py")
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script), name, str(tmp_path)],
        capture_output=True,
        timeout=120,
        text=True,
    )
    assert done.returncode == 0, f"scenario {name} failed:\n{done.stdout}\n{done.stderr}"
    result: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_hostile_pids_are_refused_and_the_server_keeps_serving(tmp_path: Path) -> None:
    """-1, 0, 1, the server itself, process groups and absent pids: nothing is signalled; a real worker still is."""
    result = run_scenario("hostile_pids", tmp_path)
    assert result["server_pid"] == 1
    assert all(result["bystanders_alive"])
    assert result["signalled"] == [result["worker"]]
    assert result["worker_signal"] == signal.SIGKILL
    refused = result["refused"]
    assert sum("must be > 1" in r for r in refused) == 12  # -1, 0, 1 (the server itself), process groups
    assert any("not one of this server's workers" in r for r in refused)
    assert result["never_running"] == [4_000_000]  # an absent pid: not running, never signalled
    assert any("out of range" in r for r in refused)  # 2**31 - 1: beyond any pid_max


def test_newcomer_with_a_recycled_pid_survives_the_old_deadline(tmp_path: Path) -> None:
    """The worker exits holding a timer; a new process gets its pid; the old deadline passes harmlessly."""
    result = run_scenario("pid_reuse", tmp_path)
    assert result["newcomer"] == result["old"]
    assert result["newcomer_alive"]
    assert result["signalled"] == []


def test_identity_tells_a_newcomer_from_the_worker_whose_request_it_inherits(tmp_path: Path) -> None:
    """A request read after its worker died and its pid was reused pins nothing (hangwatch clients say who they are)."""
    result = run_scenario("pin_race", tmp_path)
    ours = result["hangwatch"]
    assert ours["reused"]
    assert ours["newcomer_status"] is None  # alive
    assert any("identities differ" in r for r in ours["exited_events"])
    # The control: a torch-style request carries no start time, so the newcomer inherits the deadline.
    theirs = result["torch"]
    assert theirs["reused"]
    assert theirs["newcomer_status"] == signal.SIGKILL


def test_keeper_sweep_kills_the_runs_leftovers_and_spares_a_reused_group_number(tmp_path: Path) -> None:
    """What a SIGKILLed agent's keeper kills: its groups' members and processes marked with the run's token;
    never the new holder of a group number that was reused, nor anything unmarked."""
    found = run_scenario("keeper_sweep", tmp_path)
    assert found["reused"], "could not force pid reuse"
    assert found["killed"] == found["expected"], found
    assert found["spared"] == [None, None]


def test_the_group_stop_never_signals_a_reused_group_number(tmp_path: Path) -> None:
    """A worker collected early gives its number to a newcomer leading its own group: the group stop spares it."""
    result = run_scenario("reused_group", tmp_path)
    assert result["reused"], "the scenario could not make the newcomer take the worker's pid"
    assert result["newcomer_alive"]
    assert result["busy"] == -signal.SIGTERM
