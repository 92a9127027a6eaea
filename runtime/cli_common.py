"""What ``dia2-rt`` and ``dia2-export`` share: one error path, parameter types, input and output checks.

Every failure a user can cause is one ``Error: ...`` line on stderr: exit status 2
for a usage error, 1 for anything else, 130 for Ctrl-C. Torch-free (export/ reuses it).
"""

from __future__ import annotations

import errno
import math
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from .script import MAX_SCRIPT_BYTES, ScriptError, check_complete_script, check_size
from .signals import deferred

INT64_MAX = 2**63 - 1  # seeds and top-k reach the graphs and numpy as int64
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """One line on stderr, exit status 1."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past click (which would print a blank line first)."""


class OneLineGroup(click.Group):
    """A command group whose every failure is one ``Error: ...`` line (no usage dump, no traceback)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (each kind is mapped below; the rest re-raised)
            _exit_for(exc)
        sys.exit(code or 0)


def _exit_for(exc: BaseException) -> NoReturn:
    if isinstance(exc, (_Interrupted, KeyboardInterrupt, click.Abort)):
        _die("Interrupted.", EXIT_INTERRUPTED)
    if isinstance(exc, click.ClickException):
        _die(f"Error: {one_line(exc.format_message())}", exc.exit_code)
    if isinstance(exc, OSError):
        if exc.errno == errno.EPIPE:
            silence_stdout()
        _die(f"Error: {describe_os_error(exc)}", 1)
    if isinstance(exc, ValueError):  # the library's own errors (ScriptError, ArtifactError, ...) are ValueErrors
        _die(f"Error: {one_line(str(exc))}", 1)
    raise exc


def _die(line: str, code: int) -> NoReturn:
    try:
        click.echo(line, err=True)
    finally:
        sys.exit(code)


def one_line(message: str) -> str:
    return " ".join(message.split()) or "failed"


def describe_os_error(exc: OSError) -> str:
    """``path: reason`` without the ``[Errno N]`` noise."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {reason}" if exc.filename else reason


def silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's exit flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# --- parameter types ---------------------------------------------------------


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (click's own range lets both through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def int64_range(min: int = 0) -> click.IntRange:  # noqa: A002 (click's own keyword)
    return click.IntRange(min, INT64_MAX)


def cpu_count() -> int:
    return os.cpu_count() or 1


def threads_option(help_prefix: str = "ONNX Runtime intra-op threads per graph"):
    # More threads than cores only adds hand-offs; a typo like 100000 would spawn that many.
    return click.option(
        "--threads", type=click.IntRange(1, cpu_count()),
        help=f"{help_prefix}, 1 to {cpu_count()} (the cores) [default: per graph, 1 for graphs under "
             f"64 MB, all cores for larger ones].")


# --- script input ------------------------------------------------------------


def read_script(text: str | None, input_file: str | None, *, stdin_dash: bool = False) -> str:
    """The script from TEXT, ``--input FILE`` (``-`` = stdin when ``stdin_dash``) or piped stdin,
    bounded and strictly UTF-8, checked whole: nothing downstream ever sees a bad script."""
    if text is not None and input_file is not None:
        fail("give the script as an argument or with --input, not both")
    if input_file is not None and not (stdin_dash and input_file == "-"):
        script = _decode(_read_bounded_file(input_file), input_file)
    elif text is not None:
        script = _check_argument(text)
    elif input_file == "-" or (sys.stdin is not None and not sys.stdin.isatty()):
        script = _decode(_read_bounded(sys.stdin.buffer), "stdin")
    else:
        fail("no script: pass TEXT, --input FILE, or pipe it on stdin")
    try:
        check_complete_script(script)
    except ScriptError as exc:
        fail(str(exc))
    return script


def _read_bounded_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return _read_bounded(f)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")


def _read_bounded(stream) -> bytes:
    """At most one byte past the limit: /dev/zero or a 10 GB file is refused without being read."""
    data = stream.read(MAX_SCRIPT_BYTES + 1)
    if len(data) > MAX_SCRIPT_BYTES:
        fail(f"the script is too long: over {MAX_SCRIPT_BYTES} bytes; split it into shorter scripts")
    return data


def _decode(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{source} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})")
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write: not part of the script
    try:
        check_size(text)
    except ScriptError as exc:
        fail(str(exc))
    return text


def _check_argument(text: str) -> str:
    # Undecodable argv bytes arrive as lone surrogates (PEP 383), which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fail("the script argument is not UTF-8 text")
    return text


# --- outputs -----------------------------------------------------------------


Inputs = Sequence[tuple[str, "str | Path | None"]]


def check_outputs(outputs: dict[str, str | None], protected: Sequence[tuple[str, Path]] = (),
                  inputs: Inputs = ()) -> dict[str, Path]:
    """Up-front checks for files a command will write at its end, so a long run never ends in
    "cannot write" and no output ever replaces what the command reads: each in an existing,
    writable directory; not a directory, device, pipe, socket or symbolic link; no two the same
    file; none the same file as an input (``inputs``: (label, path) pairs; hard links count),
    nor inside, nor a hard link into, a protected directory (the artifacts or checkpoint in use).

    A symbolic link is refused rather than followed: outputs are renamed into place, which would
    replace the link itself with a regular file, and writing through it in place could not be
    atomic. ``outputs`` maps option names (``--out``) to paths (None = not given); returns the given
    ones."""
    given = {option: Path(path) for option, path in outputs.items() if path is not None}
    sources = [(label, Path(path)) for label, path in inputs if path is not None and str(path) != "-"]
    seen: list[tuple[str, Path, os.stat_result | None]] = []
    for option, path in given.items():
        info = _check_output_file(option, path)
        real = path.resolve()
        for other, other_real, other_info in seen:
            if real == other_real or _same(info, other_info):
                fail(f"{other} and {option} name the same file ({path})")
        seen.append((option, real, info))
        for label, source in sources:
            if real == source.resolve() or _same(info, _stat(source)):
                fail(f"{option} {path} is the same file as the {label} {source}; write the output elsewhere")
        for label, directory in protected:
            if is_within(real, directory):
                fail(f"{option} {path} lies inside the {label} {directory}; write outputs elsewhere")
            linked = _linked_into(info, Path(directory)) if info is not None else None
            if linked is not None:
                fail(f"{option} {path} is a hard link to {linked} in the {label}; write outputs elsewhere")
    return given


def _check_output_file(option: str, path: Path) -> os.stat_result | None:
    """The output's own checks; its stat when it exists (to tell it apart from the inputs)."""
    parent = path.parent
    info = _stat(path, follow=False)
    if info is not None and stat.S_ISLNK(info.st_mode):
        fail(f"{option} {path} is a symbolic link; name the file itself (outputs replace what they name)")
    if info is not None and stat.S_ISDIR(info.st_mode):
        fail(f"{option} {path} is a directory")
    if info is not None and not stat.S_ISREG(info.st_mode):
        # Outputs are renamed into place: over /dev/null that would replace the device itself.
        fail(f"{option} {path} is not a regular file (a device, pipe or socket); name a file")
    if not parent.is_dir():
        fail(f"{option} {path}: directory {parent} does not exist")
    reason = unwritable(parent)
    if reason:
        fail(f"{option} {path}: cannot write to {parent} ({reason})")
    return info


def _stat(path: Path, follow: bool = True) -> os.stat_result | None:
    try:
        return os.stat(path, follow_symlinks=follow)
    except (OSError, ValueError):  # missing, unreadable, or a name the system cannot take
        return None


def _same(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# Enough for any artifact or checkpoint directory (a few dozen files); a bigger tree is walked this far.
MAX_WALK_FILES = 10_000


def _linked_into(info: os.stat_result, directory: Path) -> Path | None:
    """The file under ``directory`` that an existing output is a hard link to, if any. Only an
    output with more than one link can be one, so the walk is skipped for almost every output."""
    if info.st_nlink < 2 or not directory.is_dir():
        return None
    seen = 0
    for folder, _, names in os.walk(directory):
        for name in names:
            candidate = Path(folder, name)
            if _same(info, _stat(candidate)):
                return candidate
            seen += 1
            if seen >= MAX_WALK_FILES:
                return None
    return None


def files_under(label: str, directory: str | Path, keep: Sequence[str | Path] = ()) -> list[tuple[str, Path]]:
    """(label, file) for each file in ``directory`` (walked up to MAX_WALK_FILES), as ``inputs`` for
    ``check_outputs`` where an output may sit in that directory but must not replace any file of it
    (``keep``: the output's own default names there, e.g. a report the command rewrites)."""
    directory, kept = Path(directory), {Path(k).resolve() for k in keep}
    found: list[tuple[str, Path]] = []
    if not directory.is_dir():
        return found
    for folder, _, names in os.walk(directory):
        for name in names:
            path = Path(folder, name)
            if path.resolve() not in kept:
                found.append((f"{label} file", path))
            if len(found) >= MAX_WALK_FILES:
                return found
    return found


def unwritable(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (None if one can). Tried, not guessed from its
    mode: root ignores modes, and read-only mounts or /proc refuse whatever the mode says."""
    with deferred():  # a SIGTERM here must not leave the probe behind
        try:
            fd, probe = tempfile.mkstemp(prefix=".dia2-write-probe.", dir=directory)
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        os.close(fd)
        os.unlink(probe)
    return None


def is_within(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies under it, symlinks resolved on both sides."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents
