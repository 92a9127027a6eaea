"""HTTP routes: the OpenAI-compatible speech endpoint, the model and voice lists, health, metrics.

The lists are what OpenAI clients read before they speak: ``GET /v1/models`` (the SDK's
``models.list()``), ``/v1/audio/models`` and ``/v1/audio/voices`` (Open WebUI's TTS settings).

``POST /v1/audio/speech`` answers only once the request is sure to produce audio
(its first chunk exists), so every refusal is a proper status with OpenAI's
error body: 400 bad input, 408 body too slow, 413 body too large, 415 not
``application/json`` (a web page's form or ``text/plain`` POST is a "simple"
cross-origin request that no CORS preflight stops: it must not drive the server),
503 + Retry-After when every worker is busy and the queue is full, 500 when
generation itself fails. A refused request's connection is closed: its body may
still be on the way. After
that the audio streams as frames complete (chunked body, or SSE events in
OpenAI's shape with ``stream_format: "sse"``). A client that disconnects
cancels its generation at the next frame.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from .. import ScriptError
from .audio import AudioFormat, encode_whole, wav_header
from .schema import RequestError, SpeechRequest, error_body, parse_json, validate
from .voices import DEFAULT, OPENAI_VOICES, VoiceRegistryError
from .workers import Busy, Chunk, Failed, Finished, Job

log = logging.getLogger("dia2_trt.serve")
router = APIRouter()
SPEECH = "speech"


class StreamAborted(Exception):
    """Generation failed after the audio started: the chunked body is cut off, not ended cleanly."""


class ClientGone(Exception):
    """The client hung up while its request was being read: nobody to answer."""


@router.post("/v1/audio/speech")
async def speech(request: Request) -> Response:
    state = request.app.state.serve
    require_json(request)
    raw = await read_body(request, state.config.max_body_bytes, state.config.body_timeout)
    body, fmt, plan = await state.offload(_plan_speech, state, raw)
    job = state.admit(plan)
    first = await first_event(job, request)
    if first is None:  # the client left before any audio
        state.metrics.outcome(SPEECH, "cancelled")
        return Response(status_code=499)
    if isinstance(first, Failed):
        return failure_response(state, first)
    headers = {**_NO_BUFFERING, **_ignored_header(body)}
    if body.stream_format == "sse":
        stream = sse_body(state, job, first, fmt, plan.input_tokens)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    return StreamingResponse(audio_body(state, job, first, fmt), media_type=fmt.media_type, headers=headers)


_NO_BUFFERING = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
IGNORED_HEADER = "X-Dia2-Ignored"


def _ignored_header(body: SpeechRequest) -> dict[str, str]:
    """OpenAI clients send ``instructions`` unasked (Open WebUI, the SDK's examples): serve them, and
    say in a header that it changed nothing."""
    ignored = body.ignored()
    return {IGNORED_HEADER: ", ".join(ignored)} if ignored else {}


def _plan_speech(state, raw: bytes):
    """Decode and check a speech request in full (on a parsing thread, not the event loop)."""
    body = validate(SpeechRequest, parse_json(raw))
    assert isinstance(body, SpeechRequest)  # validate returns an instance of the model it is given
    fmt = state.formats.get(body.response_format)
    if fmt is None:
        shown = body.response_format[:40]
        raise RequestError(f"response_format: {shown!r} is not served here; supported: "
                           f"{', '.join(state.formats)}", "response_format")
    return body, fmt, state.plan(body, body.input, count_tokens=body.stream_format == "sse")


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON: forms and text/plain are what a foreign page can send."""
    declared = request.headers.get("content-type", "")
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = f"{declared[:60]!r}" if declared else "none"
        raise RequestError(f"the body must be sent as Content-Type: application/json (got {shown})", status=415)


async def read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The body, refusing more than ``limit`` bytes without reading them all, or a body still
    arriving after ``seconds`` (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(f"the body is larger than this server's limit of {limit} bytes", status=413)
    try:
        return await asyncio.wait_for(_read_within(request, limit), seconds)
    except asyncio.TimeoutError:
        raise RequestError(f"the body did not arrive within this server's {seconds:g} s limit",
                           status=408) from None
    except ClientDisconnect:
        raise ClientGone() from None


async def _read_within(request: Request, limit: int) -> bytes:
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise RequestError(f"the body is larger than this server's limit of {limit} bytes", status=413)
        parts.append(part)
    return b"".join(parts)


async def first_event(job: Job, request: Request):
    """The job's first event, or None if the client disconnects first (the job is then cancelled)."""
    event = asyncio.ensure_future(job.next_event())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if event.done():
        return event.result()
    event.cancel()
    job.cancel()
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def failure_response(state, failed: Failed) -> JSONResponse:
    """A job that failed before its first audio, as a status and OpenAI's error body."""
    if failed.kind == "client":
        state.metrics.outcome(SPEECH, "client_error")
        return JSONResponse(error_body(failed.message, "input"), status_code=400)
    if failed.kind in ("timeout", "cancelled"):
        state.metrics.outcome(SPEECH, failed.kind)
        return JSONResponse(error_body(failed.message, kind="server_busy"), status_code=503,
                            headers={"Retry-After": str(state.pool.retry_after())})
    state.metrics.outcome(SPEECH, "error")
    return JSONResponse(error_body(failed.message, kind="server_error"), status_code=500)


async def _events(state, job: Job, first) -> AsyncIterator:
    """The job's events from ``first`` to its end; cancels the job if the consumer stops early."""
    finished = False
    try:
        event = first
        while True:
            if isinstance(event, (Finished, Failed)):
                finished = True  # recorded before the consumer sees it: it may stop right there
                _record(state, event)
                yield event
                return
            yield event
            event = await job.next_event()
    finally:
        if not finished:  # the client went away: free the worker at the next frame
            job.cancel()
            state.metrics.outcome(SPEECH, "cancelled")


def _record(state, event) -> None:
    if isinstance(event, Finished):
        state.metrics.finished(SPEECH, event)
    else:
        state.metrics.outcome(SPEECH, {"client": "client_error", "internal": "error"}.get(event.kind, event.kind))


async def audio_body(state, job: Job, first, fmt: AudioFormat) -> AsyncIterator[bytes]:
    if fmt.name == "wav":
        yield wav_header(state.sample_rate)
    async for event in _events(state, job, first):
        if isinstance(event, Chunk) and fmt.streams and event.audio:
            yield event.audio
        elif isinstance(event, Finished) and not fmt.streams:
            yield await asyncio.to_thread(encode_whole, fmt, event.result.pcm, state.sample_rate)
        elif isinstance(event, Failed):
            log.warning("speech stream cut off: %s", event.message)
            raise StreamAborted(event.message)


async def sse_body(state, job: Job, first, fmt: AudioFormat, input_tokens: int) -> AsyncIterator[str]:
    """OpenAI's speech events: ``speech.audio.delta`` (base64 audio) ... ``speech.audio.done`` (usage)."""
    header = wav_header(state.sample_rate) if fmt.name == "wav" else b""
    async for event in _events(state, job, first):
        if isinstance(event, Chunk) and fmt.streams and event.audio:
            yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(header + event.audio).decode()})
            header = b""
        elif isinstance(event, Finished):
            if not fmt.streams:
                data = await asyncio.to_thread(encode_whole, fmt, event.result.pcm, state.sample_rate)
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
            output = int(event.result.tokens.size)
            usage = {"input_tokens": input_tokens, "output_tokens": output, "total_tokens": input_tokens + output}
            yield _sse({"type": "speech.audio.done", "usage": usage})
        elif isinstance(event, Failed):
            yield _sse({"type": "error", **error_body(event.message, kind="server_error")})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    state = request.app.state.serve
    pool = state.pool
    status = "shutting_down" if pool.closing else "ok"
    return JSONResponse({"status": status, "workers": pool.workers, "busy": pool.busy, "queued": pool.waiting,
                         "max_queue": pool.max_queue, "sample_rate": state.sample_rate},
                        status_code=503 if pool.closing else 200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    content, media_type = request.app.state.serve.metrics.render()
    return Response(content, media_type=media_type)


@router.get("/v1/voices")
async def voices(request: Request) -> JSONResponse:
    return JSONResponse({"voices": request.app.state.serve.voices.listing()})


# Any model name is accepted (one model is served); these are the ones listed, so that clients which
# pick from /v1/models (Open WebUI, SillyTavern) offer Dia2 and the names OpenAI's own TTS uses.
MODEL_IDS = ("dia2", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")


def _model(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "dia2-trt"}


@router.get("/v1/models")
async def models() -> JSONResponse:
    """OpenAI's model list (``client.models.list()``)."""
    return JSONResponse({"object": "list", "data": [_model(m) for m in MODEL_IDS]})


@router.get("/v1/models/{model_id}")
async def model(model_id: str) -> JSONResponse:
    """Any name is served by the one model, so any name is found (``client.models.retrieve``)."""
    return JSONResponse(_model(model_id[:128]))


@router.get("/v1/audio/models")
async def audio_models() -> JSONResponse:
    """The TTS model list Open WebUI reads (``{"models": [{"id"}]}``)."""
    return JSONResponse({"models": [{"id": m, "name": m} for m in MODEL_IDS]})


@router.get("/v1/audio/voices")
async def audio_voices(request: Request) -> JSONResponse:
    """The voices a request may name, in the shape Open WebUI reads (``{"voices": [{"id", "name"}]}``):
    the registered voices, ``default``, and OpenAI's names (each an alias of ``default``)."""
    registry = request.app.state.serve.voices
    listed = [{"id": v["name"], "name": v["name"], "conditioned": v["conditioned"]} for v in registry.listing()]
    listed += [{"id": name, "name": name, "conditioned": False, "alias_of": DEFAULT}
               for name in sorted(OPENAI_VOICES)]
    return JSONResponse({"voices": listed})


def install_error_handlers(app) -> None:
    """Every refusal in OpenAI's error shape; Busy is 503 with Retry-After."""

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        request.app.state.serve.metrics.outcome(_endpoint(request), "client_error")
        # Unread body bytes may follow a 408/413/415: closing is the only way not to read them.
        return JSONResponse(error_body(str(exc), exc.param), status_code=exc.status, headers=_CLOSE)

    @app.exception_handler(VoiceRegistryError)
    async def _voice_error(request: Request, exc: VoiceRegistryError):
        request.app.state.serve.metrics.outcome(_endpoint(request), "client_error")
        return JSONResponse(error_body(str(exc), "voice"), status_code=400)

    @app.exception_handler(ScriptError)
    async def _script_error(request: Request, exc: ScriptError):
        request.app.state.serve.metrics.outcome(_endpoint(request), "client_error")
        return JSONResponse(error_body(str(exc), "input"), status_code=400)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        request.app.state.serve.metrics.outcome(_endpoint(request), "busy")
        return JSONResponse(error_body(str(exc), kind="server_busy"), status_code=503,
                            headers={"Retry-After": str(exc.retry_after)})


_CLOSE = {"Connection": "close"}


def _endpoint(request: Request) -> str:
    return SPEECH if request.url.path == "/v1/audio/speech" else request.url.path
