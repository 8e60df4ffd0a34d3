"""hangwatch benchmarks, side by side with torch.distributed.elastic.timer when it is installed.

Run:  python benchmarks/run.py            (about a minute)
      python benchmarks/run.py --torch-reap   (adds torch's reap latency at its defaults: ~70 s more)

Figures:
- us per ``with expires(...)`` block in a worker process, named scope and default scope,
  for each client/server pair;
- a FIFO client's tight loop of 1,000,000 blocks: completes, or how far it got;
- reap latency: how long after its deadline a stuck worker is signalled, with the
  servers' default max_interval (60 s Local, 10 s File).

Machines are shared and noisy: compare the ratios within one run, not absolute times
across runs. Results are also written to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import hangwatch

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: harmless
try:
    import torch.distributed.elastic.timer as ttimer
except Exception:  # torch is optional
    ttimer = None

ctx = mp.get_context("spawn")


# ------------------------------------------------------------------ worker side (runs in a child)


def _make_client(lib: str, pair: str, endpoint: Any) -> Any:
    mod: Any = hangwatch if lib == "hangwatch" else ttimer
    return mod.LocalTimerClient(endpoint) if pair == "local" else mod.FileTimerClient(endpoint)


def _client_loop(lib: str, pair: str, endpoint: Any, blocks: int, default_scope: bool, conn: Any) -> None:
    mod: Any = hangwatch if lib == "hangwatch" else ttimer
    mod.configure(_make_client(lib, pair, endpoint))
    expires = mod.expires
    done = 0
    error = None
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


def _stuck(lib: str, pair: str, endpoint: Any, after: float, deadline: Any) -> None:
    mod: Any = hangwatch if lib == "hangwatch" else ttimer
    mod.configure(_make_client(lib, pair, endpoint))
    deadline.value = time.time() + after
    with mod.expires(after=after, scope="stuck"):
        time.sleep(3600)


# ------------------------------------------------------------------ servers


def _torch_file_server(path: str) -> None:
    """Torch's FileTimerServer, in a process of its own: it signals its own process after a reap."""
    server = ttimer.FileTimerServer(path, "bench")
    server.start()
    time.sleep(3600)


class Servers:
    """Starts one server of a (library, pair) and hands out its endpoint."""

    def __init__(self, lib: str, pair: str, log_event: Optional[Callable[[str, Any], None]] = None) -> None:
        self.lib, self.pair = lib, pair
        extra = {"log_event": log_event} if log_event is not None else {}
        self.process: Optional[Any] = None
        mod: Any = hangwatch if lib == "hangwatch" else ttimer
        if pair == "local":
            self.endpoint: Any = ctx.Queue()
            self.server = mod.LocalTimerServer(self.endpoint, **extra)
            self.server.start()
            return
        self.endpoint = os.path.join(tempfile.mkdtemp(prefix="hw-bench-"), "timer.fifo")
        if lib == "hangwatch":
            self.server = mod.FileTimerServer(self.endpoint, "bench", **extra)
            self.server.start()
        else:
            self.process = ctx.Process(target=_torch_file_server, args=(self.endpoint,), daemon=True)
            self.process.start()
            deadline = time.monotonic() + 120
            while not os.path.exists(self.endpoint) and time.monotonic() < deadline:
                time.sleep(0.05)

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


def per_block(lib: str, pair: str, blocks: int, default_scope: bool) -> Dict[str, Any]:
    servers = Servers(lib, pair)
    try:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_client_loop, args=(lib, pair, servers.endpoint, blocks, default_scope, child))
        p.start()
        elapsed, done, error = parent.recv()
        p.join()
    finally:
        servers.stop()
    return {"us_per_block": elapsed / max(done, 1) * 1e6, "blocks": done, "error": error}


def reap_latency(lib: str, pair: str, samples: int, after: float = 0.3) -> Dict[str, Any]:
    """Seconds from a stuck worker's deadline until the parent sees it dead, the same way for every pair."""
    late_ms: List[float] = []
    signalled_ms: List[float] = []

    def on_event(name: str, request: Any) -> None:  # hangwatch's servers say when they signalled
        if name == "kill worker process":
            signalled_ms.append((time.time() - request.expiration_time) * 1000)

    servers = Servers(lib, pair, log_event=on_event if lib == "hangwatch" else None)
    try:
        for _ in range(samples):
            deadline = ctx.Value("d", 0.0)
            p = ctx.Process(target=_stuck, args=(lib, pair, servers.endpoint, after, deadline))
            p.start()
            p.join(120)  # returns as soon as the worker dies (it waits on the process sentinel)
            died = time.time()
            if p.is_alive():
                p.kill()
                p.join()
            elif deadline.value:
                late_ms.append((died - deadline.value) * 1000)
    finally:
        servers.stop()
    return {
        "samples": len(late_ms),
        "median_ms": statistics.median(late_ms) if late_ms else None,
        "max_ms": max(late_ms) if late_ms else None,
        "signalled_median_ms": statistics.median(signalled_ms) if signalled_ms else None,
        "signalled_max_ms": max(signalled_ms) if signalled_ms else None,
    }


# ------------------------------------------------------------------ main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=100_000, help="blocks per us-per-block figure")
    parser.add_argument("--tight-loop", type=int, default=1_000_000, help="blocks in the FIFO tight loop")
    parser.add_argument("--reap-samples", type=int, default=10)
    parser.add_argument("--torch-reap", action="store_true", help="also measure torch's reap latency (slow)")
    args = parser.parse_args(argv)

    libs = ["hangwatch"] + (["torch"] if ttimer is not None else [])
    results: Dict[str, Any] = {"python": sys.version.split()[0], "per_block": {}, "reap": {}, "tight_loop": {}}
    print(f"python {results['python']}; torch {'installed' if ttimer else 'not installed'}\n")

    print("us per `with expires(...)` block (worker process; lower is better)")
    print(f"  {'pair':<22}{'named scope':>14}{'default scope':>16}")
    for pair in ("local", "file"):
        for lib in libs:
            # torch's File client crashes after a few hundred blocks in a tight loop: measure it short.
            n = 250 if (lib, pair) == ("torch", "file") else args.blocks
            named = per_block(lib, pair, n, default_scope=False)
            default = per_block(lib, pair, n if lib == "hangwatch" else min(n, 2000), default_scope=True)
            results["per_block"][f"{lib}-{pair}"] = {"named": named, "default": default}
            print(f"  {lib + ' ' + pair:<22}{named['us_per_block']:>14.2f}{default['us_per_block']:>16.2f}")
    for pair in ("local", "file"):
        if "torch" in libs:
            ours = results["per_block"][f"hangwatch-{pair}"]["named"]["us_per_block"]
            theirs = results["per_block"][f"torch-{pair}"]["named"]["us_per_block"]
            print(f"  -> hangwatch {pair} named scope is {theirs / ours:.1f}x cheaper than torch's")

    print(f"\nFIFO client, tight loop of {args.tight_loop:,} blocks")
    for lib in libs:
        n = args.tight_loop if lib == "hangwatch" else 20_000
        r = per_block(lib, "file", n, default_scope=False)
        results["tight_loop"][lib] = r
        status = "completed" if r["error"] is None else f"failed after {r['blocks']:,} blocks ({r['error'][:60]})"
        print(f"  {lib:<10} {status}; {r['us_per_block']:.2f} us per block")

    print("\nreap latency after the deadline, servers' default max_interval (workers import torch, as trainers do)")
    print(f"  {'pair':<22}{'dead after (median / max ms)':>32}{'signalled after (median / max ms)':>36}")
    for pair in ("local", "file"):
        for lib in libs:
            if lib == "torch" and not args.torch_reap:
                continue
            r = reap_latency(lib, pair, args.reap_samples if lib == "hangwatch" else 1)
            results["reap"][f"{lib}-{pair}"] = r
            signalled = (
                f"{r['signalled_median_ms']:.1f} / {r['signalled_max_ms']:.1f}" if r["signalled_median_ms"] else "-"
            )
            print(f"  {lib + ' ' + pair:<22}{r['median_ms']:>18.1f} / {r['max_ms']:<11.1f}{signalled:>36}")
    if not args.torch_reap and "torch" in libs:
        print("  (torch: add --torch-reap; measured here 59.5 s Local, 9.5 s File)")

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten: {os.path.join(out, 'latest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
