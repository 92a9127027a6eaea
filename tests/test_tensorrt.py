"""TensorRT engines and backend. GPU-only: skipped, with the reason, where TensorRT or a GPU is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dia2_trt.export.tensorrt import have_gpu_tensorrt

AVAILABLE, REASON = have_gpu_tensorrt()
gpu = pytest.mark.skipif(not AVAILABLE, reason=f"needs an NVIDIA GPU with TensorRT: {REASON}")


def test_engines_cli_explains_why_it_cannot_run(tiny_artifacts):
    if AVAILABLE:
        pytest.skip("TensorRT is available here")
    result = subprocess.run([sys.executable, "-m", "dia2_trt.export", "engines", str(tiny_artifacts)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("Error: cannot build TensorRT engines here")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_match_onnxruntime(artifacts_factory, precision):
    from dia2_trt.export.tensorrt import build_engines

    art = artifacts_factory("default", 0, precision)
    built = build_engines(art, echo=lambda msg: None)
    assert all(e.validation.passed for e in built.values())
    graphs = json.loads((art / "manifest.json").read_text())["graphs"]
    assert {name for name, g in graphs.items() if "engine" in g} == set(built)


@pytest.mark.gpu
@gpu
def test_tensorrt_backend_speaks_the_same_greedy_tokens(artifacts_factory):
    from dia2_trt.export.tensorrt import build_engines
    from dia2_trt.runtime import Dia2Runtime
    from dia2_trt.runtime.params import GenerationParams
    from dia2_trt.runtime.tensorrt import TrtBackend

    art = artifacts_factory("default", 0, "fp32")
    build_engines(art, echo=lambda msg: None)
    params = GenerationParams(text_temperature=0.0, audio_temperature=0.0)
    text = "[S1] Hello there, how are you? [S2] I am fine, thanks."
    ort = Dia2Runtime.load(art).speak(text, params)
    trt = Dia2Runtime.load(art, backend=TrtBackend()).speak(text, params)
    assert np.array_equal(ort.tokens, trt.tokens)
    assert ort.timestamps == trt.timestamps


def test_profiles_span_one_to_max_streams_for_every_graph(artifacts_factory):
    """Every optimisation profile covers 1..N streams (opt N), 2..2N rows and 1..capacity cache rows,
    for every graph of the artifacts (prefill and codec included): pure shapes, no TensorRT needed."""
    from dia2_trt.export.tensorrt import axis_ranges, profile_shapes
    from dia2_trt.runtime.artifacts import load_manifest
    from dia2_trt.runtime.manifest import BACKBONE, CACHE_ROWS, CODEC_DECODER, DEPFORMER, STREAM_ROWS, STREAMS

    manifest = load_manifest(artifacts_factory("default", 0, "fp32", prefix_frames=8))
    n, capacity = manifest.max_streams, manifest.cache_capacity
    assert n == 8  # the build's default
    expected = {STREAMS: (1, n, n), STREAM_ROWS: (2, 2 * n, 2 * n), CACHE_ROWS: (1, capacity, capacity)}
    seen = set()
    for name, spec in manifest.graphs.items():
        shapes = profile_shapes(spec.inputs, axis_ranges(manifest, spec), name)
        assert set(shapes) == {t.name for t in spec.inputs if not t.static}, name
        for tensor in spec.inputs:
            for axis, dim in enumerate(tensor.shape):
                if dim in expected:
                    seen.add((name, dim))
                    assert tuple(s[axis] for s in shapes[tensor.name]) == expected[dim], (name, tensor.name)
    assert {(BACKBONE, STREAMS), (BACKBONE, STREAM_ROWS), (BACKBONE, CACHE_ROWS), (DEPFORMER, STREAMS),
            (DEPFORMER, STREAM_ROWS), (CODEC_DECODER, STREAMS)} <= seen
