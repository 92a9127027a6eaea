"""The ``dia2-rt serve`` command. The web stack is imported only when the command runs."""

from __future__ import annotations

import ipaddress
import warnings

import click

from ..backends import BACKEND_NAMES
from .voices import VoiceError, VoiceRegistry


@click.command()
@click.option("--artifacts", required=True, type=click.Path(), help="Artifact directory (dia2-export build).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Utterances generated at once.")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, 10_000),
              help="Requests that may wait for a worker; past that, 503 with Retry-After.")
@click.option("--voice", "voice_options", multiple=True, metavar="NAME=FILE",
              help="Register a voice file under NAME (repeatable).")
@click.option("--request-timeout", default=120.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds a request may take from admission to its last audio.")
@click.option("--max-input-chars", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Longest script a request may send.")
@click.option("--max-body-bytes", default=64 * 1024, show_default=True, type=click.IntRange(min=1024),
              help="Largest HTTP body and WebSocket message.")
@click.option("--shutdown-grace", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds in-flight streams get to finish on shutdown before they are cancelled.")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads per graph [1].")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKEND_NAMES))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(artifacts, host, port, workers, max_queue, voice_options, request_timeout, max_input_chars,
          max_body_bytes, shutdown_grace, threads, backend, log_level) -> None:
    """Serve speech: POST /v1/audio/speech (OpenAI-compatible), WebSocket /v1/stream, a page at /."""
    try:
        import uvicorn

        from .app import ServeConfig, create_app
        from .workers import Limits
    except ImportError as exc:
        raise click.ClickException(f"dia2-rt serve needs the [serve] extra (pip install 'dia2-trt[serve]'): "
                                   f"{exc}") from None
    slots = _load(artifacts, workers, backend, threads)
    voices = _voices(voice_options, slots[0])
    config = ServeConfig(max_queue=max_queue, limits=Limits(request_timeout, max_input_chars),
                         max_body_bytes=max_body_bytes, max_message_bytes=max_body_bytes,
                         shutdown_grace=shutdown_grace)
    app = create_app(slots, config, voices)
    if not _loopback(host):
        click.echo(f"warning: serving on {host}, reachable from other machines, with no authentication", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=max_body_bytes,
                timeout_graceful_shutdown=shutdown_grace, timeout_keep_alive=5)


def _voices(options, runtime) -> VoiceRegistry:
    """Each ``--voice NAME=FILE`` loaded and checked against these artifacts now, not at its first request."""
    from ..voice import load_voice

    def load(path):
        voice = load_voice(path)
        runtime.prefix(voice)  # refuses a voice made for other artifacts, or too long for the context
        return voice

    try:
        return VoiceRegistry.from_options(list(options), loader=load)
    except VoiceError as exc:
        raise click.ClickException(str(exc)) from None


def _load(artifacts: str, workers: int, backend: str, threads: int | None) -> list:
    """One loaded runtime, once per worker slot: sessions own their state, so the weights load once."""
    from .. import ArtifactError, Dia2Runtime, TruncationWarning

    warnings.simplefilter("ignore", TruncationWarning)  # each result says truncated=..., per request
    try:
        runtime = Dia2Runtime.load(artifacts, backend=backend, threads=threads)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from None
    except (ImportError, ValueError) as exc:
        raise click.ClickException(f"backend {backend} cannot run here: {exc}") from None
    return [runtime] * workers


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
