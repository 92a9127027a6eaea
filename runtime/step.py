"""The per-frame graph contract, owned in one place: names, feeds, and the rows each stream owns.

The step graphs carry a stream axis (manifest version 5): one call of the backbone steps S
streams, stream slot s owning batch rows 2s (conditional) and 2s + 1 (unconditional) of the
CFG pair; the depformer frame samples every codebook of S streams from per-stream parameters
and noise; the codec decoder (where the artifacts batch it) decodes one frame of S streams,
an ``active`` flag keeping the state of the rows that have nothing to decode.

A ``FrameStepper`` owns a batch: the bindings of the step graphs, the KV cache of every slot
(``[2 * streams, Hkv, rows, D]`` per layer, graph input in place) and the codec state. It
runs one graph for a set of slots (``backbone``, ``depformer``, ``decode``); slots that are not
in a call still take part in it (their rows are computed and thrown away), because a call runs
the slots 0 .. S-1 as one contiguous batch. Rows are independent in every graph (no op mixes
rows), so what one stream gets never depends on who else is in the batch.

Sessions call it directly (one stream, ``Session.__iter__``) or through ``batch.BatchEngine``,
which gathers the calls of every live stream into one call per graph per frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .backends import Binding
from .manifest import ACTIVE, BACKBONE, CODEC_DECODER, DEPFORMER, STREAM_ROWS, STREAMS, Manifest, cache_name
from .params import GenerationParams

BRANCHES = 2  # conditional row 2s, unconditional row 2s + 1: always both, as in the reference

# Backbone step I/O.
TOKENS, POSITION, CACHE_LENGTH = "tokens", "position", "cache_length"
HIDDEN, ACTION_LOGITS, CB0_LOGITS, K_NEW, V_NEW = "hidden", "action_logits", "cb0_logits", "k_new", "v_new"
# Depformer frame I/O.
TEXT_TOKENS, NOISE, TEMPERATURE, TOP_K = "text_tokens", "noise", "temperature", "top_k"
CFG_SCALE, CFG_FILTER_K, AUDIO_TOKENS = "cfg_scale", "cfg_filter_k", "audio_tokens"
# Prefill (one stream): tokens [2, C, T] -> k_rows / v_rows [L, 2, Hkv, T, D].
K_ROWS, V_ROWS = "k_rows", "v_rows"


@dataclass
class BackboneCall:
    """One stream's backbone step: its CFG pair's tokens [2, C], RoPE position and cache row."""

    tokens: np.ndarray
    position: int
    row: int  # where its new K/V row goes, and how many rows before it are valid


@dataclass
class BackboneResult:
    hidden: np.ndarray  # [2, E]
    action_logits: np.ndarray  # [2, Vtext]
    cb0_logits: np.ndarray  # [2, Vaudio]


@dataclass
class DepformerCall:
    """One stream's depformer frame: the backbone's outputs, the frame's text tokens, its noise [Q]."""

    hidden: np.ndarray
    cb0_logits: np.ndarray
    text: tuple[int, int]
    noise: np.ndarray
    params: GenerationParams


@dataclass
class DecodeCall:
    """One aligned frame of codes [Q] for the stream's codec."""

    codes: np.ndarray


Call = BackboneCall | DepformerCall | DecodeCall


class FrameStepper:
    """The step graphs bound for ``streams`` slots, with every slot's KV cache and codec state."""

    def __init__(self, m: Manifest, bind: Callable[[str], Binding], streams: int) -> None:
        self.manifest, self.streams = m, streams
        self.backbone, self.depformer = bind(BACKBONE), bind(DEPFORMER)
        layers = m.topology.n_layer
        self.cache_names = [(cache_name("k", i), cache_name("v", i)) for i in range(layers)]
        spec = self.backbone.spec
        cache = spec.input(cache_name("k", 0)).bounded({**spec.dims, STREAM_ROWS: BRANCHES * streams})
        self.cache = KVCache(layers, cache.static_shape, cache.dtype, grows=self.backbone.resizable)
        decoder = bind(CODEC_DECODER)
        self.batched_codec = any(t.name == ACTIVE for t in decoder.spec.inputs)
        # A codec graph without a stream axis decodes one stream per binding: one binding a slot.
        self.decoders = [decoder] if self.batched_codec else [decoder, *(bind(CODEC_DECODER)
                                                                        for _ in range(streams - 1))]
        self.rows_written = [0] * streams  # per slot: cache rows 0 .. n-1 may hold a stream's values
        self._laid_out = 0  # the S the backbone's cache is bound for (0: none yet)
        self._sizes: dict[int, int] = {}  # id(binding) -> the S it is laid out for
        self._cache_rows = 0  # the cache rows bound
        self._codec_inputs = _codec_inputs(decoder.spec)

    @staticmethod
    def codec_frame(decoder: Binding) -> tuple[int, int]:
        """(codes in, samples out) of one frame of one stream of a codec decoder binding."""
        codes, pcm = _codec_inputs(decoder.spec)
        return _per_stream(decoder, codes), _per_stream(decoder, pcm)

    def _run(self, binding: Binding, s: int, feeds: dict) -> dict:
        """Run ``binding`` on S = ``s`` streams' feeds, each shaped as the graph takes it at that size
        (a codec decoder without a stream axis takes one stream's codes as [1, Q, 1])."""
        spec, dims = binding.spec, {**binding.spec.dims, STREAMS: s, STREAM_ROWS: BRANCHES * s}
        shaped = {name: np.reshape(value, spec.input(name).bounded(dims).static_shape)
                  for name, value in feeds.items()}
        return binding.run(shaped)  # type: ignore[return-value]

    # --- layout -------------------------------------------------------------------------------

    def _size(self, binding: Binding, s: int) -> None:
        """Lay ``binding`` out for S = ``s`` streams (each graph keeps its own size: a frame's
        depformer call may hold fewer streams than its backbone call)."""
        if self._sizes.get(id(binding)) != s:
            binding.set_dims({STREAMS: s, STREAM_ROWS: BRANCHES * s})
            self._sizes[id(binding)] = s

    def _layout(self, s: int) -> None:
        """Lay the backbone out for S = ``s`` streams and bind slots 0 .. s-1 of the cache."""
        if self._sizes.get(id(self.backbone)) != s:
            self._size(self.backbone, s)
            self._laid_out = 0  # set_dims dropped the bound cache: bind it again at the new size
        if getattr(self.backbone, "device_inputs", False):  # bound once on the device: only rows are written
            if not self._cache_rows:
                self._bind_cache(self.streams)
            self._laid_out, self._cache_rows = s, self.cache.rows
            return
        if s != self._laid_out or self.cache.rows != self._cache_rows:
            self._bind_cache(s)
            self._laid_out, self._cache_rows = s, self.cache.rows

    def _bind_cache(self, s: int) -> None:
        for i, (k_name, v_name) in enumerate(self.cache_names):
            self.backbone.bind(k_name, self.cache.layer("k", i)[: BRANCHES * s])
            self.backbone.bind(v_name, self.cache.layer("v", i)[: BRANCHES * s])

    # --- the graphs ---------------------------------------------------------------------------

    def backbone_step(self, calls: dict[int, BackboneCall]) -> dict[int, BackboneResult]:
        """One backbone step of the slots in ``calls``; each slot's new K/V row is stored at its ``row``."""
        s = max(calls) + 1
        self.cache.make_room(max(call.row for call in calls.values()) + 1)
        self._layout(s)
        tokens = np.zeros((BRANCHES * s, self.manifest.audio_channels + 2), dtype=np.int64)
        position, length = np.zeros(s, dtype=np.int64), np.zeros(s, dtype=np.int64)
        for slot, call in calls.items():
            tokens[BRANCHES * slot: BRANCHES * slot + BRANCHES] = call.tokens
            position[slot], length[slot] = call.position, call.row
        out = self._run(self.backbone, s, {TOKENS: tokens, POSITION: position, CACHE_LENGTH: length})
        results = {}
        for slot, call in calls.items():
            rows = slice(BRANCHES * slot, BRANCHES * slot + BRANCHES)
            self.write_rows(slot, call.row, out[K_NEW][:, rows, :, None], out[V_NEW][:, rows, :, None])
            results[slot] = BackboneResult(*(out[name][rows].copy() for name in (HIDDEN, ACTION_LOGITS, CB0_LOGITS)))
        return results

    def depformer_frame(self, calls: dict[int, DepformerCall]) -> dict[int, np.ndarray]:
        """Every codebook of one frame for the slots in ``calls``: slot -> tokens [Q]."""
        s = max(calls) + 1
        self._size(self.depformer, s)
        first = next(iter(calls.values()))
        q = first.noise.shape[0]
        feeds = {
            HIDDEN: np.zeros((BRANCHES * s, *first.hidden.shape[1:]), first.hidden.dtype),
            CB0_LOGITS: np.zeros((BRANCHES * s, *first.cb0_logits.shape[1:]), first.cb0_logits.dtype),
            TEXT_TOKENS: np.zeros((s, 2), np.int64), NOISE: np.zeros((s, q), np.float32),
            # rows nobody asked for sample greedily and unguided, with k = 1: the TopK fast path (k = 0,
            # "no cut", would send the whole batch through the full sort)
            TEMPERATURE: np.zeros(s, np.float32), TOP_K: np.ones(s, np.int64),
            CFG_SCALE: np.ones(s, np.float32), CFG_FILTER_K: np.zeros(s, np.int64),
        }
        for slot, call in calls.items():
            rows, p = slice(BRANCHES * slot, BRANCHES * slot + BRANCHES), call.params
            feeds[HIDDEN][rows], feeds[CB0_LOGITS][rows] = call.hidden, call.cb0_logits
            feeds[TEXT_TOKENS][slot], feeds[NOISE][slot] = call.text, call.noise
            feeds[TEMPERATURE][slot], feeds[TOP_K][slot] = p.audio_temperature, p.audio_top_k
            feeds[CFG_SCALE][slot], feeds[CFG_FILTER_K][slot] = p.cfg_scale, p.cfg_filter_k
        out = self._run(self.depformer, s, feeds)[AUDIO_TOKENS].reshape(s, -1)
        return {slot: out[slot].copy() for slot in calls}

    def decode(self, calls: dict[int, DecodeCall]) -> dict[int, np.ndarray]:
        """One aligned frame of PCM for each slot in ``calls`` (float32, unclipped)."""
        codes_name, pcm_name = self._codec_inputs
        if not self.batched_codec:
            out = {}
            for slot, call in calls.items():
                out[slot] = self._run(self.decoders[slot], 1, {codes_name: call.codes})[pcm_name].reshape(-1).copy()
            return out
        s = max(calls) + 1
        self._size(self.decoders[0], s)
        q = next(iter(calls.values())).codes.shape[0]
        codes, active = np.zeros((s, q, 1), np.int64), np.zeros(s, np.bool_)
        for slot, call in calls.items():
            codes[slot, :, 0], active[slot] = call.codes, True
        pcm = self._run(self.decoders[0], s, {codes_name: codes, ACTIVE: active})[pcm_name].reshape(s, -1)
        return {slot: pcm[slot].copy() for slot in calls}

    # --- rows a slot owns ---------------------------------------------------------------------

    def write_rows(self, slot: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store a slot's K/V rows ``start`` .. start+T-1 from [L, 2, Hkv, T, D] arrays."""
        end = start + k.shape[3]
        self.rows_written[slot] = max(self.rows_written[slot], end)  # first: a failed write may leave part
        self.cache.make_room(end)
        self._layout(max(self._laid_out, slot + 1))  # the slot's rows bound (and the cache, if it grew)
        pair, rows = slice(BRANCHES * slot, BRANCHES * slot + BRANCHES), slice(start, end)
        for i, (k_name, v_name) in enumerate(self.cache_names):
            self.backbone.write_rows(k_name, pair, rows, k[i])
            self.backbone.write_rows(v_name, pair, rows, v[i])

    def read_rows(self, slot: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """A slot's rows 0 .. count-1 of every layer: ([L, 2, Hkv, count, D], same for V)."""
        if getattr(self.backbone, "device_inputs", False):  # the rows live on the device, not here
            raise NotImplementedError("reading cache rows back from a device backend is not supported: "
                                      "make warm states with the onnxruntime backend (they restore on any)")
        pair = slice(BRANCHES * slot, BRANCHES * slot + BRANCHES)
        return tuple(np.stack([self.cache.layer(kind, i)[pair, :, :count] for i in range(len(self.cache_names))])
                     for kind in ("k", "v"))  # type: ignore[return-value]

    def scrub(self, slot: int) -> None:
        """Ready ``slot`` for a new stream: the cache rows its last stream wrote zeroed (a masked row
        still multiplies by 0, and 0 * NaN is NaN), and its codec state zeroed."""
        rows = self.rows_written[slot]
        if rows:
            zero = np.zeros((), self.cache.dtype)
            shape = (len(self.cache_names), BRANCHES, self.cache.heads, rows, self.cache.width)
            zeros = np.broadcast_to(zero, shape)
            self.write_rows(slot, 0, zeros, zeros)
        self.rows_written[slot] = 0
        if self.batched_codec:
            decoder = self.decoders[0]
            self._size(decoder, max(self._sizes.get(id(decoder), 1), slot + 1))  # the slot's state in view
            decoder.reset_state(slice(slot, slot + 1))
        else:
            self.decoders[slot].reset_state()

    def restart(self) -> None:
        """Every slot free: the cache back to its first rows (a growing cache), each slot scrubbed."""
        for slot in range(self.streams):
            self.scrub(slot)
        if self.cache.restart():
            self._cache_rows = 0


def _per_stream(binding: Binding, name: str) -> int:
    """Elements of tensor ``name`` per stream (its size at one stream)."""
    spec = binding.spec
    t = next(t for t in (*spec.inputs, *spec.outputs) if t.name == name)
    return int(np.prod(t.bounded({**spec.dims, STREAMS: 1, STREAM_ROWS: BRANCHES}).static_shape))


def _codec_inputs(spec) -> tuple[str, str]:
    """(codes input, pcm output) of a codec decoder: the ones besides its state and ``active``."""
    state_inputs, state_outputs = {i for i, _ in spec.state}, {o for _, o in spec.state}
    codes = [t.name for t in spec.inputs if t.name not in state_inputs and t.name != ACTIVE]
    pcm = [t.name for t in spec.outputs if t.name not in state_outputs]
    if len(codes) != 1 or len(pcm) != 1:
        raise ValueError(f"{spec.name}: a codec decoder has one codes input and one pcm output besides "
                         f"its state, got {codes} -> {pcm}")
    return codes[0], pcm[0]


class KVCache:
    """Every slot's K/V cache: per layer, a [2 * streams, Hkv, rows, D] array the backbone reads in place.

    ``rows`` grows in steps of ROW_STEP as rows are written (when the backbone binding is
    resizable), so a step reads what has been written rounded up, not the whole capacity: at
    2B size the capacity is 1501 rows, 0.69 GB a stream, every byte of which a step read before.
    Each layer's storage is one allocation of the capacity that numpy commits only as it is
    touched, so memory grows with the rows too. Growing moves every layer's existing rows
    apart, in place, from the last block down. Row 0 .. cache_length-1 are all a step uses; the
    others are masked out (exactly 0 weight), so what they hold does not matter. A call of S
    streams binds the first 2S batch rows: a contiguous prefix of each layer.
    """

    # Reading rounds the written rows up to a multiple of ROW_STEP (on average STEP/2 extra rows a
    # step) and each growth moves every row so far (over a 1500-frame utterance, rows/STEP moves):
    # for 2B (459 KB a row) 64 costs ~0.7 ms of reading and ~0.5 ms of moves a frame on average.
    ROW_STEP = 64

    def __init__(self, layers: int, shape: tuple[int, ...], dtype: np.dtype, grows: bool) -> None:
        self._blocks, self.capacity, self.width = shape[0] * shape[1], shape[2], shape[3]
        self._head, self.heads, self.dtype = tuple(shape[:2]), shape[1], np.dtype(dtype)
        size = self._blocks * self.capacity * self.width
        self._storage = {kind: np.zeros((layers, size), dtype=dtype) for kind in ("k", "v")}
        self.grows = grows
        self._first = min(self.ROW_STEP, self.capacity) if grows else self.capacity
        self.rows = self._first

    def restart(self) -> bool:
        """Back to the first ROW_STEP rows (no row is valid then, so nothing moves); True when the
        layers changed shape (they must be bound again)."""
        changed, self.rows = self.rows != self._first, self._first
        return changed

    def layer(self, kind: str, i: int) -> np.ndarray:
        """Layer ``i``'s ``kind`` ("k" or "v") cache at its current rows: a view of the storage."""
        used = self._storage[kind][i, : self._blocks * self.rows * self.width]
        return used.reshape(*self._head, self.rows, self.width)

    def make_room(self, rows: int) -> bool:
        """Grow so that ``rows`` rows fit; True when the layers moved (they must be bound again)."""
        if rows <= self.rows:
            return False
        if rows > self.capacity:
            raise IndexError(f"cache row {rows - 1} is past the capacity {self.capacity}")
        new = min(self.capacity, -(-rows // self.ROW_STEP) * self.ROW_STEP)
        old_len, new_len = self.rows * self.width, new * self.width
        for storage in self._storage.values():
            for flat in storage:
                for j in range(self._blocks - 1, 0, -1):  # block 0 stays; a block never lands on a lower one
                    flat[j * new_len: j * new_len + old_len] = flat[j * old_len: (j + 1) * old_len]
                blocks = flat[: self._blocks * new_len].reshape(self._blocks, new, self.width)
                blocks[:, self.rows:] = 0
        self.rows = new
        return True
