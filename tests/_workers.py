"""Worker bodies run in child processes by the tests (importable by spawned children)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any, Optional

import hangwatch


def stuck_local(q: Any, after: float) -> None:
    hangwatch.configure(hangwatch.LocalTimerClient(q))
    with hangwatch.expires(after=after):
        time.sleep(60)


def finishing_local(q: Any, blocks: int) -> None:
    hangwatch.configure(hangwatch.LocalTimerClient(q))
    for _ in range(blocks):
        with hangwatch.expires(after=30):
            pass
    with hangwatch.expires(after=30):
        time.sleep(0.2)


def exits_holding_local(q: Any, after: float) -> None:
    client = hangwatch.LocalTimerClient(q)
    client.acquire("held", time.time() + after)
    # leaves without releasing


def _recurse(depth: int, afters: list) -> None:
    with hangwatch.expires(after=afters[depth]):
        if depth + 1 < len(afters):
            _recurse(depth + 1, afters)
        else:
            time.sleep(0.05)


def recursion_local(q: Any, outer_sleep: float) -> None:
    """Outer acquire 30 s; inner (same default scope) 0.3 s, released at once; then the outer runs on."""
    hangwatch.configure(hangwatch.LocalTimerClient(q))
    with hangwatch.expires(after=30):  # a different scope: stays protected
        _recurse(0, [30, 0.3])
        time.sleep(outer_sleep)


def recursion_stuck_local(q: Any) -> None:
    """The inner acquire (same scope) shortens the deadline, and the inner block gets stuck."""
    hangwatch.configure(hangwatch.LocalTimerClient(q))

    def go(depth: int) -> None:
        with hangwatch.expires(after=30 if depth == 0 else 0.3):
            if depth == 0:
                go(1)
            else:
                time.sleep(60)

    go(0)


def stuck_file(path: str, after: float, signum: int) -> None:
    hangwatch.configure(hangwatch.FileTimerClient(path, signal=signum))
    with hangwatch.expires(after=after):
        time.sleep(60)


def tight_loop_file(path: str, blocks: int) -> None:
    client = hangwatch.FileTimerClient(path)
    for _ in range(blocks):
        with hangwatch.expires(after=60, scope="s", client=client):
            pass


def torch_stuck_file(path: str, after: float) -> None:
    import torch.distributed.elastic.timer as ttimer

    ttimer.configure(ttimer.FileTimerClient(path))
    with ttimer.expires(after=after, scope="torch-client"):
        time.sleep(60)


def torch_file_server(path: str, seconds: float) -> None:
    """Torch's own FileTimerServer (2.2+ form); it signals its own process after a reap."""
    import torch.distributed.elastic.timer as ttimer

    server = ttimer.FileTimerServer(path, "interop", max_interval=0.5)
    server.start()
    time.sleep(seconds)
    server.stop()


def torch_stuck_local(q: Any, after: float) -> None:
    import torch.distributed.elastic.timer as ttimer

    ttimer.configure(ttimer.LocalTimerClient(q))
    with ttimer.expires(after=after, scope="torch-local"):
        time.sleep(60)


# ----------------------------------------------------------------- safe reaping (issue 3)


def stuck_in_regex(q: Any, after: float) -> None:
    """Holds the GIL inside the re engine (catastrophic backtracking) right after acquiring."""
    import re

    hangwatch.configure(hangwatch.LocalTimerClient(q))
    with hangwatch.expires(after=after, scope="regex"):
        re.match(r"(a+)+$", "a" * 64 + "b")


def stuck_in_ctypes(path: str, after: float) -> None:
    """Holds the GIL inside a C call (ctypes.PyDLL keeps the GIL) right after acquiring."""
    import ctypes

    libc = ctypes.PyDLL(None)
    hangwatch.configure(hangwatch.FileTimerClient(path))
    with hangwatch.expires(after=after, scope="ctypes"):
        while True:  # a signal handler interrupts sleep(); go straight back in
            libc.sleep(60)


def ignores_sigterm_local(q: Any, after: float) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stuck_local(q, after)


def stuck_local_policy(q: Any, after: float, client_policy: Any, block_policy: Any) -> None:
    hangwatch.configure(hangwatch.LocalTimerClient(q, reap_policy=client_policy))
    with hangwatch.expires(after=after, reap_policy=block_policy):
        time.sleep(60)


def stuck_recording_usr2_local(q: Any, after: float, marker: str) -> None:
    """No stack dumps (dump_signal=None); its own SIGUSR2 handler records any SIGUSR2 in ``marker``."""
    import signal

    def record(signum: int, frame: Any) -> None:
        with open(marker, "a") as f:
            f.write("SIGUSR2\n")

    signal.signal(signal.SIGUSR2, record)
    hangwatch.configure(hangwatch.LocalTimerClient(q, dump_signal=None))
    with hangwatch.expires(after=after):
        time.sleep(60)


def keeps_own_usr2_handler(q: Any) -> None:
    """Exit 0 if configuring hangwatch left the application's SIGUSR2 handler in place."""
    import signal
    import sys

    def mine(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGUSR2, mine)
    hangwatch.configure(hangwatch.LocalTimerClient(q))
    sys.exit(0 if signal.getsignal(signal.SIGUSR2) is mine else 3)


def torch_stuck_recording_usr2(path: str, after: float, marker: str) -> None:
    import signal

    import torch.distributed.elastic.timer as ttimer

    def record(signum: int, frame: Any) -> None:
        with open(marker, "a") as f:
            f.write("SIGUSR2\n")

    signal.signal(signal.SIGUSR2, record)
    ttimer.configure(ttimer.FileTimerClient(path))
    with ttimer.expires(after=after, scope="torch-client"):
        time.sleep(60)


def self_killing_file_server(path: str, seconds: float) -> None:
    """A FileTimerServer that asks for torch's behaviour: it signals itself after a reap."""
    server = hangwatch.FileTimerServer(path, "self-kill", signal_self=True)
    server.start()
    time.sleep(seconds)
    server.stop()


# ----------------------------------------------------------------- agent (issue 4)


def fails_until_restart(succeed_at: int) -> int:
    """Exit 1 on the first attempts; return the rank times 10 from attempt ``succeed_at`` on."""
    import os
    import sys

    if int(os.environ["TORCHELASTIC_RESTART_COUNT"]) < succeed_at:
        sys.exit(1)
    return int(os.environ["RANK"]) * 10


def always_fails() -> None:
    import sys

    sys.exit(3)


def stuck_on_first_attempt() -> str:
    """Zero-setup: no configure() call; the agent configured the client from the environment."""
    import os

    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    with hangwatch.expires(after=0.5, scope="step"):
        if restart == 0 and os.environ["RANK"] == "1":
            hang_in_collective()
    return "done"


def hang_in_collective() -> None:
    time.sleep(3600)


def seed_trainer(message_queue: Any) -> None:
    """torch's documented worker: configure a LocalTimerClient on the queue passed through args."""
    import os

    hangwatch.configure(hangwatch.LocalTimerClient(message_queue))
    with hangwatch.expires(after=0.5):
        if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            time.sleep(3600)


def ignores_sigterm_or_fails(pid_file: str) -> None:
    """Rank 0 ignores SIGTERM and sleeps; rank 1 fails at once, which stops the group."""
    import os
    import signal
    import sys

    if os.environ["RANK"] == "1":
        time.sleep(0.5)
        sys.exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)


# ----------------------------------------------------------------- shared memory (issue 5)


def shm_stuck(path: str, after: float, scope: Optional[str], connect_timeout: float = 1.0) -> None:
    """Registers, runs healthy blocks, then gets stuck in one (default scope when scope is None)."""
    import time

    hangwatch.configure(hangwatch.SharedMemoryTimerClient(path, connect_timeout=connect_timeout))
    for _ in range(1000):
        with hangwatch.expires(after=60, scope="healthy"):
            pass
    if scope is None:
        with hangwatch.expires(after=after):
            time.sleep(60)
    with hangwatch.expires(after=after, scope=scope):
        time.sleep(60)


def shm_stuck_in_regex(path: str, after: float) -> None:
    """Holds the GIL inside the re engine right after its (system-call free) check-in."""
    import re

    hangwatch.configure(hangwatch.SharedMemoryTimerClient(path))
    with hangwatch.expires(after=after, scope="regex"):
        re.match(r"(a+)+$", "a" * 64 + "b")


def shm_nested_same_scope(path: str) -> None:
    """torch's semantics: the inner block re-acquires the scope; leaving it releases the scope for good."""
    import time

    hangwatch.configure(hangwatch.SharedMemoryTimerClient(path))
    with hangwatch.expires(after=60, scope="s"):
        with hangwatch.expires(after=0.2, scope="s"):
            pass
        time.sleep(0.8)  # the outer block outlives the inner deadline: released, so not reaped


def shm_many_short_blocks(path: str, blocks: int) -> None:
    """Healthy blocks with a short timeout, each left well before its deadline: never reaped."""
    hangwatch.configure(hangwatch.SharedMemoryTimerClient(path))
    for _ in range(blocks):
        with hangwatch.expires(after=0.5, scope="short"):
            pass
        with hangwatch.expires(after=0.5):
            pass


def shm_fork_child_stuck(path: str, pid_file: str) -> None:
    """The parent registers; a forked child gets stuck in a block; the parent waits for it."""
    import os
    import time

    hangwatch.configure(hangwatch.SharedMemoryTimerClient(path))
    guard = hangwatch.expires(after=60, scope="shared")
    with guard:
        pass
    child = os.fork()
    if child == 0:
        with hangwatch.expires(after=0.3, scope="child"):
            time.sleep(60)
        os._exit(0)
    with open(pid_file, "w") as f:
        f.write(str(child))
    with guard:  # the parent's own block after the fork still works
        _, status = os.waitpid(child, 0)
    raise SystemExit(0 if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 else 3)


def shm_recycles_slots(path: str, names: int) -> None:
    """A client with 4 slots uses many scope names, then gets stuck under the last one."""
    import time

    hangwatch.configure(hangwatch.SharedMemoryTimerClient(path, slots=4))
    for i in range(names):
        with hangwatch.expires(after=60, scope=f"step-{i}"):
            pass
    with hangwatch.expires(after=0.3, scope="last"):
        time.sleep(60)


def shm_policy_per_block(path: str) -> None:
    """A block asks for TERM,0.2,KILL and ignores SIGTERM."""
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    client = hangwatch.SharedMemoryTimerClient(path)
    with hangwatch.expires(
        after=0.2, scope="p", client=client, reap_policy=hangwatch.ReapPolicy.parse("TERM,0.2,KILL")
    ):
        time.sleep(60)


def shm_server_gone(path: str, conn: Any) -> None:
    """Reports how blocks behave while the server stops, and after a new one starts on the same path."""
    import time

    client = hangwatch.SharedMemoryTimerClient(path)
    hangwatch.configure(client)
    with hangwatch.expires(after=60, scope="ok"):
        pass
    conn.send("registered")
    conn.recv()  # the server was stopped
    t0 = time.monotonic()
    try:
        with hangwatch.expires(after=60, scope="ok"):
            pass
        conn.send(("no error", time.monotonic() - t0))
    except hangwatch.ServerUnavailableError as exc:
        conn.send(("error", time.monotonic() - t0, str(exc)))
    conn.recv()  # a new server listens on the path
    with hangwatch.expires(after=0.3, scope="after-restart"):
        time.sleep(60)


# ----------------------------------------------------------------- reliability (issue 6)


def client_for(kind: str, address: Any) -> hangwatch.TimerClient:
    """A hangwatch client of the transport ``kind`` ("local", "fifo", "shm") for the server at ``address``."""
    if kind == "local":
        return hangwatch.LocalTimerClient(address)
    if kind == "fifo":
        return hangwatch.FileTimerClient(address)
    if kind == "shm":
        return hangwatch.SharedMemoryTimerClient(address)
    raise ValueError(f"unknown transport {kind!r}")


def storm(kind: str, address: Any, threads: int, blocks: int, go: Any, report: Any) -> None:
    """``threads`` threads each run ``blocks`` nested blocks (a named outer, a default-scope inner) with
    deadlines that never come; reports (requests sent, errors) on ``report`` (a queue)."""
    import threading

    hangwatch.configure(client_for(kind, address))
    errors: list = []

    def run(t: int) -> None:
        try:
            for _ in range(blocks):
                with hangwatch.expires(after=600, scope=f"outer-{t}"):
                    with hangwatch.expires(after=600):
                        pass
        except Exception as exc:  # counted, not raised: the test reports every error
            errors.append(repr(exc))

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    go.wait()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    with hangwatch.expires(after=600, scope="held"):  # long enough for any transport's server to see it
        time.sleep(0.6)
    report.put((threads * blocks * 4 + 2, errors))


def churn(kind: str, address: Any) -> None:
    """Runs blocks until killed: nested, long deadlines, some held across a short sleep."""
    hangwatch.configure(client_for(kind, address))
    i = 0
    while True:
        i += 1
        with hangwatch.expires(after=600, scope="churn"):
            with hangwatch.expires(after=600):
                if i % 97 == 0:
                    time.sleep(0.001)


def survivor(kind: str, address: Any, stop: Any, after: float) -> None:
    """Runs healthy blocks until ``stop`` is set, then gets stuck in a block of ``after`` seconds."""
    hangwatch.configure(client_for(kind, address))
    while not stop.is_set():
        for _ in range(50):
            with hangwatch.expires(after=600, scope="healthy"):
                pass
    with hangwatch.expires(after=after, scope="stuck"):
        time.sleep(120)


def holds_queue_lock(q: Any, conn: Any) -> None:
    """Takes the queue's write lock (as a writer killed inside ``put`` would leave it) and waits to be killed."""
    q._wlock.acquire()
    conn.send("holding")
    time.sleep(120)


def tears_a_frame(q: Any) -> None:
    """Writes the start of a long queue message and dies before the rest, as a writer SIGKILLed mid-write."""
    import os
    import signal
    import struct

    os.write(q._writer.fileno(), struct.pack("!i", 5000) + b"\x80\x05" + b"x" * 100)
    os.kill(os.getpid(), signal.SIGKILL)


def releases_then_lingers(kind: str, address: Any, after: float, linger: float) -> None:
    """Leaves a short block at once, then lingers past its deadline with no timer: only a lost release kills it."""
    hangwatch.configure(client_for(kind, address))
    with hangwatch.expires(after=after, scope="short"):
        pass
    time.sleep(linger)


def serve(kind: str, address: Any, ready: Any) -> None:
    """Runs a timer server of the transport ``kind`` until killed."""
    server: Any = hangwatch.FileTimerServer(address) if kind == "fifo" else hangwatch.SharedMemoryTimerServer(address)
    server.start()
    ready.set()
    time.sleep(600)


def outlives_its_server(kind: str, address: Any, conn: Any) -> None:
    """Inside a block when the server dies: reports how leaving it, and the next block, behave (and how fast)."""
    hangwatch.configure(client_for(kind, address))
    outcomes = []
    with hangwatch.expires(after=60, scope="warm-up"):
        pass
    try:
        with hangwatch.expires(after=60, scope="inside"):
            conn.send("inside")
            conn.recv()  # the server was killed
            t0 = time.monotonic()
        outcomes.append(("left", "no error", time.monotonic() - t0))
    except hangwatch.ServerUnavailableError:
        outcomes.append(("left", "ServerUnavailableError", time.monotonic() - t0))
    t0 = time.monotonic()
    try:
        with hangwatch.expires(after=60, scope="next"):
            pass
        outcomes.append(("next", "no error", time.monotonic() - t0))
    except hangwatch.ServerUnavailableError:
        outcomes.append(("next", "ServerUnavailableError", time.monotonic() - t0))
    conn.send(outcomes)


def stuck_reading() -> None:
    time.sleep(3600)


def file_barrier(folder: str, rank: int, world: int) -> None:
    """Waits until every rank has entered it (a collective without torch)."""
    import os

    open(os.path.join(folder, f"in.{rank}"), "w").close()
    while sum(name.startswith("in.") for name in os.listdir(folder)) < world:
        time.sleep(0.01)


def barrier_job(folder: str) -> None:
    """Rank 1 never reaches the barrier; the others wait in it, with the shorter timers."""
    import os

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with hangwatch.expires(after=5.0 if rank == 1 else 0.5, scope="step"):
        if rank == 1:
            stuck_reading()
        file_barrier(folder, rank, world)


def holds_then_releases(path: str, after: float, go: str, linger: float) -> None:
    """Holds a timer until the file ``go`` appears, releases it, then lingers past its deadline:
    only a lost release kills it."""
    import os

    hangwatch.configure(hangwatch.FileTimerClient(path))
    with hangwatch.expires(after=after, scope="held"):
        while not os.path.exists(go):
            time.sleep(0.01)
    time.sleep(linger)


def reports_a_thread_id(conn: Any) -> None:
    """Starts a thread and sends its kernel thread id, then waits to be killed."""
    import threading

    ready = threading.Event()
    tids = []

    def run() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        time.sleep(600)

    threading.Thread(target=run, daemon=True).start()
    ready.wait()
    conn.send(tids[0])
    time.sleep(600)


# ----------------------------------------------------------------- hostile clients (issue 13)


def _register_raw(path: str, slots: int) -> Any:
    """Registers on a shared-memory server by hand: (socket, mapped slots as doubles)."""
    import json
    import mmap
    import socket
    import struct

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.send(json.dumps({"v": 1, "slots": slots, "mono": time.monotonic()}).encode())
    _data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
    fd = struct.unpack("i", anc[0][2][:4])[0]
    granted = json.loads(_data)["slots"]
    view = memoryview(mmap.mmap(fd, 8 * (8 + granted))).cast("d")
    return sock, view


def shm_bind_flood(path: str, seconds: float, ready: Any) -> None:
    """Floods the socket with large bind messages (pre-encoded: it sends far faster than a server parses)."""
    import json

    sock, _view = _register_raw(path, 4096)
    message = json.dumps({"bind": [[8 + i, f"flood-scope-{i:06d}" + "x" * 200] for i in range(250)]}).encode()
    ready.set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.send(message)
        except OSError:
            time.sleep(0.001)


def shm_slot_flipper(path: str, seconds: float, ready: Any) -> None:
    """Asks for 262,144 slots, binds what it gets, and flips every one of them, over and over."""
    import json

    sock, view = _register_raw(path, 262144)
    slots = int(view[1])  # what the server granted
    for start in range(0, slots, 512):
        sock.send(json.dumps({"bind": [[8 + i, f"s{i}"] for i in range(start, start + 512)]}).encode())
    ready.set()
    deadline = time.monotonic() + seconds
    value = 1.0
    while time.monotonic() < deadline:
        value = time.monotonic() + 600 if value == 0.0 else 0.0
        for i in range(8, 8 + slots):
            view[i] = value


def shm_silent_connections(path: str, count: int, conn: Any) -> None:
    """Opens ``count`` connections and never says hello on any; reports how many stayed open after a while."""
    import socket

    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        socks.append(s)
    conn.send("connected")
    conn.recv()  # the test waited past the hello timeout
    import select

    open_ = 0
    for s in socks:  # a connection the server closed is hung up (after its refusal message, if any)
        poller = select.poll()
        poller.register(s, select.POLLIN | select.POLLRDHUP)
        if not any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0)):
            open_ += 1
    conn.send(open_)


def fifo_many_scopes(path: str, scopes: int) -> None:
    """Holds ``scopes`` distinct timers at once, then waits to be killed."""
    client = hangwatch.FileTimerClient(path)
    for i in range(scopes):
        client.acquire(f"scope-{i}", time.time() + 600)
    time.sleep(60)


def reports_environ_token(pid_file: str) -> None:
    """A function worker: writes its pid, then waits to be stopped."""
    with open(pid_file, "w") as f:
        f.write(str(__import__("os").getpid()))
    time.sleep(60)


def forks_an_escaping_grandchild(pid_file: str) -> None:
    """A function worker (fork start method): forks a child that leaves for a session of its own, without exec."""
    import os

    child = os.fork()
    if child == 0:
        os.setsid()
        time.sleep(300)
        os._exit(0)
    with open(pid_file, "w") as f:
        f.write(str(child))
    time.sleep(300)


def shm_connection_churn(path: str, seconds: float, ready: Any) -> None:
    """Keeps 8 connections that never say hello, closing and opening them again and again."""
    import socket

    ready.set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        socks = []
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(path)
            except OSError:
                s.close()
                continue
            socks.append(s)
        time.sleep(0.05)
        for s in socks:
            s.close()


def ranked_stuck_file(path: str, after: float, rank: str) -> None:
    os.environ["RANK"] = rank  # as torchrun sets it: the client tells the server
    stuck_file(path, after, 9)


def children_only_server(path: str, events_file: str, seconds: float, member_pid_file: str) -> None:
    """A FIFO server reaping only its own children (in this process), and one child of it stuck with RANK=5."""
    server = hangwatch.FileTimerServer(path, "job", max_interval=0.05, children_only=True, event_file=events_file)
    server.start()
    member = mp.get_context("spawn").Process(target=ranked_stuck_file, args=(path, 0.3, "5"))
    member.start()
    with open(member_pid_file, "w") as f:
        f.write(str(member.pid))
    member.join(seconds)
    time.sleep(max(0.0, seconds - 1))
    server.stop()
    if member.is_alive():
        member.kill()
        member.join()


def _client_for(kind: str, endpoint: Any) -> Any:
    return hangwatch.LocalTimerClient(endpoint) if kind == "local" else hangwatch.FileTimerClient(endpoint)


def forks_inside_a_block(kind: str, endpoint: Any, child_done: Any, finish: Any) -> None:
    """Holds 'held' while a child forked inside the block leaves it; leaves it when ``finish`` is set."""
    hangwatch.configure(_client_for(kind, endpoint))
    with hangwatch.expires(after=60, scope="held"):
        pid = os.fork()
        if pid == 0:  # the child leaves the block too: its release must not be the parent's
            pass
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    child_done.set()
    with hangwatch.expires(after=60, scope="held"):
        finish.wait(60)


def decorated_blocks(kind: str, endpoint: Any, calls: int) -> None:
    """A decorated function called many times, one call raising: every call's timer is released."""
    hangwatch.configure(_client_for(kind, endpoint))

    @hangwatch.expires(after=30, scope="decorated")
    def step(i: int) -> int:
        if i == 3:
            raise KeyError(i)
        return i

    for i in range(calls):
        try:
            step(i)
        except KeyError:
            pass


def timed_blocks_file(path: str, plan: list) -> None:
    """``plan``: (scope, after, sleep, times) entries, run in order with a FIFO client that never signals."""
    client = hangwatch.FileTimerClient(path, signal=0)
    for scope, after, sleep, times in plan:
        for _ in range(times):
            with hangwatch.expires(after=after, scope=scope, client=client):
                time.sleep(sleep)


def torch_timed_blocks_file(path: str, blocks: int) -> None:
    import torch.distributed.elastic.timer as torch_timer

    client = torch_timer.FileTimerClient(path, signal=0)
    for _ in range(blocks):
        with torch_timer.expires(after=5, scope="torch's", client=client):
            time.sleep(0.01)


# ----------------------------------------------------------------- deadlines that fit the job (issue 16)


def learning_job(kind: str, address: Any, plan: list, hang: Optional[float], marks: Any) -> None:
    """Run ``plan`` ((scope, after, sleep, times, learn) entries, in order), then, if ``hang`` is given, hang
    in scope "step" with ``after=hang``; the monotonic time the hang began is put on ``marks`` (a queue)."""
    hangwatch.configure(client_for(kind, address))
    for scope, after, sleep, times, learn in plan:
        for _ in range(times):
            with hangwatch.expires(after=after, scope=scope, learn=learn):
                if sleep:
                    time.sleep(sleep)
    client = hangwatch.get_configured_client()
    if isinstance(client, hangwatch.SharedMemoryTimerClient):
        client.report_blocks()  # what a hang would otherwise hold back for up to a second
    if hang is None:
        return
    marks.put(time.monotonic())
    with hangwatch.expires(after=hang, scope="step"):
        time.sleep(60)


def slow_steps(kind: str, address: Any, steps: int, median: float, slow: float, every: int) -> None:
    """A healthy job: steps of ``median`` seconds, every ``every``-th one ``slow`` seconds, in scope "step"."""
    hangwatch.configure(client_for(kind, address))
    for i in range(steps):
        with hangwatch.expires(after=30, scope="step"):
            time.sleep(slow if i % every == every // 2 else median)


def shm_nested_blocks_counted(path: str, blocks: int) -> None:
    """Nested blocks of one scope: the inner release releases (torch's rule), so each pair counts once."""
    hangwatch.configure(hangwatch.SharedMemoryTimerClient(path))
    for _ in range(blocks):
        with hangwatch.expires(after=30, scope="nested"):
            with hangwatch.expires(after=30, scope="nested"):
                pass


def heartbeats(kind: str, address: Any, beats: int, interval: float, timeout: float, then: str, marks: Any) -> None:
    """Beat "loop" ``beats`` times, ``interval`` apart, with ``timeout``; then: "stall" (sleep, not beating),
    "gil" (hold the GIL in the re engine), or "stop" (stop the heartbeat, then sleep past its timeout and exit 0).
    The monotonic time of the last beat is sent on ``marks`` (a pipe's end: written at once, not by a thread)."""
    import re

    hangwatch.configure(client_for(kind, address))
    for _ in range(beats):
        hangwatch.heartbeat("loop", timeout)
        time.sleep(interval)
    hb = hangwatch.heartbeat("loop", timeout)
    marks.send(time.monotonic())
    if then == "stop":
        hb.stop()
        time.sleep(timeout * 3)
        return
    if then == "gil":
        re.match(r"(a+)+$", "a" * 64 + "b")
    time.sleep(60)


def heartbeat_in_with(kind: str, address: Any, timeout: float) -> None:
    """Beats inside a with block, then sleeps three timeouts after it (its exit stopped the heartbeat)."""
    hangwatch.configure(client_for(kind, address))
    with hangwatch.heartbeat("loop", timeout) as hb:
        assert hb.scope == "loop" and hb.timeout == timeout
        for _ in range(5):
            time.sleep(timeout / 5)
            hb.beat()
    time.sleep(timeout * 3)
