"""The codebook delay pattern and the reference's post-processing of generated frames."""

from __future__ import annotations

from typing import Sequence

import numpy as np

UNGENERATED = -2  # audio-buffer marker for frames the loop never reached


def undelay(delayed: np.ndarray, delays: Sequence[int], pad_id: int) -> np.ndarray:
    """[Q, T] delayed codes -> [Q, T - max_delay] aligned codes (codebook q shifted left by delays[q])."""
    channels, total = delayed.shape
    target = max(0, total - (max(delays) if delays else 0))
    out = np.full((channels, target), pad_id, dtype=np.int64)
    for q, delay in enumerate(delays):
        out[q] = delayed[q, delay: delay + target]
    return out


def finish(delayed: np.ndarray, delays: Sequence[int], audio_pad: int, first_word_frame: int,
           transcript: list[tuple[str, int]], frame_rate: float) -> tuple[np.ndarray, list[tuple[str, float]], int]:
    """Undelay, crop the lead-in before the first word, and time-stamp the words.

    Returns (aligned codes [Q, T], [(word, seconds)], crop). Mirrors the reference:
    ungenerated frames become audio pad, a crop that would leave nothing is dropped,
    and words spoken before the crop are left out.
    """
    delayed = np.where(delayed == UNGENERATED, audio_pad, delayed)
    aligned = undelay(delayed, delays, audio_pad)
    crop = max(first_word_frame, 0)
    if crop >= aligned.shape[1]:
        crop = 0
    aligned = aligned[:, crop:]
    rate = max(frame_rate, 1.0)
    stamps = [(word, (step - crop) / rate) for word, step in transcript if step - crop >= 0]
    return aligned, stamps, crop
