"""Classifier-free guidance and the token sampler in numpy, with the reference's semantics.

Only the text action is sampled on the host (its vocabulary is a handful of
ids); the audio codebooks are sampled inside the depformer graph.
"""

from __future__ import annotations

import numpy as np


def guide(logits: np.ndarray, cfg_scale: float, cfg_filter_k: int) -> np.ndarray:
    """[2, V] (conditional, unconditional) -> [V]: the conditional row limited to the guided top-k.

    cfg_scale == 1 turns guidance off. The lerp is torch.lerp's two-branch
    formula so the guided values (and thus the top-k cut) round the same way.
    """
    cond = logits[0].astype(np.float32)
    if cfg_scale == 1.0:
        return cond
    uncond = logits[1].astype(np.float32)
    w = np.float32(cfg_scale)
    diff = cond - uncond
    guided = uncond + w * diff if abs(cfg_scale) < 0.5 else cond - diff * (np.float32(1.0) - w)
    if cfg_filter_k <= 0 or guided.size == 0:
        return cond
    k = min(cfg_filter_k, guided.size)
    threshold = np.partition(guided, guided.size - k)[guided.size - k]
    return np.where(guided >= threshold, cond, np.float32(-np.inf))


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Argmax at temperature 0; else softmax(logits / T), keep the top-k, renormalise, draw one."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits / np.float32(max(temperature, 1e-6))
    with np.errstate(over="ignore", invalid="ignore"):
        probs = np.exp(scaled - np.max(scaled))
    probs = np.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
    total = probs.sum(dtype=np.float64)
    if not total > 0:
        return 0  # the reference falls back to id 0 when nothing has mass
    if 0 < top_k < probs.size:
        # argpartition leaves the k largest in the tail, in no order: the draw does not care.
        keep = np.argpartition(probs, probs.size - top_k)[probs.size - top_k:]
        return int(keep[_draw(probs[keep], rng)])
    return _draw(probs, rng)


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw; zero-weight entries can never be picked (the CDF does not rise there)."""
    cdf = np.cumsum(weights, dtype=np.float64)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if index >= weights.size:  # u * total rounded up to total: take the last entry with weight
        index = int(np.flatnonzero(weights)[-1])
    return index
