"""The artifact manifest: everything the runtime needs to know, so it never reads model code."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from dia2_trt.models.config import Dia2Config
# The runtime owns the format: the exporter writes what the runtime reads.
from dia2_trt.runtime.artifacts import FORMAT, VERSION, sha256
from dia2_trt.runtime.state_machine import REFERENCE_MAX_PADDING, TokenIds

__all__ = ["FORMAT", "VERSION", "build_manifest", "sha256", "tool_versions", "topology", "write_manifest"]

_TOOLS = ("dia2-trt", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "polygraphy", "tensorrt")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def topology(cfg: Dia2Config) -> dict:
    d, dec, dep = cfg.data, cfg.model.decoder, cfg.model.depformer
    return {
        "channels": d.channels,
        "audio_channels": d.audio_channels,
        "num_depth": cfg.num_depth,
        "n_layer": dec.n_layer,
        "n_embd": dec.n_embd,
        "n_hidden": dec.n_hidden,
        "heads": dec.gqa_query_heads,
        "kv_heads": dec.kv_heads,
        "head_dim": dec.gqa_head_dim,
        "low_rank_dim": dec.low_rank_dim,
        "depformer": {
            "n_layer": dep.n_layer, "n_embd": dep.n_embd, "n_hidden": dep.n_hidden,
            "heads": dep.gqa_query_heads, "head_dim": dep.gqa_head_dim,
            "text_embedding": dep.text_embedding, "weights_schedule": list(cfg.runtime.weights_schedule),
        },
        "text_vocab_size": d.text_vocab_size,
        "audio_vocab_size": d.audio_vocab_size,
        "action_vocab_size": d.action_vocab_size,
    }


def build_manifest(cfg: Dia2Config, ids: TokenIds, *, precision: str, opset: int, capacity: int,
                   prefix_frames: int, codec: dict, graphs: dict[str, dict], source: dict) -> dict:
    d = cfg.data
    return {
        "format": FORMAT,
        "version": VERSION,
        "precision": precision,
        "opset": opset,
        "topology": topology(cfg),
        "token_ids": {k: int(v) for k, v in vars(ids).items()},
        "delays": list(d.delay_pattern),
        "second_stream_ahead": d.second_stream_ahead,
        # The reference's state machine ignores config max_pad and uses 6 frames.
        "max_padding": REFERENCE_MAX_PADDING,
        "config_max_pad": d.max_pad,
        "first_word_min_start": d.first_word_min_start,
        "max_context_steps": cfg.runtime.max_context_steps,
        "prefix_frames": prefix_frames,
        "cache_capacity": capacity,
        "frame_rate": codec["frame_rate"],
        "sample_rate": codec["sample_rate"],
        "samples_per_frame": codec["frame_samples"],
        "tokenizer": "tokenizer",
        "graphs": graphs,
        "source": source,
        "tools": tool_versions(),
    }


def write_manifest(manifest: dict, directory: Path) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
