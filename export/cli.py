"""``dia2-export``'s export commands: build artifacts, validate them, build engines, run the PyTorch reference
loop. ``calibrate`` is added on top of them by dia2_trt.calibration.cli, which the console entry starts."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path

import click

from dia2_trt.runtime.cli_common import (
    FiniteFloat,
    OneLineGroup,
    check_outputs,
    fail,
    files_under,
    int64_range,
    read_script,
)
from dia2_trt.runtime.files import AUDIO_FORMATS, audio_writer, write_atomic, write_together
from dia2_trt.runtime.manifest import FLOAT_PRECISIONS, MAX_STREAMS_LIMIT, WEIGHT_ONLY_PRECISIONS

# torch, transformers and onnx load only inside the commands (export.build and below): `-h` and a
# mistyped option took 6-26 s before, importing them just to print text. The build constants the
# options show are repeated here for that reason; tests/test_first_minutes.py keeps them equal.
BUILD_PRECISIONS = FLOAT_PRECISIONS + WEIGHT_ONLY_PRECISIONS
DEFAULT_OPSET = 23
DEFAULT_MAX_STREAMS = 8
SIZES = ("tiny", "1B", "2B")


def _checkpoint_files(size: str | None, checkpoint: str | None, mimi: str | None = None,
                      tokenizer: str | None = None):
    from dia2_trt.models.sources import resolve_checkpoint

    if (size is None) == (checkpoint is None):
        fail("give exactly one of --size or --checkpoint")
    return resolve_checkpoint(size=size, checkpoint=checkpoint, mimi=mimi, tokenizer=tokenizer)


def _hub_offline(size: str | None) -> bool:
    """A hub size (1B/2B) while the hub cannot be reached (or HF_HUB_OFFLINE): resolving reads the cache only."""
    if size is None or size.lower() == "tiny":
        return False
    from huggingface_hub import constants

    from dia2_trt.models.sources import hub_unreachable

    return bool(constants.HF_HUB_OFFLINE) or hub_unreachable() is not None


def _source_options(fn):
    fn = click.option("--tokenizer", help="Tokenizer directory or hub id, instead of the checkpoint's own.")(fn)
    fn = click.option("--mimi", help="Mimi codec directory or hub id, instead of the one the checkpoint names.")(fn)
    fn = click.option("--checkpoint", type=click.Path(),
                      help="Local checkpoint directory (config.json, model.safetensors, tokenizer).")(fn)
    return click.option("--size", type=click.Choice(SIZES, case_sensitive=False),
                        help="Model size: tiny (offline, random), 1B or 2B (Hugging Face).")(fn)


@click.group(cls=OneLineGroup)
def main() -> None:
    """Export Dia2 to ONNX / TensorRT artifacts and check them against PyTorch."""


@main.command()
@_source_options
@click.option("--precision", default="fp32", show_default=True, help=f"One of {', '.join(BUILD_PRECISIONS)}.")
@click.option("--block-size", type=int, help="int8/int4: weights per scale along the input axis "
              "(a power of two >= 16; default 64).")
@click.option("--from-artifacts", type=click.Path(), help="int8/int4: quantize this fp32 artifact directory "
              "instead of exporting the checkpoint again.")
@click.option("--out", "out", required=True, type=click.Path(), help="Artifact directory to create.")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, type=int)
@click.option("--prefix-frames", default=0, show_default=True, type=click.IntRange(0),
              help="Extra KV-cache frames reserved for an audio prefix.")
@click.option("--max-streams", default=DEFAULT_MAX_STREAMS, show_default=True,
              type=click.IntRange(1, MAX_STREAMS_LIMIT),
              help="Most streams one graph call serves (the runtime batches up to this many; "
                   "--from-artifacts keeps the source's).")
@click.option("--cache-dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="The KV cache's dtype (default: the precision's own). float16 halves what B streams' "
                   "caches hold; the attention still runs in fp32.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing artifact directory (never a directory without a dia2-trt manifest).")
@click.option("--verbose", is_flag=True, help="Show the exporters' own logs and warnings too.")
def build(size, checkpoint, mimi, tokenizer, precision, block_size, from_artifacts, out, opset, prefix_frames,
          max_streams, cache_dtype, overwrite, verbose):
    """Export the backbone, depformer and codec graphs with a manifest."""
    if from_artifacts and (size or checkpoint or mimi or tokenizer):
        fail("give --from-artifacts or a checkpoint (--size/--checkpoint/--mimi/--tokenizer), not both")
    # Offline, a hub checkpoint can only come from the cache: look there before the seconds of
    # importing torch, so "not in the cache" is the first thing said, not the last.
    source = (size, checkpoint, mimi, tokenizer)
    early = _checkpoint_files(*source) if not from_artifacts and _hub_offline(size) else None
    from .build import BuildOptions, build_artifacts, check_request, quantize_artifacts
    from .console import BuildProgress, quiet_descriptors

    options = BuildOptions(precision=precision, opset=opset, prefix_frames=prefix_frames, overwrite=overwrite,
                           block_size=block_size, max_streams=max_streams, cache_dtype=cache_dtype)
    if from_artifacts:
        with quiet_descriptors(verbose) as console:
            progress = BuildProgress(console)
            manifest = quantize_artifacts(Path(from_artifacts), Path(out), options, progress=progress)
        click.echo(progress.summary(manifest, Path(out)), err=True)
        click.echo(str(out))
        return
    check_request(Path(out), options)  # before resolving the checkpoint, which may download it
    files = early or _checkpoint_files(*source)
    with quiet_descriptors(verbose) as console:
        progress = BuildProgress(console)
        manifest = build_artifacts(files, Path(out), options, progress=progress)
    click.echo(progress.summary(manifest, Path(out)), err=True)
    click.echo(str(out))


@main.command()
@click.argument("artifacts", type=click.Path())
@_source_options
@click.option("--steps", type=click.IntRange(1),
              help="Teacher-forced decode steps [default: 64; with --against, the whole script].")
@click.option("--codec-frames", default=320, show_default=True, type=click.IntRange(1))
@click.option("--report", type=click.Path(), help="Write the JSON report here (default: ARTIFACTS/validation.json).")
@click.option("--seed", default=0, show_default=True, type=int64_range())
@click.option("--against", "against", type=click.Path(),
              help="fp32 artifacts of the same checkpoint: report teacher-forced top-1 agreement instead.")
@click.option("--script", "script_file", type=click.Path(), help="With --against: the script to speak (a file).")
def validate(artifacts, size, checkpoint, mimi, tokenizer, steps, codec_frames, report, seed, against, script_file):
    """Compare every graph with PyTorch through Polygraphy (or, with --against, with fp32 artifacts);
    exit 1 past tolerance."""
    from .validate import validate_artifacts

    if against:
        return _accuracy(Path(artifacts), Path(against), script_file, report, steps)
    steps = steps or 64
    path = Path(report) if report else Path(artifacts) / "validation.json"
    if report or Path(artifacts).is_dir():  # a missing ARTIFACTS is validate's own one-line error
        _check_report(path, [artifacts], "validation.json")  # before minutes of comparisons, not after
    source = _checkpoint_files(size, checkpoint, mimi, tokenizer) if (size or checkpoint) else None
    if source is not None:
        from .build import source_dirs

        _check_report(path, [artifacts], "validation.json",
                      protected=[("checkpoint directory", d) for d in source_dirs(source)])
    result = validate_artifacts(Path(artifacts), source, steps=steps, codec_frames=codec_frames, seed=seed,
                                echo=lambda msg: click.echo(msg, err=True))
    _write_atomic(path, json.dumps(result, indent=1) + "\n")
    click.echo(f"report: {path}", err=True)
    _verdict(result["passed"], f"{artifacts} vs PyTorch", ", ".join(result["failures"]))
    if not result["passed"]:
        fail("validation failed: " + ", ".join(result["failures"]))


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

    if timing_cache:  # read and rewritten: it must not be (or replace) a file of the artifacts
        check_outputs({"--timing-cache": timing_cache}, inputs=_artifact_files(Path(artifacts)))
    available, reason = have_gpu_tensorrt()
    if not available:
        fail(f"cannot build TensorRT engines here: {reason}")
    options = EngineOptions(workspace_gib=workspace_gib, timing_cache=Path(timing_cache) if timing_cache else None)
    built = build_engines(Path(artifacts), tuple(g.strip() for g in graphs.split(",") if g.strip()), options,
                          validate=not no_validate, echo=lambda msg: click.echo(msg, err=True))
    failed = [name for name, e in built.items() if e.validation and not e.validation.passed]
    if failed:
        fail("engines differ from ONNX Runtime beyond tolerance: " + ", ".join(failed))


def _accuracy(artifacts: Path, against: Path, script_file, report, steps: int | None) -> None:
    from .accuracy import DEFAULT_SCRIPT, accuracy_report, summary_lines

    script = read_script(None, script_file).strip() if script_file else DEFAULT_SCRIPT
    path = Path(report) if report else artifacts / "accuracy.json"
    if report or artifacts.is_dir():
        _check_report(path, [artifacts, against], "accuracy.json", inputs=[("--script file", script_file)])
    result = accuracy_report(artifacts, against, script, max_steps=steps, echo=lambda msg: click.echo(msg, err=True))
    for line in summary_lines(result):
        click.echo(line, err=True)
    _write_atomic(path, json.dumps(result, indent=1) + "\n")
    click.echo(f"report: {path}", err=True)
    _verdict(result["passed"], f"{result['precision']} {artifacts} vs fp32 {against}", "; ".join(result["failures"]))
    if not result["passed"]:
        fail("accuracy below the thresholds: " + "; ".join(result["failures"]))


@main.command()
@_source_options
@click.option("--input", "input_file", required=True, type=click.Path(), help="Script file ('-' for stdin).")
@click.option("--temperature", type=FiniteFloat(min=0), help="Both streams (default: text 0.6, audio 0.8).")
@click.option("--top-k", default=50, show_default=True, type=int64_range())
@click.option("--cfg", "cfg_scale", default=2.0, show_default=True, type=FiniteFloat(min=0, min_open=True))
@click.option("--cfg-filter-k", default=50, show_default=True, type=int64_range())
@click.option("--seed", default=0, show_default=True, type=int64_range())
@click.option("--tokens-out", required=True, type=click.Path(), help="JSON with aligned tokens and word timestamps.")
@click.option("--out", "wav_out", type=click.Path(),
              help="Also decode to audio (.wav, .flac, .ogg) with transformers' Mimi.")
def reference(size, checkpoint, mimi, tokenizer, input_file, temperature, top_k, cfg_scale, cfg_filter_k, seed,
              tokens_out, wav_out):
    """Generate with the eager PyTorch reference loop."""
    from dia2_trt.runtime.params import GenerationParams

    from .build import source_dirs

    if wav_out and Path(wav_out).suffix.lower() not in AUDIO_FORMATS:
        fail(f"{wav_out}: unknown audio format (use .wav, .flac or .ogg)")
    text = read_script(None, input_file, stdin_dash=True).strip()
    params = GenerationParams.from_options(seed=seed, temperature=temperature, top_k=top_k, cfg_scale=cfg_scale,
                                           cfg_filter_k=cfg_filter_k)
    names = {"--tokens-out": tokens_out, "--out": wav_out}
    inputs = [("script --input", input_file)]
    check_outputs(names, inputs=inputs)
    files = _checkpoint_files(size, checkpoint, mimi, tokenizer)
    outputs = check_outputs(names, protected=[("checkpoint directory", d) for d in source_dirs(files)], inputs=inputs)
    from .reference_run import run_reference

    result, pcm, rate = run_reference(files, text, params, decode=wav_out is not None)
    document = json.dumps({"tokens": result.tokens.tolist(),
                           "timestamps": [[w, s] for w, s in result.timestamps]}) + "\n"
    items: list[tuple[Path, Callable[[str], object]]] = [
        (outputs["--tokens-out"], lambda tmp: Path(tmp).write_text(document, encoding="utf-8"))]
    if wav_out:
        assert pcm is not None  # decoded: decode=wav_out is not None
        items.append((outputs["--out"], audio_writer(outputs["--out"], pcm, rate)))
    write_together(items)
    click.echo(f"{result.frames} frames, {result.tokens.shape[1]} aligned", err=True)


def _verdict(passed: bool, what: str, failures: str) -> None:
    """The one line a script or a person looks for, on stdout (the progress and details are on stderr)."""
    click.echo(f"PASS: {what}" if passed else f"FAIL: {what}: {failures}")


def _check_report(path: Path, artifact_dirs, default: str, protected=(), inputs=()) -> None:
    """A report may be its default file in an artifact directory but never replace any other file
    there (the manifest, a graph...), nor any other input."""
    files = [f for d in artifact_dirs for f in files_under("artifact", d, keep=[Path(d) / default])]
    check_outputs({"--report": str(path)}, protected=protected, inputs=[*inputs, *files])


def _artifact_files(directory: Path) -> list[tuple[str, Path]]:
    """The files an artifact directory consists of (its manifest, what that names, the stamps); every
    file in it when the manifest cannot be read."""
    from dia2_trt.runtime.artifacts import MANIFEST, STAMP, checked_files, load_manifest

    try:
        manifest = load_manifest(directory, verify=False)
    except ValueError:
        return files_under("artifact", directory)
    named = [directory / MANIFEST, directory / STAMP, *(path for path, _ in checked_files(manifest))]
    named += [path for g in manifest.graphs.values() if (path := g.engine_path) is not None]
    return [("artifact file", path) for path in named]


def _write_atomic(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    try:
        write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # after minutes of validating: say what is needed
            fail(f"cannot write {path}: no space left on device (the report needs {len(data)} bytes in {path.parent})")
        raise
