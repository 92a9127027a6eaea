"""The ASGI app: one loaded model, a worker pool over it, and the routes.

``create_app`` takes runtimes that are already loaded (the CLI loads them; tests
pass their own), so building an app is cheap and never touches the network.

Everything that costs time per request byte (JSON decoding, validation, the script
checks, tokenizing) runs on a small thread pool of its own (``ServeState.offload``),
so the event loop that answers ``/healthz`` and moves audio never waits on a large body.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI

from .. import Chunking, Dia2Runtime, GenerationParams, ScriptError
from ..script import check_script
from .audio import available_formats
from .guard import ApiKeyCheck, EdgeChecks, OriginPolicy
from .metrics import Metrics
from .page import router as page_router
from .routes import IGNORED_HEADER, ClientGone, StreamAborted, install_error_handlers
from .routes import router as http_router
from .schema import GenerationFields, RequestError
from .voices import RegisteredVoice, VoiceRegistry, VoiceRegistryError
from .websocket import router as ws_router
from .workers import Job, Limits, Pool, VoicedSessions


@dataclass(frozen=True)
class ServeConfig:
    max_queue: int = 16  # requests waiting for a worker before 503s
    limits: Limits = field(default_factory=Limits)
    # An HTTP request body; a WebSocket message's bound is uvicorn's ws_max_size (it closes with 1009 past it).
    max_body_bytes: int = 64 * 1024
    max_messages: int = 10_000  # per WebSocket stream, empty ones included (a text needs >= 1 char)
    body_timeout: float = 30.0  # seconds an HTTP body may take to arrive once its headers are in
    shutdown_grace: float = 10.0  # seconds in-flight streams get to finish on shutdown
    parse_threads: int = 2  # threads decoding and checking requests, off the event loop
    origins: OriginPolicy = field(default_factory=OriginPolicy)
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on every route but /healthz
    cors_origins: tuple[str, ...] = ()  # pages that may call the API from a browser (CORS); none by default


T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """A request checked in full, ready to be admitted: what to generate, in which voices."""

    params: GenerationParams
    voices: tuple[RegisteredVoice, RegisteredVoice]
    text: str | None = None  # the whole script (HTTP); None: it arrives in pieces (WebSocket)
    input_tokens: int = 0
    chunking: Chunking = field(default_factory=Chunking)


class ServeState:
    """What the routes share: the pool, the voices, the metrics and the model's fixed facts."""

    def __init__(self, slots: Sequence[Dia2Runtime], config: ServeConfig, voices: VoiceRegistry,
                 open_session=None) -> None:
        self.runtime = slots[0]  # for parsing and the model's facts; generation runs on the pool's slots
        self.config = config
        self.voices = voices
        self.metrics = Metrics(getattr(self.runtime, "engine", None))
        self.pool = Pool(slots, config.max_queue, open_session or VoicedSessions(),
                         on_change=self.metrics.pool_changed)
        self.metrics.pool_changed(self.pool)
        self.formats = available_formats()
        self.sample_rate = self.runtime.sample_rate
        self._parsers = ThreadPoolExecutor(max_workers=config.parse_threads, thread_name_prefix="dia2-parse")

    async def offload(self, work: Callable[..., T], *args) -> T:
        """``work(*args)`` on the parsing threads; its exceptions (RequestError...) come back here."""
        return await asyncio.get_running_loop().run_in_executor(self._parsers, functools.partial(work, *args))

    def close(self) -> None:
        self._parsers.shutdown(wait=False, cancel_futures=True)

    def plan(self, fields: GenerationFields, text: str | None = None, count_tokens: bool = False) -> Plan:
        """Check a request in full (blocking: run it with ``offload``)."""
        voices = (self._voice(fields.voice, "voice"), self._voice(fields.voice_2, "voice_2"))
        if voices[1].conditioned and not voices[0].conditioned:
            raise RequestError("voice_2: speaker 2's voice needs a voice for speaker 1 too (as in Dia2)", "voice_2")
        try:
            params = fields.params()
        except (TypeError, ValueError) as exc:  # the schema's ranges are the stricter, but say it either way
            raise RequestError(str(exc)) from None
        if text is not None:
            self.check_script(text)
        tokens = self.input_tokens(text) if text is not None and count_tokens else 0
        return Plan(params, voices, text, tokens, fields.chunking())

    def admit(self, plan: Plan) -> Job:
        """The planned job, admitted to the pool (a whole script is fed and closed); may raise Busy.
        On the event loop: a job belongs to the loop that reads its events."""
        job = Job(plan.params, plan.voices, self.config.limits, plan.chunking)
        if plan.text is not None:
            try:
                job.feed(plan.text)
            except ValueError as exc:
                raise RequestError(str(exc), "input") from None
            job.close()
        self.pool.submit(job)
        return job

    def _voice(self, name: str | None, param: str):
        try:
            return self.voices.resolve(name)
        except VoiceRegistryError as exc:
            raise RequestError(str(exc), param) from None

    def check_script(self, text: str) -> None:
        """What the session would refuse, refused before a worker is taken (ScriptError)."""
        if len(text) > self.config.limits.max_chars:  # first: the checks below scan the whole text
            raise RequestError(f"input: the script is longer than this server's limit of "
                               f"{self.config.limits.max_chars} characters", "input")
        check_script(text)
        needed = self.runtime.frames_needed(self.runtime.parse(text), GenerationFields.model_validate({}).params())
        limit = self.runtime.manifest.max_context_steps
        if needed > limit:
            raise ScriptError(f"the script is too long: it needs at least {needed} frames but the model's "
                              f"context holds {limit}; split it into shorter requests")

    def input_tokens(self, text: str) -> int:
        return sum(len(entry.tokens) for entry in self.runtime.parse(text))


class _CutOffQuietly:
    """A stream that fails after its status went out ends without its final chunk (the client sees a
    truncated body); the route has logged why, so no traceback from the server as well."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        except (StreamAborted, ClientGone):
            pass


def create_app(slots: Sequence[Dia2Runtime], config: ServeConfig | None = None,
               voices: VoiceRegistry | None = None, open_session=None) -> FastAPI:
    """An app whose pool has one worker per slot; a slot is the runtime that worker's sessions
    run on, normally one loaded runtime repeated N times (the weights load once)."""
    state = ServeState(slots, config or ServeConfig(), voices or VoiceRegistry(), open_session)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await state.pool.shutdown(state.config.shutdown_grace)
            state.close()

    app = FastAPI(title="dia2-trt", summary="Streaming Dia2 speech", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.serve = state
    app.add_middleware(_CutOffQuietly)
    _add_access_control(app, state.config)
    install_error_handlers(app)
    app.include_router(http_router)
    app.include_router(ws_router)
    app.include_router(page_router)
    return app


def _add_access_control(app: FastAPI, config: ServeConfig) -> None:
    """From the outside in: Host/Origin checks, CORS (answers preflights, which carry no key), the key.
    Starlette runs the middleware added last first."""
    if config.api_key is not None:
        app.add_middleware(ApiKeyCheck, key=config.api_key)
    origins = config.origins
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=[IGNORED_HEADER, "Retry-After"], max_age=600)
        origins = origins.allowing(config.cors_origins)
    app.add_middleware(EdgeChecks, policy=origins)
