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

import numpy as np
import soundfile as sf


class AudioError(ValueError):
    """Audio the prefix path cannot use (unreadable, empty)."""


def load_mono(path: str | Path, target_rate: int) -> np.ndarray:
    """float32 mono samples at ``target_rate``, exactly as the reference loads a prefix."""
    audio, rate = read_audio(path)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != target_rate:
        audio = resample_linear(audio, rate, target_rate)
    return audio


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """(samples [n] or [n, channels] float32, rate); AudioError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"{path}: cannot read audio ({_reason(exc)})") from None
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape[0] == 0:
        raise AudioError(f"{path}: the audio is empty")
    return audio, int(rate)


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


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
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
