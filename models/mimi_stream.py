"""Mimi codec as export-friendly graphs: a one-frame streaming decoder step and a whole-clip encoder.

transformers' `MimiModel.decode` only runs a whole code sequence at once.  Dia2 needs audio frame by
frame, and ONNX / TensorRT graphs cannot keep state, so `MimiStreamingDecoder` re-expresses the same
decoder as a pure function of (codes of one frame, state) -> (pcm, next state) with every piece of
streaming state as an explicit fixed-size tensor.  It reuses the wrapped model's submodules, so the
weights are the checkpoint's own.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MimiConfig, MimiModel
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiResidualVectorQuantizer,
    MimiResnetBlock,
    MimiTransformerLayer,
    MimiTransformerModel,
    MimiVectorQuantization,
)

from .dia2 import typed

STEP_STATE = "step"


def tiny_mimi_config(
    num_quantizers: int = 8,
    *,
    hidden_size: int = 32,
    num_filters: int = 4,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    codebook_size: int = 64,
    codebook_dim: int = 16,
    sliding_window: int = 250,
) -> MimiConfig:
    """A small Mimi with the real one's structure, rates (24 kHz, 12.5 Hz, 1920 samples a frame) and window."""
    return MimiConfig(
        hidden_size=hidden_size,
        num_filters=num_filters,
        num_residual_layers=1,
        upsampling_ratios=[8, 6, 5, 4],
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=2 * hidden_size,
        codebook_size=codebook_size,
        codebook_dim=codebook_dim,
        # differs from hidden_size, as in the real model, so the RVQ input/output projections exist
        vector_quantization_hidden_dimension=codebook_dim,
        num_quantizers=num_quantizers,
        num_semantic_quantizers=1,
        # depthwise upsample, as in the real model (upsample_groups == hidden_size == 512)
        upsample_groups=hidden_size,
        sliding_window=sliding_window,
    )


def make_tiny_mimi(seed: int, num_quantizers: int) -> MimiModel:
    """A deterministic random tiny MimiModel whose output depends on every part of it (codes included)."""
    return randomize_mimi(MimiModel(tiny_mimi_config(num_quantizers)).eval(), seed)


@torch.no_grad()
def randomize_mimi(model: MimiModel, seed: int) -> MimiModel:
    """Overwrite every weight and codebook of `model` (in place) with seeded random values.

    transformers' own init zeroes the codebooks (decode would ignore the codes) and scales the transformer
    branches by 0.01 (parity tests would barely see it), so neither is kept."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, (nn.Conv1d, nn.Linear)):
            # variance-preserving weights keep pcm around O(1), so a 1e-4 error bound is meaningful
            normal(module.weight, module.weight[0].numel() ** -0.5)
        elif isinstance(module, nn.ConvTranspose1d):
            per_output = module.weight.shape[0] // module.groups * module.kernel_size[0] // module.stride[0]
            normal(module.weight, per_output**-0.5)
        elif isinstance(module, nn.LayerNorm):
            normal(module.weight, 0.1, mean=1.0)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):  # a Module's bias is a Parameter or None
            normal(bias, 0.1)
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith("layer_scale.scale"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.5)
        elif name.endswith("codebook.embed_sum"):
            normal(tensor, 1.0)
        elif name.endswith("codebook.cluster_usage"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) * 1.5 + 0.5)
    return model


def _codebook_table(rvq: MimiResidualVectorQuantizer) -> torch.Tensor:
    """[num_codebooks, codebook_size, dim] centroids, computed as `MimiEuclideanCodebook.embed` does."""
    tables = [
        layer.codebook.embed_sum / layer.codebook.cluster_usage.clamp(min=layer.codebook.epsilon)[:, None]
        for layer in typed(rvq.layers, MimiVectorQuantization)
    ]
    return torch.stack(tables).detach().clone()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_config(config: MimiConfig) -> None:
    _require(config.use_causal_conv, "only causal Mimi (use_causal_conv=True) is supported")
    _require(config.pad_mode in ("constant", "replicate"), f"unsupported pad_mode {config.pad_mode!r}")
    _require(_rope_parameters(config)["rope_type"] == "default", "only default RoPE is supported")


def _rope_parameters(config: MimiConfig) -> dict[str, Any]:
    # PretrainedConfig always fills rope_parameters in (rope_type, rope_theta), default RoPE when none is given
    params = config.rope_parameters
    assert params is not None, "MimiConfig without rope_parameters"
    return cast("dict[str, Any]", params)


def _head_dim(config: MimiConfig) -> int:
    # MimiConfig.__post_init__ sets head_dim (hidden_size // num_attention_heads when not given)
    assert config.head_dim is not None, "MimiConfig without head_dim"
    return config.head_dim


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # fp32 statistics: fp16 variance of a 512-wide row loses too much precision
    out = F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return out.to(x.dtype)


class _Transformer(nn.Module):
    """Mimi's sliding-window transformer, as a function of explicit positions and past keys/values."""

    def __init__(self, transformer: MimiTransformerModel, config: MimiConfig):
        super().__init__()
        self.layers = transformer.layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = _head_dim(config)
        self.window = config.sliding_window
        self.rope_theta = float(_rope_parameters(config)["rope_theta"])

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, n, head_dim] of positions [B, n]: one row of positions per batch row."""
        # recomputed from constants (and folded at export) so fp16 weight conversion never rounds it
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = positions.float()[:, :, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[B, 1, n, K] of positions q [B, n] and k [B, K]: each batch row its own window."""
        # create_sliding_window_causal_mask: a query sees keys with q - window < k <= q, i.e. itself
        # and window - 1 past keys; k < 0 marks a still-empty cache slot
        q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
        return (k >= 0) & (k <= q) & (k > q - self.window)

    def forward(self, x, positions, k_positions, past):
        """x [B, n, H]; positions [B, n] and k_positions [B, K] (or [n] and [K], shared by every row);
        past: per layer (key, value) [B, kv_heads, P, head_dim] or None.

        Returns the output and per layer the keys/values of past and x together (post-RoPE)."""
        if positions.dim() == 1:
            positions, k_positions = positions[None], k_positions[None]
        cos, sin = self.rope(positions, x.dtype)
        mask = self.mask(positions, k_positions)
        present = []
        for layer, layer_past in zip(typed(self.layers, MimiTransformerLayer), past):
            x, kv = self._layer(layer, x, cos, sin, mask, layer_past)
            present.append(kv)
        return x, present

    def _layer(self, layer: MimiTransformerLayer, x, cos, sin, mask, past):
        attn = layer.self_attn
        h = _layer_norm(layer.input_layernorm, x)
        q, k, v = (self._heads(proj(h)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        groups = self.num_heads // self.num_kv_heads
        k_all, v_all = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k_all.transpose(2, 3)).float() * attn.scaling
        scores = torch.where(mask, scores, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(weights, v_all).transpose(1, 2).flatten(2)
        x = x + layer.self_attn_layer_scale(attn.o_proj(out))
        x = x + layer.mlp_layer_scale(layer.mlp(_layer_norm(layer.post_attention_layernorm, x)))
        return x, (k, v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _conv_context(conv: MimiConv1d) -> int:
    """Left context a causal conv needs: its (dilated) kernel minus its stride, as `padding_total`."""
    c = conv.conv
    return (c.kernel_size[0] - 1) * c.dilation[0] + 1 - c.stride[0]


def _transposed_overlap(conv: MimiConvTranspose1d) -> int:
    c = conv.conv
    return c.kernel_size[0] - c.stride[0]


class MimiStreamingDecoder(nn.Module):
    """One Mimi frame of S streams per call:
    forward(codes [S,Q,1] int64, active [S] bool, *state) -> (pcm [S,1,frame_samples] f32, *next_state).

    State (see `state_specs`, all fixed-size per stream, zeros initially; each with a leading
    stream axis, shown as 1 in `state_specs`):
      * `seanet.*`, `upsample`: causal-conv left context (last inputs) and transposed-conv overlap
        (the not-yet-final tail of the last output, kept without bias so bias is added exactly once);
      * `layer{i}.key` / `layer{i}.value`: the last window-1 post-RoPE keys/values of transformer layer i;
      * `step`: int64 [S], transformer steps each stream has taken (the RoPE position of its next one).

    Rows are independent streams: every op works per row (per-row RoPE positions and sliding-window
    mask), so a row's outputs depend on its own codes and state only. A row with `active` False
    keeps its state (its next state is its state; its pcm is meaningless): a batch may hold
    streams that have no frame to decode this call.
    """

    codebooks: torch.Tensor  # registered buffer

    def __init__(self, mimi: MimiModel, num_quantizers: int | None = None):
        super().__init__()
        config = mimi.config
        decoder = mimi.decoder
        if decoder is None:
            raise ValueError("this MimiModel has no decoder")
        _check_config(config)
        _require(config.pad_mode == "constant", "the decoder's causal convs must zero-pad to stream")
        _require(config.trim_right_ratio == 1.0, "streaming needs trim_right_ratio=1.0 (no output delay)")
        self.num_quantizers = config.num_quantizers if num_quantizers is None else num_quantizers
        _require(
            config.num_semantic_quantizers <= self.num_quantizers <= config.num_quantizers,
            f"num_quantizers must be in [{config.num_semantic_quantizers}, {config.num_quantizers}]",
        )
        self.codebook_size = config.codebook_size
        self.num_semantic = config.num_semantic_quantizers
        quantizer = mimi.quantizer
        table = torch.cat(
            [
                _codebook_table(quantizer.semantic_residual_vector_quantizer),
                _codebook_table(quantizer.acoustic_residual_vector_quantizer),
            ]
        )[: self.num_quantizers]
        # one flat table so the whole RVQ lookup is a single Gather
        self.register_buffer("codebooks", table.flatten(0, 1), persistent=False)
        self.semantic_proj = quantizer.semantic_residual_vector_quantizer.output_proj
        self.acoustic_proj = quantizer.acoustic_residual_vector_quantizer.output_proj
        self.upsample = decoder.upsample
        self.transformer = _Transformer(decoder.decoder_transformer, config)
        self.seanet = decoder.decoder_seanet
        self.steps_per_frame = config.latent_stride if self.upsample is not None else 1
        ratios = config.upsampling_ratios
        assert ratios is not None, "MimiConfig.__post_init__ defaults upsampling_ratios"
        self.frame_samples = self.steps_per_frame * math.prod(ratios)
        self.state_specs = self._build_state_specs(config)

    @property
    def state_names(self) -> list[str]:
        return [name for name, _, _ in self.state_specs]

    def _build_state_specs(self, config: MimiConfig) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        specs = []
        if self.upsample is not None:
            specs.append(("upsample", (1, config.hidden_size, _transposed_overlap(self.upsample)), torch.float32))
        kv_shape = (1, config.num_key_value_heads, config.sliding_window - 1, config.head_dim)
        for i in range(len(self.transformer.layers)):
            specs += [(f"layer{i}.key", kv_shape, torch.float32), (f"layer{i}.value", kv_shape, torch.float32)]
        for name, module in self.seanet.named_modules(prefix="seanet"):
            if isinstance(module, MimiConv1d):
                _require(module.conv.stride[0] == 1, f"{name}: strided decoder convs cannot stream")
                if _conv_context(module) > 0:
                    specs.append((name, (1, module.conv.in_channels, _conv_context(module)), torch.float32))
            elif isinstance(module, MimiConvTranspose1d):
                specs.append((name, (1, module.conv.out_channels, _transposed_overlap(module)), torch.float32))
        specs.append((STEP_STATE, (1,), torch.int64))
        return specs

    def initial_state(self, streams: int = 1) -> tuple[torch.Tensor, ...]:
        """Zero state for ``streams`` streams (the leading axis of every state tensor)."""
        return tuple(torch.zeros((streams, *shape[1:]), dtype=dtype) for _, shape, dtype in self.state_specs)

    def half_compute(self) -> MimiStreamingDecoder:
        """Run weights and activations in fp16; state I/O and pcm stay fp32 (RoPE, LayerNorm, softmax too).

        Converts the wrapped MimiModel's decoder in place: wrap a copy if the original must stay fp32."""
        return self.half()

    def forward(self, codes: torch.Tensor, active: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _require(
            codes.dim() == 3 and tuple(codes.shape[1:]) == (self.num_quantizers, 1),
            f"codes must be [S, {self.num_quantizers}, 1], got {tuple(codes.shape)}",
        )
        _require(len(states) == len(self.state_specs), f"expected {len(self.state_specs)} state tensors")
        state = dict(zip(self.state_names, states))
        new: dict[str, torch.Tensor] = {}
        x = self._dequantize(codes)
        if self.upsample is not None:
            x = self._transposed_step(self.upsample, "upsample", x, state, new)
        x = self._transformer_step(x.transpose(1, 2), state, new).transpose(1, 2)
        for i, layer in enumerate(self.seanet.layers):
            x = self._seanet_step(layer, f"seanet.layers.{i}", x, state, new)
        return (x.float(), *(_keep_inactive(active, new[name], state[name]) for name in self.state_names))

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [S, Q, 1] -> latent [S, hidden, 1]."""
        offsets = torch.arange(self.num_quantizers, dtype=torch.int64) * self.codebook_size
        # F.embedding exports as a plain Gather (tensor indexing becomes GatherND)
        vectors = F.embedding(codes[:, :, 0] + offsets, self.codebooks)
        latent = _project(self.semantic_proj, _sum_codebooks(vectors[:, : self.num_semantic]))
        if self.num_quantizers > self.num_semantic:
            latent = latent + _project(self.acoustic_proj, _sum_codebooks(vectors[:, self.num_semantic :]))
        return latent

    def _transformer_step(self, x: torch.Tensor, state: dict, new: dict) -> torch.Tensor:
        step = state[STEP_STATE][:, None]  # [S, 1]: each stream at its own position
        n = x.shape[1]
        window = self.transformer.window - 1
        positions = step + torch.arange(n, dtype=torch.int64)
        # cache slot j holds the key of position step - window + j (negative: not written yet)
        k_positions = step - window + torch.arange(window + n, dtype=torch.int64)
        past = [
            (state[f"layer{i}.key"].to(x.dtype), state[f"layer{i}.value"].to(x.dtype))
            for i in range(len(self.transformer.layers))
        ]
        x, present = self.transformer(x, positions, k_positions, past)
        for i, (k, v) in enumerate(present):
            new[f"layer{i}.key"], new[f"layer{i}.value"] = k[:, :, n:].float(), v[:, :, n:].float()
        new[STEP_STATE] = state[STEP_STATE] + n
        return x

    def _seanet_step(self, layer: nn.Module, name: str, x, state, new) -> torch.Tensor:
        if isinstance(layer, MimiConv1d):
            return self._conv_step(layer, name, x, state, new)
        if isinstance(layer, MimiConvTranspose1d):
            return self._transposed_step(layer, name, x, state, new)
        if isinstance(layer, MimiResnetBlock):
            residual = x
            for j, sub in enumerate(layer.block):
                x = self._seanet_step(sub, f"{name}.block.{j}", x, state, new)
            if isinstance(layer.shortcut, MimiConv1d):
                residual = self._conv_step(layer.shortcut, f"{name}.shortcut", residual, state, new)
            return residual + x
        if isinstance(layer, nn.ELU):
            return _elu(x, layer.alpha)
        return layer(x)

    def _conv_step(self, conv: MimiConv1d, name: str, x, state, new) -> torch.Tensor:
        if name not in state:
            return conv.conv(x)
        # causal conv = zero left padding; in a stream that padding is the previous inputs instead
        full = torch.cat((state[name].to(x.dtype), x), dim=2)
        new[name] = full[:, :, x.shape[2] :].float()
        return conv.conv(full)

    def _transposed_step(self, conv: MimiConvTranspose1d, name: str, x, state, new) -> torch.Tensor:
        c = conv.conv
        y = F.conv_transpose1d(x, c.weight, None, c.stride[0], groups=c.groups)
        overlap = state[name].to(y.dtype)
        # the previous call's tail overlaps this output's head; the batch model trims the final
        # tail (padding_right), which is exactly the overlap still pending here
        y = torch.cat((y[:, :, : overlap.shape[2]] + overlap, y[:, :, overlap.shape[2] :]), dim=2)
        emitted = x.shape[2] * c.stride[0]
        new[name] = y[:, :, emitted:].float()
        out = y[:, :, :emitted]
        return out if c.bias is None else out + c.bias[None, :, None]


def _elu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """ELU as max(x, 0) + alpha (exp(min(x, 0)) - 1), not ONNX's Elu: ONNX Runtime's Elu kernel
    splits a tensor among its threads at element offsets, and an element at a block's unaligned
    edge takes a scalar exp that rounds apart from the vector one, so with 2+ threads a stream's
    pcm depended on the batch size (up to 6e-7, from the first 4x480 ELU). Its Exp rounds every
    element alike; Relu, Clip and Add are exact (x > 0 gives x + 0). No Where: ORT's Where is
    slow (13 of them were 0.4 ms of a 0.8 ms frame on the real-vocabulary Mimi)."""
    negative = torch.exp(torch.clamp(x, max=0.0)) - 1.0
    return torch.relu(x) + (negative if alpha == 1.0 else alpha * negative)


def _sum_codebooks(vectors: torch.Tensor) -> torch.Tensor:
    """[S, K, dim] -> [S, dim]: the K codebooks' vectors of each stream summed, as one MatMul by ones.

    Not a ReduceSum: ONNX Runtime sums [1, K, dim] and [S, K, dim] over K in different orders (its
    fast path for a leading reduced axis), so a stream's pcm would depend on the batch size
    (measured: up to 3.5e-6 apart on the tiny Mimi). A batched MatMul runs one identical GEMM per
    stream whatever S is; a chain of K Adds would too, at 0.1 ms a frame more (K = 32, 12%)."""
    ones = torch.ones(1, vectors.shape[1], dtype=vectors.dtype)
    return torch.matmul(ones, vectors)[:, 0]


def _keep_inactive(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """A stream's next state: ``new`` where it is active, its state as it was where not."""
    return torch.where(active.reshape(-1, *([1] * (new.dim() - 1))), new, old)


def _project(proj: nn.Module | None, vector: torch.Tensor) -> torch.Tensor:
    """[S, dim] -> [S, hidden, 1]."""
    latent = vector[:, :, None]
    return latent if proj is None else proj(latent)


class MimiEncoderGraph(nn.Module):
    """pcm [1, 1, N] float32 -> codes [1, Q, T] int64, equal to `MimiModel.encode(pcm).audio_codes`.

    Re-expresses the encoder so every padding amount is plain integer arithmetic on the input length,
    which exporters keep symbolic (transformers computes it through tensors, which traces as constants)."""

    semantic_table: torch.Tensor  # registered buffers
    acoustic_table: torch.Tensor

    def __init__(self, mimi: MimiModel, num_quantizers: int | None = None):
        super().__init__()
        config = mimi.config
        encoder = mimi.encoder
        if encoder is None:
            raise ValueError("this MimiModel has no encoder")
        _check_config(config)
        self.num_quantizers = config.num_quantizers if num_quantizers is None else num_quantizers
        _require(
            config.num_semantic_quantizers <= self.num_quantizers <= config.num_quantizers,
            f"num_quantizers must be in [{config.num_semantic_quantizers}, {config.num_quantizers}]",
        )
        self.num_semantic = config.num_semantic_quantizers
        self.seanet = encoder.encoder_seanet
        self.transformer = _Transformer(encoder.encoder_transformer, config)
        self.downsample = encoder.downsample
        quantizer = mimi.quantizer
        self.semantic_proj = quantizer.semantic_residual_vector_quantizer.input_proj
        self.acoustic_proj = quantizer.acoustic_residual_vector_quantizer.input_proj
        self.register_buffer(
            "semantic_table", _codebook_table(quantizer.semantic_residual_vector_quantizer), persistent=False
        )
        acoustic = _codebook_table(quantizer.acoustic_residual_vector_quantizer)
        self.register_buffer("acoustic_table", acoustic[: self.num_quantizers - self.num_semantic], persistent=False)

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        _require(pcm.dim() == 3 and pcm.shape[:2] == (1, 1), f"pcm must be [1, 1, N], got {tuple(pcm.shape)}")
        x = pcm
        for layer in self.seanet.layers:
            x = self._seanet_layer(layer, x)
        positions = torch.arange(x.shape[2], dtype=torch.int64)
        x, _ = self.transformer(x.transpose(1, 2), positions, positions, [None] * len(self.transformer.layers))
        latents = x.transpose(1, 2)
        if self.downsample is not None:
            latents = _padded_conv(self.downsample, latents)
        codes = _rvq_encode(self.semantic_proj, self.semantic_table, latents)
        if self.acoustic_table.shape[0] > 0:
            codes = torch.cat((codes, _rvq_encode(self.acoustic_proj, self.acoustic_table, latents)))
        return codes[None]

    def _seanet_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, MimiConv1d):
            return _padded_conv(layer, x)
        if isinstance(layer, MimiResnetBlock):
            residual = x
            for sub in layer.block:
                x = self._seanet_layer(sub, x)
            if isinstance(layer.shortcut, MimiConv1d):
                residual = _padded_conv(layer.shortcut, residual)
            return residual + x
        return layer(x)


def _padded_conv(conv: MimiConv1d, x: torch.Tensor) -> torch.Tensor:
    # MimiConv1d pads left by padding_total and right up to a whole number of strides:
    # its ceil-based "extra padding" reduces to (-length) mod stride
    stride = conv.conv.stride[0]
    right = (stride - x.shape[2] % stride) % stride
    return conv.conv(F.pad(x, (_conv_context(conv), right), mode=conv.pad_mode))


def _rvq_encode(proj: nn.Module | None, tables: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Residual VQ: [1, H, T] latents -> [K, T] nearest-centroid indices (as MimiResidualVectorQuantizer.encode)."""
    x = latents if proj is None else proj(latents)
    residual = x[0].transpose(0, 1)
    codes = []
    for table in tables:
        # argmin of |r - e|^2 without the per-row |r|^2 term: torch.cdist's ranking, up to the
        # rounding of near-ties (cdist itself ranks differently on other devices the same way)
        dist = (table * table).sum(-1)[None, :] - 2.0 * residual @ table.transpose(0, 1)
        index = dist.argmin(dim=-1)
        residual = residual - F.embedding(index, table)
        codes.append(index)
    return torch.stack(codes)
