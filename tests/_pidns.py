"""Scenarios run as PID 1 of a private PID namespace (started by test_pidns.py with unshare).

Inside the namespace the only processes are this one and the children it forks, so a
bug that signals the wrong pid (even pid -1: "every process") can only hit them. Each
scenario prints one JSON object with its findings on its last line of output.

    unshare --pid --fork --mount-proc python _pidns.py SCENARIO DIRECTORY
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List

import hangwatch
from hangwatch import Event, FileTimerClient, FileTimerServer


def force_next_pid(pid: int) -> None:
    """Make the next fork in this namespace get ``pid`` (it must be free)."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))


def fork(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def sleeper(seconds: float) -> Callable[[], None]:
    return lambda: time.sleep(seconds)


def status(pid: int) -> Any:
    """None while the child runs; else the signal that ended it (0 for a normal exit)."""
    done, code = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        return None
    return os.WTERMSIG(code) if os.WIFSIGNALED(code) else 0


def write_lines(path: str, lines: List[Dict[str, Any]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for line in lines:
            os.write(fd, json.dumps(line).encode() + b"\n")
    finally:
        os.close(fd)


def line(pid: int, after: float, signum: int = 9, **extra: Any) -> Dict[str, Any]:
    return {
        "version": 1,
        "pid": pid,
        "scope_id": "s",
        "expiration_time": time.time() + after,
        "signal": signum,
        **extra,
    }


def stuck_worker(path: str) -> Callable[[], None]:
    def body() -> None:
        hangwatch.configure(FileTimerClient(path))
        with hangwatch.expires(after=0.2, scope="stuck"):
            time.sleep(30)

    return body


def reap_and_wait(pid: int, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = status(pid)
        if result is not None:
            return result
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def hostile_pids(directory: str) -> Dict[str, Any]:
    """Requests naming -1, 0, 1 (this process, init), process groups and absent pids; then an allow-list."""
    events: List[Event] = []
    path = os.path.join(directory, "hostile.fifo")
    server = FileTimerServer(path, max_interval=10, on_event=events.append)
    server.start()
    bystanders = [fork(sleeper(30)) for _ in range(3)]
    hostile = [-1, 0, 1, os.getpid(), -bystanders[0], -os.getpgrp(), 4_000_000, 2**31 - 1]
    write_lines(path, [line(pid, -1) for pid in hostile])
    write_lines(path, [line(pid, -1, signum=sig) for pid in (-1, 1) for sig in (15, 2, 19)])
    time.sleep(0.5)
    alive_after_hostile = [status(pid) is None for pid in bystanders]
    # An allow-list refuses even a real process that is not a worker.
    server.set_allowed_pids([])
    write_lines(path, [line(bystanders[1], -1)])
    time.sleep(0.3)
    server.set_allowed_pids(None)
    # The server still serves a genuine stuck worker.
    worker = fork(stuck_worker(path))
    worker_signal = reap_and_wait(worker)
    alive_at_end = [status(pid) is None for pid in bystanders]
    server.stop()
    for pid in bystanders:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {
        "server_pid": os.getpid(),
        "hostile": len(hostile) + 6,
        "refused": [e.details.get("reason", "") for e in events if e.name == "bad request"],
        "never_running": [e.worker for e in events if e.name == "worker exited"],
        "bystanders_alive": alive_after_hostile + alive_at_end,
        "worker": worker,
        "worker_signal": worker_signal,
        "signalled": [e.worker for e in events if e.name == "kill worker process"],
    }


def pid_reuse(directory: str) -> Dict[str, Any]:
    """A worker holding a timer exits; a newcomer gets its pid; the old deadline passes."""
    events: List[Event] = []
    path = os.path.join(directory, "reuse.fifo")
    server = FileTimerServer(path, max_interval=10, on_event=events.append)
    server.start()

    def holds_and_exits() -> None:
        FileTimerClient(path).acquire("held", time.time() + 0.5)

    old = fork(holds_and_exits)
    os.waitpid(old, 0)
    deadline = time.monotonic() + 5
    while not any(e.name == "worker exited" and e.worker == old for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    force_next_pid(old)
    newcomer = fork(sleeper(30))
    time.sleep(1.0)  # well past the old worker's deadline
    newcomer_status = status(newcomer)
    server.stop()
    if newcomer_status is None:
        os.kill(newcomer, signal.SIGKILL)
        os.waitpid(newcomer, 0)
    return {
        "old": old,
        "newcomer": newcomer,
        "newcomer_alive": newcomer_status is None,
        "exited_events": [e.details.get("reason", "") for e in events if e.name == "worker exited"],
        "signalled": [e.worker for e in events if e.name == "kill worker process"],
    }


def pin_race(directory: str) -> Dict[str, Any]:
    """The worker's request is still in the pipe when it exits and a newcomer takes its pid.

    The server pins when it reads the request, too late to tell by a pidfd alone: the start
    time the hangwatch client sent is what tells the newcomer apart. A torch-style line
    (no start time) written for the same pid shows what happens without it.
    """
    results: Dict[str, Any] = {}
    for kind in ("hangwatch", "torch"):
        events: List[Event] = []
        path = os.path.join(directory, f"race-{kind}.fifo")
        server = FileTimerServer(path, max_interval=10, on_event=events.append)  # created, not started

        def sends_and_exits(kind: str = kind, path: str = path) -> None:
            if kind == "hangwatch":
                FileTimerClient(path).acquire("raced", time.time() + 0.3)
            else:
                write_lines(path, [line(os.getpid(), 0.3)])

        old = fork(sends_and_exits)
        os.waitpid(old, 0)
        force_next_pid(old)
        newcomer = fork(sleeper(30))
        server.start()
        time.sleep(1.0)
        newcomer_status = status(newcomer)
        server.stop()
        if newcomer_status is None:
            os.kill(newcomer, signal.SIGKILL)
            os.waitpid(newcomer, 0)
        results[kind] = {
            "reused": newcomer == old,
            "newcomer_status": newcomer_status,
            "exited_events": [e.details.get("reason", "") for e in events if e.name == "worker exited"],
        }
    return results


def keeper_sweep(directory: str) -> Dict[str, Any]:
    """The keeper's sweep: a live group member and a marked escapee die; the holder of a reused group number,
    an unmarked bystander and this process (the sweep's caller stands for the keeper) are spared."""
    from hangwatch._keeper import TOKEN_VARIABLE, sweep
    from hangwatch._reaper import start_time

    token = "t0ken"

    def leader_with_member() -> None:
        os.setpgid(0, 0)
        if os.fork() == 0:  # a member of the group, left behind when the leader dies
            time.sleep(30)
            os._exit(0)
        time.sleep(30)

    group = fork(leader_with_member)
    time.sleep(0.2)
    members = [pid for pid in range(2, 400) if os.path.exists(f"/proc/{pid}") and pid != group and _pgid(pid) == group]
    old_group = fork(lambda: (os.setpgid(0, 0), time.sleep(30)))
    old_start = start_time(old_group)
    time.sleep(0.05)  # start times count clock ticks: the newcomer starts ticks later, as any real one would
    os.kill(old_group, signal.SIGKILL)
    os.waitpid(old_group, 0)
    force_next_pid(old_group)
    reused = fork(lambda: (os.setsid(), time.sleep(30)))  # an unrelated group now holds the number
    marked = os.fork()
    if marked == 0:
        os.setsid()  # left the session, but carries the token
        os.execve(
            sys.executable, [sys.executable, "-c", "import time; time.sleep(30)"], {**os.environ, TOKEN_VARIABLE: token}
        )
    bystander = fork(sleeper(30))
    time.sleep(0.5)
    killed = sweep(token, {group: start_time(group), old_group: old_start})
    result = {
        "reused": reused == old_group,
        "killed": sorted(killed),
        "expected": sorted([group, *members, marked]),
        "spared": [status(pid) for pid in (reused, bystander)],  # None: still running
    }
    for pid, running in zip((reused, bystander), result["spared"]):
        if running is None:
            os.kill(pid, signal.SIGKILL)
    return result


def _pgid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[2])


def reused_group(directory: str) -> Dict[str, Any]:
    """A worker is collected early (as multiprocessing does when it starts the next worker); a newcomer gets its
    number and leads a group of its own; then the group stop runs. Only the real workers may be signalled."""
    import subprocess

    from hangwatch.agent.workers import Worker, stop_group

    early = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    early_worker = Worker(0, early.pid, early)
    early.wait()  # collected: its pid and its (empty) group number are free again
    force_next_pid(early.pid)

    def lead_a_group() -> None:
        os.setsid()
        time.sleep(30)

    newcomer = fork(lead_a_group)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{newcomer}/stat", "rb") as f:
            if int(f.read().rsplit(b")", 1)[1].split()[2]) == newcomer:
                break
        time.sleep(0.01)
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    codes = stop_group([early_worker, Worker(1, busy.pid, busy)], set(), grace=1.0, subreaper=False)
    newcomer_alive = status(newcomer) is None
    os.kill(newcomer, signal.SIGKILL)
    os.waitpid(newcomer, 0)
    return {"reused": newcomer == early.pid, "newcomer_alive": newcomer_alive, "busy": codes[1]}


SCENARIOS = {
    "hostile_pids": hostile_pids,
    "pid_reuse": pid_reuse,
    "pin_race": pin_race,
    "keeper_sweep": keeper_sweep,
    "reused_group": reused_group,
}

if __name__ == "__main__":
    name, directory = sys.argv[1], sys.argv[2]
    if os.getpid() != 1:
        sys.exit("run me as PID 1 of a new PID namespace: unshare --pid --fork --mount-proc ...")
    print(json.dumps(SCENARIOS[name](directory)), flush=True)
