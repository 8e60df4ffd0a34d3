"""Stacks as data: the frames of each thread of a process, read from the text of a stack dump.

Two sources are read:

- :mod:`faulthandler`'s all-thread dump, which hangwatch's clients write when the server
  asks (Python frames only; the main thread is the last one listed, as CPython lists its
  threads newest first);
- ``pystack remote --native-all``, the optional native sampler (Python and C/C++ frames,
  every thread of the process, the interpreter's own and those it does not know, such as
  gloo's or NCCL's; the main thread is the one whose id is the pid).

Frames are kept innermost first, whatever order the source printed them in. Lines that
belong to neither format are skipped: a dump cut short still yields what it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = ["Frame", "ThreadStack", "main_thread", "parse_faulthandler", "parse_pystack", "short_function"]


@dataclass(frozen=True)
class Frame:
    """One frame of a stack.

    Attributes:
        func: the function (for native frames, its name without the argument list).
        file: the Python source file, or for a native frame the source file if known, else ``""``.
        line: the line number (0 when unknown).
        native: whether it is a C/C++ frame.
        library: the shared object of a native frame.
    """

    func: str
    file: str
    line: int = 0
    native: bool = False
    library: str = ""

    def short(self) -> str:
        """``train.py:44 in main`` for Python; ``c10d::Work::wait (libtorch_cpu.so)`` for native code."""
        if self.native:
            lib = self.library.rsplit("/", 1)[-1]
            return f"{self.func} ({lib})" if lib else self.func
        return f"{self.file.rsplit('/', 1)[-1]}:{self.line} in {self.func}"


@dataclass(frozen=True)
class ThreadStack:
    """The frames of one thread, innermost first.

    Attributes:
        ident: the thread's id as the source printed it (``0x7f...`` or a native thread id).
        name: the thread's name where the source gives one (pystack: the kernel's name), else ``""``.
        main: whether it is the process's main thread.
        frames: its frames, innermost first.
    """

    ident: str
    name: str
    main: bool
    frames: Tuple[Frame, ...]

    @property
    def python_frames(self) -> Tuple[Frame, ...]:
        """Its Python frames only, innermost first."""
        return tuple(f for f in self.frames if not f.native)


def main_thread(threads: Sequence[ThreadStack]) -> Optional[ThreadStack]:
    """The main thread of a parsed dump (None for an empty one)."""
    for thread in threads:
        if thread.main:
            return thread
    return None


# ------------------------------------------------------------------------- faulthandler

_FH_HEADER = re.compile(r"^(Current thread|Thread) (0x[0-9a-fA-F]+)(?: \[(.*)\])? \(most recent call first\):\s*$")
_FH_STACK = re.compile(r"^Stack \(most recent call first\):\s*$")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+|\?\?\?) in (.*?)\s*$')


def parse_faulthandler(text: str) -> List[ThreadStack]:
    """Parse a :mod:`faulthandler` dump into its threads; the last one listed is the main thread."""
    threads: List[Tuple[str, str, List[Frame]]] = []
    for line in text.splitlines():
        header = _FH_HEADER.match(line)
        if header is not None:
            threads.append((header.group(2), header.group(3) or "", []))
            continue
        if _FH_STACK.match(line):
            threads.append(("", "", []))
            continue
        frame = _FH_FRAME.match(line)
        if frame is not None and threads:
            number = frame.group(2)
            threads[-1][2].append(Frame(frame.group(3), frame.group(1), int(number) if number.isdigit() else 0))
    last = len(threads) - 1
    return [ThreadStack(ident, name, i == last, tuple(frames)) for i, (ident, name, frames) in enumerate(threads)]


# ------------------------------------------------------------------------- pystack

_PS_HEADER = re.compile(r"^Traceback for thread (\d+) \((.*?)\) \[.*\] \(most recent call last\):\s*$")
_PS_PYTHON = re.compile(r'^\s+\(Python\) File "(.*)", line (\d+), in (.*?)\s*$')
_PS_NATIVE = re.compile(r'^\s+\(C\) File "(.*)", line (\d+), in (.*) \(([^()]*)\)\s*$')


def short_function(name: str) -> str:
    """A C/C++ function name without its argument list and symbol version (``f(int) const`` -> ``f``)."""
    name = name.split("@", 1)[0].strip().replace("(anonymous namespace)::", "")
    if name.endswith(" (inlined)"):
        name = name[: -len(" (inlined)")]
    for suffix in (" const", " volatile", " &", " &&"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        if name[i] == ")":
            depth += 1
        elif name[i] == "(":
            depth -= 1
            if depth == 0:
                return name[:i] if i > 0 else name
    return name


def parse_pystack(text: str, pid: int) -> List[ThreadStack]:
    """Parse ``pystack remote`` output into its threads; the thread whose id is ``pid`` is the main thread."""
    threads: List[Tuple[str, str, List[Frame]]] = []
    for line in text.splitlines():
        header = _PS_HEADER.match(line)
        if header is not None:
            threads.append((header.group(1), header.group(2), []))
            continue
        if not threads:
            continue
        python = _PS_PYTHON.match(line)
        if python is not None:
            threads[-1][2].append(Frame(python.group(3), python.group(1), int(python.group(2))))
            continue
        native = _PS_NATIVE.match(line)
        if native is not None:
            source = native.group(1)
            threads[-1][2].append(
                Frame(
                    short_function(native.group(3)),
                    "" if source in ("???", native.group(4)) else source,
                    int(native.group(2)),
                    native=True,
                    library=native.group(4),
                )
            )
    return [
        ThreadStack(ident, name, ident == str(pid), tuple(reversed(frames)))  # printed most recent call last
        for ident, name, frames in threads
    ]
