"""One Triton request checked in full: its script, its ``params`` JSON and its voices.

Nothing here imports Triton, so the checks run (and are tested) anywhere. The
``params`` fields are ``dia2-rt serve``'s generation extras with the same names,
mapped through the same ``GenerationParams.from_options`` as ``dia2-rt speak``'s
options, so a request reproduces a CLI run exactly. Every failure is a
:class:`BadRequest` with one line, which the model sends as a Triton error response.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..files import InputFileError, parse_json
from ..params import Chunking, GenerationParams
from ..script import ScriptError, check_script
from ..serve.voices import RegisteredVoice, VoiceRegistry, VoiceRegistryError

# The JSON type each field takes (bool is refused for both: JSON true is not a seed).
NUMBERS = {"seed": int, "temperature": float, "text_temperature": float, "audio_temperature": float,
           "top_k": int, "cfg_scale": float, "cfg_filter_k": int, "first_chunk_frames": int, "chunk_frames": int}
VOICES = ("voice", "voice_2")
MAX_PARAMS_BYTES = 64 * 1024  # the server's body limit: a params document is a few hundred bytes


class BadRequest(ValueError):
    """A request the model refuses (one line); the model keeps serving."""


@dataclass(frozen=True)
class Plan:
    text: str
    params: GenerationParams
    voices: tuple[RegisteredVoice, RegisteredVoice]
    chunking: Chunking = Chunking()


def plan(text: bytes | str | None, raw_params: bytes | None, registry: VoiceRegistry, runtime,
         max_chars: int) -> Plan:
    """The checked request, or BadRequest naming the input at fault."""
    script = _script(text, runtime, max_chars)
    fields = parse_params(raw_params)
    voices = (_voice(registry, fields.pop("voice", None), "voice"),
              _voice(registry, fields.pop("voice_2", None), "voice_2"))
    if voices[1].conditioned and not voices[0].conditioned:
        raise BadRequest("params.voice_2: speaker 2's voice needs a voice for speaker 1 too (as in Dia2)")
    try:
        chunking = Chunking(fields.pop("first_chunk_frames", 1), fields.pop("chunk_frames", 1))
        params = GenerationParams.from_options(**fields)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"params: {exc}") from None
    return Plan(script, params, voices, chunking)


def parse_params(raw: bytes | None) -> dict:
    """The ``params`` input's JSON object, its fields type-checked (ranges are GenerationParams')."""
    if raw is None or not raw.strip():
        return {}
    if len(raw) > MAX_PARAMS_BYTES:
        raise BadRequest(f"params: longer than {MAX_PARAMS_BYTES} bytes")
    try:
        data = parse_json(raw, "params")
    except InputFileError as exc:
        raise BadRequest(str(exc)) from None
    if not isinstance(data, dict):
        raise BadRequest("params: expected a JSON object")
    for key, value in data.items():
        _check_field(key, value)
    return {key: float(v) if NUMBERS.get(key) is float and v is not None else v for key, v in data.items()}


def _check_field(key: str, value) -> None:
    if key in VOICES:
        if value is not None and (not isinstance(value, str) or len(value) > 64):
            raise BadRequest(f"params.{key}: expected a voice name (a string of at most 64 characters)")
        return
    kind = NUMBERS.get(key)
    if kind is None:
        raise BadRequest(f"params.{key}: unknown field (use {', '.join([*NUMBERS, *VOICES])})")
    if key in ("temperature", "text_temperature", "audio_temperature") and value is None:
        return  # as the server's schema: null means "the default"
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise BadRequest(f"params.{key}: expected {'an integer' if kind is int else 'a number'}")


def _script(text: bytes | str | None, runtime, max_chars: int) -> str:
    if text is None:
        raise BadRequest("text: missing")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("text: not UTF-8") from None
    if not text.strip():
        raise BadRequest("text: empty")
    if len(text) > max_chars:  # first: the checks below scan the whole text
        raise BadRequest(f"text: the script is longer than this model's limit of {max_chars} characters")
    try:
        check_script(text)
        needed = runtime.frames_needed(runtime.parse(text), GenerationParams())
    except ScriptError as exc:
        raise BadRequest(f"text: {exc}") from None
    limit = runtime.manifest.max_context_steps
    if needed > limit:
        raise BadRequest(f"text: the script is too long: it needs at least {needed} frames but the model's "
                         f"context holds {limit}; split it into shorter requests")
    return text


def _voice(registry: VoiceRegistry, name, param: str) -> RegisteredVoice:
    try:
        return registry.resolve(name)
    except VoiceRegistryError as exc:
        raise BadRequest(f"params.{param}: {exc}") from None
