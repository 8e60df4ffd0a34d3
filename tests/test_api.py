"""configure / expires / TimerRequest: the client-side contract users write code against."""

from __future__ import annotations

import asyncio
import math
import pickle
import sys
import threading
import time
from typing import List, Tuple

import pytest

import hangwatch
from hangwatch import FileTimerRequest, TimerClient, TimerRequest


class RecordingClient(TimerClient):
    """A real TimerClient subclass that records what expires() asks of it."""

    def __init__(self, fail_release: bool = False) -> None:
        self.calls: List[Tuple[str, str, float]] = []
        self.fail_release = fail_release

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.calls.append(("acquire", scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        self.calls.append(("release", scope_id, -1))
        if self.fail_release:
            raise BrokenPipeError("server gone")


@pytest.fixture(autouse=True)
def _no_default_client():
    names = ("_timer_client", "_fast_client", "_fast_named", "_fast_sites")
    saved = [getattr(hangwatch.api, name) for name in names]
    hangwatch.configure(None)  # what configure() set, including the cached guards of hangwatch's clients
    yield
    for name, value in zip(names, saved):
        setattr(hangwatch.api, name, value)


def here() -> str:
    frame = sys._getframe(1)
    return f"{frame.f_code.co_filename}#{frame.f_lineno}"


class TestTimerRequest:
    def test_equality_is_on_the_three_fields(self) -> None:
        """Two requests are equal when worker, scope and expiration match, as torch's."""
        assert TimerRequest(1, "a", 2.0) == TimerRequest(1, "a", 2.0)
        assert TimerRequest(1, "a", 2.0) != TimerRequest(1, "a", 3.0)
        assert TimerRequest(1, "a", 2.0) != "TimerRequest"

    def test_pickles_across_processes(self) -> None:
        """Requests survive pickling, which the multiprocessing queue does."""
        r = TimerRequest(42, "scope", 12.5)
        assert pickle.loads(pickle.dumps(r)) == r
        f = FileTimerRequest(42, "scope", 12.5, 9)
        assert pickle.loads(pickle.dumps(f)) == f

    def test_file_request_json_is_torchs_wire_format(self) -> None:
        """to_json carries torch's five fields."""
        import json

        obj = json.loads(FileTimerRequest(7, "s#1", 1.5, 15).to_json())
        assert obj == {"version": 1, "pid": 7, "scope_id": "s#1", "expiration_time": 1.5, "signal": 15}
        assert FileTimerRequest(7, "s", 1.0).worker_pid == 7
        assert FileTimerRequest(7, "s", 1.0, 9) != FileTimerRequest(7, "s", 1.0, 15)


class TestExpires:
    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1, -0.001, "5", None, True, [1]])
    def test_rejects_bad_after_naming_the_value(self, bad: object) -> None:
        """after must be a finite number >= 0; the error shows what was passed."""
        with pytest.raises(ValueError, match=r"after must be a finite number of seconds >= 0 \(got .+\)"):
            hangwatch.expires(after=bad)  # type: ignore[arg-type]

    def test_zero_is_allowed(self) -> None:
        """after=0 is a valid (immediately expiring) timer."""
        client = RecordingClient()
        with hangwatch.expires(after=0, client=client):
            pass
        assert [c[0] for c in client.calls] == ["acquire", "release"]

    def test_without_client_says_how_to_configure(self) -> None:
        """No configured client: RuntimeError that names configure()."""
        with pytest.raises(RuntimeError, match=r"hangwatch\.configure\(client\)"), hangwatch.expires(after=1):
            pass

    def test_configure_sets_the_default_client(self) -> None:
        """The configured client serves every expires() without client=."""
        client = RecordingClient()
        hangwatch.configure(client)
        assert hangwatch.get_configured_client() is client
        with hangwatch.expires(after=10, scope="x"):
            pass
        assert [(c[0], c[1]) for c in client.calls] == [("acquire", "x"), ("release", "x")]

    def test_configure_rejects_non_clients(self) -> None:
        """configure() refuses an object that cannot acquire and release."""
        with pytest.raises(TypeError, match="acquire"):
            hangwatch.configure(object())  # type: ignore[arg-type]

    def test_configure_none_removes_the_client(self) -> None:
        """configure(None) resets the default client, as torch's does; expires() then says how to configure."""
        hangwatch.configure(RecordingClient())
        hangwatch.configure(None)
        assert hangwatch.get_configured_client() is None
        with pytest.raises(RuntimeError, match="Configure timer client"), hangwatch.expires(after=1, scope="x"):
            pass

    def test_explicit_client_wins(self) -> None:
        """client= is used instead of the configured one."""
        default, mine = RecordingClient(), RecordingClient()
        hangwatch.configure(default)
        with hangwatch.expires(after=1, scope="s", client=mine):
            pass
        assert default.calls == [] and len(mine.calls) == 2

    def test_expiration_is_after_seconds_from_entry(self) -> None:
        """The acquire carries time.time() + after, taken when the block is entered."""
        client = RecordingClient()
        guard = hangwatch.expires(after=5, scope="s", client=client)
        time.sleep(0.05)
        before = time.time()
        with guard:
            pass
        assert before + 5 <= client.calls[0][2] <= time.time() + 5

    def test_default_scope_is_the_callers_file_and_line(self) -> None:
        """Without scope=, the scope is '<this file>#<line of the with statement>'."""
        client = RecordingClient()
        file, _, line = here().rpartition("#")
        guard = hangwatch.expires(after=1, client=client)  # the line after here()
        expected = f"{file}#{int(line) + 1}"
        with guard:
            pass
        assert client.calls[0][1] == expected
        assert client.calls[0][1].startswith(__file__)

    def test_nested_default_scopes_are_distinct(self) -> None:
        """Two nested blocks at different lines hold two timers; the inner release keeps the outer."""
        client = RecordingClient()
        with hangwatch.expires(after=10, client=client):
            with hangwatch.expires(after=1, client=client):
                pass
        outer, inner, inner_rel, outer_rel = client.calls
        assert outer[1] != inner[1]
        assert inner_rel[1] == inner[1] and outer_rel[1] == outer[1]

    def test_recursion_reuses_the_scope(self) -> None:
        """A recursive block re-acquires the same scope, as torch's (the first release releases it)."""
        client = RecordingClient()

        def recurse(n: int) -> None:
            with hangwatch.expires(after=n + 1, client=client):
                if n:
                    recurse(n - 1)

        recurse(2)
        scopes = {c[1] for c in client.calls}
        assert len(scopes) == 1
        assert [c[0] for c in client.calls] == ["acquire"] * 3 + ["release"] * 3

    def test_block_exception_propagates_and_timer_is_released(self) -> None:
        """The block's exception comes out unchanged and the timer is still released."""
        client = RecordingClient()
        err = KeyError("boom")
        with pytest.raises(KeyError) as info, hangwatch.expires(after=1, scope="s", client=client):
            raise err
        assert info.value is err
        assert client.calls[-1][0] == "release"

    def test_release_failure_does_not_mask_the_block_exception(self) -> None:
        """If the release fails while the block raised, the block's exception is what propagates."""
        client = RecordingClient(fail_release=True)
        with pytest.raises(ZeroDivisionError), hangwatch.expires(after=1, scope="s", client=client):
            1 / 0  # noqa: B018

    def test_release_failure_after_success_is_raised(self) -> None:
        """A release that fails after a clean block is an error the caller sees."""
        client = RecordingClient(fail_release=True)
        with pytest.raises(BrokenPipeError), hangwatch.expires(after=1, scope="s", client=client):
            pass

    def test_decorator_guards_each_call(self) -> None:
        """@expires wraps every call in its own acquire/release, scoped at the decoration line."""
        client = RecordingClient()
        line = here()

        @hangwatch.expires(after=3, client=client)
        def work(x: int) -> int:
            return x * 2

        assert work(4) == 8 and work(5) == 10
        assert [c[0] for c in client.calls] == ["acquire", "release"] * 2
        file, _, lineno = client.calls[0][1].rpartition("#")
        assert file == __file__ and int(lineno) == int(line.rpartition("#")[2]) + 2
        assert work.__name__ == "work"

    def test_decorator_on_coroutine_functions(self) -> None:
        """@expires on an async function holds the timer across the awaited body."""
        client = RecordingClient()

        @hangwatch.expires(after=3, scope="coro", client=client)
        async def work() -> str:
            assert client.calls[-1][0] == "acquire"
            await asyncio.sleep(0)
            return "done"

        assert asyncio.run(work()) == "done"
        assert [c[0] for c in client.calls] == ["acquire", "release"]

    def test_configure_is_thread_safe(self) -> None:
        """Concurrent configure() calls leave one of the clients configured, never a broken state."""
        clients = [RecordingClient() for _ in range(8)]
        threads = [threading.Thread(target=hangwatch.configure, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert hangwatch.get_configured_client() in clients
