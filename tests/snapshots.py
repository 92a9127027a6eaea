"""A directory's entries with what changes when one is replaced, rewritten or added: the file-safety
tests of both tiers compare a snapshot from before a refused command with one from after it."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry below ``directory`` (hidden ones too) -> its identity."""
    return {str(p.relative_to(directory)): identity(p) for p in directory.rglob("*")}


def identity(path: Path) -> tuple:
    info = os.lstat(path)
    if path.is_dir() and not path.is_symlink():  # the write probe (cli_common.unwritable) touches a folder's mtime
        return info.st_ino, info.st_mode
    return info.st_ino, info.st_mode, info.st_size, info.st_mtime_ns
