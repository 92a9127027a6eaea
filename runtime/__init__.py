"""Torch-free Dia2 runtime: reads an artifact directory (manifest + graphs + tokenizer) and streams speech.

    from dia2_trt.runtime import Dia2Runtime, GenerationParams
    runtime = Dia2Runtime.load("artifacts/tiny")
    result = runtime.speak("[S1] Hello there. [S2] Hi!", GenerationParams(seed=1))

This package must never import torch, nor dia2_trt.models / export / calibration.
The names below load on first use, so importing one submodule (the script
parser, the state machine) does not load ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Dia2Runtime": "runtime",
    "Session": "session",
    "AudioChunk": "session",
    "Chunking": "params",
    "SpeakResult": "session",
    "Progress": "session",
    "TruncationWarning": "session",
    "GenerationParams": "params",
    "ArtifactError": "artifacts",
    "ScriptError": "script",
    "Backend": "backends",
    "Graph": "backends",
    "Binding": "backends",
    "create_backend": "backends",
    "BACKEND_NAMES": "backends",
}

# Spelled out (not sorted(_EXPORTS)) so that type checkers see the public names; a test keeps the two equal.
__all__ = ["ArtifactError", "AudioChunk", "BACKEND_NAMES", "Backend", "Binding", "Chunking", "Dia2Runtime",
           "GenerationParams", "Graph", "Progress", "ScriptError", "Session", "SpeakResult", "TruncationWarning",
           "create_backend"]

if TYPE_CHECKING:
    from .artifacts import ArtifactError
    from .backends import BACKEND_NAMES, Backend, Binding, Graph, create_backend
    from .params import Chunking, GenerationParams
    from .runtime import Dia2Runtime
    from .script import ScriptError
    from .session import AudioChunk, Progress, Session, SpeakResult, TruncationWarning


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
