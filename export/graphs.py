"""The modules that become the backbone-step and depformer-frame graphs.

Both are pure functions of their inputs (no Python state, no data-dependent
control flow), so one trace gives a static-shape graph that ONNX Runtime and
TensorRT run as is. The CFG pair (conditional row 0, unconditional row 1) is
the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from dia2_trt.models.dia2 import Dia2Model
from dia2_trt.runtime.manifest import CACHE_ROWS, cache_name
from dia2_trt.runtime.state_machine import TokenIds

BRANCHES = 2

# The sampler's uniform numbers are clamped below 1 (1 - 2**-24 is the largest float32 below 1).
_U_MAX = 1.0 - 2.0**-24


class BackboneStep(nn.Module):
    """One frame of the backbone for the CFG pair.

    The cache is read, never written: new K/V rows come out as outputs and the
    runtime stores them at ``position``. Writing in-graph would need either a
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
        """The caches' row axis is left open: a step reads as many rows as it is given (CACHE_ROWS)."""
        return ({}, {}, {}, tuple({2: CACHE_ROWS} for _ in range(2 * self.n_layer)))

    @staticmethod
    def example_inputs(model: Dia2Model, capacity: int, position: int = 0):
        """(tokens, position, cache_length, k_cache.0 .. k_cache.{L-1}, v_cache.0 .. v_cache.{L-1})."""
        cfg = model.config
        dec = cfg.model.decoder
        caches = [torch.zeros(BRANCHES, dec.kv_heads, capacity, dec.gqa_head_dim) for _ in range(2 * dec.n_layer)]
        tokens = torch.zeros(BRANCHES, cfg.data.channels, dtype=torch.long)
        pos = torch.tensor([position], dtype=torch.long)
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
    """The reference's CFG: the conditional row, limited to the guided top-k.

    logits [2, V] -> [V]. ``cfg_scale == 1`` disables guidance (and the filter),
    ``filter_k == 0`` disables only the filter. torch.lerp's two-branch formula
    is spelled out so the guided values round like the reference's.
    """
    cond, uncond = logits[0], logits[1]
    diff = cond - uncond
    guided = torch.where(cfg_scale.abs() < 0.5, uncond + cfg_scale * diff, cond - diff * (1.0 - cfg_scale))
    use_filter = (cfg_scale != 1.0) & (filter_k > 0)
    # an unused threshold is asked for k = 1, so switching the filter off never takes the slow path
    threshold = kth_largest(guided, torch.where(use_filter, filter_k, torch.ones_like(filter_k)))
    filtered = torch.where(guided >= threshold, cond, torch.full_like(cond, float("-inf")))
    return torch.where(use_filter, filtered, cond)


def kth_largest(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor for a runtime ``k`` [1] (clamped to [1, len]).

    Both branches have static shapes (TensorRT handles a data-dependent TopK k
    poorly): TopK(TOPK_MAX) when k fits, else the full descending sort. Either
    way the result is the k-th value of the sorted order, so ties resolve alike:
    every entry equal to the threshold passes the ``>=`` that uses it.
    """
    n = values.shape[0]
    k = k.clamp(1, n)
    if n <= TOPK_MAX:
        return _kth_of_top(values, k, n)
    return torch.cond(k[0] <= TOPK_MAX, _kth_of_top_max, _kth_of_sorted, (values, k))


def _kth_of_top(values: torch.Tensor, k: torch.Tensor, top: int) -> torch.Tensor:
    return torch.gather(torch.topk(values, top).values, 0, k - 1)


def _kth_of_top_max(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return _kth_of_top(values, k.clamp(1, TOPK_MAX), TOPK_MAX)


def _kth_of_sorted(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.gather(torch.sort(values, descending=True).values, 0, k - 1)


def sample(logits: torch.Tensor, uniform: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The reference sampler in closed form: argmax at temperature 0, else softmax(l / T) over the
    top-k, drawn by inverse CDF from one uniform number ``uniform`` [1] (the host sampler's ``_draw``).

    One uniform per codebook instead of a Gumbel value per logit: the host fills 32 numbers a frame
    instead of 32 x 2050 (189 us of numpy per frame, measured), and the graph takes no logarithms.
    The top-k are the TopK's sorted values, so the draw runs over at most TOPK_MAX entries; a k
    above that (or no cut) takes the full descending sort, with the same draw.
    """
    greedy = torch.argmax(logits, dim=0, keepdim=True)
    scaled = logits / temperature.clamp_min(1e-6)
    n = logits.shape[0]
    k = torch.where((top_k > 0) & (top_k < n), top_k, torch.full_like(top_k, n))
    if n <= TOPK_MAX:
        drawn = _draw_top(scaled, uniform, k, n)
    else:
        drawn = torch.cond(k[0] <= TOPK_MAX, _draw_top_max, _draw_sorted, (scaled, uniform, k))
    return torch.where(temperature > 0, drawn, greedy)


def _draw_top(scaled: torch.Tensor, uniform: torch.Tensor, k: torch.Tensor, top: int) -> torch.Tensor:
    values, indices = torch.topk(scaled, top)
    return torch.gather(indices, 0, _inverse_cdf(values, uniform, k))


def _draw_top_max(scaled: torch.Tensor, uniform: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return _draw_top(scaled, uniform, k, TOPK_MAX)


def _draw_sorted(scaled: torch.Tensor, uniform: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    values, indices = torch.sort(scaled, descending=True)
    return torch.gather(indices, 0, _inverse_cdf(values, uniform, k))


def _inverse_cdf(values: torch.Tensor, uniform: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Position [1] drawn from softmax(values[:k]) (values sorted descending) by one uniform.

    As numpy's searchsorted(side="right"): the count of CDF entries <= u * total. Entries
    without mass (past k, or -inf from the CFG filter) sit at the sorted tail, where the CDF
    is flat, so only u * total rounding up to total could reach them: the position is
    capped at the last entry with mass.
    """
    keep = torch.arange(values.shape[0]) < k
    probs = torch.softmax(torch.where(keep, values, torch.full_like(values, float("-inf"))), dim=0)
    cdf = torch.cumsum(probs, dim=0)
    target = uniform.clamp(0.0, _U_MAX) * cdf[-1:]
    position = (cdf <= target).sum(dim=0, keepdim=True)
    last = (probs > 0).sum(dim=0, keepdim=True) - 1
    return torch.minimum(position, last)


class DepformerFrame(nn.Module):
    """All audio codebooks of one frame: cb0 from the backbone's logits, then every depformer stage.

    Guidance, masking and sampling happen in-graph so a frame is one call
    (the reference's per-stage host round trips leave a GPU mostly idle).
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
        return torch.cat(tokens)

    def first_stages(self, stages: int, hidden, cb0_logits, text_tokens, noise, temperature, top_k, cfg_scale,
                     cfg_filter_k) -> tuple[list[torch.Tensor], list[list[tuple]]]:
        """cb0 and depformer stages 0 .. stages - 1: their tokens, and per layer the stages' (k, v)."""
        main = text_tokens[0:1].expand(BRANCHES)
        second = text_tokens[1:2].expand(BRANCHES)
        cb0 = guide(cb0_logits, cfg_scale, cfg_filter_k)
        cb0 = cb0.masked_fill(self.special, torch.finfo(cb0.dtype).min)
        token = sample(cb0, noise[0:1], temperature, top_k)
        tokens = [token]
        past: list[list] = [[] for _ in range(self.n_layer)]
        for stage in range(stages):
            logits = self.depformer.stage_split(stage, token.expand(BRANCHES), hidden, main, second, past)
            token = sample(guide(logits, cfg_scale, cfg_filter_k), noise[stage + 1:stage + 2], temperature, top_k)
            tokens.append(token)
        return tokens, past

    @staticmethod
    def example_inputs(model: Dia2Model):
        cfg = model.config
        q, vocab = cfg.data.audio_channels, cfg.data.audio_vocab_size
        return (
            torch.zeros(BRANCHES, cfg.model.decoder.n_embd),
            torch.zeros(BRANCHES, vocab),
            torch.zeros(2, dtype=torch.long),
            torch.full((q,), 0.5),
            torch.zeros(1),
            torch.tensor([50], dtype=torch.long),
            torch.ones(1),
            torch.tensor([50], dtype=torch.long),
        )
