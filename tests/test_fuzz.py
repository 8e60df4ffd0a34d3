"""Hostile input, property-based: everything a client can put on each transport's wire.

Each server here runs its real loop body round by round in the test's thread, reading
from its real FIFO, queue pipe or socket, with the kill primitives replaced by
recorders (RecorderPin), so whatever the fuzzer makes up can never signal a process
of this machine. The properties, for every input:

- the server's round never raises (the watchdog neither dies nor drops a batch);
- no process outside the server's workers is ever pinned or signalled;
- every refused input is reported (a ``bad request`` event);
- valid clients are still served afterwards.

``HANGWATCH_FUZZ_EXAMPLES`` sets the examples per test (the stress mode runs a million
inputs); ``HANGWATCH_FUZZ_REPORT`` names a file where each test appends its counts.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import pickle
import socket
import struct
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hangwatch import FileTimerServer, Limits, LocalTimerServer, SharedMemoryTimerServer, TimerRequest
from hangwatch.local import WorkerRequest

import _workers
from conftest import EventLog, RecorderPin, wait_for

EXAMPLES = int(os.environ.get("HANGWATCH_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
WORKER = 4_194_000  # the one allowed "worker": a pid the recorder stands in for, never a real process's concern
ME = os.getpid()
EVERY_EVENT = Limits(refusal_events_per_second=None)  # every refusal is counted here: none may be rate-limited

# ----------------------------------------------------------------- what a client can send

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
pids = st.one_of(st.sampled_from([-1, 0, 1, ME, WORKER, 2**22, 2**31 - 1, 2**31, 2**63, -(2**31)]), junk)
# Deadlines around now (past ones expire at once and exercise the reap), and the odd ones.
times = st.one_of(
    st.floats(-5, 5).map(lambda d: time.time() + d),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-1, 0, -1.0, 1e308, -1e308, 5e-324]),
    junk,
)
identity = st.one_of(
    junk,
    st.fixed_dictionaries(
        {},
        optional={
            "start": st.one_of(st.integers(-1, 2**63), junk),
            "pidfd_ino": st.one_of(st.integers(-1, 2**63), junk),
            "dump_signal": st.one_of(st.integers(-3, 70), junk),
            "dump_fd": st.one_of(st.integers(-3, 2000), junk),
            "reap": st.one_of(st.sampled_from(["KILL", "TERM,0.1,KILL", "USR1,0,TERM,0.1,KILL", ""]), junk),
        },
    ),
)


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


raw_line = st.one_of(
    st.binary(max_size=160).map(lambda b: b.replace(b"\n", b" ")),
    st.integers(1, 4000).map(lambda n: b"[" * n),  # nesting past the JSON decoder's recursion limit
    st.integers(1, 2000).map(deep),
)
json_line = st.fixed_dictionaries(
    {},
    optional={
        "version": st.one_of(st.just(1), junk),
        "pid": pids,
        "scope_id": st.one_of(st.text(max_size=30), junk),
        "expiration_time": times,
        "signal": st.one_of(st.integers(-3, 70), junk),
        "hangwatch": identity,
    },
).map(lambda obj: json.dumps(obj).encode())


# ----------------------------------------------------------------- driving a server round by round


def run_rounds(server: Any, n: int = 2) -> None:
    """The watchdog's own round (wait for descriptors, read requests, apply, reap), without its thread."""
    for _ in range(n):
        server._wait(0)
        server.register_timers(server._request_queue.get(1 << 20, 0))
        server._expire_and_reap()


def check_targets(allowed: bool, only: int = WORKER) -> None:
    """Nothing but ``only`` is pinned or signalled (any pid > 1 but this one when no allow-list is set)."""
    for pid in RecorderPin.pinned + [p for p, _ in RecorderPin.signals]:
        assert isinstance(pid, int) and not isinstance(pid, bool), pid
        if allowed:
            assert pid == only, pid
        else:
            assert pid > 1 and pid != ME, pid


def report(name: str, **counts: int) -> None:
    path = os.environ.get("HANGWATCH_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **counts}) + "\n")


def pinned_canary(canaries: List[int]) -> Any:
    """A pin factory: real pins for the test's own canary workers, recorders for every other pid."""
    from hangwatch._reaper import ProcessPin

    return lambda pid: ProcessPin(pid) if pid in canaries else RecorderPin(pid)


# ----------------------------------------------------------------- the FIFO


@pytest.fixture(params=[True, False], ids=["allow-list", "torch-rules"])
def fifo_server(request: Any, tmp_path: Path) -> Iterator[Tuple[FileTimerServer, int, bool, List[int]]]:
    canaries: List[int] = []
    allowed = request.param
    path = str(tmp_path / "fuzz.fifo")
    server = FileTimerServer(
        path, pin=pinned_canary(canaries), allowed_pids=[WORKER] if allowed else None, limits=EVERY_EVENT
    )
    server._open_selector()
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        yield server, fd, allowed, canaries
    finally:
        os.close(fd)
        server.stop()


def test_fifo_lines(fifo_server: Tuple[FileTimerServer, int, bool, List[int]], events: EventLog) -> None:
    """Any line on the FIFO is applied or refused with an event; nobody else is signalled; still serving."""
    server, fd, allowed, canaries = fifo_server
    tried = [0]

    @FUZZ
    @given(st.lists(st.one_of(json_line, raw_line), min_size=1, max_size=12))
    def lines(batch: List[bytes]) -> None:
        before_count = server.request_count
        before_bad = sum(1 for e in events.named("bad request") if "line" in e.details)
        data = b"".join(line + b"\n" for line in batch)
        for at in range(0, len(data), 16384):
            os.write(fd, data[at : at + 16384])
            run_rounds(server)
        run_rounds(server)
        counted = [line for line in batch if line.strip()]
        refused = sum(1 for e in events.named("bad request") if "line" in e.details) - before_bad
        assert server.request_count - before_count + refused == len(counted)
        check_targets(allowed)
        tried[0] += len(batch)

    lines()
    report(f"fifo[{'allow-list' if allowed else 'torch-rules'}]", inputs=tried[0], signals=len(RecorderPin.signals))
    # Still serving: a real worker gets stuck and is reaped, for real.
    if allowed:
        server.set_allowed_pids([WORKER])
    p = mp.get_context("spawn").Process(target=_workers.stuck_file, args=(server._file_path, 0.3, 9))
    p.start()
    canaries.append(p.pid)
    if allowed:
        server.set_allowed_pids([WORKER, p.pid])
    server.start()
    p.join(30)
    assert p.exitcode == -9


# ----------------------------------------------------------------- the multiprocessing queue


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return struct.pack("!i", len(data)) + data


requests = st.one_of(
    st.builds(TimerRequest, pids, st.one_of(st.text(max_size=20), junk), times),
    st.builds(WorkerRequest, pids, st.one_of(st.text(max_size=20), junk), times, identity),
    junk,
)
garbage = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.integers(-(2**31), 2**31 - 1), st.binary(max_size=40)).map(
        lambda t: struct.pack("!i", t[0]) + b"\x80\x05" + t[1]
    ),
)


@pytest.fixture(params=[True, False], ids=["allow-list", "torch-rules"])
def queue_server(request: Any) -> Iterator[Tuple[LocalTimerServer, Any, bool, List[int]]]:
    canaries: List[int] = []
    q = mp.get_context("spawn").Queue()
    server = LocalTimerServer(
        q, pin=pinned_canary(canaries), allowed_pids=[WORKER] if request.param else None, limits=EVERY_EVENT
    )
    server._open_selector()
    try:
        yield server, q, request.param, canaries
    finally:
        server.stop()


def test_queue_messages(queue_server: Tuple[LocalTimerServer, Any, bool, List[int]], events: EventLog) -> None:
    """Any object, and any bytes, on the queue's pipe: never a crash, never a wrong target; the requests
    written after garbage are read once the garbage is known to be torn."""
    server, q, allowed, canaries = queue_server
    fd = q._writer.fileno()
    reader = server._request_queue
    tried = [0]

    @FUZZ
    @given(st.lists(st.one_of(requests.map(frame), garbage), min_size=1, max_size=10))
    def messages(batch: List[bytes]) -> None:
        for chunk in batch:
            os.write(fd, chunk)
            run_rounds(server, 1)
        for _ in range(sum(map(len, batch)) + 1):  # whatever is left is garbage: let time show it torn
            if not reader._buffer:
                break
            reader._partial_since = time.monotonic() - 60
            run_rounds(server, 1)
        assert reader._buffer == b""
        check_targets(allowed)
        # A valid release after the garbage is read and applied.
        before = server.request_count
        os.write(fd, frame(TimerRequest(WORKER, "after-garbage", -1)))
        run_rounds(server, 1)
        assert server.request_count == before + 1
        tried[0] += len(batch)

    messages()
    report(f"queue[{'allow-list' if allowed else 'torch-rules'}]", inputs=tried[0], signals=len(RecorderPin.signals))
    p = mp.get_context("spawn").Process(target=_workers.stuck_local, args=(q, 0.3))
    p.start()
    canaries.append(p.pid)
    if allowed:
        server.set_allowed_pids([WORKER, p.pid])
    server.start()
    p.join(30)
    assert p.exitcode == -9


# ----------------------------------------------------------------- shared memory


hellos = st.one_of(
    st.fixed_dictionaries(
        {"v": st.one_of(st.just(1), junk), "slots": st.one_of(st.integers(-2, 70), junk), "mono": times},
        optional={"after": st.one_of(st.floats(allow_nan=True, allow_infinity=True), junk)},
    ).flatmap(lambda h: identity.map(lambda i: {**h, **i} if isinstance(i, dict) else h)),
    st.binary(max_size=100),
    st.integers(1, 3000).map(deep),
)
shm_messages = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "bind": st.one_of(
                st.lists(st.tuples(st.one_of(st.integers(-2, 80), junk), st.one_of(st.text(max_size=10), junk))),
                junk,
            ),
            "policy": st.one_of(
                st.lists(st.tuples(st.integers(-2, 80), st.one_of(st.just("KILL"), st.just(None), junk))),
                junk,
            ),
            "after": st.one_of(st.floats(allow_nan=True, allow_infinity=True), junk),
        },
    ).map(lambda m: json.dumps(m).encode()),
    st.binary(max_size=100),
    st.integers(1, 3000).map(deep),
)
slot_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-5, 5).map(lambda d: time.monotonic() + d),
    st.sampled_from([0.0, -0.0, 5e-324, -1.0]),
)
shm_actions = st.lists(
    st.one_of(shm_messages.map(lambda m: ("send", m)), st.tuples(st.just("store"), st.integers(0, 70), slot_values)),
    max_size=10,
)


def connect(path: str, hello: Any, server: Any) -> Tuple[socket.socket, Optional[Dict[str, Any]], List[int]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(path)
    sock.send(hello if isinstance(hello, bytes) else json.dumps(hello).encode())
    run_rounds(server, 3)
    sock.setblocking(False)
    try:
        data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
    except BlockingIOError:
        return sock, None, []
    fds = [struct.unpack("i", payload[:4])[0] for _, _, payload in anc]
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    return sock, reply, fds


@pytest.fixture
def shm_server(tmp_path: Path) -> Iterator[Tuple[SharedMemoryTimerServer, List[int]]]:
    canaries: List[int] = []
    # The registering peer is this test process (the kernel says so); only it may be "signalled".
    server = SharedMemoryTimerServer(
        str(tmp_path / "fuzz.sock"), pin=pinned_canary(canaries), allowed_pids=[ME], limits=EVERY_EVENT
    )
    server._open_selector()
    try:
        yield server, canaries
    finally:
        server.stop()


def test_shm_registrations_messages_and_slots(
    shm_server: Tuple[SharedMemoryTimerServer, List[int]], events: EventLog
) -> None:
    """Any hello, any message, any slot value: refused with an event or applied; only the registered
    process itself can ever be a target; the server keeps serving."""
    server, canaries = shm_server
    tried = [0]

    @FUZZ
    @given(hellos, shm_actions)
    def session(hello: Any, actions: List[Any]) -> None:
        before_bad = len(events.named("bad request"))
        sock, reply, fds = connect(server.socket_path, hello, server)
        try:
            registered = bool(reply and reply.get("ok") and fds)
            if not registered:
                assert len(events.named("bad request")) > before_bad  # every refusal is reported
                return
            capacity = int(reply["slots"])  # type: ignore[index]
            mm = mmap.mmap(fds[0], (8 + capacity) * 8)
            view = memoryview(mm).cast("d")
            for action in actions:
                if action[0] == "send":
                    try:
                        sock.send(action[1])
                    except OSError:
                        break  # disconnected for an earlier bad message
                elif action[1] < capacity:
                    view[8 + action[1]] = action[2]
                for region in server._request_queue._regions.values():
                    region.next_scan = 0.0  # read the slots this round
                run_rounds(server)
            view.release()
            mm.close()
        finally:
            sock.close()
            for fd in fds:
                os.close(fd)
            run_rounds(server)
            tried[0] += 1 + len(actions)
        check_targets(True, only=ME)  # the kernel-vouched peer: a message cannot name a pid

    session()
    assert wait_for(lambda: (run_rounds(server), server.registered_workers == 0)[1], 5)
    report("shm", inputs=tried[0], signals=len(RecorderPin.signals))
    p = mp.get_context("spawn").Process(target=_workers.shm_stuck, args=(server.socket_path, 0.3, "canary"))
    p.start()
    canaries.append(p.pid)
    server.set_allowed_pids([ME, p.pid])
    server.start()
    p.join(30)
    assert p.exitcode == -9


def test_a_deeply_nested_line_is_refused_and_the_next_one_served(fifo_path: str, events: EventLog) -> None:
    """Found by the fuzzer: JSON nested past the decoder's recursion limit raised RecursionError out of
    the watchdog's round, and the lines read with it were lost."""
    server = FileTimerServer(fifo_path, pin=RecorderPin, allowed_pids=[WORKER])
    server._open_selector()
    try:
        fd = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        good = {"version": 1, "pid": WORKER, "scope_id": "s", "expiration_time": time.time() + 60, "signal": 9}
        os.write(fd, b"[" * 4000 + b"\n" + json.dumps(good).encode() + b"\n")
        os.close(fd)
        run_rounds(server)
        assert server.active_timers == 1
        assert any("line" in e.details for e in events.named("bad request"))
    finally:
        server.stop()


def test_an_unhashable_worker_id_is_refused_and_the_batch_served(events: EventLog) -> None:
    """Found by the fuzzer: a queue message whose worker_id was a list raised TypeError out of the
    round, losing every request read with it."""
    q = mp.get_context("spawn").Queue()
    server = LocalTimerServer(q, pin=RecorderPin, allowed_pids=[WORKER])
    server._open_selector()
    try:
        fd = q._writer.fileno()
        os.write(
            fd, frame(TimerRequest([], "s", time.time() + 60)) + frame(TimerRequest(WORKER, "s", time.time() + 60))
        )
        run_rounds(server)
        assert server.active_timers == 1
        assert any("worker_id must be a pid" in e.details["reason"] for e in events.named("bad request"))
    finally:
        server.stop()


@pytest.mark.parametrize("message", [b"", b"[" * 4000], ids=["empty", "deeply-nested"])
def test_shm_empty_and_deep_messages_are_refused(tmp_path: Path, events: EventLog, message: bytes) -> None:
    """Found by the fuzzer: an empty message was taken for a hang-up (no reply, no event); JSON nested
    past the decoder's limit raised RecursionError out of the round."""
    server = SharedMemoryTimerServer(str(tmp_path / "s.sock"), pin=RecorderPin)
    server._open_selector()
    try:
        sock, reply, fds = connect(server.socket_path, message, server)
        sock.close()
        assert reply is not None and "error" in reply and fds == []
        assert any("registration refused" in e.details["reason"] for e in events.named("bad request"))
    finally:
        server.stop()
