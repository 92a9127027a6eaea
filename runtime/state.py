"""Everything one utterance writes, owned by one session at a time.

The runtime's graphs and weights are shared; a ``GenerationState`` holds a
session's own buffers: step tokens, the delayed audio codes, sampling noise,
the KV cache, its bindings of the step graphs and the codec (with the codec's
streaming state), the text state, what has been emitted, and the random
generator. ``reset`` readies it for a new utterance, so a finished session's
state serves the next one without allocating or binding anything again.

Nothing of one session may reach the next, however it ended (finished, cancelled,
failed mid-frame, NaN in its outputs): ``reset`` scrubs every buffer a session
writes, unconditionally, before the next session uses the state. Zeroing the cache
matters although a step masks the rows past ``cache_length`` out: the mask gives
them weight exactly 0, and 0 * NaN is NaN, so one NaN row left by a failed
session would turn every later session's attention into NaN.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

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
    """One session's buffers and bookkeeping. A session writes cache row t at step t before any
    step reads it, but rows it never reaches are read too (masked), so ``scrub`` zeroes them."""

    tokens: np.ndarray  # [2, C] the step tokens fed to the backbone
    audio: np.ndarray  # [Q, cache_capacity + max_delay + 1] delayed codes (both CFG rows get the same ones)
    noise: np.ndarray  # [Q] one uniform number per codebook for the in-graph audio sampler
    cache: KVCache  # layer i's K is bound as the backbone's k_cache.i
    backbone: Binding
    depformer: Binding
    codec: CodecStream
    cache_names: list[tuple[str, str]] = field(default_factory=list)  # (k, v) input of each layer, in order
    text: TextState | None = None  # set by reset(), as is the rule
    rule: StopRule | None = None
    emitter: Emitter = field(default_factory=Emitter)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    rows_written: int = 0  # cache rows 0 .. rows_written-1 may hold a session's values (scrub zeroes them)

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
    def allocate(cls, m: Manifest, bind: Callable[[str], Binding]) -> GenerationState:
        """Buffers for manifest ``m``; ``bind(graph name)`` gives this state its own binding of a graph."""
        backbone = bind("backbone")
        cache = backbone.spec.input(cache_name("k", 0)).bounded(backbone.spec.dims)
        q, layers = m.audio_channels, m.topology.n_layer
        state = cls(
            tokens=np.zeros((BRANCHES, 2 + q), dtype=np.int64),
            # a prefix of A frames moves generation A frames on: room for every cached frame and the delay tail
            audio=np.zeros((q, m.cache_capacity + m.max_delay + 1), dtype=np.int64),
            noise=np.zeros(q, dtype=np.float32),
            cache=KVCache(layers, cache.static_shape, cache.dtype, grows=backbone.resizable),
            backbone=backbone, depformer=bind("depformer"),
            codec=CodecStream(bind("codec_decoder"), m.codec.codebook_size),
            cache_names=[(cache_name("k", i), cache_name("v", i)) for i in range(layers)],
        )
        state._bind_cache()
        return state

    def _bind_cache(self) -> None:
        for i, (k_name, v_name) in enumerate(self.cache_names):
            self.backbone.bind(k_name, self.cache.layer("k", i))
            self.backbone.bind(v_name, self.cache.layer("v", i))

    def write_rows(self, rows, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Store K/V rows ([L, 2, Hkv, D] at one row, or [L, 2, Hkv, T, D] at a slice) in this state's cache."""
        end = rows.stop if isinstance(rows, slice) else rows + 1
        self.rows_written = max(self.rows_written, end)  # before writing: a failed write may leave part of it
        if self.cache.make_room(end):
            self._bind_cache()
        index = (slice(None), slice(None), rows)
        for i, (k_name, v_name) in enumerate(self.cache_names):
            self.backbone.write(k_name, index, k_new[i])
            self.backbone.write(v_name, index, v_new[i])

    def scrub(self) -> None:
        """Back to what a fresh allocation holds: the cache rows a session may have written zeroed
        (where the backbone reads them), every binding's carried state zeroed (the codec's
        streaming state), the host buffers zeroed and the bookkeeping dropped."""
        self._zero_cache()
        for binding in (self.backbone, self.depformer):
            binding.reset_state()
        self.codec.reset()
        for buffer in (self.tokens, self.audio, self.noise):
            buffer.fill(0)
        self.text, self.rule, self.emitter = None, None, Emitter()
        self.rng = np.random.default_rng(0)

    def _zero_cache(self) -> None:
        """Zero every cache row the backbone may read, through the binding (where the cache lives).

        A growing cache goes back to its first rows, all of which are zeroed, whoever wrote them:
        storage past the view needs nothing, as no step reads it and growing builds the new view
        from the rows in view and zeroes, never from what lay past it (KVCache.make_room). A fixed
        one (TensorRT's, at capacity) has the rows written zeroed; a binding that writes single rows
        only takes the whole cache again from the host copy, which only bind() ever reads."""
        if self.cache.restart():
            self._bind_cache()
        rows = self.cache.rows if self.cache.grows else self.rows_written
        if rows:
            view = self.cache.layer("k", 0)
            zeros = np.broadcast_to(np.zeros((), view.dtype), (*view.shape[:2], rows, view.shape[3]))
            index = (slice(None), slice(None), slice(0, rows))
            try:
                for names in self.cache_names:
                    for name in names:
                        self.backbone.write(name, index, zeros)
            except ValueError:  # TensorRT writes one row per call: one upload beats a copy per row and layer
                self._bind_cache()
        self.rows_written = 0

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


class KVCache:
    """One session's K/V cache: per layer, a [2, Hkv, rows, D] array the backbone reads in place.

    ``rows`` grows in steps of ROW_STEP as rows are written (when the backbone binding is
    resizable), so a step reads what has been written rounded up, not the whole capacity: at
    2B size the capacity is 1501 rows, 0.69 GB, every byte of which a step read before. Each
    layer's storage is one allocation of the capacity that numpy commits only as it is touched,
    so memory grows with the rows too. Growing moves every layer's existing rows apart, in
    place, from the last block down. Row 0 .. cache_length-1 are all a step uses; the others
    are masked out (exactly 0 weight), so what they hold does not matter.
    """

    # Reading rounds the written rows up to a multiple of ROW_STEP (on average STEP/2 extra rows a
    # step) and each growth moves every row so far (over a 1500-frame utterance, rows/STEP moves):
    # for 2B (459 KB a row) 64 costs ~0.7 ms of reading and ~0.5 ms of moves a frame on average.
    ROW_STEP = 64

    def __init__(self, layers: int, shape: tuple[int, ...], dtype: np.dtype, grows: bool) -> None:
        self._blocks, self.capacity, self._width = shape[0] * shape[1], shape[2], shape[3]
        self._head = tuple(shape[:2])
        size = self._blocks * self.capacity * self._width
        self._storage = {kind: np.zeros((layers, size), dtype=dtype) for kind in ("k", "v")}
        self.grows = grows
        self._first = min(self.ROW_STEP, self.capacity) if grows else self.capacity
        self.rows = self._first

    def restart(self) -> bool:
        """Back to the first ROW_STEP rows for a new utterance (no row is valid then, so nothing
        moves); True when the layers changed shape (they must be bound again)."""
        changed, self.rows = self.rows != self._first, self._first
        return changed

    def layer(self, kind: str, i: int) -> np.ndarray:
        """Layer ``i``'s ``kind`` ("k" or "v") cache at its current rows: a view of the storage."""
        used = self._storage[kind][i, : self._blocks * self.rows * self._width]
        return used.reshape(*self._head, self.rows, self._width)

    def make_room(self, rows: int) -> bool:
        """Grow so that ``rows`` rows fit; True when the layers moved (they must be bound again)."""
        if rows <= self.rows:
            return False
        if rows > self.capacity:
            raise IndexError(f"cache row {rows - 1} is past the capacity {self.capacity}")
        new = min(self.capacity, -(-rows // self.ROW_STEP) * self.ROW_STEP)
        old_len, new_len = self.rows * self._width, new * self._width
        for storage in self._storage.values():
            for flat in storage:
                for j in range(self._blocks - 1, 0, -1):  # block 0 stays; a block never lands on a lower one
                    flat[j * new_len: j * new_len + old_len] = flat[j * old_len: (j + 1) * old_len]
                blocks = flat[: self._blocks * new_len].reshape(self._blocks, new, self._width)
                blocks[:, self.rows:] = 0
        self.rows = new
        return True

    def copy_rows(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows 0 .. count-1 of every layer: ([L, 2, Hkv, count, D], same for V)."""
        layers = len(self._storage["k"])

        def rows(kind: str) -> np.ndarray:
            return np.stack([self.layer(kind, i)[:, :, :count] for i in range(layers)])

        return rows("k"), rows("v")


class StatePool:
    """States no session holds, kept for the next one; it grows to the most sessions run at once."""

    def __init__(self, m: Manifest, bind: Callable[[str], Binding]) -> None:
        self._manifest, self._bind = m, bind
        self._free: list[GenerationState] = []
        self._lock = threading.Lock()

    def take(self) -> GenerationState:
        """A state for one session; ``reset`` it before use (that scrubs it again)."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return GenerationState.allocate(self._manifest, self._bind)

    def give_back(self, state: GenerationState) -> None:
        """Keep ``state`` for the next session (whose ``reset`` scrubs it); given back twice, kept once."""
        with self._lock:
            if not any(s is state for s in self._free):
                self._free.append(state)

    def __len__(self) -> int:
        """States waiting for a session."""
        return len(self._free)
