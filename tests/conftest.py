"""Session-wide fixtures: tiny checkpoints and artifact directories, each built once, and the
committed tiny fixture with one runtime on it (the serve tests' server and solo runs)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# `--size tiny` builds into this cache; keep test runs hermetic and off $HOME.
os.environ.setdefault("DIA2_TRT_CACHE", tempfile.mkdtemp(prefix="dia2-trt-test-cache-"))
# Tiny models gain nothing from intra-op threads, and torch's idle OpenMP workers
# spin on the cores ONNX Runtime needs next (subprocesses inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

FIXTURE = Path(__file__).resolve().parent / "data" / "tiny-artifacts"

SCRIPTS = {
    "dialogue": "[S1] Hello there, how are you? [S2] I am fine, thanks.",
    "break": '[S1] Wait for it. <break time="0.4s"/> Now. [S2] Okay!',
    "single": "[S2] Just one speaker, talking quite a while about nothing in particular.",
}


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(variant="default", seed=0) -> checkpoint dir, cached for the session."""
    from dia2_trt.models.tiny import build_tiny_checkpoint

    built: dict[tuple[str, int], Path] = {}

    def make(variant: str = "default", seed: int = 0) -> Path:
        key = (variant, seed)
        if key not in built:
            out = tmp_path_factory.mktemp(f"ckpt-{variant}-{seed}")
            built[key] = build_tiny_checkpoint(out, seed=seed, variant=variant)
        return built[key]

    return make


@pytest.fixture(scope="session")
def artifacts_factory(checkpoint_factory, tmp_path_factory):
    """make(variant="default", seed=0, precision="fp32", prefix_frames=0) -> artifact dir, cached for the session."""
    from dia2_trt.export.build import BuildOptions, build_artifacts
    from dia2_trt.models.sources import resolve_checkpoint

    built: dict[tuple[str, int, str, int], Path] = {}

    def make(variant: str = "default", seed: int = 0, precision: str = "fp32", prefix_frames: int = 0) -> Path:
        key = (variant, seed, precision, prefix_frames)
        if key not in built:
            files = resolve_checkpoint(checkpoint=checkpoint_factory(variant, seed))
            out = tmp_path_factory.mktemp(f"art-{variant}-{seed}-{precision}-p{prefix_frames}") / "artifacts"
            build_artifacts(files, out, BuildOptions(precision=precision, prefix_frames=prefix_frames))
            built[key] = out
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("default", 0)


@pytest.fixture(scope="session")
def tiny_artifacts(artifacts_factory) -> Path:
    return artifacts_factory("default", 0, "fp32")


# --- the committed fixture (no export, no torch) ----------------------------------


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """The committed tiny artifact directory (read only)."""
    return FIXTURE


@pytest.fixture(scope="session")
def runtime(artifacts):
    """One loaded runtime for every server and solo run: sessions on it run side by side."""
    from dia2_trt.runtime import Dia2Runtime

    return Dia2Runtime.load(artifacts, threads=1)
