"""Output files that appear whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

# soundfile format and subtype by extension; OGG means Vorbis.
AUDIO_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    Readers never see a partial file, and a failed write leaves nothing behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_audio(path: Path, pcm: np.ndarray, rate: int) -> None:
    """WAV/FLAC (16-bit) or OGG (Vorbis), chosen by the extension."""
    import soundfile as sf

    fmt, subtype = AUDIO_FORMATS[Path(path).suffix.lower()]
    write_atomic(path, lambda tmp: sf.write(tmp, pcm, rate, format=fmt, subtype=subtype))
