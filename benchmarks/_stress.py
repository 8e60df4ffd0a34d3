"""hangwatch's stress mode: the reliability scenarios of the test suite, at full size.

Run:  python -m benchmarks.stress            (full size: about an hour on 2 cores, most of it the fuzzer)
      python -m benchmarks.stress --quick    (a few minutes)

From a checkout (the fuzzing part runs tests/test_fuzz.py). Prints one summary table:
for each scenario and transport, the load held, the faults injected, the inputs tried,
the requests lost and the wrong kills; and writes it to benchmarks/results/stress.json.

1. storm: 64 processes x 100,000 blocks each (two threads per process, one block in
   ten nested), deadlines that never come. Lost: requests sent but not counted by the
   server (Local, FIFO), timers left active, client errors. Wrong kills: any reap.
2. kill: clients SIGKILLed at random moments while they and four survivors send; then
   the survivors get stuck. Lost: timers left active at the end, survivors not reaped.
   Wrong kills: reaps of anyone but the survivors.
3. fuzz: hypothesis on every transport's wire (tests/test_fuzz.py) to a million inputs.
   Wrong kills: pins or signals aimed outside the workers (the test fails on any).
4. orphans: the launcher SIGKILLed (and SIGINT, SIGTERM, success) with workers that
   started children in and out of their session. Wrong kills: none can be counted here;
   lost: processes left running.
5. hostile: four honest survivors churn blocks and then get stuck beside writers dying
   mid-line (FIFO), clients flooding the socket and flipping every slot, silent
   connections (shared memory), and workers frozen before their stack dump (every
   transport). Lost: survivors not reaped; wrong kills: reaps of anyone else (the frozen
   workers' own expired timers excepted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import hangwatch
from hangwatch.events import Event

ROOT = Path(__file__).resolve().parent.parent
TRANSPORTS = ("local", "fifo", "shm")


def _client(kind: str, address: Any) -> hangwatch.TimerClient:
    if kind == "local":
        return hangwatch.LocalTimerClient(address)
    if kind == "fifo":
        return hangwatch.FileTimerClient(address)
    return hangwatch.SharedMemoryTimerClient(address)


def _server(kind: str, address: Any, events: List[Event]) -> Any:
    if kind == "local":
        return hangwatch.LocalTimerServer(address, max_interval=10, on_event=events.append)
    if kind == "fifo":
        return hangwatch.FileTimerServer(address, on_event=events.append)
    return hangwatch.SharedMemoryTimerServer(address, on_event=events.append)


def _address(kind: str, ctx: Any, directory: str) -> Any:
    if kind == "local":
        return ctx.Queue()
    return os.path.join(directory, "timer.fifo" if kind == "fifo" else "timer.sock")


# ----------------------------------------------------------------- 1. storm


def _storm_client(kind: str, address: Any, blocks: int, go: Any, report: Any) -> None:
    hangwatch.configure(_client(kind, address))
    sent = [0, 0]
    errors: List[str] = []

    def run(t: int, n: int) -> None:
        try:
            for i in range(n):
                with hangwatch.expires(after=3600, scope=f"outer-{t}"):
                    if i % 10 == 0:
                        with hangwatch.expires(after=3600):
                            sent[t] += 2
                    sent[t] += 2
        except Exception as exc:
            errors.append(repr(exc))

    half = blocks // 2
    threads = [threading.Thread(target=run, args=(0, half)), threading.Thread(target=run, args=(1, blocks - half))]
    go.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.put((sum(sent), errors[:5], len(errors)))


def storm(kind: str, processes: int, blocks: int) -> Dict[str, Any]:
    ctx = mp.get_context("spawn")
    events: List[Event] = []
    with tempfile.TemporaryDirectory(prefix="hangwatch-stress-") as directory:
        address = _address(kind, ctx, directory)
        server = _server(kind, address, events)
        server.start()
        try:
            go, report = ctx.Event(), ctx.Queue()
            procs = [
                ctx.Process(target=_storm_client, args=(kind, address, blocks, go, report)) for _ in range(processes)
            ]
            for p in procs:
                p.start()
            started = time.monotonic()
            go.set()
            results = [report.get(timeout=7200) for _ in procs]
            for p in procs:
                p.join()
            sent = sum(r[0] for r in results)
            errors = sum(r[2] for r in results)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (
                server.active_timers or (kind != "shm" and server.request_count < sent)
            ):
                time.sleep(0.05)
            took = time.monotonic() - started
            counted = server.request_count
            left = server.active_timers
        finally:
            server.stop()
    lost = left + errors + (max(0, sent - counted) if kind != "shm" else 0)
    return {
        "scenario": "storm",
        "transport": kind,
        "load": f"{processes} procs x {blocks:,} blocks ({sent:,} requests) in {took:.0f} s",
        "faults": 0,
        "inputs": sent,
        "lost": lost,
        "wrong_kills": len([e for e in events if e.name == "kill worker process"]),
        "details": {"sent": sent, "counted": counted, "left": left, "errors": errors, "seconds": round(took, 1)},
    }


# ----------------------------------------------------------------- 2. clients killed mid-send


def _churn(kind: str, address: Any) -> None:
    hangwatch.configure(_client(kind, address))
    i = 0
    while True:
        i += 1
        with hangwatch.expires(after=3600, scope="churn"):  # noqa: SIM117 (nested on purpose)
            with hangwatch.expires(after=3600):
                if i % 97 == 0:
                    time.sleep(0.001)


def _survivor(kind: str, address: Any, stop: Any, after: float) -> None:
    hangwatch.configure(_client(kind, address))
    while not stop.is_set():
        for _ in range(50):
            with hangwatch.expires(after=3600, scope="healthy"):
                pass
    with hangwatch.expires(after=after, scope="stuck"):
        time.sleep(600)


def kill_mid_send(kind: str, kills: int, pool_size: int = 8) -> Dict[str, Any]:
    ctx = mp.get_context("forkserver")  # a fresh client every few milliseconds; spawn would take too long
    ctx.set_forkserver_preload(["hangwatch", "benchmarks._stress"])
    events: List[Event] = []
    rng = random.Random(6)
    with tempfile.TemporaryDirectory(prefix="hangwatch-stress-") as directory:
        address = _address(kind, ctx, directory)
        server = _server(kind, address, events)
        server.start()
        stop = ctx.Event()
        survivors = [ctx.Process(target=_survivor, args=(kind, address, stop, 0.5)) for _ in range(4)]
        pool = [ctx.Process(target=_churn, args=(kind, address)) for _ in range(pool_size)]
        killed: List[int] = []
        late: List[float] = []
        try:
            for p in survivors + pool:
                p.start()
            time.sleep(2)
            started = time.monotonic()
            for _ in range(kills):
                victim = pool.pop(rng.randrange(len(pool)))
                time.sleep(rng.random() * 0.1)
                os.kill(victim.pid, signal.SIGKILL)
                victim.join()
                killed.append(victim.pid)
                fresh = ctx.Process(target=_churn, args=(kind, address))
                fresh.start()
                pool.append(fresh)
            took = time.monotonic() - started
            for p in pool:
                p.kill()
                p.join()
            stop.set()
            t0 = time.monotonic()
            for p in survivors:
                p.join(60)
            stuck_reaped = sum(1 for p in survivors if p.exitcode == -signal.SIGKILL)
            late = [e.details.get("late_s", 0.0) for e in events if e.name == "kill worker process"]
            deadline = time.monotonic() + 30
            while server.active_timers and time.monotonic() < deadline:
                time.sleep(0.05)
            left = server.active_timers
            wall = time.monotonic() - t0
        finally:
            for p in pool + survivors:
                if p.is_alive():
                    p.kill()
                    p.join()
            server.stop()
    survivor_pids = {p.pid for p in survivors}
    wrong = [e.worker for e in events if e.name == "kill worker process" and e.worker not in survivor_pids]
    return {
        "scenario": "kill mid-send",
        "transport": kind,
        "load": f"{pool_size} senders + 4 survivors, {kills} kills in {took:.0f} s",
        "faults": kills,
        "inputs": server.request_count,
        "lost": left + (4 - stuck_reaped),
        "wrong_kills": len(wrong),
        "details": {
            "survivors_reaped": stuck_reaped,
            "max_late_s": round(max(late), 4) if late else None,
            "timers_left": left,
            "survivors_done_in_s": round(wall, 2),
            "bad_requests": len([e for e in events if e.name == "bad request"]),
        },
    }


# ----------------------------------------------------------------- 3. fuzzing


def fuzz(inputs: int) -> List[Dict[str, Any]]:
    # About 6 inputs per example across five tests (FIFO and queue twice: allow-list and torch's rules).
    examples = max(50, inputs // (6 * 5))
    with tempfile.TemporaryDirectory(prefix="hangwatch-stress-") as directory:
        report = os.path.join(directory, "fuzz.jsonl")
        env = {**os.environ, "HANGWATCH_FUZZ_EXAMPLES": str(examples), "HANGWATCH_FUZZ_REPORT": report}
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "tests/test_fuzz.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - started
        rows = [json.loads(line) for line in Path(report).read_text().splitlines()] if os.path.exists(report) else []
    failed = done.returncode != 0
    if failed:
        print(done.stdout[-3000:], file=sys.stderr)
    return [
        {
            "scenario": "fuzz",
            "transport": row["test"],
            "load": f"{examples:,} examples ({took:.0f} s for all)",
            "faults": 0,
            "inputs": row["inputs"],
            "lost": 0 if not failed else "test failed",
            "wrong_kills": 0 if not failed else "see the failure",
            "details": {"recorded_signals_to_the_allowed_worker": row["signals"]},
        }
        for row in rows
    ] or [
        {
            "scenario": "fuzz",
            "transport": "all",
            "load": "-",
            "faults": 0,
            "inputs": 0,
            "lost": "test failed",
            "wrong_kills": "?",
            "details": {},
        }
    ]


# ----------------------------------------------------------------- 5. hostile clients


def _tearer(path: str) -> None:
    """Writes the start of a line to the FIFO, with no end, and waits to be killed (a writer dying mid-line)."""
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, b'{"version": 1, "pid": 4, "scope_id": "torn", "expir')
    time.sleep(600)


def _raw_register(path: str, slots: int) -> Tuple[Any, Any]:
    import mmap
    import socket
    import struct

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.send(json.dumps({"v": 1, "slots": slots, "mono": time.monotonic()}).encode())
    data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
    granted = json.loads(data)["slots"]
    fd = struct.unpack("i", anc[0][2][:4])[0]
    return sock, memoryview(mmap.mmap(fd, 8 * (8 + granted))).cast("d")


def _flooder(path: str) -> None:
    """Floods the shared-memory socket with large bind messages, far faster than a server parses them."""
    sock, _ = _raw_register(path, 4096)
    message = json.dumps({"bind": [[8 + i, f"flood-{i:06d}" + "x" * 200] for i in range(250)]}).encode()
    while True:
        try:
            sock.send(message)
        except OSError:
            time.sleep(0.001)


def _flipper(path: str) -> None:
    """Asks for 262,144 slots, binds what it gets, and flips them all, over and over."""
    sock, view = _raw_register(path, 262144)
    slots = int(view[1])
    for start in range(0, slots, 512):
        sock.send(json.dumps({"bind": [[8 + i, f"s{i}"] for i in range(start, min(slots, start + 512))]}).encode())
    value = 0.0
    while True:
        value = time.monotonic() + 600 if value == 0.0 else 0.0
        for i in range(8, 8 + slots):
            view[i] = value


def _silent(path: str, count: int) -> None:
    """Opens connections and never says hello."""
    import socket

    socks = []
    for _ in range(count):
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)
            socks.append(s)
        except OSError:
            time.sleep(0.01)
    time.sleep(600)


def _frozen(kind: str, address: Any, after: float) -> None:
    """Gets stuck, then is frozen (SIGSTOP) before its deadline: its stack never comes."""
    hangwatch.configure(_client(kind, address))
    with hangwatch.expires(after=after, scope="frozen"):
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(600)


def hostile(kind: str, attack: str, size: int, seconds: float) -> Dict[str, Any]:
    """Honest survivors churn blocks, then get stuck, while attackers do their worst; the survivors must be
    reaped on time and nobody else wrongly."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["hangwatch", "benchmarks._stress"])
    events: List[Event] = []
    with tempfile.TemporaryDirectory(prefix="hangwatch-stress-") as directory:
        address = _address(kind, ctx, directory)
        server = _server(kind, address, events)
        server.start()
        stop = ctx.Event()
        survivors = [ctx.Process(target=_survivor, args=(kind, address, stop, 0.5)) for _ in range(4)]
        attackers: List[Any] = []
        faults = 0
        allowed = set()
        try:
            started = time.monotonic()
            if attack == "partial lines":  # writers dying mid-line, one after another
                for p in survivors:
                    p.start()
                for _ in range(size):
                    tearer = ctx.Process(target=_tearer, args=(address,))
                    tearer.start()
                    time.sleep(seconds / size)
                    tearer.kill()
                    tearer.join()
                    faults += 1
            else:
                if attack == "floods":
                    attackers = [ctx.Process(target=_flooder, args=(address,)) for _ in range(2)]
                    attackers.append(ctx.Process(target=_flipper, args=(address,)))
                elif attack == "silent connections":
                    attackers = [ctx.Process(target=_silent, args=(address, size // 8)) for _ in range(8)]
                elif attack == "slow stack dumps":
                    attackers = [ctx.Process(target=_frozen, args=(kind, address, 0.3)) for _ in range(size)]
                for p in attackers:
                    p.start()
                time.sleep(1.0)  # the attack is on: the survivors register, churn and get stuck under it
                for p in survivors:
                    p.start()
                faults = size if attack != "floods" else len(attackers)
                allowed = {p.pid for p in attackers} if attack == "slow stack dumps" else set()
                time.sleep(seconds)
            took = time.monotonic() - started
            stop.set()
            for p in survivors:
                p.join(60)
            reaped = sum(1 for p in survivors if p.exitcode == -signal.SIGKILL)
        finally:
            for p in survivors + attackers:
                if p.is_alive():
                    p.kill()
                    p.join()
            server.stop()
    survivor_pids = {p.pid for p in survivors}
    kills = [e for e in events if e.name == "kill worker process" and "late_s" in e.details]
    wrong = [e.worker for e in kills if e.worker not in survivor_pids | allowed]
    # On the FIFO the only refusals may be the fragments: any other refused line was an honest request lost.
    refused_honest = [
        e
        for e in events
        if attack == "partial lines"
        and e.name == "bad request"
        and "incomplete line" not in e.details.get("reason", "")
    ]
    late = [e.details["late_s"] for e in kills if e.worker in survivor_pids]
    return {
        "scenario": f"hostile: {attack}",
        "transport": kind,
        "load": f"4 survivors beside {attack} ({faults:,}) for {took:.0f} s; reaped at most "
        f"{max(late) * 1000:.0f} ms late"
        if late
        else f"4 survivors beside {attack} ({faults:,}) for {took:.0f} s",
        "faults": faults,
        "inputs": server.request_count,
        "lost": 4 - reaped + len(refused_honest),
        "wrong_kills": len(wrong),
        "details": {
            "survivors_reaped": reaped,
            "honest_lines_refused": len(refused_honest),
            "max_late_s": round(max(late), 4) if late else None,
            "limit_events": len([e for e in events if e.name == "limit reached"]),
            "bad_requests": len([e for e in events if e.name == "bad request"]),
        },
    }


# ----------------------------------------------------------------- 4. orphans

SPAWNER = """
import os, subprocess, sys, time
inside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
def grandchild():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # a daemon: double fork, its own session
            time.sleep(600)
        os._exit(0)
grandchild()
with open(os.path.join({directory!r}, "pids-" + os.environ["RANK"]), "a") as f:
    f.write(f"{{os.getpid()}} {{inside.pid}} {{outside.pid}}\\n")
if {finish!r}:
    sys.exit(0)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")


def _marked(token_dir: str) -> List[int]:
    """Processes whose command line or environment names this trial's directory (its workers' trees)."""
    found = []
    needle = token_dir.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read() and not _gone(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def orphans(trials: int) -> Dict[str, Any]:
    ways = ["SIGKILL", "SIGINT", "SIGTERM", "success"]
    left_total = 0
    runs = 0
    started = time.monotonic()
    for trial in range(trials):
        way = ways[trial % len(ways)]
        with tempfile.TemporaryDirectory(prefix="hangwatch-orphans-") as directory:
            script = Path(directory) / "spawner.py"
            script.write_text(textwrap.dedent(SPAWNER.format(directory=directory, finish=way == "success")))
            launcher = subprocess.Popen(
                [sys.executable, "-m", "hangwatch", "run", "--nproc-per-node", "2", "--stop-grace", "1", str(script)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "HANGWATCH_STRESS_TRIAL": directory},  # marks every process of the trial
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(list(Path(directory).glob("pids-*"))) < 2:
                time.sleep(0.05)
            time.sleep(0.3)
            if way != "success":
                launcher.send_signal(getattr(signal, way))
            launcher.wait(120)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _marked(directory):
                time.sleep(0.1)
            left = _marked(directory)
            left_total += len(left)
            for pid in left:  # never leave them running, whatever the count says
                os.kill(pid, signal.SIGKILL)
            runs += 1
    return {
        "scenario": "orphans",
        "transport": "launcher",
        "load": f"{runs} runs (SIGKILL, SIGINT, SIGTERM, success), 2 workers x 4 children",
        "faults": runs,
        "inputs": 0,
        "lost": left_total,
        "wrong_kills": 0,
        "details": {"processes_left": left_total, "seconds": round(time.monotonic() - started, 1)},
    }


# ----------------------------------------------------------------- the table


def table(rows: List[Dict[str, Any]]) -> str:
    head = ["scenario", "transport", "load held", "faults injected", "inputs tried", "lost requests", "wrong kills"]
    body = [
        [
            r["scenario"],
            r["transport"],
            r["load"],
            f"{r['faults']:,}" if isinstance(r["faults"], int) else str(r["faults"]),
            f"{r['inputs']:,}" if isinstance(r["inputs"], int) else str(r["inputs"]),
            str(r["lost"]),
            str(r["wrong_kills"]),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [" | ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    parser.add_argument(
        "--only", choices=["storm", "kill", "fuzz", "orphans", "hostile"], action="append", help="run only these"
    )
    parser.add_argument("--fuzz-inputs", type=int, help="inputs for the fuzzer (default 1,000,000; --quick 20,000)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("the stress mode needs Linux", file=sys.stderr)
        return 2
    only = set(args.only or ["storm", "kill", "fuzz", "orphans", "hostile"])
    sizes: Dict[str, Tuple[int, ...]] = {
        "storm": (8, 5_000) if args.quick else (64, 100_000),
        "kill": (30,) if args.quick else (300,),
        "fuzz": (args.fuzz_inputs or (20_000 if args.quick else 1_000_000),),
        "orphans": (4,) if args.quick else (20,),
        "hostile": (10,) if args.quick else (1,),  # the divisor of the sizes below
    }
    rows: List[Dict[str, Any]] = []

    def show(row: Dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "storm" in only:
        for kind in TRANSPORTS:
            show(storm(kind, *sizes["storm"]))
    if "kill" in only:
        for kind in TRANSPORTS:
            show(kill_mid_send(kind, *sizes["kill"]))
    if "fuzz" in only:
        for row in fuzz(*sizes["fuzz"]):
            show(row)
    if "orphans" in only:
        show(orphans(*sizes["orphans"]))
    if "hostile" in only:
        scale = sizes["hostile"][0]
        attacks = [
            ("fifo", "partial lines", 300 // scale, 60.0 / scale),
            ("shm", "floods", 3, 60.0 / scale),
            ("shm", "silent connections", 2000 // scale, 30.0 / scale),
        ]
        attacks += [(kind, "slow stack dumps", 8, 10.0 / scale) for kind in TRANSPORTS]
        for kind, attack, size, seconds in attacks:
            show(hostile(kind, attack, size, seconds))
    print()
    print(table(rows))
    out = ROOT / "benchmarks" / "results" / ("stress-quick.json" if args.quick else "stress.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1) + "\n")
    print(f"\nwritten to {out}")
    bad = [r for r in rows if r["lost"] != 0 or r["wrong_kills"] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
