"""The runtime's behaviour on the committed tiny fixture, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.manifest import Manifest
from dia2_trt.runtime.params import GenerationParams

from .conftest import FIXTURE

SCRIPT = "[S1] Hello there, how are you? [S2] I am fine, thanks."
GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)


@pytest.fixture(scope="module")
def runtime() -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE, threads=1)


def test_greedy_tokens_match_the_reference_golden(runtime, golden):
    """golden: the PyTorch reference loop's output, written by python -m dia2_trt.export.tiny_fixture."""
    result = runtime.speak(golden["script"], GenerationParams(**golden["params"]))
    assert result.tokens.tolist() == golden["tokens"]
    assert [[w, s] for w, s in result.timestamps] == golden["timestamps"]


def test_speak_says_every_word(runtime):
    result = runtime.speak(SCRIPT, GenerationParams(seed=3))
    assert result.sample_rate == runtime.manifest.sample_rate and result.pcm.dtype == np.float32
    assert result.pcm.size == result.tokens.shape[1] * runtime.manifest.samples_per_frame > 0
    assert [w for w, _ in result.timestamps] == SCRIPT.replace("[S1] ", "").replace("[S2] ", "").split()
    assert np.isfinite(result.pcm).all()


def test_sampling_is_deterministic_per_seed(runtime):
    first, again = (runtime.speak(SCRIPT, GenerationParams(seed=7)) for _ in range(2))
    assert np.array_equal(first.tokens, again.tokens) and np.array_equal(first.pcm, again.pcm)
    other = runtime.speak(SCRIPT, GenerationParams(seed=8))
    assert not np.array_equal(first.tokens, other.tokens)


def test_streaming_equals_the_whole(runtime):
    params = GenerationParams(seed=5)
    whole = runtime.speak(SCRIPT, params)
    chunks = list(runtime.stream(SCRIPT, params))
    assert len(chunks) > 1
    assert np.array_equal(np.concatenate([c.pcm for c in chunks]), whole.pcm)
    assert [w for c in chunks for w in c.words] == whole.timestamps


def test_fixture_manifest_is_verified_and_round_trips():
    manifest = load_manifest(FIXTURE)  # checksums included
    raw = json.loads((FIXTURE / "manifest.json").read_text())
    assert Manifest.from_json(raw, FIXTURE).to_json() == raw
    assert Manifest.from_json(manifest.to_json(), FIXTURE) == manifest


def test_speaking_never_imports_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from dia2_trt.runtime.cli import main
        sys.argv = ["dia2-rt", "speak", "--artifacts", {str(FIXTURE)!r}, "--quiet", "--out",
                    {str(tmp_path / "out.wav")!r}, "[S1] Hello there."]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        banned = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx")
                  or m.startswith(("dia2_trt.models", "dia2_trt.export", "dia2_trt.calibration"))]
        assert not banned, banned
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.wav").stat().st_size > 44
