"""Voice names a request may use, and what each one means.

``--voice NAME=FILE`` registers a voice file under a name. ``default`` and
OpenAI's built-in voice names mean "no prefix" (an unconditioned random
speaker, as ``dia2-rt speak`` without a voice), so drop-in OpenAI clients work
unchanged. Any other name is a request error: a voice is never ignored.

The registry checks each file when the server starts (a regular, readable file,
then the ``loader``: the CLI's loads it with the runtime's ``load_voice`` and
checks it against the artifacts) and hands requests a :class:`RegisteredVoice` whose
``prefix`` is what the loader made of the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# OpenAI's /v1/audio/speech voices (2025): they all mean "no prefix" here.
OPENAI_VOICES = frozenset({
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage", "shimmer",
    "verse",
})
DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class VoiceRegistryError(ValueError):
    """A voice name or file the server cannot use (one line)."""


@dataclass(frozen=True)
class RegisteredVoice:
    name: str
    path: Path | None  # None: no prefix
    prefix: Any = None  # what the loader made of the file (the runtime's voice)

    @property
    def conditioned(self) -> bool:
        return self.path is not None


NO_PREFIX = RegisteredVoice(DEFAULT, None)


class VoiceRegistry:
    """Names -> voices. ``resolve`` is what the request handlers call."""

    def __init__(self, loader: Callable[[Path], Any] | None = None) -> None:
        self._voices: dict[str, RegisteredVoice] = {}
        self._loader = loader

    @classmethod
    def from_options(cls, options: list[str] | tuple[str, ...], loader: Callable[[Path], Any] | None = None
                     ) -> VoiceRegistry:
        """Build from ``NAME=FILE`` strings (the CLI's repeated ``--voice``)."""
        registry = cls(loader)
        for option in options:
            name, sep, file = option.partition("=")
            if not sep or not file:
                raise VoiceRegistryError(f"--voice {option!r}: expected NAME=FILE")
            registry.register(name, Path(file))
        return registry

    @classmethod
    def checked(cls, options: list[str] | tuple[str, ...], runtime) -> VoiceRegistry:
        """``NAME=FILE`` voices, each loaded and checked against ``runtime``'s artifacts now (made for
        other artifacts, or too long for the context: VoiceRegistryError), not at its first request."""
        from ..voice import load_voice

        def load(path: Path):
            voice = load_voice(path)
            runtime.prefix(voice)  # refuses a voice made for other artifacts, or too long for the context
            return voice

        return cls.from_options(list(options), loader=load)

    def register(self, name: str, path: Path) -> None:
        if not _NAME.fullmatch(name):
            raise VoiceRegistryError(f"voice name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        if name == DEFAULT or name in OPENAI_VOICES:
            raise VoiceRegistryError(f"voice name {name!r} is reserved (it means no prefix)")
        if name in self._voices:
            raise VoiceRegistryError(f"voice {name!r} is registered twice")
        if not path.is_file():
            raise VoiceRegistryError(f"voice {name!r}: {path} is not a file")
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise VoiceRegistryError(f"voice {name!r}: cannot read {path}: {exc.strerror or exc}") from None
        prefix = self._load(name, path)
        self._voices[name] = RegisteredVoice(name, path.resolve(), prefix)

    def _load(self, name: str, path: Path) -> Any:
        if self._loader is None:
            return None
        try:
            return self._loader(path)
        except (OSError, ValueError) as exc:
            raise VoiceRegistryError(f"voice {name!r}: {exc}") from None

    def resolve(self, name: str | None) -> RegisteredVoice:
        """The voice a request names; a name that is neither registered nor built in is a VoiceRegistryError."""
        if name is None or name == DEFAULT or name in OPENAI_VOICES:
            return NO_PREFIX
        voice = self._voices.get(name)
        if voice is None:
            raise VoiceRegistryError(f"unknown voice {name!r}: use {', '.join(self.names())} or an OpenAI voice name")
        return voice

    def names(self) -> list[str]:
        """Registered names first, then ``default`` (the built-in OpenAI names are aliases of it)."""
        return sorted(self._voices) + [DEFAULT]

    def listing(self) -> list[dict[str, Any]]:
        return [{"name": name, "conditioned": self.resolve(name).conditioned} for name in self.names()]
