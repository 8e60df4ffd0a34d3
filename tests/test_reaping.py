"""Safe and explanatory reaping: stack dumps, escalation, allow-list, event sinks (real processes and signals)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import signal
import stat
import time
from pathlib import Path
from typing import Any, ClassVar, List, Set, Tuple

import pytest

import hangwatch
from hangwatch import FileTimerServer, LocalTimerServer, ReapPolicy
from hangwatch._reaper import ProcessPin

import _workers
from conftest import EventLog, needs_torch, run_worker, wait_for

spawn = mp.get_context("spawn")
SIGKILL, SIGTERM = int(signal.SIGKILL), int(signal.SIGTERM)


def kill_event(events: EventLog, pid: int, index: int = 0) -> Any:
    kills = [e for e in events.named("kill worker process") if e.worker == pid]
    return kills[index]


class TestStackDumps:
    def test_stack_of_a_worker_holding_the_gil_in_the_re_engine(self, events: EventLog) -> None:
        """A worker stuck in a C regex match (GIL held) is reaped, and its stack names the stuck function."""
        q = spawn.Queue()
        server = LocalTimerServer(q)
        server.start()
        try:
            p = run_worker(_workers.stuck_in_regex, q, 0.5)
        finally:
            server.stop()
        assert p.exitcode == -SIGKILL
        kill = kill_event(events, p.pid)
        assert kill.scope == "regex"
        assert kill.details["signal"] == "SIGKILL"
        assert "in stuck_in_regex" in kill.details["stack"]
        assert "_workers.py" in kill.details["stack"]
        assert kill.details["late_s"] < 5

    def test_stack_of_a_worker_in_a_ctypes_call_over_the_fifo(self, fifo_path: str, events: EventLog) -> None:
        """A worker in a GIL-holding ctypes call: the FIFO server shows where it sits, then kills it."""
        server = FileTimerServer(fifo_path, "dump")
        server.start()
        try:
            p = run_worker(_workers.stuck_in_ctypes, fifo_path, 0.5)
        finally:
            server.stop()
        assert p.exitcode == -SIGKILL
        stack = kill_event(events, p.pid).details["stack"]
        assert "in stuck_in_ctypes" in stack
        # The stack is in the log line a user reads, not only in the structured event.
        assert "in stuck_in_ctypes" in str(kill_event(events, p.pid))

    def test_no_dump_signal_for_a_worker_that_did_not_register(self, tmp_path: Path, events: EventLog) -> None:
        """A client with dump_signal=None is never sent SIGUSR2; the event says why there is no stack."""
        marker = tmp_path / "usr2"
        q = spawn.Queue()
        server = LocalTimerServer(q)
        server.start()
        try:
            p = run_worker(_workers.stuck_recording_usr2_local, q, 0.3, str(marker))
        finally:
            server.stop()
        assert p.exitcode == -SIGKILL
        assert not marker.exists()
        assert "registered no dump handler" in kill_event(events, p.pid).details["stack_note"]

    @needs_torch
    def test_no_dump_signal_for_a_torch_client(self, fifo_path: str, tmp_path: Path, events: EventLog) -> None:
        """torch's FileTimerClient registers no handler: it is never sent the dump signal."""
        marker = tmp_path / "usr2"
        server = FileTimerServer(fifo_path, "torch")
        server.start()
        try:
            p = run_worker(_workers.torch_stuck_recording_usr2, fifo_path, 0.3, str(marker))
        finally:
            server.stop()
        assert p.exitcode == -SIGKILL
        assert not marker.exists()
        assert "stack" not in kill_event(events, p.pid).details

    def test_an_application_handler_on_the_dump_signal_is_left_alone(self) -> None:
        """configure() does not replace a SIGUSR2 handler the application installed."""
        p = run_worker(_workers.keeps_own_usr2_handler, spawn.Queue())
        assert p.exitcode == 0

    def test_stopped_worker_dump_times_out_and_sigkill_still_ends_it(self, events: EventLog) -> None:
        """A SIGSTOPped worker cannot dump: the wait is bounded, SIGTERM stays pending, SIGKILL ends it."""
        q = spawn.Queue()
        server = LocalTimerServer(q, reap_policy=ReapPolicy(("TERM", "KILL"), 0.5, dump_timeout=0.3))
        server.start()
        p = spawn.Process(target=_workers.stuck_local, args=(q, 1.0))
        p.start()
        try:
            assert wait_for(lambda: server.active_timers == 1, 15)
            os.kill(p.pid, signal.SIGSTOP)
            p.join(15)
            assert p.exitcode == -SIGKILL
        finally:
            if p.is_alive():
                p.kill()
                p.join()
            server.stop()
        first = kill_event(events, p.pid)
        assert first.details["signal"] == "SIGTERM"
        assert "no stack within 0.3 s" in first.details["stack_note"]
        assert "stopped" in first.details["stack_note"]
        assert kill_event(events, p.pid, 1).details["signal"] == "SIGKILL"


class TestEscalation:
    def test_worker_ignoring_sigterm_dies_by_sigkill_after_the_grace(self, events: EventLog) -> None:
        """TERM, grace, KILL: a worker that ignores SIGTERM is killed once the grace is over."""
        q = spawn.Queue()
        server = LocalTimerServer(q, reap_policy=ReapPolicy.parse("TERM,0.5,KILL"))
        server.start()
        try:
            p = run_worker(_workers.ignores_sigterm_local, q, 0.3)
            assert wait_for(lambda: events.named("worker reaped"), 10)
        finally:
            server.stop()
        assert p.exitcode == -SIGKILL
        term, kill = kill_event(events, p.pid), kill_event(events, p.pid, 1)
        assert (term.details["signal"], term.details["step"]) == ("SIGTERM", "1/2")
        assert (kill.details["signal"], kill.details["step"]) == ("SIGKILL", "2/2")
        assert kill.details["reason"] == "still alive 0.5 s after SIGTERM"
        assert kill.time - term.time >= 0.45
        reaped = events.named("worker reaped")[0]
        assert (reaped.worker, reaped.details["signal"]) == (p.pid, "SIGKILL")

    def test_worker_ending_on_sigterm_is_not_sent_sigkill(self, events: EventLog) -> None:
        """When SIGTERM ends the worker, the reap is over: no SIGKILL follows."""
        q = spawn.Queue()
        server = LocalTimerServer(q, reap_policy=ReapPolicy.term_then_kill(grace=0.5))
        server.start()
        try:
            p = run_worker(_workers.stuck_local, q, 0.3)
            assert wait_for(lambda: events.named("worker reaped"), 10)
            time.sleep(0.8)  # past the grace: a SIGKILL would have been reported by now
        finally:
            server.stop()
        assert p.exitcode == -SIGTERM
        assert [e.details["signal"] for e in events.named("kill worker process")] == ["SIGTERM"]
        assert events.named("worker reaped")[0].details["signal"] == "SIGTERM"

    def test_policy_precedence_block_over_client_over_server(self, events: EventLog) -> None:
        """The server's policy applies unless the client chose one; an expires(reap_policy=) call beats both."""
        q = spawn.Queue()
        server = LocalTimerServer(q, reap_policy=ReapPolicy("KILL"))
        server.start()
        cases = [
            (None, None, -SIGKILL),  # the server's
            (ReapPolicy("TERM"), None, -SIGTERM),  # the client's
            (ReapPolicy("TERM"), ReapPolicy("USR1"), -int(signal.SIGUSR1)),  # the block's
        ]
        procs = []
        try:
            for client_policy, block_policy, _ in cases:
                p = spawn.Process(target=_workers.stuck_local_policy, args=(q, 0.3, client_policy, block_policy))
                p.start()
                procs.append(p)
            for p in procs:
                p.join(30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            server.stop()
        assert [p.exitcode for p in procs] == [expected for _, _, expected in cases]

    def test_unkillable_worker_is_reported_and_does_not_wedge_the_watchdog(self, events: EventLog) -> None:
        """A worker whose signals never land (as if stuck in the kernel): `reap failed`; others reaped on time."""
        deaf: List[int] = []
        recorded: List[Tuple[int, int]] = []

        class DeafPin(ProcessPin):
            """Signals to the deaf worker are recorded, never delivered: it behaves as if unkillable."""

            def send_signal(self, signum: int) -> None:
                if self.pid in deaf:
                    recorded.append((self.pid, signum))
                    return
                super().send_signal(signum)

        q = spawn.Queue()
        policy = ReapPolicy(("TERM", "KILL"), 0.3, dump_timeout=0.2)
        server = LocalTimerServer(q, reap_policy=policy, pin=DeafPin)
        server.start()
        stuck = spawn.Process(target=_workers.stuck_local, args=(q, 0.2))
        other = spawn.Process(target=_workers.stuck_local, args=(q, 0.8))
        try:
            stuck.start()
            deaf.append(stuck.pid)  # long before its first request arrives (spawn imports first)
            other.start()
            other.join(30)
            assert wait_for(lambda: events.named("reap failed"), 10)
            assert stuck.is_alive()
        finally:
            for p in (stuck, other):
                if p.is_alive():
                    p.kill()
                    p.join()
            server.stop()
        assert recorded == [(stuck.pid, int(signal.SIGUSR2)), (stuck.pid, SIGTERM), (stuck.pid, SIGKILL)]
        failed = events.named("reap failed")[0]
        assert failed.worker == stuck.pid
        assert "still alive 1 s after SIGKILL" in failed.details["reason"]
        assert "state: S (sleeping)" in failed.details["reason"]
        # Meanwhile the watchdog reaped the other worker on time.
        assert other.exitcode == -SIGTERM
        assert kill_event(events, other.pid).details["late_s"] < 2


class TestTargets:
    def test_allow_list_refuses_other_pids(self, events: EventLog) -> None:
        """With allowed_pids, a request naming another pid is refused and that process is never signalled."""
        q = spawn.Queue()
        server = LocalTimerServer(q, allowed_pids=[])
        server.start()
        outsider = spawn.Process(target=_workers.stuck_local, args=(q, 0.2))
        outsider.start()
        try:
            assert wait_for(lambda: events.named("bad request"), 15)
            time.sleep(0.5)
            assert outsider.is_alive()
            assert events.named("kill worker process") == []
            assert "not one of this server's workers" in events.named("bad request")[0].details["reason"]
            # Once it is on the list, its next timer is enforced.
            server.set_allowed_pids([outsider.pid])
            assert server.allowed_pids == frozenset([outsider.pid])
        finally:
            outsider.kill()
            outsider.join()
        member = spawn.Process(target=_workers.stuck_local, args=(q, 0.2))
        member.start()
        server.set_allowed_pids([member.pid])
        member.join(30)
        server.stop()
        assert member.exitcode == -SIGKILL

    def test_children_only_reaps_the_servers_children_and_refuses_any_other_process(self, tmp_path: Path) -> None:
        """children_only (what the launcher uses under torch's engine): the server's own child is reaped, and its
        events name the rank the child said; a process that is not the server's descendant is never signalled."""
        path, log, member_file = str(tmp_path / "timer.fifo"), tmp_path / "events.jsonl", tmp_path / "member"
        server = spawn.Process(target=_workers.children_only_server, args=(path, str(log), 6.0, str(member_file)))
        server.start()
        try:
            assert wait_for(lambda: os.path.exists(path), 30)
            outsider = spawn.Process(target=_workers.stuck_file, args=(path, 0.3, int(SIGKILL)))
            outsider.start()
            try:
                server.join(60)
                assert server.exitcode == 0
                assert outsider.is_alive()  # the server's sibling: refused, never signalled
            finally:
                outsider.kill()
                outsider.join()
        finally:
            if server.is_alive():
                server.kill()
                server.join()
        events = [json.loads(line) for line in log.read_text().splitlines()]
        member = int(member_file.read_text())
        kills = [e for e in events if e["name"] == "kill worker process"]
        assert [(e["worker"], e["details"].get("rank")) for e in kills] == [(member, 5)], events
        refused = [e for e in events if e["name"] == "bad request" and e["worker"] == outsider.pid]
        assert refused and "(children_only)" in refused[0]["details"]["reason"], events

    def test_worker_removed_from_the_allow_list_is_not_signalled(self, events: EventLog) -> None:
        """A worker pinned while allowed, then removed from the list, is refused at its deadline."""
        q = spawn.Queue()
        p = spawn.Process(target=_workers.stuck_local, args=(q, 1.0))
        p.start()
        server = LocalTimerServer(q, allowed_pids=[p.pid])
        server.start()
        try:
            assert wait_for(lambda: server.active_timers == 1, 15)
            server.set_allowed_pids([])
            assert wait_for(lambda: events.named("reap refused"), 10)
            assert p.is_alive()
        finally:
            p.kill()
            p.join()
            server.stop()

    @pytest.mark.parametrize(
        "error", [OSError(24, "Too many open files"), RuntimeError("a bug while pinning")], ids=["EMFILE", "bug"]
    )
    def test_a_request_that_cannot_be_applied_is_refused_alone(self, events: EventLog, error: Exception) -> None:
        """A failure while applying one request (here: pinning its worker) refuses that request only; the
        stuck worker whose request shares the round is still reaped (Local pair)."""

        class FailingPin(ProcessPin):
            refuse: ClassVar[Set[int]] = set()

            def __init__(self, pid: int) -> None:
                if pid in FailingPin.refuse:
                    raise error
                super().__init__(pid)

        q = spawn.Queue()
        unpinnable = spawn.Process(target=_workers.stuck_local, args=(q, 0.3))
        unpinnable.start()
        assert unpinnable.pid is not None
        FailingPin.refuse = {unpinnable.pid}
        server = LocalTimerServer(q, pin=FailingPin)
        try:
            stuck = spawn.Process(target=_workers.stuck_local, args=(q, 0.3))
            stuck.start()
            time.sleep(1.0)  # both acquires wait in the queue: the server reads them in one round
            server.start()
            stuck.join(30)
            assert stuck.exitcode == -SIGKILL
            assert wait_for(lambda: events.named("bad request"), 5)
            assert str(error) in events.named("bad request")[0].details["reason"]
            assert unpinnable.is_alive()
        finally:
            server.stop()
            unpinnable.kill()
            unpinnable.join()

    def test_bad_allow_list_is_refused(self) -> None:
        """allowed_pids must hold worker pids > 1."""
        with pytest.raises(ValueError, match=r"allowed_pids must be worker pids > 1 \(got \[-1, 1\]\)"):
            LocalTimerServer(spawn.Queue(), allowed_pids=[1, -1, 5000])


class TestEventSinks:
    def test_json_lines_file_holds_the_whole_story_of_a_reap(self, tmp_path: Path) -> None:
        """Every event is one JSON object per line, written as it happens, in a file only the owner reads."""
        path = tmp_path / "events.jsonl"
        seen: List[hangwatch.Event] = []
        q = spawn.Queue()
        server = LocalTimerServer(q, event_file=path, on_event=seen.append)
        server.start()
        p = run_worker(_workers.stuck_in_regex, q, 0.3)
        assert wait_for(lambda: any(e.name == "worker reaped" for e in seen), 10)
        # Written as it happens (by the sink's own thread): readable while the server still runs.
        assert wait_for(lambda: len(path.read_text().splitlines()) == 4, 5)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        server.stop()
        names = [line["name"] for line in lines]
        assert names == ["watchdog started", "timer expired", "kill worker process", "worker reaped"]
        kill = lines[2]
        assert (kill["worker"], kill["scope"]) == (p.pid, "regex")
        assert kill["details"]["signal"] == "SIGKILL" and "in stuck_in_regex" in kill["details"]["stack"]
        assert json.loads(path.read_text().splitlines()[-1])["name"] == "watchdog stopped"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [e.name for e in seen][:4] == names

    def test_the_events_file_is_opened_safely(self, tmp_path: Path) -> None:
        """No symlink is followed, no FIFO is opened (it would block), and another user's file is not appended to:
        the server refuses at once, naming the path."""
        q = spawn.Queue()
        victim = tmp_path / "victim"
        victim.write_text("someone's data\n")
        link = tmp_path / "link.jsonl"
        link.symlink_to(victim)
        with pytest.raises(OSError, match=f"refusing to write events to {link}: it is a symbolic link"):
            LocalTimerServer(q, event_file=link)
        assert victim.read_text() == "someone's data\n"
        fifo = tmp_path / "fifo.jsonl"
        os.mkfifo(fifo)
        started = time.monotonic()
        with pytest.raises(OSError, match="not a regular file"):
            LocalTimerServer(q, event_file=fifo)
        assert time.monotonic() - started < 5
        if os.geteuid() == 0:
            theirs = tmp_path / "theirs.jsonl"
            theirs.write_text("")
            os.chown(theirs, 65534, 65534)
            with pytest.raises(OSError, match="owned by this user"):
                LocalTimerServer(q, event_file=theirs)
            assert theirs.read_text() == ""

    def test_every_event_name_is_documented_in_the_readme(self) -> None:
        """The README lists every event name the servers emit."""
        readme = (Path(__file__).parent.parent / "README.md").read_text()
        missing = [name for name in hangwatch.EVENT_NAMES if f"`{name}`" not in readme]
        assert missing == []


class TestSelfKill:
    def test_no_self_kill_by_default(self, fifo_path: str) -> None:
        """Unlike torch's, the server survives reaping a worker."""
        server = FileTimerServer(fifo_path, "safe")
        server.start()
        try:
            p = run_worker(_workers.stuck_file, fifo_path, 0.2, SIGKILL)
            assert server._watchdog_thread is not None and server._watchdog_thread.is_alive()
        finally:
            server.stop()
        assert p.exitcode == -SIGKILL

    def test_signal_self_is_torchs_behaviour_on_request(self, fifo_path: str) -> None:
        """signal_self=True: after the reap, the server's process gets the same signal."""
        srv = spawn.Process(target=_workers.self_killing_file_server, args=(fifo_path, 30))
        srv.start()
        try:
            assert wait_for(lambda: os.path.exists(fifo_path), 15)
            worker = run_worker(_workers.stuck_file, fifo_path, 0.2, SIGTERM)
            srv.join(15)
            assert worker.exitcode == -SIGTERM
            assert srv.exitcode == -SIGTERM
        finally:
            if srv.is_alive():
                srv.kill()
                srv.join()


class TestReapPolicy:
    def test_parse_and_defaults(self) -> None:
        """Text policies read as signals plus one grace; the default is torch's single SIGKILL."""
        assert ReapPolicy().signals == (SIGKILL,)
        assert ReapPolicy.parse("TERM,10,KILL") == ReapPolicy((SIGTERM, SIGKILL), 10)
        assert ReapPolicy.parse("sigterm, kill").grace == 5.0
        assert ReapPolicy.parse("none").signals == ()

    @pytest.mark.parametrize(
        ("build", "message"),
        [
            (lambda: ReapPolicy("BOGUS"), "unknown signal name 'BOGUS'"),
            (lambda: ReapPolicy(0), "0 is not a signal number"),
            (lambda: ReapPolicy("KILL", float("nan")), "grace must be a finite number"),
            (lambda: ReapPolicy("KILL", -1), "grace must be between 0 and 86400"),
            (lambda: ReapPolicy("KILL", dump_timeout=0), "dump_timeout must be between"),
            (lambda: ReapPolicy.parse("TERM,1,KILL,2"), "one grace period"),
            (lambda: ReapPolicy.from_wire([["TERM"], 1, True, 1]), "numbers on the wire"),
            (lambda: ReapPolicy.from_wire({"signals": 9}), "must be"),
        ],
    )
    def test_bad_policies_say_what_is_wrong(self, build: Any, message: str) -> None:
        """Each invalid policy is refused with a message naming the problem."""
        with pytest.raises(ValueError, match=message):
            build()

    def test_round_trips_and_is_immutable(self) -> None:
        """A policy survives the wire and pickling unchanged, and cannot be modified."""
        policy = ReapPolicy.term_then_kill(3)
        assert ReapPolicy.from_wire(json.loads(json.dumps(policy.to_wire()))) == policy
        assert pickle.loads(pickle.dumps(policy)) == policy
        assert hash(policy) == hash(ReapPolicy((SIGTERM, SIGKILL), 3))
        with pytest.raises(AttributeError, match="immutable"):
            policy.grace = 1  # type: ignore[misc]

    def test_expires_with_a_policy_needs_a_hangwatch_client(self) -> None:
        """A reap policy cannot travel through a client that does not carry one: clear TypeError."""

        class Plain(hangwatch.TimerClient):
            def acquire(self, scope_id: str, expiration_time: float) -> None:
                pass

            def release(self, scope_id: str) -> None:
                pass

        with pytest.raises(TypeError, match="Plain cannot carry a reap policy"):
            with hangwatch.expires(after=1, client=Plain(), reap_policy=ReapPolicy("TERM")):
                pass
        with pytest.raises(TypeError, match=r"reap_policy must be a hangwatch\.ReapPolicy"):
            hangwatch.expires(after=1, reap_policy="TERM")
