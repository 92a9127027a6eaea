"""Run the PyTorch reference loop on a checkpoint (``dia2-export reference``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from dia2_trt.models.reference import ReferenceLoop, ReferenceResult
from dia2_trt.models.sources import CheckpointFiles, load_mimi, load_model
from dia2_trt.models.tokens import resolve_token_ids
from dia2_trt.runtime.params import GenerationParams
from dia2_trt.runtime.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from transformers import MimiModel


def reference_loop(files: CheckpointFiles, mimi: MimiModel | None = None) -> tuple[ReferenceLoop, MimiModel]:
    model = load_model(files)
    codec = mimi if mimi is not None else load_mimi(files.mimi_ref)
    ids = resolve_token_ids(model.config, files.tokenizer_dir)
    tokenizer = TextTokenizer.from_dir(files.tokenizer_dir)
    return ReferenceLoop(model, ids, tokenizer.encode, float(codec.config.frame_rate)), codec


def decode_batch(mimi: MimiModel, tokens: np.ndarray) -> np.ndarray:
    """transformers' batch decode, clamped like the reference; [Q, T] -> pcm [T * 1920]."""
    if tokens.shape[1] == 0:
        return np.zeros(0, dtype=np.float32)
    with torch.inference_mode():
        out = mimi.decode(torch.from_numpy(tokens)[None], return_dict=False)
    return out[0][0, 0].clamp(-1.0, 1.0).numpy()


def run_reference(files: CheckpointFiles, text: str, params: GenerationParams,
                  decode: bool = False) -> tuple[ReferenceResult, np.ndarray | None, int]:
    loop, mimi = reference_loop(files)
    result = loop.run(text, params)
    pcm = decode_batch(mimi, result.tokens) if decode else None
    return result, pcm, int(mimi.config.sampling_rate)
