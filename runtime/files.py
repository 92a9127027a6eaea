"""Files in and out: inputs read within a bound before anything decodes them, outputs that
appear whole or not at all."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import first_line
from .signals import deferred

# --- bounded reads ----------------------------------------------------------------------------------

# Nesting deeper than any file or request of ours has: the parser's recursion stays far from Python's
# limit, so a crafted '[[[[...' is one line, not a RecursionError from deep inside json.
MAX_JSON_DEPTH = 64
# No file or request of ours holds an integer past 64 bits (seeds, ids, shapes, counts); a longer one
# would pass json (up to 4300 digits) and then overflow float() or numpy far from the parser.
MAX_JSON_INT_DIGITS = 20


class InputFileError(ValueError):
    """A file that must not be decoded: missing, not a regular file, too large, or malformed.
    The message is one line naming the file; callers re-raise it as their own error type."""


def open_regular(path: str | Path, max_bytes: int, what: str = "file"):
    """Open ``path`` for reading if it is a regular file of at most ``max_bytes``.

    Checked on the open descriptor (no window between check and read), opened non-blocking so a
    FIFO is refused instead of waiting for a writer forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputFileError(f"{what} {path} not found") from None
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InputFileError(f"{what} {path} is not a regular file (a directory, device, pipe or socket)")
    if info.st_size > max_bytes:
        os.close(fd)
        raise InputFileError(f"{what} {path} is too large: {info.st_size} bytes, at most {max_bytes}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_regular(path: str | Path, what: str = "file", max_bytes: int = 1 << 62) -> int:
    """The size of ``path`` if it is a regular file of at most ``max_bytes`` (InputFileError if not),
    without reading it: for files another reader opens later (a FIFO is refused, not waited on)."""
    with open_regular(path, max_bytes, what) as f:
        return os.fstat(f.fileno()).st_size


def read_regular(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (read at most one byte past the bound,
    so a file that grows while it is read is refused too)."""
    with open_regular(path, max_bytes, what) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise InputFileError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    if len(data) > max_bytes:
        raise InputFileError(f"{what} {path} is too large: over {max_bytes} bytes")
    return data


def parse_json(data: bytes | str, what: str = "JSON", max_depth: int = MAX_JSON_DEPTH, *,
               nonfinite: bool = False) -> Any:
    """``json.loads`` that fails in one line on bad UTF-8, bad JSON, nesting deeper than
    ``max_depth``, integers of more than ``MAX_JSON_INT_DIGITS`` digits and non-finite numbers
    (NaN, Infinity, and exponents that overflow to infinity such as 1e999) unless ``nonfinite``
    (for a reader that range-checks its floats itself and names the field), and strings that are
    not UTF-8 text (lone surrogate escapes)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputFileError(f"{what} is not UTF-8 (byte {exc.start})") from None
    if data.startswith("\ufeff"):
        data = data[1:]  # a UTF-8 byte-order mark, as some editors write it
    try:
        if nonfinite:
            value = json.loads(data, parse_int=_bounded_int)
        else:
            value = json.loads(data, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError:  # deeper than Python's recursion limit
        raise InputFileError(f"{what} nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, int digit limit, NaN/Infinity
        raise InputFileError(f"{what} is not valid JSON ({first_line(exc)})") from None
    # Counting brackets is C-speed; only a text with more of them than the bound is walked. (A
    # regex pass over the raw text instead cost ~20 ms a MB holding the GIL, which stalled the
    # server's event loop from its parsing thread.)
    if data.count("[") + data.count("{") > max_depth and _depth(value, max_depth) > max_depth:
        raise InputFileError(f"{what} nests deeper than {max_depth} levels")
    if "\\u" in data:
        _check_text(value, what)
    return value


def _check_text(value: Any, what: str) -> None:
    """A ``\\udXXX`` escape can put a lone surrogate in a string: valid JSON, but no UTF-8 text, and
    tokenizers and encoders downstream fail on it with their own errors. Checked in one pass over
    the parsed value (only when the text has an escape at all)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InputFileError(f"{what} holds a string that is not UTF-8 text (a lone surrogate escape)") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_JSON_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


def _depth(value: Any, bound: int) -> int:
    """The nesting depth of parsed JSON, walked without recursion; stops once past ``bound``."""
    deepest, level = 0, [value] if isinstance(value, (list, dict)) else []
    while level and deepest <= bound:
        deepest += 1
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (list, dict))]
    return deepest


def read_json_file(path: str | Path, max_bytes: int, what: str = "file") -> Any:
    """A bounded regular file parsed as bounded JSON."""
    return parse_json(read_regular(path, max_bytes, what), f"{what} {path}")


# --- outputs -------------------------------------------------------------------------------------

# soundfile format and subtype by extension; OGG means Vorbis.
AUDIO_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    Readers never see a partial file, and a failed write leaves nothing behind.
    """
    write_together([(Path(path), write)])


def write_together(items: Sequence[tuple[Path, Callable[[str], object]]]) -> None:
    """``write_atomic`` for several files that succeed or fail together: every one is written to
    its temporary name first, and only when all have been written are they renamed into place."""
    temps: list[str] = []
    try:
        for path, write in items:
            with deferred():  # a temporary file made is one the cleanup below knows of
                temps.append(_temp_beside(Path(path)))
            write(temps[-1])
            _share(temps[-1])
        with deferred():  # all renamed into place, or (stopped before) none
            for (path, _), tmp in zip(items, temps):
                os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return tmp


def _share(tmp: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temporary name only


def write_audio(path: Path, pcm: np.ndarray, rate: int) -> None:
    """WAV/FLAC (16-bit) or OGG (Vorbis), chosen by the extension."""
    write_atomic(path, audio_writer(path, pcm, rate))


def audio_writer(path: Path, pcm: np.ndarray, rate: int) -> Callable[[str], object]:
    """``write(tmp)`` for ``write_atomic``/``write_together``: the format follows ``path``'s extension."""
    import soundfile as sf

    fmt, subtype = AUDIO_FORMATS[Path(path).suffix.lower()]
    return lambda tmp: sf.write(tmp, pcm, rate, format=fmt, subtype=subtype)
