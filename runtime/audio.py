"""Prefix audio in: any file soundfile reads, mixed to mono, resampled to the codec's rate.

The spec is nari-labs/dia2's ``load_mono_audio`` (runtime/audio_io.py). It tries
``sphn.read_wav`` and ``sphn.resample_audio``, but no sphn release has either
(0.2.0, the version its uv.lock pins, and 0.2.1 offer ``read``/``resample``), so the
reference always takes its fallbacks: ``soundfile.read(dtype="float32")``, a mean
over channels, and ``torch.nn.functional.interpolate(mode="linear",
align_corners=False)`` to ``round(n * dst / src)`` samples. ``resample_linear``
is that interpolation in numpy, operation for operation in float32, so a 44.1 kHz
prefix gives the reference's samples bit for bit (tests/test_voices.py compares
against torch) and therefore its codes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf

from .errors import first_line
from .files import InputFileError, open_regular

# Bounds checked on the header, before a sample is decoded. A prefix is at most the artifact's
# cache (2B: 1501 frames, 2 minutes); ten minutes is far past any, and callers that know the
# artifact pass its own limit (``max_seconds``). The duration bound is also what keeps resampling
# small: a 1 Hz file of 10^6 frames would otherwise become 24 * 10^9 samples at 24 kHz.
MAX_AUDIO_SECONDS = 600.0
MAX_AUDIO_SAMPLES = 1 << 25  # frames x channels decoded as float32: 128 MiB (~6 min of 48 kHz stereo)
MAX_AUDIO_BYTES = 1 << 30  # the file itself: float64 samples at MAX_AUDIO_SAMPLES plus metadata


class AudioError(ValueError):
    """Audio the prefix path cannot use (unreadable, empty, too long)."""


class AudioInfo(NamedTuple):
    frames: int
    channels: int
    rate: int

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


def load_mono(path: str | Path, target_rate: int, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """float32 mono samples at ``target_rate``, exactly as the reference loads a prefix."""
    audio, rate = read_audio(path, max_seconds)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != target_rate:
        audio = resample_linear(audio, rate, target_rate)
    return audio


def read_audio(path: str | Path, max_seconds: float = MAX_AUDIO_SECONDS) -> tuple[np.ndarray, int]:
    """(samples [n] or [n, channels] float32, rate); AudioError for anything unusable, and for
    more than ``max_seconds`` or MAX_AUDIO_SAMPLES, refused from the header before decoding."""
    path = Path(path)
    with _open(path) as f:
        info = _checked_info(f, path, max_seconds)
        try:
            f.seek(0)
            # frames= the header's count: never more than was checked, whatever the stream holds
            audio, rate = sf.read(f, frames=info.frames, dtype="float32", always_2d=False)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
            raise AudioError(f"{path}: cannot read audio ({first_line(exc)})") from None
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape[0] == 0:
        raise AudioError(f"{path}: the audio is empty")
    return audio, int(rate)


def audio_info(path: str | Path, max_seconds: float = MAX_AUDIO_SECONDS) -> AudioInfo:
    """The header of a prefix audio file, checked as ``read_audio`` checks it, without decoding."""
    path = Path(path)
    with _open(path) as f:
        return _checked_info(f, path, max_seconds)


def _open(path: Path):
    if not path.exists():
        raise AudioError(f"{path}: no such audio file")
    try:
        return open_regular(path, MAX_AUDIO_BYTES, "audio file")
    except InputFileError as exc:
        raise AudioError(str(exc)) from None


def _checked_info(f, path: Path, max_seconds: float) -> AudioInfo:
    try:
        with sf.SoundFile(f) as snd:
            info = AudioInfo(int(snd.frames), int(snd.channels), int(snd.samplerate))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        raise AudioError(f"{path}: cannot read audio ({first_line(exc)})") from None
    if info.rate < 1 or info.channels < 1:
        raise AudioError(f"{path}: cannot read audio ({info.rate} Hz, {info.channels} channels)")
    if info.frames * info.channels > MAX_AUDIO_SAMPLES:
        raise AudioError(f"{path}: too much audio ({info.frames} frames x {info.channels} channels; "
                         f"at most {MAX_AUDIO_SAMPLES} samples)")
    if info.seconds > max_seconds:
        raise AudioError(f"{path}: the audio is {info.seconds:.1f} s long ({info.frames} frames at {info.rate} Hz); "
                         f"a prefix may be at most {max_seconds:.1f} s")
    return info


def resample_linear(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """PyTorch's 1-D linear interpolation (align_corners=False) to round(n * dst / src) samples.

    The float32 steps of ATen's CPU kernel, including the two fused multiply-adds
    its x86 build compiles them to (without them ~20% of the samples differ in the
    last bits; with them none do, tests/test_voices.py):
    scale = float(n_in) / n_out; x = max(fma(scale, i + 0.5, -0.5), 0);
    i0 = min(floor(x), n_in - 1); w1 = clamp(x - i0, 0, 1); w0 = 1 - w1;
    out = fma(w0, a[i0], w1 * a[i1]).
    """
    audio = np.asarray(audio, dtype=np.float32)
    if src_rate == dst_rate:
        return audio
    n_in = audio.shape[0]
    n_out = max(1, int(round(n_in * dst_rate / src_rate)))
    if n_out == n_in:  # ATen copies when the sizes agree
        return audio.copy()
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    src = _fma32(scale, np.arange(n_out).astype(f32) + f32(0.5), f32(-0.5))
    src = np.maximum(src, f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
    i1 = i0 + (i0 < n_in - 1)
    w0 = f32(1) - w1
    return _fma32(w0, audio[i0], w1 * audio[i1])


def _fma32(a, b, c) -> np.ndarray:
    """float32 fma(a, b, c) = round32(a * b + c), rounded once.

    a * b of two float32s is exact in float64; the float64 sum with c may round,
    and rounding that again to float32 can go wrong only when it lands exactly on
    a float32 midpoint, so the sum's exact error (TwoSum) breaks those ties.
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    r = s.astype(np.float32)
    half_way = (np.abs(s - r.astype(np.float64)) * 2 == np.abs(np.spacing(r).astype(np.float64))) & (err != 0)
    if half_way.any():
        r[half_way] = np.nextafter(s[half_way], s[half_way] + err[half_way]).astype(np.float32)
    return r


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with _open(Path(path)) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pcm16(pcm: np.ndarray) -> bytes:
    """Float samples -> s16le bytes: clipped to [-1, 1], scaled by 32767 and rounded (every output
    of the runtime, ``dia2-rt speak --out -`` and the server alike, rounds this way)."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
