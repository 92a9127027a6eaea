"""The PyTorch reference loop: Dia2's generation semantics, eager, on our model port.

This is the yardstick the exported graphs and the torch-free runtime are
measured against, so it follows nari-labs/dia2's ``run_generation_loop`` step
for step (same tensor ops in the same order), not what would be fastest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dia2_trt.runtime.frames import UNGENERATED, StopRule, finish
from dia2_trt.runtime.params import GenerationParams
from dia2_trt.runtime.script import parse_script
from dia2_trt.runtime.state_machine import StateMachine, TokenIds

from .dia2 import Dia2Model

BRANCHES = 2  # conditional and unconditional rows, always run (as in the reference)

# observe(step, what, tensor): what is "tokens" (the backbone's [2, C] input), "action" or a
# codebook index 0..Q-1 (its raw [2, V] CFG-pair logits). For parity diagnosis: the margin of
# each decision (export/accuracy.py: first_divergence).
Observer = Callable[[int, "str | int", torch.Tensor], None]


def _ignore(step: int, what, tensor: torch.Tensor) -> None:
    pass


@dataclass
class ReferenceResult:
    tokens: np.ndarray  # [Q, T] aligned codes after undelay and crop
    timestamps: list[tuple[str, float]]
    delayed: np.ndarray  # [Q, steps + 1] the raw delayed buffer (cond row)
    frames: int = 0
    text_tokens: list[tuple[int, int]] = field(default_factory=list)


def guidance(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """CFG the reference's way: sample from the conditional logits, limited to the guided top-k."""
    if not params.cfg_active:
        return logits[:1]
    cond, uncond = logits[0:1].float(), logits[1:2].float()
    guided = torch.lerp(uncond, cond, params.cfg_scale)
    if params.cfg_filter_k > 0 and guided.shape[-1] > 0:
        k = min(params.cfg_filter_k, guided.shape[-1])
        threshold = torch.topk(guided, k=k, dim=-1, sorted=False).values[..., -1:]
        cond = torch.where(guided >= threshold, cond, torch.full_like(cond, float("-inf")))
    return cond


def sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """The reference sampler: argmax at temperature 0, else softmax -> top-k -> multinomial."""
    logits = logits.reshape(-1).float()
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    norm = probs.sum()
    if norm <= 0:
        return 0
    probs = probs / norm.clamp_min(1e-12)
    if 0 < top_k < probs.numel():
        top, idx = torch.topk(probs, top_k)
        top = top / top.sum().clamp_min(1e-12)
        return int(idx[torch.multinomial(top, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def mask_special_audio(logits: torch.Tensor, ids: TokenIds) -> torch.Tensor:
    """cb0 may not be the audio pad or bos token."""
    masked = logits.clone()
    for idx in (ids.audio_pad, ids.audio_bos):
        if 0 <= idx < masked.shape[-1]:
            masked[..., idx] = torch.finfo(masked.dtype).min
    return masked


class ReferenceLoop:
    def __init__(self, model: Dia2Model, ids: TokenIds, encode, frame_rate: float) -> None:
        self.model = model.eval()
        self.cfg = model.config
        self.ids = ids
        self.encode = encode
        self.frame_rate = frame_rate
        self.delays = list(self.cfg.data.delay_pattern)

    def entries(self, text: str):
        return parse_script([text], self.encode, self.ids, self.frame_rate)

    @torch.inference_mode()
    def run(self, text: str, params: GenerationParams, max_frames: int | None = None,
            observe: Observer | None = None) -> ReferenceResult:
        """Generate; ``max_frames`` stops early (benchmarks) without changing any buffer's size;
        ``observe`` sees every step's inputs and logits (it must not change them)."""
        machine = StateMachine(self.ids, second_stream_ahead=self.cfg.data.second_stream_ahead,
                               initial_padding=params.initial_padding)
        state = machine.new_state(self.entries(text))
        run = _Run(self, params, observe or _ignore)
        rule = StopRule.start(run.capacity, self.delays, machine.max_padding, params.initial_padding,
                              self.ids.new_word)
        steps = self.cfg.runtime.max_context_steps
        for t in range(steps if max_frames is None else min(steps, max_frames)):
            if rule.stops_before(t):
                break
            action = run.backbone(t)
            main, second = machine.process(t, state, action)
            run.text_tokens.append((main, second))
            run.depformer(t, main, second)
            rule = rule.after(t, main, state.end_step)
        delayed = run.audio[0, :, :rule.columns].numpy()
        tokens, stamps, _ = finish(delayed, self.delays, self.ids.audio_pad, rule.crop, state.transcript,
                                   self.frame_rate)
        return ReferenceResult(tokens, stamps, np.where(delayed == UNGENERATED, self.ids.audio_pad, delayed),
                               rule.last_step + 1, run.text_tokens)


class _Run:
    """Buffers of one generation: step tokens, KV caches, the delayed audio buffer."""

    def __init__(self, loop: ReferenceLoop, params: GenerationParams, observe: Observer) -> None:
        cfg, ids = loop.cfg, loop.ids
        self.loop, self.params, self.ids, self.observe = loop, params, ids, observe
        self.capacity = cfg.runtime.max_context_steps + 1
        q = cfg.data.audio_channels
        self.tokens = torch.full((BRANCHES, cfg.data.channels, 1), ids.pad, dtype=torch.long)
        self.tokens[0, 0, 0] = ids.bos
        self.tokens[1, 0, 0] = ids.zero
        self.audio = torch.full((BRANCHES, q, self.capacity), UNGENERATED, dtype=torch.long)
        dec, dep = cfg.model.decoder, cfg.model.depformer
        shape = (dec.n_layer, BRANCHES, dec.kv_heads, self.capacity, dec.gqa_head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        dshape = (dep.n_layer, BRANCHES, dep.kv_heads, max(cfg.num_depth, 1), dep.gqa_head_dim)
        self.dk, self.dv = torch.zeros(dshape), torch.zeros(dshape)
        self.delays = torch.tensor(loop.delays, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(params.seed)
        self.hidden = self.cb0_logits = None
        self.text_tokens: list[tuple[int, int]] = []

    def backbone(self, t: int) -> int:
        """Run the backbone for frame t and sample the text action."""
        q = self.audio.shape[1]
        audio_in = self.audio[:, :, t] if t < self.capacity else torch.full((BRANCHES, q), self.ids.audio_bos)
        self.tokens[:, 2:, 0] = torch.where(self.delays > t, self.ids.audio_bos, audio_in)
        self.tokens[1:, 0, 0] = self.ids.zero
        self.tokens[1:, 1, 0] = self.ids.pad
        self.observe(t, "tokens", self.tokens[:, :, 0])
        positions = torch.full((BRANCHES, 1), t, dtype=torch.long)
        hidden, action, cb0 = self.loop.model.transformer.step_reference(
            self.tokens, positions, self.k, self.v, torch.tensor(t))
        self.hidden, self.cb0_logits = hidden[:, 0], cb0
        self.observe(t, "action", action)
        self.observe(t, 0, cb0)
        p = self.params
        return sample(guidance(action, p), p.text_temperature, p.text_top_k, self.generator)

    def depformer(self, t: int, main: int, second: int) -> None:
        """Write the text tokens, then sample cb0 and every depformer stage for frame t + 1."""
        p, ids = self.params, self.ids
        self.tokens[:, 0, 0] = main
        self.tokens[:, 1, 0] = second
        assert self.cb0_logits is not None, "depformer() runs after the frame's backbone step"
        logits = mask_special_audio(guidance(self.cb0_logits, p), ids)
        token = sample(logits, p.audio_temperature, p.audio_top_k, self.generator)
        self.audio[:, 0, t + 1] = token
        mains = torch.full((BRANCHES,), main, dtype=torch.long)
        seconds = torch.full((BRANCHES,), second, dtype=torch.long)
        depformer = self.loop.model.depformer
        for stage in range(depformer.num_depth):
            prev = torch.full((BRANCHES,), token, dtype=torch.long)
            stage_logits = depformer.stage_reference(stage, prev, self.hidden, mains, seconds, self.dk, self.dv)
            self.observe(t, stage + 1, stage_logits)
            token = sample(guidance(stage_logits, p), p.audio_temperature, p.audio_top_k, self.generator)
            self.audio[:, stage + 1, t + 1] = token
