"""The TensorRT backend's refusal of engines built elsewhere: checked before deserialising, without TensorRT."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dia2_trt.runtime.artifacts import ArtifactError, EngineEntry, load_manifest
from dia2_trt.runtime.tensorrt import check_engine

from .conftest import FIXTURE

H200 = {"device": "NVIDIA H200", "compute_capability": "9.0"}


def _spec(tmp_path, **entry):
    fields = dict(file="backbone.plan", sha256="0" * 64, tensorrt="10.9.0", gpu="NVIDIA H200",
                  compute_capability="9.0", built_at="2026-12-01T00:00:00Z")
    (tmp_path / "backbone.plan").write_bytes(b"plan")
    spec = load_manifest(FIXTURE, verify=False).graph("backbone")
    return replace(spec, root=tmp_path, engine=EngineEntry(**{**fields, **entry}))


def test_an_engine_built_here_is_accepted(tmp_path):
    assert check_engine(_spec(tmp_path), "10.9.0", H200) == tmp_path / "backbone.plan"


def test_fields_the_build_could_not_record_are_left_to_tensorrt(tmp_path):
    assert check_engine(_spec(tmp_path, gpu=None, compute_capability=None), "10.9.0", H200).is_file()


@pytest.mark.parametrize("entry,message", [
    ({"tensorrt": "10.8.0"}, "backbone.plan: built with TensorRT 10.8.0, this is TensorRT 10.9.0; rebuild"),
    ({"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
     r"built for NVIDIA A100-SXM4-80GB \(compute 8.0\), this GPU is NVIDIA H200 \(compute 9.0\)"),
    ({"compute_capability": "8.9"}, r"compute 8.9\), this GPU is NVIDIA H200 \(compute 9.0\)"),
    ({"file": "gone.plan"}, "gone.plan: TensorRT engine missing"),
])
def test_an_engine_from_elsewhere_is_refused_with_the_reason(tmp_path, entry, message):
    with pytest.raises(ArtifactError, match=message):
        check_engine(_spec(tmp_path, **entry), "10.9.0", H200)


def test_a_graph_without_an_engine_is_refused():
    spec = load_manifest(FIXTURE, verify=False).graph("depformer")
    with pytest.raises(ArtifactError, match="graph 'depformer' has no TensorRT engine in the manifest"):
        check_engine(spec, "10.9.0", H200)
