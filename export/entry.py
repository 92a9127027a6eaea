"""``dia2-export``'s console entry: see dia2_trt.runtime.entry (Ctrl-C during imports, missing extras).

SIGTERM (``kill``, a container stopping, a CI timeout) would otherwise end the process where it
stands, leaving a half-built ``.OUT.xxxx`` directory and the parent directories a build made. Here
it is raised in the main thread as ``Terminated``, so the build's own failure path
(export/build.py ``atomic_dir``) removes what it made, then the command exits 143 (128 + SIGTERM,
what a shell reports for a process SIGTERM ended) with one line.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from dia2_trt.runtime.entry import launch

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, as an exception: a BaseException, so no library's ``except Exception`` swallows it
    and every ``except BaseException``/``finally`` cleanup on the way out runs."""


_held = 0  # depth of deferred() blocks
_pending: list[int] = []  # a signal that arrived inside one


def _on_signal(signum: int, frame) -> None:
    if _held:
        _pending.append(signum)
        return
    _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    # A second SIGTERM must not cut the cleanup that the first one started short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM and Ctrl-C (when ``main`` installed their handlers) until the block ends.

    For steps whose effect and its record must not be split: a directory made but its name not yet
    kept for the cleanup, an old artifact moved aside but the new one not yet renamed in.
    """
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            signum = signal.SIGTERM if signal.SIGTERM in _pending else signal.SIGINT
            _pending.clear()
            _raise_for(signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, _on_signal)
    try:
        launch("dia2_trt.export.cli", extra="export")
    except Terminated:
        sys.stderr.write("Terminated.\n")
        sys.exit(EXIT_TERMINATED)
