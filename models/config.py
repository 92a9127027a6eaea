"""Dia2 config.json parsing, with the reference implementation's defaults.

Every field the reference reads is read here with the same default, so a
checkpoint behaves identically in both; what the reference would fail on with a
KeyError deep inside model construction fails here with one clear line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ACTIVATIONS = ("silu", "swish", "swiglu", "gelu", "geglu", "relu", "linear")


class ConfigError(ValueError):
    """A config.json that cannot describe a Dia2 model."""


@dataclass(frozen=True)
class DataConfig:
    channels: int
    text_vocab_size: int
    audio_vocab_size: int
    action_vocab_size: int
    text_pad_token_id: int
    text_new_word_token_id: int
    text_zero_token_id: int
    audio_pad_token_id: int
    audio_bos_token_id: int
    action_pad_token_id: int
    action_new_word_token_id: int
    delay_pattern: list[int]
    first_word_min_start: int
    max_pad: int
    second_stream_ahead: int
    tokenizer_path: str | None = None

    @property
    def audio_channels(self) -> int:
        return max(0, self.channels - 2)


@dataclass(frozen=True)
class DecoderConfig:
    n_layer: int
    n_embd: int
    n_hidden: int
    gqa_query_heads: int
    kv_heads: int
    gqa_head_dim: int
    low_rank_dim: int | None = None


@dataclass(frozen=True)
class DepformerConfig:
    n_layer: int
    n_embd: int
    n_hidden: int
    gqa_query_heads: int
    kv_heads: int
    gqa_head_dim: int
    apply_rope: bool = True
    text_embedding: bool = True
    mlp_activations: list[str] = field(default_factory=lambda: ["silu", "linear"])


@dataclass(frozen=True)
class ModelConfig:
    decoder: DecoderConfig
    depformer: DepformerConfig
    mlp_activations: list[str]
    dropout: float
    rope_min_timescale: float
    rope_max_timescale: float
    normalization_layer_epsilon: float


@dataclass(frozen=True)
class RuntimeConfig:
    weights_schedule: list[int]
    max_context_steps: int


@dataclass(frozen=True)
class AssetsConfig:
    tokenizer: str | None = None
    mimi: str | None = None


@dataclass(frozen=True)
class Dia2Config:
    data: DataConfig
    model: ModelConfig
    runtime: RuntimeConfig
    assets: AssetsConfig
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def num_depth(self) -> int:
        """Depformer stages: every audio codebook but cb0, which the backbone predicts."""
        return max(self.data.audio_channels - 1, 0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("raw")
        return out


def load_config(path: str | Path) -> Dia2Config:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> Dia2Config:
    reader = _Reader(raw, source)
    data = _parse_data(reader.block("data"))
    model = _parse_model(reader.block("model"))
    runtime_raw = raw.get("runtime")
    if runtime_raw is None:
        # The reference refuses such configs too.
        raise ConfigError(f"{source}: missing 'runtime' block")
    runtime = _parse_runtime(reader.block("runtime"), data)
    assets_raw = raw.get("assets") or {}
    assets = AssetsConfig(
        tokenizer=assets_raw.get("tokenizer") or data.tokenizer_path,
        mimi=assets_raw.get("mimi"),
    )
    config = Dia2Config(data=data, model=model, runtime=runtime, assets=assets, raw=raw)
    _validate(config, source)
    return config


class _Reader:
    """Typed access to one JSON block, naming the dotted path in every error."""

    def __init__(self, block: Any, where: str) -> None:
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: expected an object")
        self._block = block
        self._where = where

    def block(self, key: str) -> _Reader:
        if key not in self._block:
            raise ConfigError(f"{self._where}: missing '{key}' block")
        return _Reader(self._block[key] if self._block[key] is not None else {}, f"{self._where}:{key}")

    def optional_block(self, key: str) -> _Reader:
        return _Reader(self._block.get(key) or {}, f"{self._where}:{key}")

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self._block or (self._block[key] is None and default is not ...):
            if default is ...:
                raise ConfigError(f"{self._where}: missing field '{key}'")
            return default
        value = self._block[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self._where}.{key}: expected {kind.__name__}, got {value!r}")
        return value

    def int_list(self, key: str, default: Any = ...) -> list[int] | None:
        value = self.get(key, list, default)
        if value is None:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{self._where}.{key}: expected a list of integers")
        return list(value)


def _parse_data(r: _Reader) -> DataConfig:
    audio_vocab = r.get("audio_vocab_size", int)
    return DataConfig(
        channels=r.get("channels", int),
        text_vocab_size=r.get("text_vocab_size", int),
        audio_vocab_size=audio_vocab,
        action_vocab_size=r.get("action_vocab_size", int),
        text_pad_token_id=r.get("text_pad_token_id", int),
        text_new_word_token_id=r.get("text_new_word_token_id", int),
        text_zero_token_id=r.get("text_zero_token_id", int, 7),
        audio_pad_token_id=r.get("audio_pad_token_id", int, audio_vocab - 1),
        audio_bos_token_id=r.get("audio_bos_token_id", int, audio_vocab - 2),
        action_pad_token_id=r.get("action_pad_token_id", int),
        action_new_word_token_id=r.get("action_new_word_token_id", int),
        delay_pattern=r.int_list("delay_pattern", []) or [],
        first_word_min_start=r.get("first_word_min_start", int, 0),
        max_pad=r.get("max_pad", int, 0),
        second_stream_ahead=r.get("second_stream_ahead", int, 0),
        tokenizer_path=r.get("tokenizer_path", str, None),
    )


def _parse_decoder(r: _Reader) -> DecoderConfig:
    return DecoderConfig(
        n_layer=r.get("n_layer", int),
        n_embd=r.get("n_embd", int),
        n_hidden=r.get("n_hidden", int),
        gqa_query_heads=r.get("gqa_query_heads", int),
        kv_heads=r.get("kv_heads", int),
        gqa_head_dim=r.get("gqa_head_dim", int),
        low_rank_dim=r.get("low_rank_dim", int, None),
    )


def _parse_depformer(r: _Reader) -> DepformerConfig:
    return DepformerConfig(
        n_layer=r.get("n_layer", int),
        n_embd=r.get("n_embd", int),
        n_hidden=r.get("n_hidden", int),
        gqa_query_heads=r.get("gqa_query_heads", int),
        kv_heads=r.get("kv_heads", int),
        gqa_head_dim=r.get("gqa_head_dim", int),
        apply_rope=r.get("apply_rope", bool, True),
        text_embedding=r.get("text_embedding", bool, True),
        mlp_activations=list(r.get("mlp_activations", list, ["silu", "linear"])),
    )


def _parse_model(r: _Reader) -> ModelConfig:
    linear = r.optional_block("linear")
    return ModelConfig(
        decoder=_parse_decoder(r.block("decoder")),
        depformer=_parse_depformer(r.block("depformer")),
        mlp_activations=list(linear.get("mlp_activations", list, ["silu", "linear"])),
        dropout=r.get("dropout", float, 0.0),
        rope_min_timescale=r.get("rope_min_timescale", float, 1.0),
        rope_max_timescale=r.get("rope_max_timescale", float, 10000.0),
        normalization_layer_epsilon=r.get("normalization_layer_epsilon", float, 1e-5),
    )


def _parse_runtime(r: _Reader, data: DataConfig) -> RuntimeConfig:
    schedule = r.int_list("weights_schedule", None)
    if schedule is None:
        schedule = list(range(max(data.audio_channels - 1, 0)))
    return RuntimeConfig(weights_schedule=schedule, max_context_steps=r.get("max_context_steps", int, 1500))


def _validate(cfg: Dia2Config, source: str) -> None:
    d, dec, dep = cfg.data, cfg.model.decoder, cfg.model.depformer
    problems = []
    if d.channels < 3:
        problems.append(f"data.channels must be >= 3 (text, second text, >= 1 audio codebook), got {d.channels}")
    if len(d.delay_pattern) != d.audio_channels:
        problems.append(f"data.delay_pattern has {len(d.delay_pattern)} entries, "
                        f"expected {d.audio_channels} (channels - 2)")
    if any(v < 1 for v in d.delay_pattern):
        # At frame 0 nothing is generated yet: a codebook with delay 0 would read an
        # empty slot (the reference crashes there), so every codebook starts on bos.
        problems.append("data.delay_pattern entries must be >= 1")
    if len(cfg.runtime.weights_schedule) != cfg.num_depth:
        problems.append(
            f"runtime.weights_schedule has {len(cfg.runtime.weights_schedule)} entries, "
            f"expected {cfg.num_depth} (one per depformer stage)"
        )
    if any(v < 0 for v in cfg.runtime.weights_schedule):
        problems.append("runtime.weights_schedule entries must be >= 0")
    if cfg.runtime.max_context_steps <= 0:
        problems.append("runtime.max_context_steps must be positive")
    for name, block in (("decoder", dec), ("depformer", dep)):
        if block.gqa_head_dim % 2:
            problems.append(f"model.{name}.gqa_head_dim must be even (RoPE)")
        if block.kv_heads <= 0 or block.gqa_query_heads % block.kv_heads:
            problems.append(f"model.{name}.gqa_query_heads must be a multiple of kv_heads")
    if dep.gqa_query_heads != dep.kv_heads:
        # The depformer's fused in_proj yields as many K/V heads as query heads.
        problems.append("model.depformer.kv_heads must equal gqa_query_heads")
    for name, acts in (("model.linear", cfg.model.mlp_activations), ("model.depformer", dep.mlp_activations)):
        if len(acts) != 2 or any(a.lower() not in _ACTIVATIONS for a in acts):
            problems.append(f"{name}.mlp_activations must be two of {', '.join(_ACTIVATIONS)}, got {acts}")
    for key in ("audio_pad_token_id", "audio_bos_token_id"):
        if not 0 <= getattr(d, key) < d.audio_vocab_size:
            problems.append(f"data.{key} must lie inside audio_vocab_size")
    for key in ("text_pad_token_id", "text_new_word_token_id", "text_zero_token_id"):
        if not 0 <= getattr(d, key) < d.text_vocab_size:
            problems.append(f"data.{key} must lie inside text_vocab_size")
    if problems:
        raise ConfigError(f"{source}: {problems[0]}")
