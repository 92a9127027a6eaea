"""SIGTERM as an exception, so the commands' own cleanup runs when a process is told to stop.

SIGTERM (``kill``, a container stopping, a CI timeout) would otherwise end the process where it
stands: a half-built ``.OUT.xxxx`` artifact directory, the parent directories a build made, or an
output's temporary file left beside it. ``install`` makes it raise ``Terminated`` in the main
thread, so every ``except BaseException`` / ``finally`` cleanup on the way out runs, and the entry
point exits 143 (128 + SIGTERM, what a shell reports for a process SIGTERM ended) with one line.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, as an exception: a BaseException, so no library's ``except Exception`` swallows it."""


_held = 0  # depth of deferred() blocks
_pending: list[int] = []  # a signal that arrived inside one


def install() -> None:
    """Route SIGTERM (and Ctrl-C, unless the process was started with it ignored) through ``deferred``."""
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)


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
    """Hold SIGTERM and Ctrl-C (once ``install`` ran) until the block ends.

    For steps whose effect and its record must not be split: a file or directory made but its name
    not yet kept for the cleanup, outputs renamed into place together, an old artifact moved aside
    but the new one not yet renamed in. Without ``install`` it changes nothing.
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
