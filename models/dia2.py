"""Dia2 in PyTorch: backbone (``transformer``) and audio decoder (``depformer``).

Parameter names and shapes are those of the official ``model.safetensors``.
Everything runs in float32: the reference computes in float32 on CPU, and the
fp16 graphs are made from the fp32 export, not from here.

Each attention module has two ways of consuming its KV cache:

* ``attend_reference`` writes the new K/V into a cache tensor and runs SDPA over
  the whole cache with the reference's additive mask -- the same kernels in the
  same order as nari-labs/dia2, so the PyTorch reference loop is bit-identical.
* ``attend_split`` leaves the cache untouched and attends to ``[cache, new]``
  by computing the scores of the two parts separately (see ``_split_attention``).
  This is the form the exported step graphs use.
"""

from __future__ import annotations

from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import Dia2Config

M = TypeVar("M", bound=nn.Module)


def typed(modules: nn.ModuleList, kind: type[M]) -> list[M]:
    """The modules of ``modules`` as ``kind``s: iterating an nn.ModuleList gives a type checker plain
    Modules, whose attributes torch types as ``Tensor | Module``."""
    return cast("list[M]", list(modules))


def _activation(name: str) -> nn.Module:
    name = name.lower()
    if name in ("silu", "swish", "swiglu"):
        return nn.SiLU()
    if name in ("gelu", "geglu"):
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    return nn.Identity()


class Rotary(nn.Module):
    """RoPE with the reference's half-split rotation and cached tables."""

    def __init__(self, head_dim: int, min_timescale: float, max_timescale: float, max_positions: int) -> None:
        super().__init__()
        self.shape = (head_dim, min_timescale, max_timescale, max_positions)
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        if self.cos.device.type != "meta":
            self.build_tables()

    def build_tables(self) -> None:
        """(Re)compute the tables, e.g. after materialising a model built on the meta device."""
        head_dim, min_timescale, max_timescale, max_positions = self.shape
        fraction = (2.0 * torch.arange(0, head_dim // 2)) / head_dim
        timescale = min_timescale * (max_timescale / min_timescale) ** fraction
        inv_freq = (1.0 / timescale).to(torch.float32)
        t = torch.arange(max_positions, dtype=torch.float32)
        emb = torch.cat((torch.einsum("i,j->ij", t, inv_freq),) * 2, dim=-1)
        self.cos = emb.cos().to(self.cos.device)
        self.sin = emb.sin().to(self.sin.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        # x: [B, T, H, D]; positions: [B or 1, T], or one position known when the graph is traced
        if isinstance(positions, int):
            return self._at(x, positions)
        cos = self.cos[positions].unsqueeze(2)
        sin = self.sin[positions].unsqueeze(2)
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def _at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """The same rotation at a fixed position, with the half swap and its sin product as one MatMul.

        ``rotate_half(x) * sin == x @ (R * sin)`` exactly: each column of R holds a single +-1, so
        each output is the one product +-x_p * sin_j plus exact zeros. One MatMul replaces
        Split, Neg, Concat and Mul: the depformer rotates q and k of every layer in each of its
        stages (3 x 31 x 2 a frame with the real vocabularies), and ONNX Runtime pays ~2 us a node.
        """
        half = x.shape[-1] // 2
        eye, zero = torch.eye(half, dtype=x.dtype), torch.zeros(half, half, dtype=x.dtype)
        swap = torch.cat((torch.cat((zero, eye), dim=1), torch.cat((-eye, zero), dim=1)), dim=0)
        return x * self.cos[position] + torch.matmul(x, swap * self.sin[position])


def _reference_mask(length: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    positions = torch.arange(capacity, device=length.device)
    masked = (positions >= length).view(1, 1, 1, capacity)
    return torch.zeros(masked.shape, dtype=dtype).masked_fill(masked, torch.finfo(dtype).min)


def _split_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor,
) -> torch.Tensor:
    """Attention over ``concat(cache[:, :, valid], new)`` without building the concat.

    q: [B, H, D]; k_new/v_new: [B, Hkv, D]; caches: [B, Hkv, S, D]; valid: bool, broadcast to
    [B, Hkv, G, S] (one length for all rows: [S]; one per row: [B, 1, 1, S]).
    Concatenating would copy the whole cache every step inside the graph; scoring
    the cache and the new key separately only reads it, so the runtime (ORT or
    TensorRT) can keep the cache in place and write just the new row.
    """
    b, h, d = q.shape
    hkv = k_new.shape[1]
    qg = q.view(b, hkv, h // hkv, d)
    scores_cache = torch.matmul(qg, k_cache.transpose(-1, -2))  # [B, Hkv, G, S]
    scores_cache = scores_cache.masked_fill(~valid, torch.finfo(q.dtype).min)
    score_new = (qg * k_new.unsqueeze(2)).sum(-1, keepdim=True)  # [B, Hkv, G, 1]
    probs = torch.softmax(torch.cat((scores_cache, score_new), dim=-1), dim=-1)
    out = torch.matmul(probs[..., :-1], v_cache) + probs[..., -1:] * v_new.unsqueeze(2)
    return out.reshape(b, h * d)


def pair_rows(per_stream: torch.Tensor) -> torch.Tensor:
    """[S, ...] -> [2S, ...]: each stream's value for both rows of its CFG pair (rows 2s, 2s + 1).

    Expand + reshape rather than repeat_interleave: it exports as plain shape ops."""
    s = per_stream.shape[0]
    return per_stream.unsqueeze(1).expand(s, 2, *per_stream.shape[1:]).reshape(2 * s, *per_stream.shape[1:])


class MultiStreamEmbedding(nn.Module):
    """Main + second text stream through one table; pads in the second stream add nothing."""

    def __init__(self, vocab: int, dim: int, pad_id: int, low_rank_dim: int | None = None) -> None:
        super().__init__()
        self.pad_id = pad_id
        base = low_rank_dim if low_rank_dim is not None else dim
        self.embedding = nn.Embedding(vocab, base)
        self.main_proj = nn.Linear(base, dim, bias=False)
        self.second_proj = nn.Linear(base, dim, bias=False)

    def forward(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        out_main = self.main_proj(self.embedding(main))
        out_second = self.second_proj(self.embedding(second))
        use_second = (second != self.pad_id).unsqueeze(-1)
        return out_main + torch.where(use_second, out_second, torch.zeros_like(out_second))


class Mlp(nn.Module):
    """Two-activation gated MLP: ``wo(act0(gate) * act1(up))`` with ``[gate, up] = wi(x)``."""

    def __init__(self, dim: int, hidden: int, activations: list[str]) -> None:
        super().__init__()
        self.hidden = hidden
        self.wi = nn.Linear(dim, 2 * hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)
        self.act0 = _activation(activations[0])
        self.act1 = _activation(activations[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the halves of wi's output, as the reference's view(..., 2, hidden).unbind(-2) takes them;
        # chunk exports as one Split (unbind added a Squeeze per half)
        gate, up = self.wi(x).chunk(2, dim=-1)
        return self.wo(self.act0(gate) * self.act1(up))


class Attention(nn.Module):
    """Backbone GQA attention: q/k RMSNorm per head, RoPE, scale 1.0."""

    def __init__(self, cfg: Dia2Config) -> None:
        super().__init__()
        dec, eps = cfg.model.decoder, cfg.model.normalization_layer_epsilon
        self.heads, self.kv_heads, self.head_dim = dec.gqa_query_heads, dec.kv_heads, dec.gqa_head_dim
        self.q_proj = nn.Linear(dec.n_embd, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dec.n_embd, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dec.n_embd, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dec.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)

    def project(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary):
        """x: [B, 1, E] -> q [B, H, 1, D], k/v [B, Hkv, 1, D]."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        return rotary(q, positions).transpose(1, 2), rotary(k, positions).transpose(1, 2), v.transpose(1, 2)

    def attend_reference(self, q, k, v, k_cache, v_cache, length: torch.Tensor) -> torch.Tensor:
        """Write at ``length`` and attend over the whole cache, exactly as the reference."""
        k_cache[:, :, length] = k[:, :, 0]
        v_cache[:, :, length] = v[:, :, 0]
        mask = _reference_mask(length + 1, k_cache.shape[2], q.dtype)
        out = F.scaled_dot_product_attention(
            q, k_cache, v_cache, attn_mask=mask, scale=1.0, enable_gqa=self.heads != self.kv_heads
        )
        b = q.shape[0]
        return self.o_proj(out.transpose(1, 2).reshape(b, 1, self.heads * self.head_dim))

    def attend_causal(self, q, k, v, causal: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D], k/v [B, Hkv, T, D], causal [T, T] bool -> [B, T, E] (prefill)."""
        b, h, t, d = q.shape
        hkv = k.shape[1]
        qg = q.view(b, hkv, h // hkv, t, d)
        scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, G, T, T]
        probs = torch.softmax(scores.masked_fill(~causal, torch.finfo(q.dtype).min), dim=-1)
        out = torch.matmul(probs, v.unsqueeze(2)).view(b, h, t, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))

    def attend_split(self, q, k, v, k_cache, v_cache, valid: torch.Tensor) -> torch.Tensor:
        out = _split_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache, valid)
        return self.o_proj(out.unsqueeze(1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Dia2Config) -> None:
        super().__init__()
        dec, eps = cfg.model.decoder, cfg.model.normalization_layer_epsilon
        self.pre_norm = nn.RMSNorm(dec.n_embd, eps=eps)
        self.attn = Attention(cfg)
        self.post_norm = nn.RMSNorm(dec.n_embd, eps=eps)
        self.mlp = Mlp(dec.n_embd, dec.n_hidden, cfg.model.mlp_activations)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_norm(x))


class Backbone(nn.Module):
    """The per-frame transformer (checkpoint prefix ``transformer.``)."""

    def __init__(self, cfg: Dia2Config, max_positions: int) -> None:
        super().__init__()
        d, dec = cfg.data, cfg.model.decoder
        self.audio_embeds = nn.ModuleList(nn.Embedding(d.audio_vocab_size, dec.n_embd) for _ in range(d.audio_channels))
        self.text_embed = MultiStreamEmbedding(d.text_vocab_size, dec.n_embd, d.text_pad_token_id, dec.low_rank_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(dec.n_layer))
        self.norm = nn.RMSNorm(dec.n_embd, eps=cfg.model.normalization_layer_epsilon)
        self.action_head = nn.Linear(dec.n_embd, d.action_vocab_size, bias=False)
        self.cb0_head = nn.Linear(dec.n_embd, d.audio_vocab_size, bias=False)
        m = cfg.model
        self.rotary = Rotary(dec.gqa_head_dim, m.rope_min_timescale, m.rope_max_timescale, max_positions)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, C, 1] -> [B, 1, E]; audio terms added in channel order like the reference."""
        hidden = self.text_embed(tokens[:, 0, :], tokens[:, 1, :])
        for idx, table in enumerate(self.audio_embeds):
            hidden = hidden + table(tokens[:, idx + 2, :])
        return hidden

    def heads(self, x: torch.Tensor):
        hidden = self.norm(x)
        return hidden, self.action_head(hidden), self.cb0_head(hidden)

    def step_reference(self, tokens, positions, k_cache, v_cache, length):
        """One frame, writing into ``[L, B, Hkv, S, D]`` caches at ``length`` (a 0-d tensor)."""
        x = self.embed(tokens)
        for i, layer in enumerate(typed(self.layers, DecoderLayer)):
            q, k, v = layer.attn.project(layer.pre_norm(x), positions, self.rotary)
            x = layer.mlp_residual(x + layer.attn.attend_reference(q, k, v, k_cache[i], v_cache[i], length))
        return self.heads(x)

    def step(self, tokens, position, k_caches, v_caches, cache_length=None):
        """Export form. tokens [2S, C] int64 (stream s owns rows 2s and 2s + 1, its CFG pair),
        position [S] int64, one [2S, Hkv, R, D] cache per layer.

        Per-layer caches rather than one stacked tensor: slicing a layer out of a
        stacked graph input is a copy (a Split) in ONNX, 0.7 GB per step for 2B.
        Returns (hidden [2S, E], action [2S, A], cb0 [2S, V], k_new, v_new [L, 2S, Hkv, D]);
        the caller stores each stream's k_new/v_new rows at its ``cache_length`` before the next step.

        ``position`` is each stream's RoPE position, ``cache_length`` its number of valid
        cache rows (default: ``position``). They differ after an audio-prefix
        warm-up: the reference's generation restarts at frame A - 1 while its
        cache already holds A rows, so every later frame t attends to t + 1 rows.
        Every row reads only its own stream's position, length and cache rows: no op mixes rows.
        """
        x = self.embed(tokens.unsqueeze(-1))
        length = position if cache_length is None else cache_length
        positions = pair_rows(position).view(-1, 1)
        valid = torch.arange(k_caches[0].shape[2], device=position.device) < pair_rows(length).view(-1, 1)
        valid = valid[:, None, None, :]  # [2S, 1, 1, R]: broadcast over heads and groups
        k_out, v_out = [], []
        for i, layer in enumerate(typed(self.layers, DecoderLayer)):
            q, k, v = layer.attn.project(layer.pre_norm(x), positions, self.rotary)
            x = layer.mlp_residual(x + layer.attn.attend_split(q, k, v, k_caches[i], v_caches[i], valid))
            k_out.append(k[:, :, 0])
            v_out.append(v[:, :, 0])
        hidden, action, cb0 = self.heads(x)
        return hidden[:, 0], action[:, 0], cb0[:, 0], torch.stack(k_out), torch.stack(v_out)

    def prefill(self, tokens):
        """T frames from an empty cache in one pass: tokens [B, C, T] -> k, v [L, B, Hkv, T, D].

        Frame t sits at RoPE position t and attends causally to frames 0..t, so the
        rows equal the ones T single steps would write (same ops, other reduction
        order). Only the K/V rows come out: the reference's warm-up discards every
        logit it computes.
        """
        x = self.embed(tokens)
        frames = tokens.shape[2]
        positions = torch.arange(frames, device=tokens.device).view(1, frames)
        causal = torch.ones(frames, frames, dtype=torch.bool, device=tokens.device).tril()
        k_out, v_out = [], []
        for layer in typed(self.layers, DecoderLayer):
            q, k, v = layer.attn.project(layer.pre_norm(x), positions, self.rotary)
            x = layer.mlp_residual(x + layer.attn.attend_causal(q, k, v, causal))
            k_out.append(k)
            v_out.append(v)
        return torch.stack(k_out), torch.stack(v_out)


class ScheduleAttention(nn.Module):
    """Depformer attention: fused QKV and output projections picked per stage by the weights schedule."""

    def __init__(self, cfg: Dia2Config) -> None:
        super().__init__()
        dep, eps = cfg.model.depformer, cfg.model.normalization_layer_epsilon
        self.schedule = list(cfg.runtime.weights_schedule)
        self.heads, self.head_dim = dep.gqa_query_heads, dep.gqa_head_dim
        ids = [str(i) for i in sorted(set(self.schedule))]
        inner = self.heads * self.head_dim
        self.in_proj = nn.ModuleDict({i: nn.Linear(dep.n_embd, 3 * inner, bias=False) for i in ids})
        self.out_proj = nn.ModuleDict({i: nn.Linear(inner, dep.n_embd, bias=False) for i in ids})
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)

    def project(self, x: torch.Tensor, stage: int, rotary: Rotary | None, fixed: bool = False):
        """x: [B, 1, E] -> q, k, v each [B, H, 1, D]; ``fixed``: the export form of the rotation."""
        b, t, _ = x.shape
        proj = self.in_proj[str(self.schedule[stage])](x)
        if fixed:  # one Split, no per-part Squeeze; the same values as the view below
            q, k, v = (part.view(b, t, self.heads, self.head_dim) for part in proj.chunk(3, dim=-1))
        else:
            proj = proj.view(b, t, 3, self.heads, self.head_dim)
            q, k, v = proj[:, :, 0], proj[:, :, 1], proj[:, :, 2]
        q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            pos = stage if fixed else torch.full((1, 1), stage, dtype=torch.long, device=x.device)
            q, k = rotary(q, pos), rotary(k, pos)
        if fixed and t == 1:  # moving a unit axis: a Reshape, where Transpose copies
            return tuple(y.reshape(b, self.heads, 1, self.head_dim) for y in (q, k, v))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def output(self, attn: torch.Tensor, stage: int) -> torch.Tensor:
        return self.out_proj[str(self.schedule[stage])](attn)


class DepformerLayer(nn.Module):
    def __init__(self, cfg: Dia2Config) -> None:
        super().__init__()
        dep, eps = cfg.model.depformer, cfg.model.normalization_layer_epsilon
        self.pre_norm = nn.RMSNorm(dep.n_embd, eps=eps)
        self.post_norm = nn.RMSNorm(dep.n_embd, eps=eps)
        self.self_attention = ScheduleAttention(cfg)
        self.mlp = Mlp(dep.n_embd, dep.n_hidden, dep.mlp_activations)


class Depformer(nn.Module):
    """The audio decoder: one stage per codebook after cb0 (checkpoint prefix ``depformer.``)."""

    def __init__(self, cfg: Dia2Config) -> None:
        super().__init__()
        d, dep, m = cfg.data, cfg.model.depformer, cfg.model
        self.num_depth = cfg.num_depth
        self.schedule = list(cfg.runtime.weights_schedule)
        self.audio_embeds = nn.ModuleList(nn.Embedding(d.audio_vocab_size, dep.n_embd) for _ in range(self.num_depth))
        self.text_embed = (
            MultiStreamEmbedding(d.text_vocab_size, dep.n_embd, d.text_pad_token_id) if dep.text_embedding else None
        )
        ids = [str(i) for i in sorted(set(self.schedule))]
        self.depformer_in = nn.ModuleDict({i: nn.Linear(m.decoder.n_embd, dep.n_embd, bias=False) for i in ids})
        self.layers = nn.ModuleList(DepformerLayer(cfg) for _ in range(dep.n_layer))
        self.norm = nn.RMSNorm(dep.n_embd, eps=m.normalization_layer_epsilon)
        self.logits = nn.ModuleList(nn.Linear(dep.n_embd, d.audio_vocab_size, bias=False)
                                    for _ in range(self.num_depth))
        self.vocab_limit = min(d.audio_pad_token_id, d.audio_bos_token_id)
        # The reference builds this table with its default length, 1500.
        self.rotary = (Rotary(dep.gqa_head_dim, m.rope_min_timescale, m.rope_max_timescale, 1500)
                       if dep.apply_rope else None)

    def stage_input(self, stage: int, prev_audio, hidden, main_text, second_text) -> torch.Tensor:
        """prev_audio/main/second: [B] int64; hidden: [B, E_backbone] -> [B, 1, E]."""
        emb = self.audio_embeds[stage](prev_audio[:, None])
        if stage == 0 and self.text_embed is not None:
            emb = emb + self.text_embed(main_text[:, None], second_text[:, None])
        return self.depformer_in[str(self.schedule[stage])](hidden[:, None]) + emb

    def stage_logits(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return self.logits[stage](self.norm(x))[:, 0, : self.vocab_limit]

    def stage_reference(self, stage, prev_audio, hidden, main_text, second_text, k_cache, v_cache):
        """One stage with the reference's per-frame cache ``[L, B, H, num_depth, D]``."""
        x = self.stage_input(stage, prev_audio, hidden, main_text, second_text)
        length = torch.tensor(stage)
        for i, layer in enumerate(typed(self.layers, DepformerLayer)):
            att = layer.self_attention
            q, k, v = att.project(layer.pre_norm(x), stage, self.rotary)
            k_cache[i][:, :, stage] = k[:, :, 0]
            v_cache[i][:, :, stage] = v[:, :, 0]
            mask = _reference_mask(length + 1, k_cache.shape[3], q.dtype)
            out = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], attn_mask=mask, scale=1.0)
            b = q.shape[0]
            x = x + att.output(out.transpose(1, 2).reshape(b, 1, att.heads * att.head_dim), stage)
            x = x + layer.mlp(layer.post_norm(x))
        return self.stage_logits(stage, x)

    def stage_split(self, stage, prev_audio, hidden, main_text, second_text, past: list[list[tuple]]):
        """Export form: ``past[i]`` lists the (k, v) of earlier stages of layer i; appended in place."""
        x = self.stage_input(stage, prev_audio, hidden, main_text, second_text)
        for i, layer in enumerate(typed(self.layers, DepformerLayer)):
            att = layer.self_attention
            q, k, v = att.project(layer.pre_norm(x), stage, self.rotary, fixed=True)
            past[i].append((k, v))
            keys = torch.cat([kv[0] for kv in past[i]], dim=2)
            values = torch.cat([kv[1] for kv in past[i]], dim=2)
            # The per-frame cache holds at most num_depth rows: concat is cheap here.
            out = torch.softmax(torch.matmul(q, keys.transpose(-1, -2)), dim=-1) @ values
            b = q.shape[0]
            # out [B, H, 1, D]: with one query the heads' order is already [B, 1, H * D]'s
            x = x + att.output(out.reshape(b, 1, att.heads * att.head_dim), stage)
            x = x + layer.mlp(layer.post_norm(x))
        return self.stage_logits(stage, x)


class Dia2Model(nn.Module):
    def __init__(self, cfg: Dia2Config, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Backbone(cfg, max_positions or cfg.runtime.max_context_steps)
        self.depformer = Depformer(cfg)

    @classmethod
    def empty(cls, cfg: Dia2Config) -> Dia2Model:
        """Uninitialised weights (to be loaded), skipping the seconds-long random init of a 2B model."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        for module in model.modules():
            if isinstance(module, Rotary):
                module.build_tables()
        return model
