"""The artifact manifest, built as the runtime's typed objects: the exporter writes what the runtime reads."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from dia2_trt.models.config import Dia2Config
from dia2_trt.runtime.artifacts import sha256
from dia2_trt.runtime.files import write_atomic
from dia2_trt.runtime.graph_io import read_io
from dia2_trt.runtime.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    CodecInfo,
    DepformerTopology,
    FileRef,
    GraphSpec,
    Manifest,
    SourceInfo,
    StatePair,
    TensorSpec,
    TokenizerEntry,
    Topology,
)
from dia2_trt.runtime.state_machine import REFERENCE_MAX_PADDING, TokenIds

__all__ = ["FORMAT", "VERSION", "build_manifest", "graph_spec", "sha256", "tool_versions", "topology",
           "write_manifest"]

_TOOLS = ("dia2-trt", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "polygraphy", "tensorrt")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def topology(cfg: Dia2Config) -> Topology:
    d, dec, dep = cfg.data, cfg.model.decoder, cfg.model.depformer
    return Topology(
        channels=d.channels, audio_channels=d.audio_channels, num_depth=cfg.num_depth,
        n_layer=dec.n_layer, n_embd=dec.n_embd, n_hidden=dec.n_hidden, heads=dec.gqa_query_heads,
        kv_heads=dec.kv_heads, head_dim=dec.gqa_head_dim, low_rank_dim=dec.low_rank_dim,
        depformer=DepformerTopology(
            n_layer=dep.n_layer, n_embd=dep.n_embd, n_hidden=dep.n_hidden, heads=dep.gqa_query_heads,
            head_dim=dep.gqa_head_dim, text_embedding=dep.text_embedding,
            weights_schedule=tuple(cfg.runtime.weights_schedule)),
        text_vocab_size=d.text_vocab_size, audio_vocab_size=d.audio_vocab_size,
        action_vocab_size=d.action_vocab_size,
    )


def graph_spec(root: Path, name: str, file: str, precision: str, state: list[dict] | tuple = ()) -> GraphSpec:
    """The entry of a graph written into ``root``: its own I/O, checksum and external weights."""
    path = Path(root) / file
    inputs, outputs = read_io(path)
    data = path.with_name(path.name + ".data")
    return GraphSpec(
        name=name, file=file, sha256=sha256(path), precision=precision,
        inputs=tuple(TensorSpec.from_json(t) for t in inputs), outputs=tuple(TensorSpec.from_json(t) for t in outputs),
        state=tuple(StatePair(p["input"], p["output"]) for p in state),
        external_data=FileRef(data.name, sha256(data)) if data.exists() else None, root=Path(root),
    )


def tokenizer_entry(root: Path, directory: str) -> TokenizerEntry:
    files = sorted(p for p in (Path(root) / directory).iterdir() if p.is_file())
    return TokenizerEntry(directory, {p.name: sha256(p) for p in files})


def build_manifest(cfg: Dia2Config, ids: TokenIds, *, root: Path, precision: str, opset: int, capacity: int,
                   prefix_frames: int, codec: CodecInfo, graphs: dict[str, GraphSpec], tokenizer: TokenizerEntry,
                   source: SourceInfo, max_streams: int) -> Manifest:
    return Manifest(
        precision=precision, opset=opset, topology=topology(cfg), token_ids=ids,
        delays=tuple(cfg.data.delay_pattern), second_stream_ahead=cfg.data.second_stream_ahead,
        # The reference's state machine ignores config max_pad and uses 6 frames.
        max_padding=REFERENCE_MAX_PADDING, max_context_steps=cfg.runtime.max_context_steps,
        prefix_frames=prefix_frames, cache_capacity=capacity, codec=codec, tokenizer=tokenizer, graphs=graphs,
        source=source, tools=tool_versions(), max_streams=max_streams, root=Path(root),
    )


def write_manifest(manifest: Manifest, directory: Path) -> None:
    text = json.dumps(manifest.to_json(), indent=1) + "\n"
    write_atomic(Path(directory) / MANIFEST, lambda tmp: Path(tmp).write_text(text))
