"""The modules that become the backbone-step and depformer-frame graphs.

Both are pure functions of their inputs (no Python state, no data-dependent
control flow), so one trace gives a static-shape graph that ONNX Runtime and
TensorRT run as is. The batch is S streams (1..max_streams, the "streams" axis):
stream s owns rows 2s (conditional) and 2s + 1 (unconditional) of the CFG pair (the
"stream_rows" axis, 2S); every per-stream value (position, sampler settings, noise,
tokens) has one entry a stream. No op mixes rows of different streams, so a stream's
outputs are those of a one-stream call whatever shares the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from dia2_trt.models.dia2 import Dia2Model, pair_rows
from dia2_trt.runtime.manifest import CACHE_ROWS, STREAM_ROWS, STREAMS, cache_name
from dia2_trt.runtime.state_machine import TokenIds

BRANCHES = 2
# The streams of the example inputs a graph is traced with: not 1, which torch.export would fix as a
# constant, and not 2, the CFG pair's size, so no axis is taken for another.
EXAMPLE_STREAMS = 3

# The sampler's uniform numbers are clamped below 1 (1 - 2**-24 is the largest float32 below 1).
_U_MAX = 1.0 - 2.0**-24


class BackboneStep(nn.Module):
    """One frame of the backbone for S streams' CFG pairs.

    The cache is read, never written: new K/V rows come out as outputs and the
    runtime stores each stream's at its ``cache_length``. Writing in-graph would need either a
    whole-cache copy per step (Concat / ScatterND produce new tensors) or opset-24
    TensorScatter with input/output aliasing, which ONNX Runtime does not
    guarantee and TensorRT < 10.15 cannot import. A [L, 2, Hkv, D] row write on
    the host (or one cudaMemcpy2D on the device) is the cheapest portable option.
    """

    output_names = ["hidden", "action_logits", "cb0_logits", "k_new", "v_new"]

    def __init__(self, model: Dia2Model) -> None:
        super().__init__()
        self.backbone = model.transformer
        self.n_layer = len(model.transformer.layers)
        self.input_names = ["tokens", "position", "cache_length",
                            *cache_names("k", self.n_layer), *cache_names("v", self.n_layer)]

    def forward(self, tokens, position, cache_length, *caches):
        return self.backbone.step(tokens, position, caches[: self.n_layer], caches[self.n_layer:], cache_length)

    @property
    def dynamic_shapes(self) -> tuple:
        """The streams and their rows; the caches' row axis is left open too: a step reads as many
        rows as it is given (CACHE_ROWS)."""
        caches = tuple({0: STREAM_ROWS, 2: CACHE_ROWS} for _ in range(2 * self.n_layer))
        return ({0: STREAM_ROWS}, {0: STREAMS}, {0: STREAMS}, caches)

    @staticmethod
    def example_inputs(model: Dia2Model, capacity: int, position: int = 0, streams: int = EXAMPLE_STREAMS):
        """(tokens, position, cache_length, k_cache.0 .. k_cache.{L-1}, v_cache.0 .. v_cache.{L-1})."""
        cfg = model.config
        dec = cfg.model.decoder
        rows = BRANCHES * streams
        caches = [torch.zeros(rows, dec.kv_heads, capacity, dec.gqa_head_dim) for _ in range(2 * dec.n_layer)]
        tokens = torch.zeros(rows, cfg.data.channels, dtype=torch.long)
        pos = torch.full((streams,), position, dtype=torch.long)
        return (tokens, pos, pos.clone(), *caches)


class BackbonePrefill(nn.Module):
    """An audio prefix's warm-up in one call: T frames from an empty cache -> their T K/V rows.

    The reference warms up one backbone step per prefix frame (125 full steps for
    10 s) and throws the logits away; every input of those steps is known up front
    (the prefix codes and the forced text tokens), so one causal pass over T frames
    writes the same cache rows. T is a dynamic axis ("frames"), at most the
    artifact's prefix capacity.
    """

    input_names = ["tokens"]
    output_names = ["k_rows", "v_rows"]

    def __init__(self, model: Dia2Model) -> None:
        super().__init__()
        self.backbone = model.transformer

    def forward(self, tokens):
        return self.backbone.prefill(tokens)

    @staticmethod
    def example_inputs(model: Dia2Model, frames: int = 3):
        """tokens [2, C, frames] int64."""
        return (torch.zeros(BRANCHES, model.config.data.channels, frames, dtype=torch.long),)

    dynamic_shapes = ({2: "frames"},)


def cache_names(kind: str, n_layer: int) -> list[str]:
    """Graph input names of the per-layer caches: ``k_cache.0`` ... (the runtime reads the same scheme)."""
    return [cache_name(kind, i) for i in range(n_layer)]


# The largest k (runtime top_k, cfg_filter_k) served by a static TopK: ONNX Runtime
# selects 64 of 2050 logits with a heap, ~5x faster than the full descending sort
# (measured: 32 stages x 2 thresholds, 14 ms vs 80 ms on a loaded 2-core CPU), and
# the 2B depformer takes 64 such thresholds a frame. A larger k takes the exact
# full sort inside an If, so every k gives the same tokens; only its speed differs.
TOPK_MAX = 64


def guide(logits: torch.Tensor, cfg_scale: torch.Tensor, filter_k: torch.Tensor) -> torch.Tensor:
    """The reference's CFG: each stream's conditional row, limited to the guided top-k.

    logits [2S, V] (rows 2s, 2s + 1 the pair), cfg_scale / filter_k [S] -> [S, V]. ``cfg_scale == 1``
    disables guidance (and the filter), ``filter_k == 0`` disables only the filter.
    """
    cond, guided, use_filter = _guidance(logits, cfg_scale, filter_k)
    # an unused threshold is asked for k = 1, so switching the filter off never takes the slow path
    threshold = kth_largest(guided, torch.where(use_filter, filter_k, torch.ones_like(filter_k)))
    return _filtered(cond, guided, use_filter, threshold)


def _guidance(logits: torch.Tensor, cfg_scale: torch.Tensor, filter_k: torch.Tensor):
    """(cond [S, V], guided [S, V], use_filter [S]); the guided values round like torch.lerp's (``_lerp``)."""
    pair = logits.unflatten(0, (-1, BRANCHES))
    cond, uncond = pair[:, 0], pair[:, 1]
    return cond, _lerp(uncond, cond, cfg_scale), (cfg_scale != 1.0) & (filter_k > 0)


def _filtered(cond, guided, use_filter, threshold) -> torch.Tensor:
    """cond where the guided value reaches the row's threshold (every entry, on a row without filter)."""
    filtered = torch.where(guided >= threshold, cond, torch.full_like(cond, float("-inf")))
    return torch.where(use_filter.unsqueeze(1), filtered, cond)


def kth_largest(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each row's k-th largest entry: values [S, V], a runtime ``k`` [S] (clamped to [1, V]) -> [S, 1].

    Both branches have static shapes (TensorRT handles a data-dependent TopK k
    poorly): TopK(TOPK_MAX) when every row's k fits, else the full descending sort.
    Either way the result is the k-th value of the row's sorted order, so ties resolve
    alike and a row's threshold never depends on the other rows' k: every entry equal
    to the threshold passes the ``>=`` that uses it.
    """
    n = values.shape[1]
    k = k.clamp(1, n)
    if n <= TOPK_MAX:
        return _kth_of_top(values, k, n)
    return torch.cond(k.max() <= TOPK_MAX, _kth_of_top_max, _kth_of_sorted, (values, k))


def _kth_of_top(values: torch.Tensor, k: torch.Tensor, top: int) -> torch.Tensor:
    return torch.gather(torch.topk(values, top, dim=1).values, 1, (k - 1).unsqueeze(1))


def _kth_of_top_max(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return _kth_of_top(values, k.clamp(1, TOPK_MAX), TOPK_MAX)


def _kth_of_sorted(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.gather(torch.sort(values, dim=1, descending=True).values, 1, (k - 1).unsqueeze(1))


def sample(logits: torch.Tensor, uniform: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The reference sampler in closed form, per stream: logits [S, V], uniform / temperature /
    top_k [S] -> tokens [S]. Argmax at temperature 0, else softmax(l / T) over the top-k, drawn by
    inverse CDF from one uniform number (the host sampler's ``_draw``).

    One uniform per codebook instead of a Gumbel value per logit: the host fills 32 numbers a frame
    instead of 32 x 2050 (189 us of numpy per frame, measured), and the graph takes no logarithms.
    The top-k are the TopK's sorted values, so the draw runs over at most TOPK_MAX entries; when any
    row's k is above that (or has no cut) every row takes the full descending sort, with the same draw.
    """
    greedy = torch.argmax(logits, dim=1)
    scaled = logits / temperature.clamp_min(1e-6).unsqueeze(1)
    n = logits.shape[1]
    k = torch.where((top_k > 0) & (top_k < n), top_k, torch.full_like(top_k, n))
    if n <= TOPK_MAX:
        drawn = _draw_top(scaled, uniform, k, n)
    else:
        drawn = torch.cond(k.max() <= TOPK_MAX, _draw_top_max, _draw_sorted, (scaled, uniform, k))
    return torch.where(temperature > 0, drawn, greedy)


def _draw_top(scaled: torch.Tensor, uniform: torch.Tensor, k: torch.Tensor, top: int) -> torch.Tensor:
    values, indices = torch.topk(scaled, top, dim=1)
    return torch.gather(indices, 1, _inverse_cdf(values, uniform, k).unsqueeze(1)).squeeze(1)


def _draw_top_max(scaled: torch.Tensor, uniform: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return _draw_top(scaled, uniform, k, TOPK_MAX)


def _draw_sorted(scaled: torch.Tensor, uniform: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    values, indices = torch.sort(scaled, dim=1, descending=True)
    return torch.gather(indices, 1, _inverse_cdf(values, uniform, k).unsqueeze(1)).squeeze(1)


def _inverse_cdf(values: torch.Tensor, uniform: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each row's position [S] drawn from softmax(values[s, :k[s]]) (rows sorted descending) by its uniform.

    As numpy's searchsorted(side="right"): the count of CDF entries <= u * total. Entries
    without mass (past k, or -inf from the CFG filter) sit at the sorted tail, where the CDF
    is flat, so only u * total rounding up to total could reach them: the position is
    capped at the last entry with mass.
    """
    keep = torch.arange(values.shape[1]).unsqueeze(0) < k.unsqueeze(1)
    probs = torch.softmax(torch.where(keep, values, torch.full_like(values, float("-inf"))), dim=1)
    cdf = torch.cumsum(probs, dim=1)
    target = uniform.clamp(0.0, _U_MAX).unsqueeze(1) * cdf[:, -1:]
    position = (cdf <= target).sum(dim=1)
    last = (probs > 0).sum(dim=1) - 1
    return torch.minimum(position, last)


def guided_sample(logits: torch.Tensor, uniform: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  cfg_scale: torch.Tensor, filter_k: torch.Tensor) -> torch.Tensor:
    """``sample(guide(logits, ...), ...)`` with one pass over the vocabulary: tokens [S].

    The guided top-k leaves at most TOPK_MAX candidates, and both the draw and the argmax need only
    those, so after one TopK over the row every op runs on TOPK_MAX entries. Over 2050 ids (the
    real vocabulary) ONNX Runtime's TopK(64) costs ~15 us a row and a full-width op ~1.5 us (8 rows,
    one thread, measured); ``sample(guide(...))`` ran two TopKs and about twelve full-width ops a
    stage, most of what each added stream cost a frame: the real-vocabulary depformer call for 8
    streams went from 18.0 to 14.6 ms with this (one stream 5.8 -> 5.4 ms). A row without the filter
    keys the TopK on its conditional logits (guidance weight 1 leaves them exact). When a row's
    candidates may miss an entry it needs (a cut past TOPK_MAX, ties at the TopK's last entry, or
    equal kept values, which the candidates would order by guidance instead of by id) the whole
    batch takes ``sample(guide(...))``'s full sort. Either way the draw sees the kept entries in
    the same order (value, then the lower id), so a seed gives the same token.
    """
    if logits.shape[1] <= TOPK_MAX:
        return sample(guide(logits, cfg_scale, filter_k), uniform, temperature, top_k)
    fast, whole = sample_candidates(logits, uniform, temperature, top_k, cfg_scale, filter_k)
    return torch.cond(whole.all(), _candidates_suffice, _sample_sorted,
                      (fast, logits, uniform, temperature, top_k, cfg_scale, filter_k))


def sample_candidates(logits: torch.Tensor, uniform: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      cfg_scale: torch.Tensor, filter_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [S] drawn among the TOPK_MAX candidates, per row whether that is exact [S] bool)."""
    n = logits.shape[1]
    pair = logits.unflatten(0, (-1, BRANCHES))
    cond, uncond = pair[:, 0], pair[:, 1]
    use_filter = (cfg_scale != 1.0) & (filter_k > 0)
    key = _lerp(uncond, cond, torch.where(use_filter, cfg_scale, torch.ones_like(cfg_scale)))
    top_keys, top_ids = torch.topk(key, TOPK_MAX, dim=1)
    threshold = torch.gather(top_keys, 1, (filter_k.clamp(1, TOPK_MAX) - 1).unsqueeze(1))
    kept = (top_keys >= threshold) | ~use_filter.unsqueeze(1)
    masked = torch.where(kept, torch.gather(cond, 1, top_ids), torch.full_like(top_keys, float("-inf")))
    k = torch.where((top_k > 0) & (top_k < n), top_k, torch.full_like(top_k, n))
    values, order = torch.topk(masked / temperature.clamp_min(1e-6).unsqueeze(1), TOPK_MAX, dim=1)
    drawn = torch.gather(top_ids, 1, torch.gather(order, 1, _inverse_cdf(values, uniform, k).unsqueeze(1))).squeeze(1)
    # unfiltered, the TopK's first entry is the row's argmax (the lowest id of the largest)
    greedy = torch.where(use_filter, torch.gather(top_ids, 1, masked.argmax(dim=1, keepdim=True)).squeeze(1),
                         top_ids[:, 0])
    sampled = temperature > 0
    # The candidates hold every entry a row needs: filtered, all that reach the threshold; unfiltered
    # and drawn, its top k by the scaled value (whatever lies outside scales to at most the last).
    # Equal kept values would be ordered by the candidates' order, not by id: those rows (rare with
    # real logits) take the sort too. Unfiltered greedy rows read the TopK's own order, exempt.
    tied = ((values[:, 1:] == values[:, :-1]) & (values[:, 1:] > float("-inf"))).any(dim=1)
    whole = ~((sampled | use_filter) & tied) & (
        (use_filter & (top_keys[:, -1] < threshold[:, 0]))
        | (~use_filter & (~sampled | ((k < TOPK_MAX) & (_at(values, k - 1) > values[:, -1])))))
    return torch.where(sampled, drawn, greedy), whole


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """torch.lerp's two-branch formula (start + w (end - start) below |w| 0.5, else end - (end - start)(1 - w)),
    spelled out so the guided values round like the reference's. The branch is picked per row on
    [S, 1] and the row computed once (negating a product is exact)."""
    w = weight.unsqueeze(1)
    small = w.abs() < 0.5
    return torch.where(small, start, end) + (end - start) * torch.where(small, w, -(1.0 - w))


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(values, 1, index.clamp(0, values.shape[1] - 1).unsqueeze(1)).squeeze(1)


def _candidates_suffice(fast, logits, uniform, temperature, top_k, cfg_scale, filter_k) -> torch.Tensor:
    return fast.clone()


def _sample_sorted(fast, logits, uniform, temperature, top_k, cfg_scale, filter_k) -> torch.Tensor:
    cond, guided, use_filter = _guidance(logits, cfg_scale, filter_k)
    k = torch.where(use_filter, filter_k, torch.ones_like(filter_k)).clamp(1, cond.shape[1])
    filtered = _filtered(cond, guided, use_filter, _kth_of_sorted(guided, k))
    n = cond.shape[1]
    cut = torch.where((top_k > 0) & (top_k < n), top_k, torch.full_like(top_k, n))
    drawn = _draw_sorted(filtered / temperature.clamp_min(1e-6).unsqueeze(1), uniform, cut)
    return torch.where(temperature > 0, drawn, torch.argmax(filtered, dim=1))


class DepformerFrame(nn.Module):
    """All audio codebooks of one frame: cb0 from the backbone's logits, then every depformer stage.

    Guidance, masking and sampling happen in-graph so a frame is one call
    (the reference's per-stage host round trips leave a GPU mostly idle), for S streams at once:
    hidden / cb0_logits [2S, ...], text_tokens [S, 2], noise [S, Q], the sampler settings [S]
    -> audio_tokens [S, Q].
    """

    input_names = ["hidden", "cb0_logits", "text_tokens", "noise", "temperature", "top_k", "cfg_scale", "cfg_filter_k"]
    output_names = ["audio_tokens"]
    special: torch.Tensor  # registered buffer

    def __init__(self, model: Dia2Model, ids: TokenIds) -> None:
        super().__init__()
        self.depformer = model.depformer
        self.n_layer = len(model.depformer.layers)
        vocab = model.config.data.audio_vocab_size
        special = torch.zeros(vocab, dtype=torch.bool)
        special[[ids.audio_pad, ids.audio_bos]] = True
        self.register_buffer("special", special, persistent=False)

    def forward(self, hidden, cb0_logits, text_tokens, noise, temperature, top_k, cfg_scale, cfg_filter_k):
        tokens, _ = self.first_stages(self.depformer.num_depth, hidden, cb0_logits, text_tokens, noise, temperature,
                                      top_k, cfg_scale, cfg_filter_k)
        return torch.stack(tokens, dim=1)

    dynamic_shapes = ({0: STREAM_ROWS}, {0: STREAM_ROWS}, *({0: STREAMS} for _ in range(6)))

    def first_stages(self, stages: int, hidden, cb0_logits, text_tokens, noise, temperature, top_k, cfg_scale,
                     cfg_filter_k) -> tuple[list[torch.Tensor], list[list[tuple]]]:
        """cb0 and depformer stages 0 .. stages - 1: their tokens, and per layer the stages' (k, v)."""
        main, second = pair_rows(text_tokens[:, 0]), pair_rows(text_tokens[:, 1])
        cb0 = guide(cb0_logits, cfg_scale, cfg_filter_k)
        cb0 = cb0.masked_fill(self.special, torch.finfo(cb0.dtype).min)
        token = sample(cb0, noise[:, 0], temperature, top_k)
        tokens = [token]
        past: list[list] = [[] for _ in range(self.n_layer)]
        for stage in range(stages):
            logits = self.depformer.stage_split(stage, pair_rows(token), hidden, main, second, past)
            token = guided_sample(logits, noise[:, stage + 1], temperature, top_k, cfg_scale, cfg_filter_k)
            tokens.append(token)
        return tokens, past

    @staticmethod
    def example_inputs(model: Dia2Model, streams: int = EXAMPLE_STREAMS):
        cfg = model.config
        q, vocab = cfg.data.audio_channels, cfg.data.audio_vocab_size
        return (
            torch.zeros(BRANCHES * streams, cfg.model.decoder.n_embd),
            torch.zeros(BRANCHES * streams, vocab),
            torch.zeros(streams, 2, dtype=torch.long),
            torch.full((streams, q), 0.5),
            torch.zeros(streams),
            torch.full((streams,), 50, dtype=torch.long),
            torch.ones(streams),
            torch.full((streams,), 50, dtype=torch.long),
        )
