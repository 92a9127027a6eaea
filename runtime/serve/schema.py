"""Request bodies: OpenAI's speech request plus Dia2's generation extras, and the error shape.

The extras mirror ``dia2-rt speak``'s options and map to GenerationParams through
the same ``GenerationParams.from_options``, so a request with the same text, seed
and parameters reproduces a CLI run exactly.
Unknown fields are errors rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import Chunking, GenerationParams
from ..files import InputFileError
from ..files import parse_json as parse_bounded_json
from ..params import MAX_CHUNK_FRAMES


class RequestError(ValueError):
    """A bad request: HTTP 400 (or ``status``) with OpenAI's error body; a close frame on the socket."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class GenerationFields(BaseModel):
    """What every generation request may set (HTTP body or the socket's start message)."""

    # parse_json already refuses NaN, Infinity and 1e999; this keeps a model built from Python finite too
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)

    voice: str = Field("default", max_length=64, description="Speaker 1's voice: a registered name or 'default'")
    voice_2: str | None = Field(None, max_length=64, description="Speaker 2's voice (Dia2 extra)")
    seed: int = Field(0, ge=0, lt=2**63)
    temperature: float | None = Field(None, ge=0, le=10, description="Both streams (0 = greedy)")
    text_temperature: float | None = Field(None, ge=0, le=10)
    audio_temperature: float | None = Field(None, ge=0, le=10)
    top_k: int = Field(50, ge=0, le=1_000_000, description="0 = no top-k cut")
    cfg_scale: float = Field(2.0, gt=0, le=100, description="Classifier-free guidance (1 = off)")
    cfg_filter_k: int = Field(50, ge=0, le=1_000_000)
    first_chunk_frames: int = Field(1, ge=1, le=MAX_CHUNK_FRAMES,
                                    description="Frames (80 ms each) in the first audio chunk (Dia2 extra)")
    chunk_frames: int = Field(1, ge=1, le=MAX_CHUNK_FRAMES, description="Frames in each later chunk (Dia2 extra)")

    def chunking(self) -> Chunking:
        return Chunking(self.first_chunk_frames, self.chunk_frames)

    def params(self) -> GenerationParams:
        """As ``dia2-rt speak`` builds them from the same options."""
        return GenerationParams.from_options(
            seed=self.seed, temperature=self.temperature, text_temperature=self.text_temperature,
            audio_temperature=self.audio_temperature, top_k=self.top_k, cfg_scale=self.cfg_scale,
            cfg_filter_k=self.cfg_filter_k)


class SpeechRequest(GenerationFields):
    """POST /v1/audio/speech."""

    model: str = Field(..., min_length=1, max_length=128, description="Any name: this server serves one model")
    input: str = Field(..., min_length=1)
    response_format: str = "mp3"  # OpenAI's default; checked against the formats this machine can encode
    stream_format: Literal["audio", "sse"] = "audio"
    speed: float = Field(1.0, description="OpenAI's 0.25-4.0; only 1.0 is served (Dia2 has no speed control)")
    instructions: str | None = Field(None, max_length=4096,
                                     description="Accepted and ignored (Dia2 takes no style prompt); the "
                                                 "response's X-Dia2-Ignored header says so")

    @field_validator("speed")
    @classmethod
    def _speed(cls, value: float) -> float:
        # Resampling would change the pitch with the pace, and Dia2 has no pace control of its own:
        # refusing is honest where a silent 1.0 would not be.
        if value != 1.0:
            raise ValueError(f"{value:g} is not supported: only 1.0 is (Dia2 has no speed control; "
                             f"OpenAI's 0.25-4.0 range is not served)")
        return value

    def ignored(self) -> list[str]:
        """Fields the request set that this server accepts but does not act on."""
        return ["instructions"] if self.instructions else []


class StreamStart(GenerationFields):
    """The socket's first message: {"type": "start", ...GenerationFields, "include_tokens"?}."""

    type: Literal["start"]
    include_tokens: bool = Field(False, description="Add the generated audio tokens to the done event")


def parse_json(raw: bytes | str, what: str = "the body") -> Any:
    """Bounded JSON (no deep nesting, no 5000-digit integers, no NaN): a one-line 400 otherwise."""
    try:
        return parse_bounded_json(raw, what)
    except InputFileError as exc:
        raise RequestError(str(exc)) from None


def validate(model: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise RequestError("expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        raise RequestError(f"{param}: {message}" if param else message, param) from None
