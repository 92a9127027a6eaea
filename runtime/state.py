"""Everything one utterance writes on the host, owned by one session at a time.

The runtime's graphs and weights are shared, and so is the batch (``step.FrameStepper``:
every slot's KV cache and codec state); a ``GenerationState`` holds a session's own host
buffers: step tokens, the delayed audio codes, sampling noise, the text state, what has been
emitted, and the random generator. ``reset`` readies it for a new utterance, so a finished
session's state serves the next one without allocating anything again.

Nothing of one session may reach the next, however it ended (finished, cancelled, failed
mid-frame, NaN in its outputs): ``reset`` scrubs every buffer a session writes,
unconditionally, before the next session uses the state, and the stepper scrubs a slot's
cache rows and codec state before a new stream takes the slot (``FrameStepper.scrub``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from .artifacts import Manifest
from .frames import UNGENERATED, StopRule
from .params import GenerationParams
from .state_machine import StateMachine, TextState
from .step import BRANCHES

T = TypeVar("T")


@dataclass
class Emitter:
    """Which aligned frames and words have gone out, and the audio so far."""

    crop: int | None = None  # first aligned frame of the output, once the first word is known
    next_frame: int = 0  # next aligned frame (absolute) to decode
    words_sent: int = 0  # transcript entries already attached to a chunk or dropped
    started: float = 0.0  # perf_counter at the first frame
    first_audio: float | None = None  # seconds from the start to the first PCM
    pcm: list[np.ndarray] = field(default_factory=list)
    held: list[np.ndarray] = field(default_factory=list)  # decoded frames not yet sent (a chunk filling up)


@dataclass
class GenerationState:
    """One session's host buffers and bookkeeping."""

    tokens: np.ndarray  # [2, C] the step tokens fed to the backbone
    audio: np.ndarray  # [Q, cache_capacity + max_delay + 1] delayed codes (both CFG rows get the same ones)
    noise: np.ndarray  # [Q] one uniform number per codebook for the in-graph audio sampler
    text: TextState | None = None  # set by reset(), as is the rule
    rule: StopRule | None = None
    emitter: Emitter = field(default_factory=Emitter)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @property
    def live_text(self) -> TextState:
        """The utterance's text state: ``reset`` sets it before a session reads it (``scrub`` drops it)."""
        assert self.text is not None, "the state was not reset for an utterance"
        return self.text

    @property
    def live_rule(self) -> StopRule:
        """The utterance's stop rule: ``reset`` sets it before a session reads it (``scrub`` drops it)."""
        assert self.rule is not None, "the state was not reset for an utterance"
        return self.rule

    @classmethod
    def allocate(cls, m: Manifest) -> GenerationState:
        """Buffers for manifest ``m``."""
        q = m.audio_channels
        return cls(
            tokens=np.zeros((BRANCHES, 2 + q), dtype=np.int64),
            # a prefix of A frames moves generation A frames on: room for every cached frame and the delay tail
            audio=np.zeros((q, m.cache_capacity + m.max_delay + 1), dtype=np.int64),
            noise=np.zeros(q, dtype=np.float32),
        )

    def scrub(self) -> None:
        """Back to what a fresh allocation holds: the host buffers zeroed and the bookkeeping dropped."""
        for buffer in (self.tokens, self.audio, self.noise):
            buffer.fill(0)
        self.text, self.rule, self.emitter = None, None, Emitter()
        self.rng = np.random.default_rng(0)

    def reset(self, m: Manifest, machine: StateMachine, params: GenerationParams) -> None:
        """Ready for a new utterance: scrubbed, then set to the utterance's start."""
        self.scrub()
        ids = m.token_ids
        self.tokens.fill(ids.pad)
        self.tokens[0, 0] = ids.bos
        self.tokens[1, 0] = ids.zero
        self.audio.fill(UNGENERATED)
        self.text = machine.new_state([])
        self.rule = StopRule.start(m.max_context_steps + 1, m.delays, machine.max_padding, params.initial_padding,
                                   ids.new_word)
        self.emitter = Emitter()
        self.rng = np.random.default_rng(params.seed)


class StatePool(Generic[T]):
    """Objects no session holds, kept for the next one; it grows to the most sessions run at once."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._free: list[T] = []
        self._lock = threading.Lock()

    def take(self) -> T:
        """One for a session; reset it before use."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._make()

    def give_back(self, item: T) -> None:
        """Keep ``item`` for the next session; given back twice, kept once."""
        with self._lock:
            if not any(s is item for s in self._free):
                self._free.append(item)

    def __len__(self) -> int:
        """Objects waiting for a session."""
        return len(self._free)
