"""The codebook delay pattern, the reference's stopping rule and its post-processing of generated frames."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class StopRule:
    """The reference's rules for when the loop stops and where the output starts, as a value.

    Pure: ``after`` returns the rule for the next frame and changes nothing, so
    the PyTorch reference loop and the runtime share it step for step.
    """

    capacity: int
    """Columns of the delayed audio buffer; frame t writes column t + 1, so t + 1 < capacity."""
    flush_tail: int
    """Frames run past the end mark: every codebook's delayed frames and the last word's padding."""
    initial_padding: int
    """Frames of lead-in before the first word (``GenerationParams.initial_padding``)."""
    new_word: int
    """The text token that starts a word on the main stream."""
    first_word_frame: int | None = None
    """The first main-stream new word's frame less the lead-in; None until it appears."""
    eos_cutoff: int | None = None
    """The first frame not run, once the script's end mark is known."""
    last_step: int = -1
    """The last frame run (-1 before the first)."""
    first_frame: int = 0
    """The first frame run: 0, or A - 1 after an A-frame audio prefix (the reference's start_step)."""
    include_prefix: bool = False
    """An audio prefix stays in the output (as the reference's include_prefix): no crop."""

    @classmethod
    def start(cls, capacity: int, delays: Sequence[int], max_padding: int, initial_padding: int,
              new_word: int) -> StopRule:
        return cls(capacity, max(delays, default=0) + max_padding, initial_padding, new_word)

    def after_prefix(self, frames: int, max_context: int, max_delay: int, cache_capacity: int,
                     include_prefix: bool) -> StopRule:
        """The rule for generation after an A-frame prefix warm-up: it starts at A - 1, its delayed buffer
        is the reference's max_context + A + max_delay + 1 columns, but frame t needs KV row t + 1."""
        capacity = min(max_context + frames + max_delay + 1, cache_capacity)
        return replace(self, capacity=capacity, first_frame=frames - 1, include_prefix=include_prefix)

    def stops_before(self, t: int) -> bool:
        """Whether frame t is past the end mark's tail or past the buffer."""
        return (self.eos_cutoff is not None and t >= self.eos_cutoff) or t + 1 >= self.capacity

    def after(self, t: int, main: int, end_step: int | None) -> StopRule:
        """The rule once frame t ran, emitting ``main`` with the machine's end mark at ``end_step``."""
        first = self.first_word_frame
        if first is None and main == self.new_word:
            first = t - self.initial_padding
        cutoff = self.eos_cutoff
        if cutoff is None and end_step is not None:
            cutoff = end_step + self.flush_tail
        return replace(self, first_word_frame=first, eos_cutoff=cutoff, last_step=t)

    @property
    def columns(self) -> int:
        """Delayed-buffer columns that hold output: the last frame run wrote column last_step + 1."""
        last = self.last_step
        return min(last + 2, self.capacity) if last >= self.first_frame else self.first_frame + 1

    @property
    def crop(self) -> int:
        """The lead-in the output drops, as ``finish`` is asked for it (it falls back to 0 if too long):
        none when a prefix is kept, else from the first word, else from the start frame."""
        if self.include_prefix:
            return 0
        return self.first_word_frame if self.first_word_frame is not None else self.first_frame

    @property
    def truncated(self) -> bool:
        """The loop stopped before the end mark's tail ran out (the context was too short)."""
        return self.eos_cutoff is None or self.last_step + 1 < self.eos_cutoff
