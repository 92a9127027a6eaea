"""Generation parameters shared by the runtime and the PyTorch reference loop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationParams:
    """Defaults are the reference's ``GenerationConfig`` defaults.

    A temperature of 0 means greedy (argmax) for that stream.
    """

    text_temperature: float = 0.6
    text_top_k: int = 50
    audio_temperature: float = 0.8
    audio_top_k: int = 50
    cfg_scale: float = 2.0
    cfg_filter_k: int = 50
    initial_padding: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("text_temperature", "audio_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 0")
        for name in ("text_top_k", "audio_top_k", "cfg_filter_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 0")
        if self.cfg_scale <= 0:
            raise ValueError("cfg scale must be positive")
        if self.initial_padding < 0:
            raise ValueError("initial padding must be >= 0")

    @property
    def cfg_active(self) -> bool:
        return self.cfg_scale != 1.0
