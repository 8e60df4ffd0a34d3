"""Another user cannot talk to the servers: tried for real, as ``nobody`` (setpriv), where the machine allows.

The servers' files sit in a directory everyone may enter, so what keeps ``nobody`` out
is the FIFO's and the socket's own mode, and the shared-memory server's check of the
peer's uid (SO_PEERCRED), not a private parent directory.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from hangwatch import FileTimerServer, SharedMemoryTimerServer

from conftest import EventLog, RecorderPin, wait_for

SYSTEM_PYTHON = "/usr/bin/python3"


def _nobody_available() -> str:
    if os.geteuid() != 0:
        return "needs root to run a process as another user"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "there is no user 'nobody'"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is needed to run as nobody"
    return ""


needs_nobody = pytest.mark.skipif(bool(_nobody_available()), reason=_nobody_available() or "available")


def as_nobody(code: str) -> str:
    """Run Python ``code`` as the user nobody (no groups); return what it printed."""
    done = subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", SYSTEM_PYTHON, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory under /tmp that every user may enter (unlike pytest's private tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="hangwatch-perm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


TRY_FIFO = """
import os, sys
try:
    fd = os.open(sys.argv[1] if len(sys.argv) > 1 else {path!r}, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, b'{{"version": 1, "pid": 2, "scope_id": "x", "expiration_time": 0, "signal": 9}}\\n')
    print("written")
except OSError as exc:
    print(type(exc).__name__)
"""

TRY_SOCKET = """
import json, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
try:
    s.connect({path!r})
    s.send(json.dumps({{"v": 1, "slots": 4, "mono": time.monotonic()}}).encode())
    print(s.recv(4096).decode() or "closed")
except OSError as exc:
    print(type(exc).__name__)
"""


@needs_nobody
def test_another_user_cannot_write_the_fifo(open_dir: Path) -> None:
    """nobody cannot open the FIFO for writing: no line of theirs reaches the server."""
    path = str(open_dir / "timer.fifo")
    server = FileTimerServer(path, pin=RecorderPin)
    server.start()
    try:
        assert as_nobody(TRY_FIFO.format(path=path)) == "PermissionError"
        assert server.request_count == 0
    finally:
        server.stop()


@needs_nobody
def test_another_user_cannot_register_on_the_socket(open_dir: Path) -> None:
    """nobody cannot connect to the shared-memory server's socket."""
    path = str(open_dir / "timer.sock")
    server = SharedMemoryTimerServer(path, pin=RecorderPin)
    server.start()
    try:
        assert as_nobody(TRY_SOCKET.format(path=path)) == "PermissionError"
        assert server.registered_workers == 0
    finally:
        server.stop()


@needs_nobody
def test_the_socket_checks_the_peers_user_even_if_its_mode_is_opened(open_dir: Path, events: EventLog) -> None:
    """With the socket's mode opened up by hand, nobody connects, and is refused by uid (SO_PEERCRED)."""
    path = str(open_dir / "timer.sock")
    server = SharedMemoryTimerServer(path, pin=RecorderPin)
    server.start()
    try:
        os.chmod(path, 0o777)
        reply = as_nobody(TRY_SOCKET.format(path=path))
        # The refusal is sent at accept; the peer reads it, or finds the connection closed under its hello.
        assert reply in ("BrokenPipeError", "ConnectionResetError") or "uid" in json.loads(reply)["error"], reply
        assert wait_for(lambda: any("uid" in e.details["reason"] for e in events.named("bad request")), 5)
        assert server.registered_workers == 0
    finally:
        server.stop()
