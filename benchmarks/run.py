"""hangwatch's benchmark suite, side by side with torch.distributed.elastic.timer when it is installed.

Run:  python -m benchmarks              (about 3-4 minutes; or python benchmarks/run.py)
      python -m benchmarks --torch-reap  (adds torch's reap latency at its defaults: ~70 s more)
      python -m benchmarks --quick       (smaller counts, for a smoke run)

Figures, for every hangwatch pair (shared memory, Local queue, FIFO) and torch's pairs:

1. us per ``with expires(...)`` block in a worker, named scope and default scope;
2. a FIFO client's tight loop of 1,000,000 blocks: completes, or how far it got;
3. drain: 8 clients x 10,000 blocks, then a stuck sentinel: wall time, how late the
   sentinel died, and whether every request was counted;
   storm: 8 workers (then 4 per core, at least 16) x 10,000 blocks, each then at once in a 0.05 s block
   that hangs: how late the worst was seen dead;
4. reap latency: how long after its deadline a stuck worker was signalled and seen dead;
5. scale: with 100,000 active timers, reap latency percentiles; the deadline book's
   cost per round at 1k/10k/100k timers; an idle server's CPU with 1,000 long timers;
   the server's memory per active timer.

Machines are shared and noisy: compare ratios within one run, not absolute times across
runs. Results go to benchmarks/results/latest.json, and a plot to latest.png (with
matplotlib: pip install 'hangwatch[bench]').
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from typing import Any, Callable, Dict, List, Optional

import hangwatch
from hangwatch._deadlines import DeadlineBook

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: harmless
# torch is imported only where a torch pair runs: a process that imported it takes tens of
# milliseconds longer to die, which would blur the reap latency of hangwatch's own pairs.
ttimer: Any = None
HAVE_TORCH = importlib.util.find_spec("torch") is not None


# Where torch's own output goes (its tracebacks, its log): out of the table, kept for reading.
THIRD_PARTY_LOG = "HANGWATCH_BENCH_THIRD_PARTY_LOG"


def _torch() -> Any:
    global ttimer
    if ttimer is None:
        log = os.environ.get(THIRD_PARTY_LOG)
        if log and mp.parent_process() is not None:  # a torch child: its stderr (tracebacks) to the log
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(fd, 2)
            os.close(fd)
        import torch.distributed.elastic.timer as timer_module

        ttimer = timer_module
    return ttimer


def compared(ratio: float, better: str, worse: str) -> str:
    """``3.1x cheaper`` for 3.1; ``1.4x dearer`` for 0.7 (a ratio below 1 is the other way round)."""
    return f"{ratio:.1f}x {better}" if ratio >= 1 else f"{1 / ratio:.1f}x {worse}"


ctx = mp.get_context("spawn")
HERE = os.path.dirname(os.path.abspath(__file__))

# (library, pair) in table order
PAIRS = [("hangwatch", "shm"), ("hangwatch", "local"), ("hangwatch", "file"), ("torch", "local"), ("torch", "file")]


def label(lib: str, pair: str) -> str:
    return f"{lib} {pair}"


# ------------------------------------------------------------------ worker side (runs in a child)


def _make_client(lib: str, pair: str, endpoint: Any) -> Any:
    if pair == "shm":
        return hangwatch.SharedMemoryTimerClient(endpoint)
    mod: Any = hangwatch if lib == "hangwatch" else _torch()
    return mod.LocalTimerClient(endpoint) if pair == "local" else mod.FileTimerClient(endpoint)


def _configure(lib: str, pair: str, endpoint: Any) -> Any:
    mod: Any = hangwatch if lib == "hangwatch" else _torch()
    mod.configure(_make_client(lib, pair, endpoint))
    return mod


def _client_loop(
    lib: str, pair: str, endpoint: Any, blocks: int, default_scope: bool, start: Any, conn: Any, ready: Any = None
) -> None:
    mod = _configure(lib, pair, endpoint)
    expires = mod.expires
    with expires(after=60, scope="warm-up"):  # connect and register before the clock starts
        pass
    done = 0
    error = None
    if ready is not None:
        ready.release()
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    try:
        if default_scope:
            for done in range(1, blocks + 1):  # noqa: B007
                with expires(after=60):
                    pass
        else:
            for done in range(1, blocks + 1):  # noqa: B007
                with expires(after=60, scope="bench"):
                    pass
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        done -= 1
    conn.send((time.perf_counter() - t0, done, error))
    if pair == "local" and lib == "torch":
        time.sleep(0.2)  # let torch's feeder thread flush before the process ends


def _heartbeat_loop(pair: str, endpoint: Any, beats: int, conn: Any) -> None:
    """``beats`` calls of ``hangwatch.heartbeat(...)``, then as many ``hb.beat()``: (seconds each, beats)."""
    hangwatch.configure(_make_client("hangwatch", pair, endpoint))
    heartbeat = hangwatch.heartbeat
    hb = heartbeat("warm-up", 60)
    t0 = time.perf_counter()
    for _ in range(beats):
        heartbeat("bench", 60)
    calls = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(beats):
        hb.beat()
    conn.send((calls, time.perf_counter() - t0, beats))


def _stuck(lib: str, pair: str, endpoint: Any, after: float, deadline: Any, start: Any, ready: Any = None) -> None:
    mod = _configure(lib, pair, endpoint)
    with mod.expires(after=60, scope="warm-up"):
        pass
    if ready is not None:
        ready.release()
    if start is not None:
        start.wait()
    deadline.value = time.time() + after
    with mod.expires(after=after, scope="stuck"):
        time.sleep(3600)


def _storm_worker(
    lib: str, pair: str, endpoint: Any, blocks: int, after: float, deadlines: Any, index: int, start: Any, ready: Any
) -> None:
    """A busy stretch of ``blocks`` blocks, then at once a block of ``after`` seconds that hangs."""
    mod = _configure(lib, pair, endpoint)
    expires = mod.expires
    with expires(after=60, scope="warm-up"):
        pass
    ready.release()
    start.wait()
    for _ in range(blocks):
        with expires(after=60, scope="bench"):
            pass
    deadlines[index] = time.time() + after
    with expires(after=after, scope="stuck"):
        time.sleep(3600)


def _holder(lib: str, pair: str, endpoint: Any, timers: int, ready: Any, release: Any) -> None:
    """Holds ``timers`` long timers (distinct scopes) until told to go."""
    mod = _configure(lib, pair, endpoint)
    with contextlib.ExitStack() as stack:
        for i in range(timers):
            stack.enter_context(mod.expires(after=3600, scope=f"held-{i}"))
        ready.set()
        release.wait()


# ------------------------------------------------------------------ servers


def _torch_file_server(path: str) -> None:
    """Torch's FileTimerServer, in a process of its own: it signals its own process after a reap."""
    server = _torch().FileTimerServer(path, "bench")
    server.start()
    time.sleep(3600)


class Servers:
    """Starts one server of a (library, pair) and hands out its endpoint."""

    def __init__(
        self,
        lib: str,
        pair: str,
        log_event: Optional[Callable[[str, Any], None]] = None,
        torch_interval: Optional[float] = None,
        statistics: bool = False,
    ) -> None:
        self.lib, self.pair = lib, pair
        extra: Dict[str, Any] = {"log_event": log_event} if log_event is not None else {}
        if statistics:
            extra["statistics"] = True
        if lib == "torch" and torch_interval is not None:
            extra["max_interval"] = torch_interval
        self.process: Optional[Any] = None
        self.dir = tempfile.mkdtemp(prefix="hw-bench-")
        mod: Any = hangwatch if lib == "hangwatch" else _torch()
        if pair == "shm":
            self.endpoint: Any = os.path.join(self.dir, "timer.sock")
            self.server: Any = hangwatch.SharedMemoryTimerServer(self.endpoint, **extra)
            self.server.start()
            return
        if pair == "local":
            self.endpoint = ctx.Queue()
            self.server = mod.LocalTimerServer(self.endpoint, **extra)
            self.server.start()
            return
        self.endpoint = os.path.join(self.dir, "timer.fifo")
        if lib == "hangwatch":
            self.server = mod.FileTimerServer(self.endpoint, "bench", **extra)
            self.server.start()
        else:
            self.process = ctx.Process(target=_torch_file_server, args=(self.endpoint,), daemon=True)
            self.process.start()
            deadline = time.monotonic() + 120
            while not os.path.exists(self.endpoint) and time.monotonic() < deadline:
                time.sleep(0.05)

    def requests(self) -> Optional[int]:
        return getattr(self.server, "request_count", None) if self.lib == "hangwatch" else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            if os.path.exists(self.endpoint):
                os.remove(self.endpoint)
        elif self.lib == "torch":
            self.server._stop_signaled = True  # torch's stop() waits up to max_interval (60 s)
        else:
            self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _join_dead(p: Any, deadline_value: Any, timeout: float = 120) -> Optional[float]:
    """Wait for a stuck worker to die; ms from its deadline to when it was seen dead (None if it was not)."""
    p.join(timeout)
    died = time.time()
    if p.is_alive():
        p.kill()
        p.join()
        return None
    return (died - deadline_value.value) * 1000 if deadline_value.value else None


def _stuck_sample(servers: Servers, after: float) -> Optional[float]:
    deadline = ctx.Value("d", 0.0)
    start = ctx.Event()
    p = ctx.Process(target=_stuck, args=(servers.lib, servers.pair, servers.endpoint, after, deadline, start))
    p.start()
    start.set()
    return _join_dead(p, deadline)


def pct(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# ------------------------------------------------------------------ 1, 2: cost per block


def per_block(lib: str, pair: str, blocks: int, default_scope: bool, statistics: bool = False) -> Dict[str, Any]:
    servers = Servers(lib, pair, statistics=statistics)
    try:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_client_loop, args=(lib, pair, servers.endpoint, blocks, default_scope, None, child))
        p.start()
        elapsed, done, error = parent.recv()
        p.join()
    finally:
        servers.stop()
    return {"us_per_block": elapsed / max(done, 1) * 1e6, "blocks": done, "error": error}


def heartbeat_cost(pair: str, beats: int) -> Dict[str, float]:
    """us per ``heartbeat(scope, timeout)`` call and per ``hb.beat()``, in a worker."""
    servers = Servers("hangwatch", pair)
    try:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_heartbeat_loop, args=(pair, servers.endpoint, beats, child))
        p.start()
        calls, beat, n = parent.recv()
        p.join()
    finally:
        servers.stop()
    return {"us_per_call": calls / n * 1e6, "us_per_beat": beat / n * 1e6}


def floor_us(blocks: int) -> float:
    """A bare ``with`` of a trivial context manager, in this process: the floor of any check-in."""

    class Null:
        def __enter__(self) -> None:
            pass

        def __exit__(self, *exc: Any) -> None:
            pass

    null = Null()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(blocks):
            with null:
                pass
        best = min(best, time.perf_counter() - t0)
    return best / blocks * 1e6


# ------------------------------------------------------------------ 3: drain


def drain(lib: str, pair: str, clients: int, blocks: int) -> Dict[str, Any]:
    """``clients`` processes x ``blocks`` blocks, then a stuck sentinel; all started together."""
    servers = Servers(lib, pair)
    try:
        start = ctx.Event()
        ready = ctx.Semaphore(0)
        pipes, procs = [], []
        for _ in range(clients):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client_loop, args=(lib, pair, servers.endpoint, blocks, False, start, child, ready))
            p.start()
            pipes.append(parent)
            procs.append(p)
        deadline = ctx.Value("d", 0.0)
        go = ctx.Event()
        sentinel = ctx.Process(target=_stuck, args=(lib, pair, servers.endpoint, 0.05, deadline, go, ready))
        sentinel.start()
        for _ in range(clients + 1):  # every process imported and connected before the clock starts
            ready.acquire(timeout=120)
        time.sleep(0.2)
        t0 = time.time()
        start.set()
        results = [conn.recv() for conn in pipes]
        go.set()  # the sentinel enters its block once every client has sent everything
        late = _join_dead(sentinel, deadline, timeout=90)
        wall = time.time() - t0
        for p in procs:
            p.join(30)
        errors = [r[2] for r in results if r[2]]
        sent = (sum(r[1] for r in results) + clients + 1) * 2 + 1  # + the warm-up blocks
        counted = servers.requests()
        active = getattr(servers.server, "active_timers", None) if lib == "hangwatch" else None
    finally:
        servers.stop()
    return {
        "wall_s": wall,
        "sentinel_late_ms": late,
        "errors": errors[:2],
        "client_errors": len(errors),
        "requests_sent": sent if pair != "shm" else None,
        "requests_counted": counted,
        "active_after": active,
    }


# ------------------------------------------------------------------ 3b: storm, then hang


def storm(lib: str, pair: str, workers: int, blocks: int, after: float = 0.05) -> Dict[str, Any]:
    """``workers`` processes each run ``blocks`` blocks, then at once enter an ``after`` s block and hang.

    The figure: how long after its deadline each was seen dead (the worst, and the median). torch's
    servers run at torchrun's 0.1 s interval.
    """
    servers = Servers(lib, pair, torch_interval=0.1)
    try:
        start = ctx.Event()
        ready = ctx.Semaphore(0)
        deadlines = ctx.Array("d", [0.0] * workers)
        procs = []
        for index in range(workers):
            p = ctx.Process(
                target=_storm_worker,
                args=(lib, pair, servers.endpoint, blocks, after, deadlines, index, start, ready),
            )
            p.start()
            procs.append(p)
        for _ in range(workers):
            ready.acquire(timeout=120)
        time.sleep(0.2)
        start.set()
        died: Dict[int, float] = {}
        waiting = {p.sentinel: i for i, p in enumerate(procs)}
        limit = time.monotonic() + 120
        while waiting and time.monotonic() < limit:
            for sentinel in mp.connection.wait(list(waiting), timeout=1.0):
                died[waiting.pop(sentinel)] = time.time()  # type: ignore[index]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    finally:
        servers.stop()
    late = [(died[i] - deadlines[i]) * 1000 for i in died if deadlines[i]]
    return {
        "workers": workers,
        "blocks": blocks,
        "worst_ms": max(late) if len(late) == workers else None,
        "median_ms": statistics.median(late) if late else None,
        "not_reaped": workers - len(late),
    }


# ------------------------------------------------------------------ 4: reap latency


def reap_latency(lib: str, pair: str, samples: int, after: float = 0.1) -> Dict[str, Any]:
    """ms from a stuck worker's deadline until it is seen dead, the same way for every pair."""
    signalled: List[float] = []

    def on_event(name: str, request: Any) -> None:  # hangwatch's servers say when they signalled
        if name == "kill worker process" and request is not None:
            signalled.append((time.time() - request.expiration_time) * 1000)

    servers = Servers(lib, pair, log_event=on_event if lib == "hangwatch" else None)
    late: List[float] = []
    try:
        for _ in range(samples):
            value = _stuck_sample(servers, after)
            if value is not None:
                late.append(value)
    finally:
        servers.stop()
    return {
        "samples": late,
        "median_ms": statistics.median(late) if late else None,
        "p99_ms": pct(late, 99),
        "max_ms": max(late) if late else None,
        "signalled_median_ms": statistics.median(signalled) if signalled else None,
        "signalled_max_ms": max(signalled) if signalled else None,
    }


# ------------------------------------------------------------------ 5: scale


def scale_latency(pair: str, holders: int, per_holder: int, samples: int) -> Dict[str, Any]:
    """Reap latency of a stuck worker while ``holders * per_holder`` long timers are active."""
    servers = Servers("hangwatch", pair)
    release = ctx.Event()
    procs = []
    try:
        t0 = time.monotonic()
        for _ in range(holders):
            ready = ctx.Event()
            p = ctx.Process(target=_holder, args=("hangwatch", pair, servers.endpoint, per_holder, ready, release))
            p.start()
            procs.append((p, ready))
        for _, ready in procs:
            ready.wait(300)
        want = holders * per_holder
        while servers.server.active_timers < want and time.monotonic() - t0 < 300:
            time.sleep(0.05)
        active = servers.server.active_timers
        late = [v for v in (_stuck_sample(servers, 0.1) for _ in range(samples)) if v is not None]
    finally:
        release.set()
        for p, _ in procs:
            p.join(30)
        servers.stop()
    return {
        "active_timers": active,
        "samples": late,
        "p50_ms": pct(late, 50),
        "p99_ms": pct(late, 99),
        "max_ms": max(late) if late else None,
    }


def book_round_cost(sizes: List[int]) -> Dict[str, float]:
    """us for one watchdog round of the deadline book (set one, release one, next deadline, expired now)."""
    out: Dict[str, float] = {}
    for n in sizes:
        book: DeadlineBook[int, None] = DeadlineBook()
        base = time.monotonic() + 3600
        for i in range(n):
            book.set(i % 64, f"s{i}", base + i * 1e-3, None)
        rounds = 20_000
        t0 = time.perf_counter()
        now = time.monotonic()
        for _ in range(rounds):
            book.set(999, "hot", base + 1, None)
            book.remove(999, "hot")
            book.next_deadline()
            book.expired(now)
        out[str(n)] = (time.perf_counter() - t0) / rounds * 1e6
    return out


def idle_cpu(pair: str, timers: int, seconds: float) -> Dict[str, Any]:
    """The server's CPU use (this process, otherwise idle) with ``timers`` long timers held by 4 workers."""
    servers = Servers("hangwatch", pair)
    release = ctx.Event()
    procs = []
    try:
        for _ in range(4):
            ready = ctx.Event()
            p = ctx.Process(target=_holder, args=("hangwatch", pair, servers.endpoint, timers // 4, ready, release))
            p.start()
            procs.append((p, ready))
        for _, ready in procs:
            ready.wait(120)
        t0 = time.monotonic()
        while servers.server.active_timers < timers and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        time.sleep(0.5)
        before = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.monotonic()
        time.sleep(seconds)
        after = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - w0
        active = servers.server.active_timers
    finally:
        release.set()
        for p, _ in procs:
            p.join(30)
        servers.stop()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"active_timers": active, "cpu_percent_of_a_core": cpu / wall * 100}


def memory_per_timer(timers: int) -> Dict[str, float]:
    """Bytes the server holds per active timer (tracemalloc), timers of a real (sleeping) worker process."""
    from hangwatch._worker import WorkerInfo
    from hangwatch.local import WorkerRequest

    sleeper = ctx.Process(target=time.sleep, args=(120,))
    sleeper.start()
    out: Dict[str, float] = {}
    try:
        pid = sleeper.pid
        assert pid is not None
        for pair in ("shm", "file"):
            d = tempfile.mkdtemp(prefix="hw-bench-")
            now = time.time() + 3600
            limits = hangwatch.Limits(timers_per_worker=timers)  # one worker holds them all: lift its cap
            if pair == "shm":
                server: Any = hangwatch.SharedMemoryTimerServer(os.path.join(d, "m.sock"), limits=limits)
                info = WorkerInfo(None, None, 0, -1, None)
                names = [f"held-{i}" for i in range(timers)]  # the names live in the worker's region table
                make: Callable[[int], Any] = lambda i: WorkerRequest(pid, names[i], now + i, info)  # noqa: E731, B023 (used within this iteration)
            else:
                server = hangwatch.FileTimerServer(os.path.join(d, "m.fifo"), limits=limits)
                make = lambda i: hangwatch.FileTimerRequest(pid, f"held-{i}", now + i, 9)  # noqa: E731, B023 (used within this iteration)
            server.register_timers([make(0)])  # pins the worker outside the measurement
            gc.collect()
            tracemalloc.start()
            first = tracemalloc.take_snapshot()
            # The requests are made inside the measurement: the server keeps each as its timer's payload.
            server.register_timers([make(i) for i in range(1, timers)])
            gc.collect()
            second = tracemalloc.take_snapshot()
            tracemalloc.stop()
            grown = sum(s.size_diff for s in second.compare_to(first, "filename"))
            assert server.active_timers == timers, (pair, server.active_timers)  # every timer was held
            out[pair] = grown / (timers - 1)
            server.close_pins()
            server.stop()
            shutil.rmtree(d, ignore_errors=True)
    finally:
        sleeper.kill()
        sleeper.join()
    return out


# ------------------------------------------------------------------ report


def plot(results: Dict[str, Any], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot ({type(exc).__name__}: pip install 'hangwatch[bench]')"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(results["per_block"])
    named = [results["per_block"][n]["named"]["us_per_block"] for n in names]
    default = [results["per_block"][n]["default"]["us_per_block"] for n in names]
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], named, width=0.4, label="named scope")
    left.bar([x + 0.2 for x in xs], default, width=0.4, label="default scope")
    left.axhline(results["floor_us"], color="grey", linestyle="--", label="bare `with` (floor)")
    left.set_yscale("log")
    left.set_xticks(list(xs))
    left.set_xticklabels(names, rotation=20)
    left.set_ylabel("us per `with expires(...)` block (log)")
    left.set_title("Check-in cost (lower is better)")
    left.legend()
    reap = {k: v["samples"] for k, v in results["reap"].items() if v["samples"]}
    for k, v in results.get("scale", {}).items():
        if v.get("samples"):
            reap[f"{k}, {v['active_timers'] // 1000}k active"] = v["samples"]
    if reap:
        right.boxplot(list(reap.values()), showfliers=True)
        right.set_xticks(range(1, len(reap) + 1))
        right.set_xticklabels(list(reap), rotation=20, fontsize=8)
        right.set_yscale("log")
    right.set_ylabel("ms from deadline to dead (log)")
    right.set_title("Reap latency of a stuck worker")
    fig.suptitle(f"hangwatch benchmarks (python {results['python']}, one run, ratios matter)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--blocks", type=int, default=200_000, help="blocks per us-per-block figure")
    parser.add_argument("--tight-loop", type=int, default=1_000_000, help="blocks in the FIFO tight loop")
    parser.add_argument("--reap-samples", type=int, default=20)
    parser.add_argument("--scale-timers", type=int, default=100_000)
    parser.add_argument("--torch-reap", action="store_true", help="also measure torch's reap latency (slow)")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run of every figure")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.tight_loop, args.reap_samples, args.scale_timers = 20_000, 50_000, 5, 10_000

    os.makedirs(args.out, exist_ok=True)
    third_party = os.path.join(args.out, "third-party.log")
    open(third_party, "w").close()
    os.environ[THIRD_PARTY_LOG] = third_party  # torch's children write their tracebacks there
    have_torch = HAVE_TORCH
    if have_torch:
        _torch()  # this process hosts torch's Local server
        torch_log = logging.getLogger("torch.distributed.elastic")
        torch_log.addHandler(logging.FileHandler(third_party))
        torch_log.propagate = False
    pairs = [(lib, pair) for lib, pair in PAIRS if lib == "hangwatch" or have_torch]
    results: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": getattr(sys.modules.get("torch"), "__version__", None) if have_torch else None,
        "cores": os.cpu_count(),
        "per_block": {},
        "reap": {},
        "drain": {},
        "storm": {},
        "scale": {},
    }
    print(f"python {results['python']}; torch {results['torch'] or 'not installed'}; {results['cores']} cores\n")

    # 1. cost per block
    results["floor_us"] = floor_us(args.blocks)
    print(f"1. us per `with expires(...)` block in a worker (bare `with` floor: {results['floor_us']:.2f} us)")
    print(f"   {'pair':<18}{'named':>10}{'default':>10}{'default/named':>15}")
    for lib, pair in pairs:
        n = 250 if (lib, pair) == ("torch", "file") else args.blocks  # torch's File client crashes in a tight loop
        nd = n if lib == "hangwatch" else min(n, 2000)  # torch's default scope is slow: fewer blocks
        named = per_block(lib, pair, n, default_scope=False)
        default = per_block(lib, pair, nd, default_scope=True)
        results["per_block"][label(lib, pair)] = {"named": named, "default": default}
        ratio = default["us_per_block"] / named["us_per_block"]
        print(f"   {label(lib, pair):<18}{named['us_per_block']:>10.2f}{default['us_per_block']:>10.2f}{ratio:>15.2f}")
    ratios: Dict[str, float] = {}
    if have_torch:
        pb = results["per_block"]
        tl, tf = pb["torch local"]["named"]["us_per_block"], pb["torch file"]["named"]["us_per_block"]
        ratios = {
            "shm vs torch local": tl / pb["hangwatch shm"]["named"]["us_per_block"],
            "local vs torch local": tl / pb["hangwatch local"]["named"]["us_per_block"],
            "file vs torch file": tf / pb["hangwatch file"]["named"]["us_per_block"],
        }
        for name, value in ratios.items():
            print(f"   -> hangwatch {name}: {compared(value, 'cheaper', 'dearer')}")
    results["ratios"] = ratios

    # 1b. the same with per-scope statistics (hangwatch run's default), and heartbeats
    print("\n1b. us per named-scope block with per-scope statistics on (hangwatch run's default), and heartbeats")
    print(f"   {'pair':<18}{'off':>10}{'on':>10}{'on/off':>10}{'heartbeat()':>13}{'hb.beat()':>11}")
    results["statistics_cost"] = {}
    for pair in ("shm", "local", "file"):
        off = per_block("hangwatch", pair, args.blocks, default_scope=False)["us_per_block"]
        on = per_block("hangwatch", pair, args.blocks, default_scope=False, statistics=True)["us_per_block"]
        beats = heartbeat_cost(pair, args.blocks if pair == "shm" else args.blocks // 4)
        results["statistics_cost"][pair] = {"off_us": off, "on_us": on, **beats}
        print(
            f"   {label('hangwatch', pair):<18}{off:>10.2f}{on:>10.2f}{on / off:>10.2f}"
            f"{beats['us_per_call']:>13.2f}{beats['us_per_beat']:>11.2f}"
        )

    # 2. FIFO tight loop
    print(f"\n2. FIFO client, tight loop of {args.tight_loop:,} blocks")
    results["tight_loop"] = {}
    for lib in ["hangwatch"] + (["torch"] if have_torch else []):
        r = per_block(lib, "file", args.tight_loop if lib == "hangwatch" else 20_000, default_scope=False)
        results["tight_loop"][lib] = r
        status = "completed" if r["error"] is None else f"failed after {r['blocks']:,} blocks ({r['error'][:50]})"
        print(f"   {lib:<10} {status}")

    # 3. drain
    clients, blocks = (8, 10_000) if not args.quick else (4, 2_000)
    print(f"\n3. drain: {clients} clients x {blocks:,} blocks, then a stuck sentinel (after=0.05 s)")
    print(f"   {'pair':<18}{'wall s':>8}{'sentinel late ms':>18}{'client errors':>15}{'requests counted':>20}")
    for lib, pair in pairs:
        r = drain(lib, pair, clients, blocks)
        results["drain"][label(lib, pair)] = r
        counted = "-" if r["requests_counted"] is None else f"{r['requests_counted']:,}"
        if r["requests_sent"] is not None and r["requests_counted"] is not None:
            counted += f" / {r['requests_sent']:,}"
        elif pair == "shm":
            counted = f"state; {r['active_after']} left"
        print(
            f"   {label(lib, pair):<18}{r['wall_s']:>8.2f}{fmt(r['sentinel_late_ms']):>18}"
            f"{r['client_errors']:>15}{counted:>20}"
        )
    if have_torch:
        tw = results["drain"]["torch local"]["wall_s"]
        for pair in ("shm", "local", "file"):
            ratio = tw / results["drain"][f"hangwatch {pair}"]["wall_s"]
            results["ratios"][f"drain {pair} vs torch local"] = ratio
            print(f"   -> hangwatch {pair}: {compared(ratio, 'faster', 'slower')}")

    # 3b. storm, then hang
    cores = os.cpu_count() or 1
    results["storm"] = {}
    storm_blocks = 10_000 if not args.quick else 2_000
    for workers in (8, max(16, 4 * cores)):
        print(
            f"\n3b. storm: {workers} workers x {storm_blocks:,} blocks, then at once a 0.05 s block that hangs "
            f"({cores} cores); how late each was seen dead"
        )
        print(f"   {'pair':<18}{'worst ms':>10}{'median ms':>11}{'not reaped':>12}")
        key = f"{workers} workers"
        results["storm"][key] = {}
        for lib, pair in pairs:
            if (lib, pair) == ("torch", "file"):
                continue  # torch's FileTimerServer signals its own process after the first reap
            r = storm(lib, pair, workers, storm_blocks)
            results["storm"][key][label(lib, pair)] = r
            print(f"   {label(lib, pair):<18}{fmt(r['worst_ms']):>10}{fmt(r['median_ms']):>11}{r['not_reaped']:>12}")
    print("   (torch file: not run; its server signals its own process after its first reap)")

    # 4. reap latency
    print(f"\n4. reap latency, {args.reap_samples} stuck workers per pair (after=0.1 s; servers' defaults)")
    print(f"   {'pair':<18}{'dead after: median':>20}{'p99':>8}{'max ms':>8}{'signalled: median':>20}{'max ms':>8}")
    for lib, pair in pairs:
        if lib == "torch" and not args.torch_reap:
            continue
        r = reap_latency(lib, pair, args.reap_samples if lib == "hangwatch" else 1)
        results["reap"][label(lib, pair)] = r
        print(
            f"   {label(lib, pair):<18}{fmt(r['median_ms']):>20}{fmt(r['p99_ms']):>8}{fmt(r['max_ms']):>8}"
            f"{fmt(r['signalled_median_ms']):>20}{fmt(r['signalled_max_ms']):>8}"
        )
    if have_torch and not args.torch_reap:
        print("   (torch: add --torch-reap; it reaps at its max_interval: ~60 s Local, ~10 s File)")

    # 5. scale
    holders = 10
    print(f"\n5. scale: {args.scale_timers:,} active timers held by {holders} workers")
    for pair in ("shm", "file"):
        r = scale_latency(pair, holders, args.scale_timers // holders, max(5, args.reap_samples))
        results["scale"][f"hangwatch {pair}"] = r
        print(
            f"   hangwatch {pair:<8} {r['active_timers']:,} active: stuck worker dead after "
            f"p50 {fmt(r['p50_ms'])} ms, p99 {fmt(r['p99_ms'])} ms, max {fmt(r['max_ms'])} ms"
        )
    sizes = [1_000, 10_000, 100_000]
    results["book_round_us"] = book_round_cost(sizes)
    costs = results["book_round_us"]
    print(
        "   deadline book, us per watchdog round: "
        + ", ".join(f"{int(n):,}: {costs[n]:.2f}" for n in costs)
        + f" (x{costs['100000'] / costs['1000']:.2f} for 100x the timers)"
    )
    results["idle_cpu"] = {}
    for pair in ("shm", "local", "file"):
        r = idle_cpu(pair, 1_000, 3.0 if args.quick else 5.0)
        results["idle_cpu"][pair] = r
        print(
            f"   idle {pair:<6} server, {r['active_timers']:,} long timers: {r['cpu_percent_of_a_core']:.2f}% of a core"
        )
    results["bytes_per_timer"] = memory_per_timer(args.scale_timers)
    print(
        "   server memory per active timer: "
        + ", ".join(f"{k} {v:.0f} B" for k, v in results["bytes_per_timer"].items())
    )

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten: {os.path.join(args.out, 'latest.json')}")
    print(f"plot: {plot(results, os.path.join(args.out, 'latest.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
