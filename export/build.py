"""checkpoint -> artifact directory (graphs + tokenizer + manifest), built atomically (artifact_dir.py)."""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from dia2_trt.models.sources import CheckpointFiles, load_mimi, load_model
from dia2_trt.models.tokens import check_tokenizer, resolve_token_ids
from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.cli_common import is_within
from dia2_trt.runtime.files import open_regular
from dia2_trt.runtime.manifest import (
    BACKBONE,
    BACKBONE_PREFILL,
    CACHE_ROWS,
    CODEC_DECODER,
    CODEC_ENCODER,
    DEPFORMER,
    FLOAT_PRECISIONS,
    MANIFEST,
    MAX_STREAMS_LIMIT,
    STREAM_ROWS,
    STREAMS,
    WEIGHT_ONLY_PRECISIONS,
    GraphSpec,
    Manifest,
    SourceInfo,
    cache_name,
)

from .artifact_dir import BuildError, atomic_dir, check_output_dir, copy_tree, tree_bytes
from .cache_dtype import CACHE_DTYPES, fp16_cache
from .codec import export_codec_decoder, export_codec_encoder
from .depformer_loop import export_depformer_loop, tail_stages
from .graphs import BackbonePrefill, BackboneStep, DepformerFrame
from .manifest import build_manifest, graph_spec, sha256, tokenizer_entry, write_manifest
from .onnx_io import export_module, save_model

# What this exporter can write: the manifest's PRECISIONS but the calibrated Q/DQ ones (calibration/).
BUILD_PRECISIONS = FLOAT_PRECISIONS + WEIGHT_ONLY_PRECISIONS
WEIGHT_ONLY_BITS = dict(zip(WEIGHT_ONLY_PRECISIONS, (8, 4)))  # fp32 graphs, integer weights
# Their codec decoder's weights (the real Mimi's 48 transformer MatMuls, 100 of its 228 MB, and the
# codebook table) in 8 bits whatever the build's: on the 2B decoder, 40.9 dB SNR against fp32 over
# 40 random-code frames, 31 vs 38 ms a frame on one thread, 76 MB less to hold. The encoder, run once
# per voice prompt, stays fp32 (nearest-centroid search flips codes under rounding).
CODEC_BITS = 8
# Opset 23 has RMSNormalization (one node instead of six; 20% off the depformer on ORT
# CPU). For a TensorRT whose ONNX parser predates opset 23, build with --opset 20.
DEFAULT_OPSET = 23
# Streams one call of the per-frame graphs serves at most: the TensorRT profiles' optimum and the
# runtime's default number of slots (ONNX Runtime takes any count up to it).
DEFAULT_MAX_STREAMS = 8
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    prefix_frames: int = 0  # cache rows reserved for an audio prefix (voice continuation)
    overwrite: bool = False
    block_size: int | None = None  # weight-only precisions; None: the measured default
    max_streams: int = DEFAULT_MAX_STREAMS  # the bound of the graphs' streams axis
    cache_dtype: str | None = None  # the KV cache's dtype; None: the precision's own (fp16 for fp16 builds)

    @staticmethod
    def opset_floor() -> int:
        from .weight_only import QUANT_MIN_OPSET

        return QUANT_MIN_OPSET

    def weight_only_scheme(self):
        """The int8/int4 scheme asked for, or None for a float precision."""
        from .weight_only import DEFAULT_BLOCK_SIZE, WeightOnlyScheme

        if self.precision not in WEIGHT_ONLY_BITS:
            return None
        return WeightOnlyScheme(WEIGHT_ONLY_BITS[self.precision], self.block_size or DEFAULT_BLOCK_SIZE)


def check_request(out: Path, options: BuildOptions) -> None:
    """Fail before any work (or download) if the options are bad or the result could not be put in place."""
    if options.precision not in BUILD_PRECISIONS:
        raise BuildError(f"unknown precision {options.precision!r}; choose one of {', '.join(BUILD_PRECISIONS)}")
    if options.cache_dtype not in (None, *CACHE_DTYPES) or (options.precision == "fp16"
                                                           and options.cache_dtype == "float32"):
        raise BuildError(f"--cache-dtype {options.cache_dtype}: choose float16 (any precision) or float32 "
                         f"(not for fp16 builds, whose cache is fp16)")
    if not 1 <= options.max_streams <= MAX_STREAMS_LIMIT:
        raise BuildError(f"--max-streams must be in 1..{MAX_STREAMS_LIMIT}, got {options.max_streams}")
    _check_weight_only(options)
    check_output_dir(Path(out), options.overwrite)


def _check_weight_only(options: BuildOptions) -> None:
    if options.block_size is not None and options.precision not in WEIGHT_ONLY_BITS:
        raise BuildError(f"--block-size applies to {' and '.join(WEIGHT_ONLY_BITS)}, not {options.precision}")
    if options.precision in WEIGHT_ONLY_BITS and options.opset < options.opset_floor():
        raise BuildError(f"{options.precision} needs opset >= {options.opset_floor()} (blocked DequantizeLinear), "
                         f"got {options.opset}")
    options.weight_only_scheme()  # a bad block size fails here, before any export


def check_source(out: Path, files: CheckpointFiles) -> None:
    """The output must not be, hold or lie inside any directory the checkpoint is read from:
    replacing it would delete the checkpoint, and an artifact inside it would change it."""
    for directory in source_dirs(files):
        if is_within(out, directory) or is_within(directory, out):
            relation = ("is" if Path(out).resolve() == directory.resolve()
                        else "lies inside" if is_within(out, directory) else "holds")
            raise BuildError(f"--out {out} {relation} the checkpoint directory {directory}; "
                             f"build the artifacts somewhere else")


def source_dirs(files: CheckpointFiles) -> list[Path]:
    """The local directories a checkpoint's files come from (a hub Mimi id has none)."""
    dirs = [files.config_path.parent, files.weights_path.parent, files.tokenizer_dir]
    if Path(files.mimi_ref).is_dir():
        dirs.append(Path(files.mimi_ref))
    return dirs


def build_artifacts(files: CheckpointFiles, out: Path, options: BuildOptions,
                    progress: Callable[[str], None] = lambda msg: None) -> Manifest:
    """Export every graph into a temporary sibling of ``out``, then rename it into place.

    A failed build leaves nothing behind: no temporary directory, no parent directories it created.
    """
    check_source(out, files)
    check_request(out, options)
    return atomic_dir(Path(out), options.overwrite, _build_bytes(files, options),
                      lambda tmp: _build_into(files, tmp, options, progress), load=load_manifest)


def quantize_artifacts(src: Path, out: Path, options: BuildOptions,
                       progress: Callable[[str], None] = lambda msg: None) -> Manifest:
    """An int8/int4 artifact directory from an fp32 one of the same checkpoint: no torch export.

    The source is only read; the result is built in a temporary sibling of ``out``.
    """
    src, out = Path(src), Path(out)
    check_request(out, options)
    if options.precision not in WEIGHT_ONLY_BITS:
        raise BuildError(f"--from-artifacts makes {' or '.join(WEIGHT_ONLY_BITS)} artifacts, not {options.precision}")
    if is_within(out, src) or is_within(src, out):
        raise BuildError(f"--out {out} and --from-artifacts {src} overlap; build somewhere else")
    manifest = load_manifest(src)
    if manifest.precision != "fp32":
        raise BuildError(f"{src} holds {manifest.precision} graphs; quantize from fp32 artifacts")
    if manifest.opset < options.opset_floor():
        raise BuildError(f"{src} was exported at opset {manifest.opset}; int8/int4 need >= {options.opset_floor()}")
    return atomic_dir(out, options.overwrite, _quantize_bytes(manifest),
                      lambda tmp: _quantize_into(src, tmp, manifest, options, progress), load=load_manifest)


def _quantize_into(src: Path, tmp: Path, manifest: Manifest, options: BuildOptions, progress) -> None:
    started = time.perf_counter()
    for entry in (p for p in sorted(src.iterdir()) if p.name != MANIFEST and not p.name.startswith(".")):
        progress(f"copying {entry.name}")
        copy_tree(entry, tmp / entry.name)
    graphs = dict(manifest.graphs)
    for name in (n for n in (BACKBONE, DEPFORMER, BACKBONE_PREFILL) if n in graphs):
        quantized = _quantized_graph(tmp, graphs[name].file, name, options, progress, graphs)
        graphs[name] = replace(quantized, dims=graphs[name].dims)
    _cache_dtype(tmp, graphs, options, progress)
    if graphs[CODEC_DECODER].precision == "fp32":
        graphs[CODEC_DECODER] = _quantized_codec(tmp, graphs[CODEC_DECODER], progress)
    write_manifest(replace(manifest, precision=options.precision, graphs=graphs, root=tmp), tmp)
    progress(f"done in {time.perf_counter() - started:.1f}s")


def _cache_dtype(tmp: Path, graphs: dict, options: BuildOptions, progress) -> None:
    """The backbone's cache in fp16 where asked (an fp16 build's already is)."""
    spec = graphs[BACKBONE]
    if options.cache_dtype != "float16" or spec.input(cache_name("k", 0)).dtype == np.float16:
        return
    progress("fp16 KV cache")
    fp16_cache(tmp / spec.file)
    io = graph_spec(tmp, BACKBONE, spec.file, spec.precision)
    graphs[BACKBONE] = replace(spec, inputs=io.inputs, outputs=io.outputs, sha256=io.sha256)


def _build_bytes(files: CheckpointFiles, options: BuildOptions) -> int:
    """About a build's peak: every weight in fp32 (the backbone's twice with a prefill graph, the
    codec's in both codec graphs), half as much again for what the graphs hold beyond the
    checkpoint (the depformer's stage heads) and a quantizing pass's new file beside the old.
    Tiny, sampled: 3.65 MB seen with a prefill (4.1 estimated), 3.07 without (3.0). A hub Mimi not
    in the local cache counts as 0."""
    model = _safetensors_elements(files.weights_path) * 4
    mimi = _safetensors_elements(_mimi_weights(files.mimi_ref)) * 4
    return int(1.5 * (model * (2 if options.prefix_frames else 1) + 2 * mimi))


def _quantize_bytes(manifest: Manifest) -> int:
    """``--from-artifacts``: a copy of the fp32 artifacts, and a graph's quantized copy beside it
    (tiny int4: 3.63 MB seen, 4.16 estimated)."""
    sizes = [_graph_bytes(spec) for spec in manifest.graphs.values()]
    return tree_bytes(manifest.root) + max(sizes, default=0) // 2


def _graph_bytes(spec: GraphSpec) -> int:
    data = spec.external_data_path
    return tree_bytes(spec.path) + (tree_bytes(data) if data is not None else 0)


def _mimi_weights(ref: str) -> Path | None:
    if Path(ref).is_dir():
        return Path(ref) / "model.safetensors"
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref, "model.safetensors")  # the cache only: no download
    except (ImportError, ValueError):
        return None
    return Path(found) if isinstance(found, str) else None


def _safetensors_elements(path: Path | None) -> int:
    """Elements of every tensor in a safetensors file, from its JSON header (no tensor is read)."""
    if path is None:
        return 0
    try:
        with open_regular(path, 1 << 50, "checkpoint weights") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(size, 100 << 20)))
    except (OSError, TypeError, ValueError):  # InputFileError is a ValueError
        return 0
    total = 0
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict):
            total += int(np.prod(entry.get("shape") or [1]))
    return total


def _build_into(files: CheckpointFiles, tmp: Path, options: BuildOptions, progress) -> None:
    started = time.perf_counter()
    progress(f"loading checkpoint {files.config_path.parent}")
    model = load_model(files)
    cfg = model.config
    capacity = cfg.runtime.max_context_steps + 1 + options.prefix_frames
    if capacity > model.transformer.rotary.cos.shape[0]:
        model.transformer.rotary = type(model.transformer.rotary)(
            cfg.model.decoder.gqa_head_dim, cfg.model.rope_min_timescale, cfg.model.rope_max_timescale, capacity)
    check_tokenizer(files.tokenizer_dir)
    ids = resolve_token_ids(cfg, files.tokenizer_dir)
    mimi = load_mimi(files.mimi_ref)
    graphs = {}
    progress("exporting backbone step")
    backbone = BackboneStep(model)
    export_module(backbone, BackboneStep.example_inputs(model, capacity), backbone.input_names,
                  backbone.output_names, tmp / "backbone.onnx", options.opset, dynamic=backbone.dynamic_shapes)
    progress("exporting depformer frame")
    _export_depformer(model, ids, tmp / "depformer.onnx", options)
    step_graphs = [BACKBONE, DEPFORMER]
    if options.prefix_frames:
        progress("exporting backbone prefill (audio-prefix warm-up)")
        _export_prefill(model, tmp / f"{BACKBONE_PREFILL}.onnx", options.opset)
        step_graphs.append(BACKBONE_PREFILL)
    del model  # the fp16 pass below holds a whole graph in memory: give the torch weights back first
    gc.collect()  # the exporter leaves reference cycles that still hold the weights
    for name in step_graphs:
        if options.precision in WEIGHT_ONLY_BITS:
            graphs[name] = _quantized_graph(tmp, f"{name}.onnx", name, options, progress, graphs)
            continue
        if options.precision == "fp16":
            progress(f"converting {name} to fp16")
            _convert_fp16(tmp / f"{name}.onnx")
        graphs[name] = graph_spec(tmp, name, f"{name}.onnx", options.precision)
    _cache_dtype(tmp, graphs, options, progress)
    streams = stream_dims(options.max_streams)
    graphs[BACKBONE] = replace(graphs[BACKBONE], dims={**streams, CACHE_ROWS: capacity})
    graphs[DEPFORMER] = replace(graphs[DEPFORMER], dims=streams)
    q = cfg.data.audio_channels
    # Weight-only builds export the codec in fp32, then quantize the decoder's weights (CODEC_BITS).
    codec_precision = "fp32" if options.precision in WEIGHT_ONLY_BITS else options.precision
    progress("exporting codec decoder step")
    graphs[CODEC_DECODER], codec = export_codec_decoder(mimi, tmp / "codec_decoder.onnx", opset=options.opset,
                                                        precision=codec_precision, num_quantizers=q,
                                                        max_streams=options.max_streams)
    if options.precision in WEIGHT_ONLY_BITS:
        graphs[CODEC_DECODER] = _quantized_codec(tmp, graphs[CODEC_DECODER], progress)
    progress("exporting codec encoder")
    graphs[CODEC_ENCODER] = export_codec_encoder(mimi, tmp / "codec_encoder.onnx", opset=options.opset,
                                                 precision=codec_precision, num_quantizers=q)
    _copy_tokenizer(files.tokenizer_dir, tmp / "tokenizer")
    manifest = build_manifest(cfg, ids, root=tmp, precision=options.precision, opset=options.opset,
                              capacity=capacity, prefix_frames=options.prefix_frames, codec=codec, graphs=graphs,
                              tokenizer=tokenizer_entry(tmp, "tokenizer"), source=_source(files),
                              max_streams=options.max_streams)
    write_manifest(manifest, tmp)
    progress(f"done in {time.perf_counter() - started:.1f}s")


def stream_dims(max_streams: int) -> dict[str, int]:
    """The bounds of the per-frame graphs' stream axes."""
    return {STREAMS: max_streams, STREAM_ROWS: 2 * max_streams}


def _export_depformer(model, ids, path: Path, options: BuildOptions) -> None:
    """Stages that share their weights as one Loop (depformer_loop.py), except in fp16 builds: their
    pass rewrites straight-line graphs, and they are made for TensorRT, which takes the stages laid out."""
    if options.precision != "fp16" and tail_stages(model.depformer.schedule) >= 2:
        export_depformer_loop(model, ids, path, options.opset)
        return
    export_module(DepformerFrame(model, ids), DepformerFrame.example_inputs(model), DepformerFrame.input_names,
                  DepformerFrame.output_names, path, options.opset, dynamic=DepformerFrame.dynamic_shapes)


def _export_prefill(model, path: Path, opset: int) -> None:
    """Only artifacts with prefix room get it: it holds a second copy of the backbone's weights."""
    prefill = BackbonePrefill(model)
    export_module(prefill, BackbonePrefill.example_inputs(model), prefill.input_names, prefill.output_names,
                  path, opset, dynamic=BackbonePrefill.dynamic_shapes)


def _convert_fp16(path: Path) -> None:
    from .precision import to_fp16

    # Shape inference by path works past protobuf's 2 GB, unlike on a loaded model.
    onnx.shape_inference.infer_shapes_path(str(path))
    save_model(to_fp16(onnx.load(str(path))), path)


def _quantized_graph(root: Path, file: str, name: str, options: BuildOptions, progress,
                     done: dict[str, GraphSpec]) -> GraphSpec:
    """Quantize ``root/file`` in place and describe it, with its quantization record.

    The prefill holds the backbone's weights and writes the rows stepping would: it takes the
    backbone's scheme as quantized (``done[BACKBONE]``), block size included. Copied in fp32 next to
    an int8 backbone, a warmed prefix's K/V rows differed from the step-wise ones by up to 0.05
    (int4: 0.5, on rows of magnitude 4) and the greedy tokens after it changed."""
    scheme = options.weight_only_scheme()
    assert scheme is not None, "only weight-only precisions are quantized"
    if name == BACKBONE_PREFILL:
        record = done[BACKBONE].quantization
        assert record is not None, "the backbone is quantized before its prefill"
        return _quantize_file(root, file, name, replace(scheme, block_size=record.block_size), options.precision,
                              fit=False, progress=progress)
    # the default block size adapts to small models; one asked for is used as given
    return _quantize_file(root, file, name, scheme, options.precision, fit=options.block_size is None,
                          progress=progress)


def _quantized_codec(root: Path, spec: GraphSpec, progress) -> GraphSpec:
    """The codec decoder's MatMul weights and codebook table in CODEC_BITS, whatever the build's bits."""
    from .weight_only import DEFAULT_BLOCK_SIZE, WeightOnlyScheme

    label = f"int{CODEC_BITS}"
    state = [{"input": p.input, "output": p.output} for p in spec.state]
    quantized = _quantize_file(root, spec.file, spec.name, WeightOnlyScheme(CODEC_BITS, DEFAULT_BLOCK_SIZE), label,
                               fit=True, progress=progress, state=state)
    return replace(quantized, dims=spec.dims)  # its streams axis keeps its bound


def _quantize_file(root: Path, file: str, name: str, scheme, label: str, *, fit: bool, progress,
                   state: list[dict] | tuple = ()) -> GraphSpec:
    from .weight_only import QuantizeError, check_block_size, fit_block_size, quantize_model_file

    progress(f"quantizing {name} weights to {label}")
    path = root / file
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
        if fit:
            scheme = fit_block_size(graph, scheme)
        check_block_size(graph, scheme, name)
        record = scheme.record(quantize_model_file(path, scheme), label)
    except QuantizeError as exc:
        raise BuildError(str(exc)) from None
    return replace(graph_spec(root, name, file, label, state), quantization=record)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _source(files: CheckpointFiles) -> SourceInfo:
    return SourceInfo(repo_id=files.repo_id, checkpoint=str(files.config_path.parent), mimi=files.mimi_ref,
                      files={p.name: sha256(p) for p in (files.config_path, files.weights_path)})
