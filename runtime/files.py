"""Output files that appear whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

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
            temps.append(_temp_beside(Path(path)))
            write(temps[-1])
            _share(temps[-1])
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
