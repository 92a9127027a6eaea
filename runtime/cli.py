"""``dia2-rt``: speak a dialogue script with exported artifacts (no torch needed)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
import numpy as np

from .artifacts import ArtifactError
from .files import AUDIO_FORMATS, write_atomic, write_audio
from .backends import BACKEND_NAMES, create_backend
from .params import GenerationParams



class CliError(click.ClickException):
    """One line on stderr, exit status 1."""


class _Group(click.Group):
    """Every failure, usage errors included, is one ``Error: ...`` line (no usage dump).

    Commands in ``LAZY`` are imported only when run (or listed by --help): ``bench``
    pulls in the benchmark harness, which ``speak`` must not load.
    """

    LAZY = {"bench": ("dia2_trt.benchmarks.cli", "bench"), "serve": ("dia2_trt.runtime.serve.command", "serve")}

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx, name: str):
        if name in self.LAZY and name not in self.commands:
            import importlib

            module, attr = self.LAZY[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        sys.exit(code or 0)


@click.group(cls=_Group)
def main() -> None:
    """Torch-free Dia2 runtime."""


@main.command()
@click.argument("text", required=False)
@click.option("--input", "input_file", type=click.Path(dir_okay=False), help="Read the script from a file.")
@click.option("--artifacts", required=True, type=click.Path(), help="Artifact directory (dia2-export build).")
@click.option("--out", "out", required=True,
              help="Audio file (.wav, .flac, .ogg), or '-' for raw 16-bit PCM on stdout.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--temperature", type=click.FloatRange(min=0), help="Both streams' temperature (0 = greedy).")
@click.option("--text-temperature", type=click.FloatRange(min=0), help="Text-action temperature [0.6].")
@click.option("--audio-temperature", type=click.FloatRange(min=0), help="Audio-token temperature [0.8].")
@click.option("--top-k", default=50, show_default=True, type=click.IntRange(min=0), help="0 = no top-k cut.")
@click.option("--cfg", "cfg_scale", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Classifier-free guidance scale (1 = off).")
@click.option("--cfg-filter-k", default=50, show_default=True, type=click.IntRange(min=0))
@click.option("--timestamps-out", type=click.Path(dir_okay=False), help="JSON [[word, seconds], ...].")
@click.option("--tokens-out", type=click.Path(dir_okay=False),
              help="JSON {tokens, timestamps}, as dia2-export reference.")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads per graph [1].")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKEND_NAMES))
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--no-verify", is_flag=True, help="Skip the artifact files' checksums (seconds for the 2B).")
def speak(text, input_file, artifacts, out, seed, temperature, text_temperature, audio_temperature, top_k,
          cfg_scale, cfg_filter_k, timestamps_out, tokens_out, threads, backend, quiet, no_verify) -> None:
    """Speak TEXT (or --input FILE, or stdin) into --out."""
    script = _read_script(text, input_file)
    from .script import ScriptError, check_script

    try:
        check_script(script)  # before the (slow) artifact load
    except ScriptError as exc:
        raise CliError(str(exc)) from None
    params = _params(seed, temperature, text_temperature, audio_temperature, top_k, cfg_scale, cfg_filter_k)
    target = _check_out(out)
    for path in (timestamps_out, tokens_out):
        if path:
            _check_out_dir(Path(path))
    from .engine import Dia2Runtime, TruncationWarning

    try:
        engine = create_backend(backend, threads)
    except (ImportError, ValueError) as exc:
        raise CliError(f"backend {backend} cannot run here: {exc}") from None
    try:
        runtime = Dia2Runtime.load(artifacts, backend=engine, verify=not no_verify)
        bar = _ProgressBar() if not quiet and sys.stderr.isatty() else None
        session = runtime.stream(script, params, progress=bar)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            result = _generate(session, target, runtime.sample_rate)
        if bar is not None:
            bar.finish()
    except (ArtifactError, ScriptError) as exc:
        raise CliError(str(exc)) from None
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    _write_sidecars(result, timestamps_out, tokens_out)
    if not quiet:
        _summary(result)


def _write_sidecars(result, timestamps_out: str | None, tokens_out: str | None) -> None:
    stamps = [[word, seconds] for word, seconds in result.timestamps]
    if timestamps_out:
        _write_text(Path(timestamps_out), json.dumps(stamps) + "\n")
    if tokens_out:
        _write_text(Path(tokens_out), json.dumps({"tokens": result.tokens.tolist(), "timestamps": stamps}) + "\n")


def _read_script(text: str | None, input_file: str | None) -> str:
    if text is not None and input_file is not None:
        raise CliError("give the script as an argument or with --input, not both")
    if input_file is not None:
        try:
            return Path(input_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {input_file}: {getattr(exc, 'strerror', None) or exc}") from None
    if text is not None:
        return text
    if sys.stdin is None or sys.stdin.isatty():
        raise CliError("no script: pass TEXT, --input FILE, or pipe it on stdin")
    return sys.stdin.read()


def _params(seed, temperature, text_temperature, audio_temperature, top_k, cfg_scale, cfg_filter_k):
    defaults = GenerationParams()
    try:
        return GenerationParams(
            text_temperature=_first(text_temperature, temperature, defaults.text_temperature),
            audio_temperature=_first(audio_temperature, temperature, defaults.audio_temperature),
            text_top_k=top_k, audio_top_k=top_k, cfg_scale=cfg_scale, cfg_filter_k=cfg_filter_k, seed=seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _first(*values):
    return next(v for v in values if v is not None)


def _check_out(out: str) -> Path | None:
    """None means stdout; a path must have a known extension and a writable directory."""
    if out == "-":
        return None
    path = Path(out)
    if path.suffix.lower() not in AUDIO_FORMATS:
        raise CliError(f"{out}: unknown audio format (use .wav, .flac or .ogg, or '-' for raw PCM)")
    _check_out_dir(path)
    return path


def _check_out_dir(path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise CliError(f"{path}: directory {parent} does not exist")
    if path.is_dir():
        raise CliError(f"{path} is a directory")


def _generate(session, target: Path | None, rate: int):
    """Raw PCM goes to stdout chunk by chunk; a file is written whole, atomically, at the end."""
    if target is None:
        stdout = sys.stdout.buffer
        for chunk in session:
            stdout.write(_pcm16(chunk.pcm))
            stdout.flush()
    else:
        for _ in session:
            pass
    result = session.result
    if target is not None:
        _write_audio(target, result.pcm, rate)
    return result


def _pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def _write_audio(path: Path, pcm: np.ndarray, rate: int) -> None:
    try:
        write_audio(path, pcm, rate)
    except Exception as exc:  # OSError, or soundfile's own error types
        raise CliError(f"cannot write {path}: {exc}") from None


def _write_text(path: Path, text: str) -> None:
    try:
        write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc}") from None


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
    first = f"{result.first_audio_seconds:.2f}s" if result.first_audio_seconds is not None else "n/a"
    click.echo(f"{result.audio_seconds:.2f}s audio in {result.wall_seconds:.2f}s wall "
               f"(RTF {result.real_time_factor:.3f}), first audio after {first}"
               + (" [truncated]" if result.truncated else ""), err=True)

