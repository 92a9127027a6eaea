"""``/v1/stream``: text in as it is written, audio out as frames complete.

This is the runtime's incremental session (``open_session`` / ``feed`` / ``close``)
on a WebSocket. All client messages are JSON text frames:

1. ``{"type": "start", "voice"?, "voice_2"?, "seed"?, "temperature"?, "text_temperature"?,
   "audio_temperature"?, "top_k"?, "cfg_scale"?, "cfg_filter_k"?, "include_tokens"?}``
   first (within the server's idle timeout); the fields mean what they mean for
   ``POST /v1/audio/speech``.
2. ``{"type": "text", "text": "..."}`` any number of times: pieces of the script, in
   order, split anywhere (mid-word too). Generation waits for words that have not
   arrived rather than ending the utterance. The stream takes a worker only once its
   first non-empty text (or its end) arrives, which must be within the idle timeout.
3. ``{"type": "end"}``: no more text; the utterance finishes.

A stream may send at most the server's ``max_messages`` messages, empty ones included;
the request time limit and the shutdown grace apply however fast messages come.

The server sends:

- ``{"type": "ready", "sample_rate": 24000, "encoding": "pcm_s16le", "channels": 1}`` once admitted;
- binary frames: audio, signed 16-bit little-endian mono PCM, as frames complete;
- ``{"type": "words", "words": [{"word": "Hello", "start": 0.08}, ...]}`` after the audio
  frame in which those words start (``start``: seconds from the start of the audio);
- ``{"type": "done", "audio_seconds", "wall_seconds", "rtf", "ttfa", "queued_seconds",
  "frames", "truncated", "timestamps"[, "tokens"]}`` at the end, then a normal close (1000).
  ``ttfa`` is from the first text the server received to the first audio it sent.

On any error the server sends ``{"type": "error", "code", "message"}`` and closes with
a reason: 1003 binary frame, 1007 not JSON (or nested too deep, or an integer too long),
1008 bad message or parameter, too many messages, or idle too long, 1009 message too
large, 1011 generation failed, 1013 busy or over the time limit (try again later).
A handshake from a foreign ``Origin`` or ``Host`` is refused with 403 or 400 before any
of this (see ``guard``).
Closing the socket cancels the generation at its next frame.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, WebSocket
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketState

from .schema import RequestError, StreamStart, parse_json, validate
from .voices import VoiceRegistryError
from .workers import Busy, Chunk, Failed, Finished, Job

log = logging.getLogger("dia2_trt.serve")
router = APIRouter()
ENDPOINT = "stream"


class _Close(Exception):
    """End the conversation with an error event and this close code."""

    def __init__(self, code: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.code, self.kind = code, kind


_BY_KIND = {"client": (1008, "bad_request"), "timeout": (1013, "timeout"), "cancelled": (1013, "cancelled"),
            "idle": (1008, "idle"), "internal": (1011, "internal")}
_OUTCOME = {"bad_request": "client_error", "internal": "error", "idle": "timeout"}
# Messages up to this size decode on the event loop: a thread hand-off costs more than they do.
_INLINE_BYTES = 4096


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    state = ws.app.state.serve
    await ws.accept()
    job, reader = None, None
    try:
        start = await _start(ws, state)
        job = await _admit(state, start)
        await ws.send_json({"type": "ready", "sample_rate": state.sample_rate, "encoding": "pcm_s16le",
                            "channels": 1})
        reader = asyncio.ensure_future(_read(ws, job, state))
        await _write(ws, state, job, start.include_tokens, reader)
    except _Close as close:
        state.metrics.outcome(ENDPOINT, _OUTCOME.get(close.kind, close.kind))
        await _close(ws, close)
    except WebSocketDisconnect:
        state.metrics.outcome(ENDPOINT, "cancelled")
    finally:
        if job is not None:
            job.cancel()
        if reader is not None:
            reader.cancel()


async def _start(ws: WebSocket, state) -> StreamStart:
    idle = state.config.limits.idle_seconds
    try:
        message = await asyncio.wait_for(ws.receive(), idle)
    except asyncio.TimeoutError:
        raise _Close(1008, "idle", f"no start message within this server's {idle:g} s idle limit") from None
    data = await _json(message, state)
    if data.get("type") != "start":
        raise _Close(1008, "bad_request", 'the first message must be {"type": "start", ...}')
    try:
        return await state.offload(validate, StreamStart, data)
    except RequestError as exc:
        raise _Close(1008, "bad_request", str(exc)) from None


async def _admit(state, start: StreamStart) -> Job:
    try:
        return state.admit(await state.offload(state.plan, start))
    except (RequestError, VoiceRegistryError) as exc:
        raise _Close(1008, "bad_request", str(exc)) from None
    except Busy as exc:
        raise _Close(1013, "busy", f"{exc}; retry after {exc.retry_after} s") from None


async def _json(message: Message, state) -> dict:
    """A client message as a JSON object, or the close that refuses it."""
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise _Close(1003, "bad_request", "binary frames are not accepted: send JSON text messages")
    try:
        data = parse_json(text, "the message") if len(text) <= _INLINE_BYTES else \
            await state.offload(parse_json, text, "the message")
    except RequestError as exc:
        raise _Close(1007, "bad_request", str(exc)) from None
    if not isinstance(data, dict):
        raise _Close(1008, "bad_request", "expected a JSON object")
    return data


async def _read(ws: WebSocket, job: Job, state) -> _Close | None:
    """Feed the job until the end message; a bad message, one message too many or a disconnect
    cancels it.

    Returns the close to send for a bad message (the writer sends it once the job has stopped).
    """
    ended, count, limit = False, 1, state.config.max_messages  # the start message was the first
    try:
        while True:
            message = await ws.receive()
            count += 1
            if count > limit and message["type"] != "websocket.disconnect":
                raise _Close(1008, "bad_request", f"more than this server's limit of {limit} messages "
                                                  f"in one stream")
            data = await _json(message, state)
            kind = data.get("type")
            if kind == "text" and not ended and isinstance(data.get("text"), str):
                _feed(job, data["text"])
            elif kind == "end" and not ended:
                ended = True
                job.close()
            else:
                raise _Close(1008, "bad_request", f"unexpected message {str(data)[:60]}: send "
                             + ('nothing more after "end"' if ended else '{"type": "text", "text": ...} or '
                                                                         '{"type": "end"}'))
    except _Close as close:
        job.cancel()
        return close
    except WebSocketDisconnect:
        job.cancel()
        return None
    except Exception:  # a reader that dies silently would leave the stream waiting for text
        log.exception("stream reader failed")
        job.cancel()
        return _Close(1011, "internal", "the server failed reading this stream")


def _feed(job: Job, text: str) -> None:
    try:
        job.feed(text)
    except ValueError as exc:
        raise _Close(1008, "bad_request", str(exc)) from None


async def _write(ws: WebSocket, state, job: Job, include_tokens: bool, reader: asyncio.Future) -> None:
    while True:
        event = await job.next_event()
        if isinstance(event, Chunk):
            if event.audio:
                await ws.send_bytes(event.audio)
            if event.words:
                await ws.send_json({"type": "words", "words": [{"word": w, "start": round(s, 4)}
                                                               for w, s in event.words]})
        elif isinstance(event, Finished):
            state.metrics.finished(ENDPOINT, event)
            await ws.send_json(_summary(event, include_tokens))
            await ws.close(1000)
            return
        else:
            raise _failure(event, reader)


def _failure(event: Failed, reader: asyncio.Future) -> Exception:
    """Why the job stopped: the reader's verdict (bad message, disconnect) comes first."""
    if reader.done() and not reader.cancelled():
        close = reader.result()
        return close if close is not None else WebSocketDisconnect(1000)
    code, kind = _BY_KIND[event.kind]
    return _Close(code, kind, event.message)


def _summary(event: Finished, include_tokens: bool) -> dict:
    r = event.result
    summary = {
        "type": "done", "audio_seconds": round(r.audio_seconds, 4), "wall_seconds": round(r.wall_seconds, 4),
        "rtf": round(r.real_time_factor, 4) if r.audio_seconds else None,
        "ttfa": None if event.first_audio_seconds is None else round(event.first_audio_seconds, 4),
        "queued_seconds": round(event.queued_seconds, 4), "frames": r.frames, "truncated": r.truncated,
        "timestamps": [[w, round(s, 4)] for w, s in r.timestamps],
    }
    if include_tokens:
        summary["tokens"] = r.tokens.tolist()
    return summary


async def _close(ws: WebSocket, close: _Close) -> None:
    """Error event, then the close frame with the reason (at most 123 bytes, as RFC 6455 allows)."""
    if ws.application_state != WebSocketState.CONNECTED:
        return
    reason = str(close).encode()[:123].decode(errors="ignore")
    try:
        await ws.send_json({"type": "error", "code": close.kind, "message": str(close)})
        await ws.close(close.code, reason)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client is already gone
