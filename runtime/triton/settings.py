"""The model's settings: what ``dia2-rt triton-repo`` writes into config.pbtxt's ``parameters``
and what the model reads back from them (one list of names and defaults for both sides)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

VOICES_DIR = "voices"  # in the version folder: NAME.voice registers voice NAME


@dataclass(frozen=True)
class Settings:
    artifacts: str  # absolute, or relative to the model's version folder (a copied artifact directory)
    backend: str = "onnxruntime"
    threads: int = 0  # 0: the runtime's per-graph default
    verify: bool = True  # the artifact files' checksums at load (seconds for the 2B)
    max_streams: int = 4  # generated at once per instance, each on a thread of its own
    max_queue: int = 16  # waiting for a thread; past that, UNAVAILABLE ("busy")
    max_input_chars: int = 4096  # as dia2-rt serve's --max-input-chars
    version_dir: str = ""  # filled in by the model: where relative paths start

    def parameters(self) -> dict[str, str]:
        """config.pbtxt's ``parameters`` (Triton's are all strings)."""
        return {f.name: _text(getattr(self, f.name)) for f in fields(self) if f.name != "version_dir"}

    @classmethod
    def from_config(cls, config: dict, version_dir: Path) -> Settings:
        """From the model config Triton hands ``initialize`` (parameters: {key: {"string_value": ...}})."""
        given = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        values: dict = {"version_dir": str(version_dir)}
        for f in fields(cls):
            if f.name in given:
                values[f.name] = _parse(f.name, given[f.name], f.default)
        if "artifacts" not in values:
            raise ValueError("config.pbtxt: no 'artifacts' parameter (dia2-rt triton-repo writes it)")
        return cls(**values)

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.version_dir) / self.artifacts  # an absolute artifacts path stays as it is

    @property
    def thread_count(self) -> int | None:
        return self.threads or None

    def voice_registry(self, runtime):
        """Every ``voices/NAME.voice`` in the version folder, each checked against the loaded artifacts
        (as ``dia2-rt serve --voice NAME=FILE`` checks them at start)."""
        import click

        from ..serve.command import _voices  # TODO(move): a serve-free home for the checked-voice loader

        folder = Path(self.version_dir) / VOICES_DIR
        files = sorted(folder.glob("*.voice")) if folder.is_dir() else []
        try:
            return _voices([f"{path.stem}={path}" for path in files], runtime)
        except click.ClickException as exc:
            raise ValueError(exc.message) from None


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _parse(name: str, text: str, default):
    if isinstance(default, bool):
        if text not in ("true", "false"):
            raise ValueError(f"config.pbtxt: parameter {name} must be true or false, got {text!r}")
        return text == "true"
    if isinstance(default, int):
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"config.pbtxt: parameter {name} must be an integer, got {text!r}") from None
        if value < (0 if name == "threads" else 1):
            raise ValueError(f"config.pbtxt: parameter {name} is out of range: {value}")
        return value
    return text
