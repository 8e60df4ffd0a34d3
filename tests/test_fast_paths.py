"""The fast paths of the torch-compatible pairs decide exactly as the general ones do.

The FIFO server decodes the line shape every client writes without the JSON parser; the
queue server builds the requests of frames it has seen (but for the time) without
unpickling; the servers decode a worker's identity once; and ``expires`` hands out cached
guards for hangwatch's clients. Each must give what the general path gives.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import pickle
import time
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hangwatch
from hangwatch._worker import parse_identity
from hangwatch.file import _parse_canonical, _parse_line
from hangwatch.local import WorkerRequest, _KnownFrames

import _workers
from conftest import run_worker, wait_for

# ------------------------------------------------------------------ the FIFO's canonical lines

scopes = st.text(max_size=40)
times = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**12), 10**12),
    st.sampled_from(["1e999", "-0.0", "1E5", "0.5e-3", "12345678901234567890123", "01", "1.", "-"]),
)
fields = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["start", "dump_signal", "dump_fd", "rank", "reap", "x"]), st.integers(-3, 99)),
    st.sampled_from(['{"a": 1}, "pid": 7', "[1]", '{"a": {"b": 2}}', "{", '{"s":0}']),
)


def _line(pid: Any, scope: str, expiration: Any, signum: int, field: Any) -> bytes:
    number = expiration if isinstance(expiration, str) else json.dumps(expiration)
    line = f'{{"version": 1, "pid": {json.dumps(pid)}, "scope_id": {json.dumps(scope)}, '
    line += f'"expiration_time": {number}, "signal": {signum}'
    if field is not None:
        line += ', "hangwatch": ' + (field if isinstance(field, str) else json.dumps(field, separators=(",", ":")))
    return (line + "}").encode()


@settings(max_examples=600, deadline=None)
@given(st.integers(-5, 2**40), scopes, times, st.integers(-70, 70), fields)
def test_a_canonical_line_decodes_as_the_json_parser_does(
    pid: int, scope: str, expiration: Any, signum: int, field: Any
) -> None:
    """Whatever the fast path accepts, the JSON parser reads the same fields, of the same types."""
    line = _line(pid, scope, expiration, signum, field)
    fast = _parse_canonical(line)
    if fast is None:
        return
    obj = json.loads(line)
    assert (fast.worker_id, fast.scope_id, fast.signal) == (obj["pid"], obj["scope_id"], obj["signal"])
    assert fast.expiration_time == obj["expiration_time"] and type(fast.expiration_time) is type(obj["expiration_time"])
    assert math.isfinite(fast.expiration_time)
    assert fast.hangwatch == obj.get("hangwatch")
    full, reason = _parse_line(line.replace(b'{"version": 1,', b'{"version":1,', 1))  # the general path
    assert full is not None, reason
    assert full == fast and full.hangwatch == fast.hangwatch


def test_the_lines_clients_write_take_the_fast_path(tmp_path: Path) -> None:
    """hangwatch's client (guard and acquire) and torch's request format are all canonical."""
    fifo = str(tmp_path / "t.fifo")
    server = hangwatch.FileTimerServer(fifo)
    server.start()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a second reader: sees part of what is written
    try:
        client = hangwatch.FileTimerClient(fifo, keep_open=True)
        lines = [
            hangwatch.FileTimerRequest(4242, "torch's", 1700000000.25, 9).to_json().encode(),
        ]
        sent: list = []
        client._send_data = sent.append  # type: ignore[method-assign]  # what would be written
        client._send = lambda line: sent.append(line.encode())  # type: ignore[method-assign]
        client.acquire("ü scope", time.time() + 5)
        client.release("ü scope")
        with hangwatch.expires(after=5, scope="guarded", client=client):
            pass
        lines += [line.rstrip(b"\n") for line in sent]
        assert len(lines) == 5
        for line in lines:
            assert _parse_canonical(line) is not None, line
    finally:
        os.close(reader)
        server.stop()


# ------------------------------------------------------------------ the queue's known frames

requests = st.builds(
    lambda cls, pid, scope, t, ext: cls(pid, scope, t, ext) if cls is WorkerRequest else cls(pid, scope, t),
    st.sampled_from([WorkerRequest, hangwatch.TimerRequest]),
    st.integers(0, 2**40),
    scopes,
    st.one_of(st.floats(allow_nan=False), st.just(-1)),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(["start", "rank", "x"]), st.integers(0, 2**33))),
)


@settings(max_examples=400, deadline=None)
@given(requests, st.floats(allow_nan=False), requests)
def test_a_known_frame_decodes_as_unpickling_does(first: Any, later_time: float, other: Any) -> None:
    """After one frame is learned, the same frame with another time, and any other frame, decode as pickle does."""
    known = _KnownFrames()
    data = pickle.dumps(first, pickle.HIGHEST_PROTOCOL)
    known.learn(data, pickle.loads(data))
    same = first
    if isinstance(first.expiration_time, float):
        same = type(first)(
            first.worker_id,
            first.scope_id,
            later_time,
            *([first.hangwatch] if isinstance(first, WorkerRequest) else []),
        )
    for request in (same, other):
        frame = b"xx" + pickle.dumps(request, pickle.HIGHEST_PROTOCOL) + b"yy"  # decoded in place
        got = known.decode(frame, 2, len(frame) - 2)
        want = pickle.loads(frame[2:-2])
        if got is None:  # not known: unpickled, as before
            continue
        assert type(got) is type(want) and got == want
        assert getattr(got, "hangwatch", None) == getattr(want, "hangwatch", None)


def test_a_workers_acquires_are_known_after_the_first() -> None:
    """The client's acquires of one scope differ only in the time: the second is built without unpickling."""
    known = _KnownFrames()
    frames = [pickle.dumps(WorkerRequest(77, "s", t, {"start": 5}), pickle.HIGHEST_PROTOCOL) for t in (1.5, 2.5)]
    assert known.decode(frames[0], 0, len(frames[0])) is None
    known.learn(frames[0], pickle.loads(frames[0]))
    got = known.decode(frames[1], 0, len(frames[1]))
    assert got == WorkerRequest(77, "s", 2.5) and got.hangwatch == {"start": 5}


# ------------------------------------------------------------------ identities


def test_a_decoded_identity_is_not_reused_for_a_lookalike() -> None:
    """True == 1 in Python, but an identity with start=True is refused even after one with start=1."""
    assert parse_identity({"start": 1, "rank": 2}).rank == 2
    with pytest.raises(ValueError, match="start"):
        parse_identity({"start": True, "rank": 2})
    with pytest.raises(ValueError, match="rank"):
        parse_identity({"start": 1, "rank": 2.0})


# ------------------------------------------------------------------ cached guards, real processes


@pytest.fixture(params=["local", "file"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tuple[str, Any, Any]]:
    ctx = mp.get_context("fork")
    if request.param == "local":
        endpoint: Any = ctx.Queue()
        server: Any = hangwatch.LocalTimerServer(endpoint)
    else:
        endpoint = str(tmp_path / "t.fifo")
        server = hangwatch.FileTimerServer(endpoint)
    server.start()
    try:
        yield request.param, endpoint, server
    finally:
        server.stop()


def test_a_child_forked_inside_a_block_releases_only_its_own_timer(pair: Tuple[str, Any, Any]) -> None:
    """The guard's prepared release carries the pid: a forked child leaving the block must not release the parent's."""
    kind, endpoint, server = pair
    ctx = mp.get_context("fork")
    child_done, finish = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_workers.forks_inside_a_block, args=(kind, endpoint, child_done, finish))
    p.start()
    try:
        assert child_done.wait(30)
        # the parent's acquire, the child's release, the parent's release, its second acquire
        assert wait_for(lambda: server.request_count >= 4, 10)
        assert server.active_timers == 1
        assert wait_for(lambda: server.active_timers == 1, 1)
    finally:
        finish.set()
        p.join(30)
    assert p.exitcode == 0
    assert wait_for(lambda: server.active_timers == 0, 10)


def test_a_decorated_function_releases_every_call(pair: Tuple[str, Any, Any]) -> None:
    """One cached guard serves every call of a decorated function, including one that raises."""
    kind, endpoint, server = pair
    p = run_worker(_workers.decorated_blocks, kind, endpoint, 20, ctx=mp.get_context("fork"))
    assert p.exitcode == 0
    assert wait_for(lambda: server.request_count >= 40, 10)
    assert server.active_timers == 0


def test_expires_reuses_one_guard_per_scope(pair: Tuple[str, Any, Any]) -> None:
    """A named scope's guard is made once per client and after; another after makes another."""
    kind, endpoint, _ = pair
    client = _workers._client_for(kind, endpoint)
    first = hangwatch.expires(after=5, scope="s", client=client)
    assert hangwatch.expires(after=5, scope="s", client=client) is first
    assert hangwatch.expires(after=6, scope="s", client=client) is not first


def test_a_subclass_that_overrides_acquire_is_called(pair: Tuple[str, Any, Any]) -> None:
    """A client subclass's own acquire/release are never bypassed by the cached guards."""
    kind, endpoint, _ = pair
    base = type(_workers._client_for(kind, endpoint))
    seen: list = []

    class Counting(base):  # type: ignore[misc, valid-type]
        def acquire(self, scope_id: str, expiration_time: float, reap_policy: Any = None) -> None:
            seen.append(("acquire", scope_id))
            super().acquire(scope_id, expiration_time, reap_policy)

        def release(self, scope_id: str) -> None:
            seen.append(("release", scope_id))
            super().release(scope_id)

    client = Counting(endpoint)
    for _ in range(2):
        with hangwatch.expires(after=5, scope="mine", client=client):
            pass
    assert seen == [("acquire", "mine"), ("release", "mine")] * 2
