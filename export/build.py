"""checkpoint -> artifact directory (graphs + tokenizer + manifest), built atomically."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from dia2_trt.models.sources import CheckpointFiles, load_mimi, load_model
from dia2_trt.models.tokens import check_tokenizer, resolve_token_ids

from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.manifest import BACKBONE, CODEC_DECODER, CODEC_ENCODER, DEPFORMER, CodecInfo, Manifest, SourceInfo

from .codec import export_codec_decoder, export_codec_encoder
from .graphs import BackboneStep, DepformerFrame
from .manifest import build_manifest, graph_spec, sha256, tokenizer_entry, write_manifest
from .onnx_io import export_module, save_model

# What this exporter can write (the manifest's PRECISIONS also holds the quantized ones).
PRECISIONS = ("fp32", "fp16")
# Opset 23 has RMSNormalization (one node instead of six; 20% off the depformer on ORT
# CPU). For a TensorRT whose ONNX parser predates opset 23, build with --opset 20.
DEFAULT_OPSET = 23
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


class BuildError(ValueError):
    """Bad build request: unknown precision, unusable output directory."""


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    prefix_frames: int = 0  # cache rows reserved for an audio prefix (voice continuation)
    overwrite: bool = False


def check_request(out: Path, options: BuildOptions) -> None:
    """Fail before any work (or download) if the options are bad or the result could not be put in place."""
    if options.precision not in PRECISIONS:
        raise BuildError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    _check_output_dir(Path(out), options.overwrite)


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BuildError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(f"cannot write to {parent}")


def build_artifacts(files: CheckpointFiles, out: Path, options: BuildOptions,
                    progress: Callable[[str], None] = lambda msg: None) -> Manifest:
    """Export every graph into a temporary sibling of ``out``, then rename it into place."""
    out = Path(out)
    check_request(out, options)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; artifacts are meant to be shared
    except OSError as exc:
        raise BuildError(f"cannot write to {out.parent}: {exc.strerror}") from None
    try:
        _build_into(files, tmp, options, progress)
        # What the runtime will read, checked by the runtime's own loader before it replaces anything;
        # this also records the big graphs' checksum stamps, so the first load does not hash them again.
        load_manifest(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_manifest(out, verify=False)


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
                  backbone.output_names, tmp / "backbone.onnx", options.opset)
    progress("exporting depformer frame")
    export_module(DepformerFrame(model, ids), DepformerFrame.example_inputs(model), DepformerFrame.input_names,
                  DepformerFrame.output_names, tmp / "depformer.onnx", options.opset)
    del model  # the fp16 pass below holds a whole graph in memory: give the torch weights back first
    gc.collect()  # the exporter leaves reference cycles that still hold the weights
    for name in (BACKBONE, DEPFORMER):
        if options.precision == "fp16":
            progress(f"converting {name} to fp16")
            _convert_fp16(tmp / f"{name}.onnx")
        graphs[name] = graph_spec(tmp, name, f"{name}.onnx", options.precision)
    q = cfg.data.audio_channels
    progress("exporting codec decoder step")
    decoder = export_codec_decoder(mimi, tmp / "codec_decoder.onnx", opset=options.opset,
                                   precision=options.precision, num_quantizers=q)
    graphs[CODEC_DECODER] = graph_spec(tmp, CODEC_DECODER, "codec_decoder.onnx", decoder["precision"],
                                       decoder["state"])
    progress("exporting codec encoder")
    encoder = export_codec_encoder(mimi, tmp / "codec_encoder.onnx", opset=options.opset,
                                   precision=options.precision, num_quantizers=q)
    graphs[CODEC_ENCODER] = graph_spec(tmp, CODEC_ENCODER, "codec_encoder.onnx", encoder["precision"])
    _copy_tokenizer(files.tokenizer_dir, tmp / "tokenizer")
    codec = CodecInfo(frame_rate=float(mimi.config.frame_rate), sample_rate=int(mimi.config.sampling_rate),
                      samples_per_frame=int(decoder["frame_samples"]), num_quantizers=int(decoder["num_quantizers"]),
                      codebook_size=int(decoder["codebook_size"]))
    manifest = build_manifest(cfg, ids, root=tmp, precision=options.precision, opset=options.opset,
                              capacity=capacity, prefix_frames=options.prefix_frames, codec=codec, graphs=graphs,
                              tokenizer=tokenizer_entry(tmp, "tokenizer"), source=_source(files))
    write_manifest(manifest, tmp)
    progress(f"done in {time.perf_counter() - started:.1f}s")


def _convert_fp16(path: Path) -> None:
    from .precision import to_fp16

    # Shape inference by path works past protobuf's 2 GB, unlike on a loaded model.
    onnx.shape_inference.infer_shapes_path(str(path))
    save_model(to_fp16(onnx.load(str(path))), path)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _source(files: CheckpointFiles) -> SourceInfo:
    return SourceInfo(repo_id=files.repo_id, checkpoint=str(files.config_path.parent), mimi=files.mimi_ref,
                      files={p.name: sha256(p) for p in (files.config_path, files.weights_path)})


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap the finished directory in; an old one is removed only after the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
