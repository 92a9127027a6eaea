"""The fp16 KV cache option: the backbone's cache inputs and new rows in fp16, the attention in fp32."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from dia2_trt.export.artifact_dir import BuildError
from dia2_trt.export.build import BuildOptions, _cache_dtype, check_request
from dia2_trt.export.manifest import write_manifest
from dia2_trt.runtime import Dia2Runtime, GenerationParams
from dia2_trt.runtime.artifacts import load_manifest

from conftest import FIXTURE

GREEDY = GenerationParams(text_temperature=0.0, audio_temperature=0.0)
SCRIPT = "[S1] Hello there, how are you? [S2] I am fine, thanks."


@pytest.fixture(scope="module")
def fp16_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16-cache") / "art"
    shutil.copytree(FIXTURE, out)
    manifest = load_manifest(out, verify=False)
    graphs = dict(manifest.graphs)
    _cache_dtype(out, graphs, BuildOptions(cache_dtype="float16"), lambda msg: None)
    write_manifest(replace(manifest, graphs=graphs, root=out), out)
    return out


def test_the_cache_is_fp16_at_the_graph_boundary(fp16_cache):
    spec = load_manifest(fp16_cache).graph("backbone")  # checksums verified: the manifest matches the file
    assert spec.input("k_cache.0").dtype == spec.input("v_cache.1").dtype == np.float16
    assert spec.output("k_new").dtype == spec.output("v_new").dtype == np.float16
    assert spec.output("hidden").dtype == np.float32


def test_fp16_cache_speaks_like_the_fp32_cache_here(fp16_cache):
    """On the fixture the rounded cache changes no greedy token (measured), alone and batched."""
    fp32 = Dia2Runtime.load(FIXTURE, max_streams=1).speak(SCRIPT, GREEDY)
    for streams in (1, 4):
        runtime = Dia2Runtime.load(fp16_cache, max_streams=streams)
        np.testing.assert_array_equal(runtime.speak(SCRIPT, GREEDY).tokens, fp32.tokens)


def test_an_fp16_build_keeps_its_own_cache(tmp_path):
    with pytest.raises(BuildError, match="--cache-dtype float32"):
        check_request(tmp_path / "out", BuildOptions(precision="fp16", cache_dtype="float32"))
