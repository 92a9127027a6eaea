"""``dia2-rt triton-repo``: write a Triton model repository that streams Dia2.

    REPO/MODEL/config.pbtxt        backend python, decoupled, CPU or GPU instances, the settings
    REPO/MODEL/1/model.py          re-exports dia2_trt.runtime.triton.model.TritonPythonModel
    REPO/MODEL/1/voices/*.voice    the registered voices (NAME.voice is voice NAME)
    REPO/MODEL/1/artifacts/        only with --copy-artifacts; otherwise config names the directory

The model folder is built beside its final place and renamed into it, so a failed
run leaves nothing behind (nor the REPO directory, when this run created it).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..artifacts import load_manifest
from ..serve.voices import VoiceRegistry
from ..voice import load_voice
from .settings import VOICES_DIR, Settings

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
COPIED_ARTIFACTS = "artifacts"

MODEL_PY = '''"""Dia2 on Triton's Python backend, written by dia2-rt triton-repo.

The model is the installed dia2-trt runtime's (dia2_trt.runtime.triton.model); this file only
points Triton at it, so upgrading the package upgrades the model and nothing here can drift.
"""

import os
import sys

# Triton's Python-backend stub embeds an interpreter that ignores PYTHONPATH; dia2-rt triton-serve
# puts the package's location there, so apply it (a no-op where dia2-trt is pip-installed, as in NGC).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from dia2_trt.runtime.triton.model import TritonPythonModel  # noqa: E402

__all__ = ["TritonPythonModel"]
'''


class RepoError(ValueError):
    """A repository that cannot be written as asked (one line)."""


def write_repo(artifacts: Path, out: Path, *, model_name: str = "dia2", instances: int = 1, kind: str = "cpu",
               voices: tuple[str, ...] = (), copy_artifacts: bool = False, settings: dict | None = None) -> Path:
    """Write REPO/MODEL and return its path; RepoError (or the runtime's ArtifactError) otherwise."""
    if not MODEL_NAME.fullmatch(model_name):
        raise RepoError(f"--model-name {model_name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    load_manifest(artifacts, verify=False)  # refuse a directory that is not artifacts now, not at model load
    registry = VoiceRegistry.from_options(list(voices), loader=load_voice)  # VoiceRegistryError: a ValueError
    target = out / model_name
    if target.exists() or target.is_symlink():
        raise RepoError(f"{target} already exists; choose another --model-name or --out")
    made = _make_dirs(out)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{model_name}.", dir=out))
        try:
            _fill(staging, artifacts, registry, instances, kind, copy_artifacts, model_name, settings or {})
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # made by this run, just above
            raise
    except BaseException:
        for directory in reversed(made):
            _remove_empty(directory)
        raise
    return target


def _fill(model: Path, artifacts: Path, registry: VoiceRegistry, instances: int, kind: str, copy: bool,
          name: str, settings: dict) -> None:
    version = model / "1"
    version.mkdir()
    (version / "model.py").write_text(MODEL_PY, encoding="utf-8")
    if copy:
        shutil.copytree(artifacts, version / COPIED_ARTIFACTS)
    where = COPIED_ARTIFACTS if copy else str(artifacts.resolve())
    voices = registry.listing()[:-1]  # the last is "default", which needs no file
    if voices:
        (version / VOICES_DIR).mkdir()
        for entry in voices:
            path = registry.resolve(entry["name"]).path
            assert path is not None  # registered voices have files
            shutil.copyfile(path, version / VOICES_DIR / f"{entry['name']}.voice")
    config = config_text(name, Settings(artifacts=where, **settings), instances, kind)
    (model / "config.pbtxt").write_text(config, encoding="utf-8")


def config_text(name: str, settings: Settings, instances: int, kind: str) -> str:
    """config.pbtxt: a decoupled Python-backend model with Dia2's inputs, outputs and settings."""
    params = "\n".join(f'parameters {{ key: "{key}" value {{ string_value: {_quote(value)} }} }}'
                       for key, value in settings.parameters().items())
    return f"""# Written by dia2-rt triton-repo: Dia2 streamed by the torch-free runtime (see docs/triton.md).
name: {_quote(name)}
backend: "python"
max_batch_size: 0
# One request, many responses: an audio chunk each, then an empty one with the final flag.
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "params" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "pcm" data_type: TYPE_INT16 dims: [ -1 ] }},
  {{ name: "words" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ count: {instances} kind: {"KIND_GPU" if kind == "gpu" else "KIND_CPU"} }} ]
{params}
"""


def _quote(value: str) -> str:
    """A protobuf text-format string: quotes and backslashes escaped, control characters refused."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise RepoError(f"{value!r}: control characters cannot go into config.pbtxt")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the ones created, outermost first."""
    missing = []
    for directory in [path, *path.parents]:
        if directory.exists():
            break
        missing.append(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RepoError(f"cannot create {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise RepoError(f"{path} is not a directory")
    return list(reversed(missing))


def _remove_empty(directory: Path) -> None:
    try:
        directory.rmdir()  # only ever empty: what this run put inside is already gone
    except OSError:
        pass
