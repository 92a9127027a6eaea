"""The ``dia2-rt serve`` command. The web stack is imported only when the command runs."""

from __future__ import annotations

import ipaddress
import signal
import warnings

import click

from ..backends import BACKEND_NAMES
from ..cli_common import FiniteFloat, threads_option
from ..script import MAX_SCRIPT_CHARS
from .voices import VoiceRegistry, VoiceRegistryError

# Upper bounds: past these a value is a typo, and some (threads, bytes) would be a resource sink.
_DAY = 86_400.0
_MAX_BODY_BYTES = 64 * 1024 * 1024


@click.command()
@click.option("--artifacts", required=True, type=click.Path(), help="Artifact directory (dia2-export build).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Utterances generated at once, each stepped on its own (without --max-streams).")
@click.option("--max-streams", default=None, type=click.IntRange(1, 64),
              help="Utterances generated at once in one batch: every frame of all of them in one graph call "
                   "per graph (at most the artifacts' max_streams). Replaces --workers.")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, 10_000),
              help="Requests that may wait for a worker; past that, 503 with Retry-After.")
@click.option("--voice", "voice_options", multiple=True, metavar="NAME=FILE",
              help="Register a voice file under NAME (repeatable).")
@click.option("--request-timeout", default=120.0, show_default=True, type=FiniteFloat(1, _DAY),
              help="Seconds a request may take from admission to its last audio.")
@click.option("--max-input-chars", default=4096, show_default=True, type=click.IntRange(1, MAX_SCRIPT_CHARS),
              help="Longest script a request may send.")
@click.option("--max-body-bytes", default=64 * 1024, show_default=True, type=click.IntRange(1024, _MAX_BODY_BYTES),
              help="Largest HTTP body and WebSocket message.")
@click.option("--max-connections", default=128, show_default=True, type=click.IntRange(1, 100_000),
              help="Open connections (HTTP and WebSocket); past that, 503 and the connection is closed.")
@click.option("--header-timeout", default=10.0, show_default=True, type=FiniteFloat(0.1, 3600),
              help="Seconds a client may take to send a request's headers.")
@click.option("--body-timeout", default=30.0, show_default=True, type=FiniteFloat(0.1, 3600),
              help="Seconds a client may take to send a request's body (408 past it).")
@click.option("--idle-timeout", default=10.0, show_default=True, type=FiniteFloat(0.1, 3600),
              help="Seconds a WebSocket may wait before its start message, then before its first text "
                   "(it holds no worker meanwhile).")
@click.option("--max-messages", default=10_000, show_default=True, type=click.IntRange(2, 10_000_000),
              help="Messages one WebSocket stream may send, empty ones included.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="A web origin (https://app.example) whose pages may call this server, besides its own "
                   "(repeatable; '*' for any).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="A Host name to answer besides IP addresses and localhost, e.g. behind a proxy "
                   "(repeatable; '*' for any).")
@click.option("--api-key", envvar="DIA2_API_KEY", show_envvar=True, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /healthz (401 otherwise). Prefer the "
                   "environment variable: a command line is visible to every user of the machine.")
@click.option("--cors-origins", "cors_origins", multiple=True, metavar="ORIGIN[,ORIGIN...]",
              help="Web origins (https://app.example) whose pages may call the API from a browser: CORS headers "
                   "for them (repeatable or comma-separated; '*' for any). Off by default.")
@click.option("--shutdown-grace", default=10.0, show_default=True, type=FiniteFloat(0, 3600),
              help="Seconds in-flight streams get to finish on shutdown before they are cancelled.")
@threads_option()
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKEND_NAMES))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(artifacts, host, port, workers, max_streams, max_queue, voice_options, request_timeout, max_input_chars,
          max_body_bytes, max_connections, header_timeout, body_timeout, idle_timeout, max_messages,
          allow_origins, allow_hosts, api_key, cors_origins, shutdown_grace, threads, backend, log_level) -> None:
    """Serve speech: POST /v1/audio/speech (OpenAI-compatible), WebSocket /v1/stream, a page at /."""
    try:
        import uvicorn

        from .app import ServeConfig, create_app
        from .guard import EdgeLimits, ListenError, OriginPolicy, listen, uvicorn_config
        from .workers import Limits
    except ImportError as exc:
        raise click.ClickException(f"dia2-rt serve needs the [serve] extra (pip install 'dia2-trt[serve]'): "
                                   f"{exc}") from None
    api_key, cors = _access(api_key, cors_origins)
    try:
        sock = listen(host, port)  # before the artifacts load: a busy port fails at once
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None
    with sock:  # closed on every way out, a failed start included
        slots = _load(artifacts, workers, max_streams, backend, threads)
        voices = _voices(voice_options, slots[0])
        config = ServeConfig(max_queue=max_queue, limits=Limits(request_timeout, max_input_chars, idle_timeout),
                             max_body_bytes=max_body_bytes, max_messages=max_messages,
                             body_timeout=body_timeout, shutdown_grace=shutdown_grace,
                             origins=OriginPolicy(host, allow_hosts, allow_origins), api_key=api_key,
                             cors_origins=cors)
        app = create_app(slots, config, voices)
        if not _loopback(host) and api_key is None:
            click.echo(f"warning: serving on {host}, reachable from other machines, with no authentication",
                       err=True)
        edge = EdgeLimits(max_connections, header_timeout, body_timeout)
        server = uvicorn.Server(uvicorn_config(app, edge, log_level=log_level, ws_max_size=max_body_bytes,
                                               timeout_graceful_shutdown=shutdown_grace, timeout_keep_alive=5))
        # SIGTERM is the server's normal stop: uvicorn drains the requests, then re-raises the signal
        # it caught, which (as before dia2-rt's own handler) ends the process as SIGTERM does.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        server.run(sockets=[sock])


def _access(api_key: str | None, cors_options) -> tuple[str | None, tuple[str, ...]]:
    """The checked API key (None: no key) and CORS origins; a bad value is a usage error (exit 2)."""
    from .guard import check_api_key

    if api_key is not None:
        try:
            check_api_key(api_key)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--api-key") from None
    cors = tuple(o.strip() for option in cors_options for o in option.split(",") if o.strip())
    for origin in cors:
        if origin != "*" and not (origin.startswith(("http://", "https://")) and "/" not in origin.split("//", 1)[1]):
            raise click.BadParameter(f"{origin[:100]!r} is not an origin: scheme://host[:port], or '*'",
                                     param_hint="--cors-origins")
    return api_key, cors


def _voices(options, runtime) -> VoiceRegistry:
    """Each ``--voice NAME=FILE`` loaded and checked against these artifacts now, not at its first request."""
    from ..voice import load_voice

    def load(path):
        voice = load_voice(path)
        runtime.prefix(voice)  # refuses a voice made for other artifacts, or too long for the context
        return voice

    try:
        return VoiceRegistry.from_options(list(options), loader=load)
    except VoiceRegistryError as exc:
        raise click.ClickException(str(exc)) from None


def _load(artifacts: str, workers: int, max_streams: int | None, backend: str, threads: int | None) -> list:
    """One loaded runtime, once per worker slot: the weights load once. With ``max_streams`` the runtime
    steps that many sessions as one batch and each worker thread only feeds its session and reads its
    chunks; without it, each of ``workers`` sessions is stepped alone in its worker's thread."""
    from .. import ArtifactError, Dia2Runtime, TruncationWarning

    warnings.simplefilter("ignore", TruncationWarning)  # each result says truncated=..., per request
    try:
        runtime = Dia2Runtime.load(artifacts, backend=backend, threads=threads, max_streams=max_streams or 1)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from None
    except (ImportError, ValueError) as exc:
        raise click.ClickException(f"backend {backend} cannot run here: {exc}") from None
    return [runtime] * (max_streams or workers)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
