"""Generation parameters shared by the runtime and the PyTorch reference loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real

INT64_MAX = 2**63 - 1  # top-k values reach the graphs as int64; seeds must fit numpy's and torch's


@dataclass(frozen=True)
class GenerationParams:
    """How to sample; defaults are the reference's ``GenerationConfig`` defaults.

    Every field is checked when the object is made: a wrong type is a TypeError,
    a value out of range (or NaN/inf) a ValueError, each naming the field.
    """

    text_temperature: float = 0.6
    """Temperature of the text action (new word or pad); 0 means greedy (argmax)."""
    text_top_k: int = 50
    """Sample the text action among its k likeliest values; 0 means no cut."""
    audio_temperature: float = 0.8
    """Temperature of the audio codebooks; 0 means greedy (argmax)."""
    audio_top_k: int = 50
    """Sample each audio codebook among its k likeliest codes; 0 means no cut."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale, > 0; 1 turns guidance off."""
    cfg_filter_k: int = 50
    """Sample only among the k best guided logits (0: no filter)."""
    initial_padding: int = 2
    """Frames of lead-in before the first word."""
    seed: int = 0
    """Seed of the sampler's random generator, 0 <= seed < 2**63."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            checked = _real(f.name, value) if f.type in ("float", float) else _integer(f.name, value)
            object.__setattr__(self, f.name, checked)  # numpy scalars become Python numbers
        for name in ("text_temperature", "audio_temperature", "text_top_k", "audio_top_k", "cfg_filter_k",
                     "initial_padding", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_label(name)} must be >= 0, got {getattr(self, name)}")
        if self.cfg_scale <= 0:
            raise ValueError(f"cfg scale must be positive, got {self.cfg_scale}")

    @classmethod
    def from_options(cls, *, seed: int = 0, temperature: float | None = None, text_temperature: float | None = None,
                     audio_temperature: float | None = None, top_k: int = 50, cfg_scale: float = 2.0,
                     cfg_filter_k: int = 50) -> GenerationParams:
        """The user-facing options (``dia2-rt speak``, ``dia2-export reference``, the server's fields):
        ``temperature`` sets both streams unless a per-stream one is given, ``top_k`` both streams' cut."""
        d = cls()
        return cls(text_temperature=_first(text_temperature, temperature, d.text_temperature),
                   audio_temperature=_first(audio_temperature, temperature, d.audio_temperature),
                   text_top_k=top_k, audio_top_k=top_k, cfg_scale=cfg_scale, cfg_filter_k=cfg_filter_k, seed=seed)

    @property
    def cfg_active(self) -> bool:
        return self.cfg_scale != 1.0


def _first(*values):
    return next(v for v in values if v is not None)


def _label(name: str) -> str:
    return name.replace("_", " ")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{_label(name)} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{_label(name)} must be finite, got {value}")
    return float(value)


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{_label(name)} must be an integer, got {type(value).__name__}")
    number = int(value)  # numbers.Integral declares no comparison operators; int() is exact for any integral
    if number > INT64_MAX:
        raise ValueError(f"{_label(name)} must be at most 2**63 - 1, got {value}")
    return number


MAX_CHUNK_FRAMES = 250  # 20 s: a chunk past that is the whole utterance in all but name


@dataclass(frozen=True)
class Chunking:
    """How many frames (80 ms each) a chunk holds: the first, and each after it.

    One frame each by default: a frame goes out as soon as the codec has made it, which is
    the earliest first audio (the Mimi decoder step has no look-ahead). A player that wants a
    longer first buffer, or fewer and larger writes, asks for more; the last chunk holds
    whatever is left. Only the grouping changes, never the audio or the words.
    """

    first_frames: int = 1
    frames: int = 1

    def __post_init__(self) -> None:
        for name in ("first_frames", "frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHUNK_FRAMES:
                raise ValueError(f"{name} must be an integer in 1..{MAX_CHUNK_FRAMES}, got {value!r}")
