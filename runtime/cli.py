"""``dia2-rt``: speak a dialogue script with exported artifacts (no torch needed)."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import click
import numpy as np

from .audio import pcm16
from .backends import BACKEND_NAMES, create_backend
from .cli_common import (
    FiniteFloat,
    OneLineGroup,
    check_outputs,
    fail,
    int64_range,
    read_script,
    silence_stdout,
    threads_option,
)
from .files import AUDIO_FORMATS, audio_writer, write_together
from .params import MAX_CHUNK_FRAMES, Chunking, GenerationParams
from .voice_cli import check_prefix_args, load_prefix, prefix_inputs, prefix_options


class _Group(OneLineGroup):
    """Commands in ``LAZY`` are imported only when run (or listed by --help): ``bench``
    pulls in the benchmark harness, which ``speak`` must not load."""

    LAZY = {"bench": ("dia2_trt.benchmarks.cli", "bench"), "voice": ("dia2_trt.runtime.voice_cli", "voice"),
            "serve": ("dia2_trt.runtime.serve.command", "serve"), "demo": ("dia2_trt.runtime.demo", "demo"),
            "triton-repo": ("dia2_trt.runtime.triton.command", "triton_repo"),
            "triton-serve": ("dia2_trt.runtime.triton.command", "triton_serve")}

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx, name: str):
        if name in self.LAZY and name not in self.commands:
            import importlib

            module, attr = self.LAZY[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=_Group)
def main() -> None:
    """Torch-free Dia2 runtime."""


@main.command()
@click.argument("text", required=False)
@click.option("--input", "input_file", type=click.Path(dir_okay=False), help="Read the script from a file.")
@click.option("--artifacts", required=True, type=click.Path(), help="Artifact directory (dia2-export build).")
@click.option("--out", "out", required=True,
              help="Audio file (.wav, .flac, .ogg, .mp3, .opus), or '-' for raw 16-bit PCM on stdout.")
@click.option("--seed", default=0, show_default=True, type=int64_range())
@click.option("--temperature", type=FiniteFloat(min=0), help="Both streams' temperature (0 = greedy).")
@click.option("--text-temperature", type=FiniteFloat(min=0), help="Text-action temperature [0.6].")
@click.option("--audio-temperature", type=FiniteFloat(min=0), help="Audio-token temperature [0.8].")
@click.option("--top-k", default=50, show_default=True, type=int64_range(), help="0 = no top-k cut.")
@click.option("--cfg", "cfg_scale", default=2.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Classifier-free guidance scale (1 = off).")
@click.option("--cfg-filter-k", default=50, show_default=True, type=int64_range())
@click.option("--first-chunk-frames", default=1, show_default=True, type=click.IntRange(1, MAX_CHUNK_FRAMES),
              help="Frames (80 ms each) in the first audio chunk written to '--out -'.")
@click.option("--chunk-frames", default=1, show_default=True, type=click.IntRange(1, MAX_CHUNK_FRAMES),
              help="Frames in each later chunk written to '--out -'.")
@click.option("--timestamps-out", type=click.Path(dir_okay=False), help="JSON [[word, seconds], ...].")
@click.option("--tokens-out", type=click.Path(dir_okay=False),
              help="JSON {tokens, timestamps}, as dia2-export reference.")
@threads_option()
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKEND_NAMES))
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--no-verify", is_flag=True, help="Skip the artifact files' checksums (seconds for the 2B).")
@prefix_options
def speak(text, input_file, artifacts, out, seed, temperature, text_temperature, audio_temperature, top_k,
          cfg_scale, cfg_filter_k, first_chunk_frames, chunk_frames, timestamps_out, tokens_out, threads, backend,
          quiet, no_verify, prefix_args) -> None:
    """Speak TEXT (or --input FILE, or stdin) into --out.

    Every output is checked before the (slow) load and written at the end, all
    together or none: a failed run leaves no file behind.
    """
    script = read_script(text, input_file)
    check_prefix_args(prefix_args)
    params = GenerationParams.from_options(seed=seed, temperature=temperature, text_temperature=text_temperature,
                                           audio_temperature=audio_temperature, top_k=top_k, cfg_scale=cfg_scale,
                                           cfg_filter_k=cfg_filter_k)
    if out != "-" and Path(out).suffix.lower() not in AUDIO_FORMATS:
        _check_encoded_format(out)
    outputs = check_outputs({"--out": None if out == "-" else out, "--timestamps-out": timestamps_out,
                             "--tokens-out": tokens_out}, protected=[("artifact directory", Path(artifacts))],
                            inputs=[("script --input", input_file), *prefix_inputs(prefix_args)])
    from .runtime import Dia2Runtime, TruncationWarning

    try:
        backend = create_backend(backend, threads)
    except (ImportError, ValueError) as exc:
        fail(f"backend {backend} cannot run here: {exc}")
    runtime = Dia2Runtime.load(artifacts, backend=backend, verify=not no_verify, max_streams=1)
    prefix = load_prefix(runtime, prefix_args)
    bar = _ProgressBar() if not quiet and sys.stderr.isatty() else None
    session = runtime.stream(script, params, progress=bar, prefix=prefix, prefill=not prefix_args["step_warmup"],
                             chunking=Chunking(first_chunk_frames, chunk_frames))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        result = _generate(session, out == "-")
    if bar is not None:
        bar.finish()
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    _write_outputs(outputs, result, runtime.sample_rate)
    if not quiet:
        _summary(result)
        _noise_note(runtime.manifest.source, result)


def _generate(session, to_stdout: bool):
    """Raw PCM goes to stdout chunk by chunk; files are written at the end (``_write_outputs``)."""
    for chunk in session:
        if to_stdout:
            _write_stdout(pcm16(chunk.pcm))
    return session.result


def _write_stdout(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except OSError as exc:
        silence_stdout()  # the unwritten rest would fail again in the interpreter's exit flush
        reason = "the reader closed it" if isinstance(exc, BrokenPipeError) else exc.strerror or str(exc)
        fail(f"cannot write audio to stdout: {reason}")


def _write_outputs(outputs: dict[str, Path], result, rate: int) -> None:
    stamps = [[word, seconds] for word, seconds in result.timestamps]
    documents = {"--timestamps-out": stamps, "--tokens-out": {"tokens": result.tokens.tolist(), "timestamps": stamps}}
    items = [(path, _audio_writer(path, result.pcm, rate) if option == "--out" else _json_writer(documents[option]))
             for option, path in outputs.items()]
    try:
        write_together(items)
    except Exception as exc:  # OSError, or soundfile's own error types
        fail(f"cannot write {', '.join(str(p) for p in outputs.values())}: {getattr(exc, 'strerror', None) or exc}")


# The server's whole-file encoders (runtime/serve/audio.py: libsndfile's MP3 and Ogg Opus, the same
# int16 rounding as every other output), by file extension.
_ENCODED = {".mp3": "mp3", ".opus": "opus"}


def _check_encoded_format(out: str) -> None:
    from .serve.audio import available_formats

    name = _ENCODED.get(Path(out).suffix.lower())
    if name is None:
        fail(f"{out}: unknown audio format (use .wav, .flac, .ogg, .mp3 or .opus, or '-' for raw PCM)")
    if name not in available_formats():
        import soundfile as sf

        fail(f"{out}: this machine's libsndfile ({sf.__libsndfile_version__}) cannot encode {name}; "
             "use .wav, .flac or .ogg")


def _audio_writer(path: Path, pcm, rate: int):
    name = _ENCODED.get(Path(path).suffix.lower())
    if name is None:
        return audio_writer(path, pcm, rate)
    from .serve.audio import FORMATS, encode_whole

    data = encode_whole(FORMATS[name], pcm, rate)
    return lambda tmp: Path(tmp).write_bytes(data)


def _noise_note(source, result) -> None:
    """Say so when the audio is noise because the weights are random: a new user's first WAV (the tiny
    checkpoint, README step 1) has a quarter of its samples at full scale and sounds broken otherwise."""
    pcm = result.pcm
    clipped = float(np.mean(np.abs(pcm) >= 0.999)) if len(pcm) else 0.0
    tiny = _random_checkpoint(source)
    if tiny or clipped >= 0.05:
        why = ("these artifacts come from the tiny checkpoint, random weights" if tiny
               else f"{clipped:.0%} of the samples are at full scale, as random weights give")
        click.echo(f"note: expect noise: {why}; for speech build --size 1B or --size 2B", err=True)


def _random_checkpoint(source) -> bool:
    """The tiny checkpoint: built by models/tiny.py into the cache as tiny-v<format>-seed<seed>
    (``--size tiny``), or the committed fixture, whose source names no checkpoint or repo at all."""
    if source.repo_id is not None:
        return False
    if source.checkpoint is None:
        return source.mimi is None
    return re.fullmatch(r"tiny-v\d+-seed\d+", Path(source.checkpoint).name) is not None


def _json_writer(document):
    text = json.dumps(document) + "\n"
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")


class _ProgressBar:
    """A words-spoken bar on stderr, redrawn in place (only on a terminal, like click's own bars)."""

    def __init__(self) -> None:
        self._shown = (-1, -1)

    def __call__(self, p) -> None:
        # Redraw when a word starts or every 25 frames: a terminal write per frame costs real time.
        key = (p.words_done, p.frame // 25)
        if key == self._shown:
            return
        self._shown = key
        total = max(p.words_total, 1)
        filled = int(24 * min(p.words_done, total) / total)
        click.echo(f"\r[{'#' * filled}{'.' * (24 - filled)}] {p.words_done}/{p.words_total} words, "
                   f"{p.frame} frames", err=True, nl=False)

    def finish(self) -> None:
        if self._shown != (-1, -1):
            click.echo("", err=True)


def _summary(result) -> None:
    first = "n/a"
    if result.first_audio_seconds is not None:
        # in frame-times too: the part of first audio that is the codebook delays, not a slow frame
        frame = result.wall_seconds / result.frames if result.frames else 0.0
        first = f"{result.first_audio_seconds * 1e3:.0f} ms" + (
            f" ({result.first_audio_seconds / frame:.1f} frame-times)" if frame > 0 else "")
    click.echo(f"{result.audio_seconds:.2f}s audio in {result.wall_seconds:.2f}s wall "
               f"(RTF {result.real_time_factor:.3f}), first audio after {first}"
               + (" [truncated]" if result.truncated else ""), err=True)

