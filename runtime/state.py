"""Everything one utterance writes, owned by one session at a time.

The runtime's graphs and weights are shared; a ``GenerationState`` holds a
session's own buffers: step tokens, the delayed audio codes, sampling noise,
the KV cache, its bindings of the step graphs and the codec (with the codec's
streaming state), the text state, what has been emitted, and the random
generator. ``reset`` readies it for a new utterance, so a finished session's
state serves the next one without allocating or binding anything again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .artifacts import Manifest, cache_name
from .backends import Binding
from .codec import CodecStream
from .frames import UNGENERATED, StopRule
from .params import GenerationParams
from .state_machine import StateMachine, TextState

BRANCHES = 2  # conditional row 0, unconditional row 1: always both, as in the reference


@dataclass
class Emitter:
    """Which aligned frames and words have gone out, and the audio so far."""

    crop: int | None = None  # first aligned frame of the output, once the first word is known
    next_frame: int = 0  # next aligned frame (absolute) to decode
    words_sent: int = 0  # transcript entries already attached to a chunk or dropped
    started: float = 0.0  # perf_counter at the first frame
    first_audio: float | None = None  # seconds from the start to the first PCM
    pcm: list[np.ndarray] = field(default_factory=list)


@dataclass
class GenerationState:
    """One session's buffers and bookkeeping. The KV cache is never cleared: row t is written
    at step t before any step reads it."""

    tokens: np.ndarray  # [2, C] the step tokens fed to the backbone
    audio: np.ndarray  # [Q, cache_capacity + max_delay + 1] delayed codes (both CFG rows get the same ones)
    noise: np.ndarray  # [Q] one uniform number per codebook for the in-graph audio sampler
    k_cache: np.ndarray  # [L, 2, Hkv, S, D]; layer i is bound as the backbone's k_cache.i
    v_cache: np.ndarray
    backbone: Binding
    depformer: Binding
    codec: CodecStream
    cache_names: list[tuple[str, str]] = field(default_factory=list)  # (k, v) input of each layer, in order
    text: TextState | None = None  # set by reset(), as is the rule
    rule: StopRule | None = None
    emitter: Emitter = field(default_factory=Emitter)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @classmethod
    def allocate(cls, m: Manifest, bind: Callable[[str], Binding]) -> "GenerationState":
        """Buffers for manifest ``m``; ``bind(graph name)`` gives this state its own binding of a graph."""
        backbone = bind("backbone")
        cache = backbone.spec.input(cache_name("k", 0))
        q, layers = m.audio_channels, m.topology.n_layer
        state = cls(
            tokens=np.zeros((BRANCHES, 2 + q), dtype=np.int64),
            # a prefix of A frames moves generation A frames on: room for every cached frame and the delay tail
            audio=np.zeros((q, m.cache_capacity + m.max_delay + 1), dtype=np.int64),
            noise=np.zeros(q, dtype=np.float32),
            k_cache=np.zeros((layers, *cache.shape), dtype=cache.dtype),
            v_cache=np.zeros((layers, *cache.shape), dtype=cache.dtype),
            backbone=backbone, depformer=bind("depformer"),
            codec=CodecStream(bind("codec_decoder"), m.codec.codebook_size),
            cache_names=[(cache_name("k", i), cache_name("v", i)) for i in range(layers)],
        )
        for i, (k_name, v_name) in enumerate(state.cache_names):
            backbone.bind(k_name, state.k_cache[i])  # views: the layers share one allocation
            backbone.bind(v_name, state.v_cache[i])
        return state

    def write_rows(self, rows, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Store K/V rows ([L, 2, Hkv, D] at one row, or [L, 2, Hkv, T, D] at a slice) in this state's cache."""
        index = (slice(None), slice(None), rows)
        for i, (k_name, v_name) in enumerate(self.cache_names):
            self.backbone.write(k_name, index, k_new[i])
            self.backbone.write(v_name, index, v_new[i])

    def reset(self, m: Manifest, machine: StateMachine, params: GenerationParams) -> None:
        ids = m.token_ids
        self.tokens.fill(ids.pad)
        self.tokens[0, 0] = ids.bos
        self.tokens[1, 0] = ids.zero
        self.audio.fill(UNGENERATED)
        self.noise.fill(0.0)
        self.codec.reset()
        self.text = machine.new_state([])
        self.rule = StopRule.start(m.max_context_steps + 1, m.delays, machine.max_padding, params.initial_padding,
                                   ids.new_word)
        self.emitter = Emitter()
        self.rng = np.random.default_rng(params.seed)


class StatePool:
    """States no session holds, kept for the next one; it grows to the most sessions run at once."""

    def __init__(self, m: Manifest, bind: Callable[[str], Binding]) -> None:
        self._manifest, self._bind = m, bind
        self._free: list[GenerationState] = []
        self._lock = threading.Lock()

    def take(self) -> GenerationState:
        with self._lock:
            if self._free:
                return self._free.pop()
        return GenerationState.allocate(self._manifest, self._bind)

    def give_back(self, state: GenerationState) -> None:
        with self._lock:
            self._free.append(state)

    def __len__(self) -> int:
        """States waiting for a session."""
        return len(self._free)
