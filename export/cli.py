"""``dia2-export``: build artifacts, validate them, and run the PyTorch reference loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dia2_trt.runtime.files import AUDIO_FORMATS, write_atomic, write_audio

from .build import DEFAULT_OPSET, PRECISIONS, BuildOptions

SIZES = ("tiny", "1B", "2B")


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _checkpoint_files(size: str | None, checkpoint: str | None):
    from dia2_trt.models.sources import resolve_checkpoint

    if (size is None) == (checkpoint is None):
        _fail("give exactly one of --size or --checkpoint")
    return resolve_checkpoint(size=size, checkpoint=checkpoint)


def _source_options(fn):
    fn = click.option("--checkpoint", type=click.Path(), help="Local checkpoint directory (config.json, model.safetensors, tokenizer).")(fn)
    return click.option("--size", type=click.Choice(SIZES, case_sensitive=False), help="Model size: tiny (offline, random), 1B or 2B (Hugging Face).")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export Dia2 to ONNX / TensorRT artifacts and check them against PyTorch."""


@main.command()
@_source_options
@click.option("--precision", default="fp32", show_default=True, help=f"One of {', '.join(PRECISIONS)}.")
@click.option("--out", "out", required=True, type=click.Path(), help="Artifact directory to create.")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, type=int)
@click.option("--prefix-frames", default=0, show_default=True, type=click.IntRange(0),
              help="Extra KV-cache frames reserved for an audio prefix.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact directory.")
def build(size, checkpoint, precision, out, opset, prefix_frames, overwrite):
    """Export the backbone, depformer and codec graphs with a manifest."""
    from .build import build_artifacts, check_request

    options = BuildOptions(precision=precision, opset=opset, prefix_frames=prefix_frames, overwrite=overwrite)
    check_request(Path(out), options)  # before resolving the checkpoint, which may download it
    files = _checkpoint_files(size, checkpoint)
    build_artifacts(files, Path(out), options, progress=lambda msg: click.echo(f"[build] {msg}", err=True))
    click.echo(str(out))


@main.command()
@click.argument("artifacts", type=click.Path())
@_source_options
@click.option("--steps", default=64, show_default=True, type=click.IntRange(1), help="Teacher-forced decode steps.")
@click.option("--codec-frames", default=320, show_default=True, type=click.IntRange(1))
@click.option("--report", type=click.Path(), help="Write the JSON report here (default: ARTIFACTS/validation.json).")
@click.option("--seed", default=0, show_default=True, type=int)
def validate(artifacts, size, checkpoint, steps, codec_frames, report, seed):
    """Compare every graph with PyTorch through Polygraphy; exit 1 past tolerance."""
    from .validate import validate_artifacts

    source = _checkpoint_files(size, checkpoint) if (size or checkpoint) else None
    result = validate_artifacts(Path(artifacts), source, steps=steps, codec_frames=codec_frames, seed=seed,
                                echo=lambda msg: click.echo(msg, err=True))
    path = Path(report) if report else Path(artifacts) / "validation.json"
    _write_atomic(path, json.dumps(result, indent=1) + "\n")
    click.echo(f"report: {path}", err=True)
    if not result["passed"]:
        _fail("validation failed: " + ", ".join(result["failures"]))


@main.command()
@click.argument("artifacts", type=click.Path(exists=True, file_okay=False))
@click.option("--graphs", default="backbone,depformer,codec_decoder,codec_encoder", show_default=True,
              help="Comma-separated graph names.")
@click.option("--workspace-gib", default=4, show_default=True, type=click.IntRange(1))
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Reuse/update a TensorRT timing cache.")
@click.option("--no-validate", is_flag=True, help="Skip the Polygraphy comparison with ONNX Runtime.")
def engines(artifacts, graphs, workspace_gib, timing_cache, no_validate):
    """Build TensorRT engines (strongly typed: precision from the ONNX) next to the graphs."""
    from .tensorrt import EngineOptions, build_engines, have_gpu_tensorrt

    available, reason = have_gpu_tensorrt()
    if not available:
        _fail(f"cannot build TensorRT engines here: {reason}")
    options = EngineOptions(workspace_gib=workspace_gib, timing_cache=Path(timing_cache) if timing_cache else None)
    built = build_engines(Path(artifacts), tuple(g.strip() for g in graphs.split(",") if g.strip()), options,
                          validate=not no_validate, echo=lambda msg: click.echo(msg, err=True))
    failed = [name for name, e in built.items() if e.validation and not e.validation.passed]
    if failed:
        _fail("engines differ from ONNX Runtime beyond tolerance: " + ", ".join(failed))


@main.command()
@_source_options
@click.option("--input", "input_file", required=True, type=click.Path(), help="Script file ('-' for stdin).")
@click.option("--temperature", type=click.FloatRange(0), help="Both streams (default: text 0.6, audio 0.8).")
@click.option("--top-k", default=50, show_default=True, type=click.IntRange(0))
@click.option("--cfg", "cfg_scale", default=2.0, show_default=True, type=float)
@click.option("--cfg-filter-k", default=50, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--tokens-out", required=True, type=click.Path(), help="JSON with aligned tokens and word timestamps.")
@click.option("--out", "wav_out", type=click.Path(), help="Also decode to audio (.wav, .flac, .ogg) with transformers' Mimi.")
def reference(size, checkpoint, input_file, temperature, top_k, cfg_scale, cfg_filter_k, seed, tokens_out, wav_out):
    """Generate with the eager PyTorch reference loop."""
    from dia2_trt.runtime.params import GenerationParams

    if wav_out and Path(wav_out).suffix.lower() not in AUDIO_FORMATS:
        _fail(f"{wav_out}: unknown audio format (use .wav, .flac or .ogg)")
    text = _read_script(input_file)
    params = _params(GenerationParams, temperature, top_k, cfg_scale, cfg_filter_k, seed)
    files = _checkpoint_files(size, checkpoint)
    from .reference_run import run_reference

    result, pcm, rate = run_reference(files, text, params, decode=wav_out is not None)
    _write_atomic(Path(tokens_out), json.dumps(
        {"tokens": result.tokens.tolist(), "timestamps": [[w, s] for w, s in result.timestamps]}) + "\n")
    if wav_out:
        _write_audio(Path(wav_out), pcm, rate)
    click.echo(f"{result.frames} frames, {result.tokens.shape[1]} aligned", err=True)


def _params(cls, temperature, top_k, cfg_scale, cfg_filter_k, seed):
    kwargs = dict(text_top_k=top_k, audio_top_k=top_k, cfg_scale=cfg_scale, cfg_filter_k=cfg_filter_k, seed=seed)
    if temperature is not None:
        kwargs.update(text_temperature=temperature, audio_temperature=temperature)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        _fail(str(exc))


def _read_script(path: str) -> str:
    from dia2_trt.runtime.script import ScriptError, check_script

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    try:
        check_script(text)
    except ScriptError as exc:
        _fail(str(exc))
    return text.strip()


def _write_atomic(path: Path, text: str) -> None:
    try:
        write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")


def _write_audio(path: Path, pcm, rate: int) -> None:
    try:
        write_audio(path, pcm, rate)
    except Exception as exc:  # OSError, or soundfile's own error types
        _fail(f"cannot write {path}: {exc}")


def run() -> None:
    """Entry point: library errors (ValueError and friends) become one-line messages."""
    try:
        main(standalone_mode=True)
    except (ValueError, FileNotFoundError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
