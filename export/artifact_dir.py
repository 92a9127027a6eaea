"""An artifact directory made atomically: the output-directory checks, the build into a temporary
sibling, the swap into place, and what a failure (a full disk included) leaves behind: nothing.

Public for every room that writes artifact directories: export's build and quantization and
calibration's Q/DQ artifacts.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dia2_trt.runtime.artifacts import FORMAT, load_manifest
from dia2_trt.runtime.cli_common import is_within, unwritable
from dia2_trt.runtime.files import InputFileError, read_json_file
from dia2_trt.runtime.manifest import MANIFEST, Manifest
from dia2_trt.runtime.signals import deferred


class BuildError(ValueError):
    """Bad build request: unknown precision, unusable output directory."""


def is_artifact_dir(path: Path) -> bool:
    """A directory holding a dia2-trt manifest: what ``--overwrite`` may replace."""
    try:  # manifests are kB; a huge file, a FIFO or a device is not ours
        raw = read_json_file(Path(path) / MANIFEST, 16 << 20, "manifest")
    except InputFileError:
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def check_output_dir(out: Path, overwrite: bool) -> None:
    real = out.resolve()
    if real.parent == real:
        raise BuildError(f"--out {out} is the root directory")
    if real.exists() and not real.is_dir():
        raise BuildError(f"{out} exists and is not a directory")
    if real.exists() and any(real.iterdir()):
        _check_replaceable(out, overwrite)
    if real.exists() and is_within(Path.cwd(), real):
        raise BuildError(f"--out {out} is (or holds) the current directory; build from somewhere else")
    ancestor = _existing_ancestor(real.parent)
    if not ancestor.is_dir():
        raise BuildError(f"cannot create {real.parent}: {ancestor} is not a directory")
    reason = unwritable(ancestor)
    if reason:
        raise BuildError(f"cannot write to {ancestor} ({reason})")


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not overwrite:
        raise BuildError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    if not is_artifact_dir(out):
        raise BuildError(f"{out} is not empty and holds no dia2-trt artifacts ({MANIFEST}); "
                         f"--overwrite only replaces an artifact directory, so it stays untouched")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def atomic_dir(out: Path, overwrite: bool, needed: int, fill: Callable[[Path], None],
               load: Callable[..., Manifest] = load_manifest) -> Manifest:
    """Run ``fill`` on a new temporary sibling of ``out``, check the result with the runtime's
    loader, then swap it into place; on failure (SIGTERM and Ctrl-C included: runtime/signals.py)
    leave nothing behind. ``needed``: about how many bytes the build writes at its peak, for
    the message when the disk fills up. ``load``: the loader that checks the result, the runtime's
    unless the caller passes its own (export/build.py passes the one it imported, so that a test
    replacing build.load_manifest replaces it here too)."""
    out = Path(out).resolve()  # a symlinked --out replaces what it points to, not the link
    created, tmp = [], None
    try:
        with deferred():  # a directory made is a directory the cleanup knows of
            created = _make_parents(out.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; artifacts are meant to be shared
        fill(tmp)
        # What the runtime will read, checked by the runtime's own loader before it replaces anything;
        # this also records the big graphs' checksum stamps, so the first load does not hash them again.
        load(tmp)
        _replace_dir(tmp, out, overwrite)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        if disk_full(exc):
            raise BuildError(f"cannot write {out}: {no_space(out.parent, needed)}") from None
        if isinstance(exc, OSError) and tmp is None:
            raise BuildError(f"cannot write to {out.parent}: {exc.strerror}") from None
        raise
    return load(out, verify=False)


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error that led to it, is a full disk or a spent quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space(directory: Path, needed: int) -> str:
    return f"no space left on device (needs about {_gb(needed)} GB in {directory})"


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f}" if size >= 1e9 else f"{size / 1e9:.2g}"


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files in ``path`` (a file or a directory tree)."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size if path.is_file() else 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def copy_tree(src: Path, dst: Path) -> None:
    """copy2, or copytree for a directory, but raising the first OSError as it is: shutil.copytree
    gathers failures into one shutil.Error without errno, which would hide a full disk."""
    if not Path(src).is_dir():
        shutil.copy2(src, dst)
        return
    Path(dst).mkdir()
    for entry in sorted(Path(src).iterdir()):
        copy_tree(entry, Path(dst) / entry.name)


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p that says which directories it made (outermost first), to undo on failure."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    try:
        for path in reversed(missing):
            path.mkdir()
    except OSError as exc:
        _remove_dirs(list(reversed(missing)))
        raise BuildError(f"cannot create {path}: {exc.strerror}") from None
    return list(reversed(missing))


def _remove_dirs(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()  # only if still empty: something else may have moved in meanwhile
        except FileNotFoundError:
            continue
        except OSError:
            return


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Swap the finished directory in; an old one is removed only after the new one is complete,
    and only if it still is an artifact directory (the export took minutes: look again)."""
    if out.exists() and any(out.iterdir()):
        _check_replaceable(out, overwrite)
    # Not split by SIGTERM: between the two renames ``out`` would be gone and the old copy hidden.
    # A signal that comes meanwhile ends the command just after: the new artifact is complete.
    with deferred():
        if not out.exists():
            tmp.rename(out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))  # a name nobody else uses
        out.replace(old)  # onto the empty placeholder
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
