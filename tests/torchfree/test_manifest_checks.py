"""A manifest is contained, verified and range-checked at load: anything wrong is one line naming it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dia2_trt.runtime import Dia2Runtime, artifacts
from dia2_trt.runtime.artifacts import ArtifactError, load_manifest

from .conftest import edit_manifest


def _refused(directory, match: str, **kwargs) -> str:
    with pytest.raises(ArtifactError, match=match) as info:
        load_manifest(directory, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _set(path: str, value):
    """An edit setting raw[a][b]... for path "a.b..." (list indices as numbers)."""
    def edit(raw):
        *head, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = raw
        for key in head:
            node = node[key]
        node[last] = value
    return edit


# --- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("graphs.backbone.file", "../backbone.onnx"),
    ("graphs.backbone.file", "/etc/passwd"),
    ("graphs.depformer.file", "tokenizer/../../depformer.onnx"),
    ("tokenizer.directory", ".."),
    ("tokenizer.directory", "/usr/share"),
])
def test_paths_outside_the_directory_are_refused(artifact_copy, field, value):
    edit_manifest(artifact_copy, _set(field, value))
    _refused(artifact_copy, f"{field} .* not a path inside the artifact directory")


def test_a_symbolic_link_out_of_the_directory_is_refused(artifact_copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(artifact_copy / "depformer.onnx", outside)
    (artifact_copy / "depformer.onnx").symlink_to(outside)
    _refused(artifact_copy, "graphs.depformer.file 'depformer.onnx' leads outside the artifact directory")


def test_an_engine_path_outside_is_refused(artifact_copy):
    engine = {"file": "../x.plan", "sha256": "0" * 64, "tensorrt": "10.13", "built_at": "2026-12-01T00:00:00+00:00"}
    edit_manifest(artifact_copy, _set("graphs.backbone.engine", engine))
    _refused(artifact_copy, "graphs.backbone.engine.file")


# --- checksums ----------------------------------------------------------------------------------


def _flip_middle_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the weights: the graph still parses
    path.write_bytes(bytes(data))


def test_a_tampered_graph_is_refused(artifact_copy):
    _flip_middle_byte(artifact_copy / "depformer.onnx")
    _refused(artifact_copy, "depformer.onnx: checksum mismatch")
    assert load_manifest(artifact_copy, verify=False).graph("depformer")  # the choice is the user's


def test_a_tampered_tokenizer_is_refused(artifact_copy):
    with open(artifact_copy / "tokenizer" / "tokenizer.json", "a") as f:
        f.write(" ")
    _refused(artifact_copy, "tokenizer.json: checksum mismatch")


def test_big_files_are_hashed_once_until_they_change(artifact_copy, monkeypatch):
    monkeypatch.setattr(artifacts, "CHEAP_BYTES", 0)  # every file counts as big
    load_manifest(artifact_copy)
    assert (artifact_copy / artifacts.STAMP).is_file()
    real = artifacts.sha256
    monkeypatch.setattr(artifacts, "sha256", lambda path: pytest.fail(f"hashed {path} again"))
    load_manifest(artifact_copy)
    monkeypatch.setattr(artifacts, "sha256", real)
    graph = artifact_copy / "depformer.onnx"
    before = graph.stat()
    _flip_middle_byte(graph)
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: ctime still moved
    _refused(artifact_copy, "depformer.onnx: checksum mismatch")


def test_speak_refuses_a_tampered_graph_unless_told_not_to_verify(artifact_copy, tmp_path):
    _flip_middle_byte(artifact_copy / "depformer.onnx")
    out = tmp_path / "out.wav"
    dia2_rt = str(Path(sys.executable).with_name("dia2-rt"))  # the console script of this venv
    args = [dia2_rt, "speak", "--artifacts", str(artifact_copy), "--quiet", "--out", str(out), "[S1] Hello."]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.count("\n") == 1 and "checksum mismatch" in proc.stderr
    proc = subprocess.run(args + ["--no-verify"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("token_ids.bos", 10**6, "token_ids.bos 1000000 is outside"),
    ("token_ids.audio_pad", -1, "token_ids.audio_pad -1 is outside"),
    ("delays.0", 0, r"delays\[0\] must be >= 1"),
    ("codec.frame_rate", -12.5, "codec.frame_rate must be > 0"),
    ("codec.frame_rate", math.inf, "codec.frame_rate must be > 0"),
    ("codec.sample_rate", 0, "codec.sample_rate must be > 0"),
    ("codec.samples_per_frame", 1000, "codec.samples_per_frame 1000 != sample_rate / frame_rate"),
    ("codec.codebook_size", 10**6, "codec.codebook_size"),
    ("cache_capacity", 3, "cache_capacity 3 != max_context_steps"),
    ("precision", "fp64", "precision: 'fp64' is not one of"),
    ("opset", "23", "opset: expected an integer"),
    ("topology.audio_vocab_size", 4096, "topology.audio_vocab_size"),
    ("graphs.backbone.inputs.0.dtype", "int32", "graphs.backbone.inputs.tokens: the manifest says int32"),
    ("graphs.depformer.inputs.3.shape", [1, 1], "graphs.depformer.inputs.noise: the manifest says float32 \\[1, 1\\]"),
    ("graphs.backbone.outputs.0.name", "renamed", "graphs.backbone.outputs.(hidden|renamed)"),
    ("graphs.backbone.sha256", "abc", "sha256 'abc' is not a hex digest"),
    ("graphs.extra", {}, "unknown graph 'extra'"),
    ("version", 99, "version 99 is not supported"),
    ("max_streams", 0, r"max_streams must be in \[1, 64\], got 0"),
    ("max_streams", 65, r"max_streams must be in \[1, 64\], got 65"),
    ("max_streams", "8", "max_streams: expected an integer"),
    ("max_streams", 4, r"graphs.backbone.dims.streams 8 != 4 \(max_streams 4\)"),
    ("graphs.depformer.dims.stream_rows", 8, r"graphs.depformer.dims.stream_rows 8 != 16"),
    ("graphs.backbone.inputs.1.shape", [1], r"graphs.backbone.inputs.position: the manifest says int64 \[1\]"),
])
def test_a_bad_field_is_named(artifact_copy, field, value, message):
    edit_manifest(artifact_copy, _set(field, value))
    _refused(artifact_copy, message)


def test_a_version_4_directory_is_refused_naming_the_rebuild(artifact_copy):
    """Artifacts from before the streams axis: one line that says how to get ones this runtime reads."""
    edit_manifest(artifact_copy, lambda raw: raw.update(version=4))
    message = _refused(artifact_copy, "manifest version 4 is not supported")
    assert "dia2-export build ... --overwrite" in message


def test_the_fixture_serves_streams(artifact_copy):
    """The committed fixture is batch-capable: max_streams recorded, the step graphs bounded by it."""
    m = load_manifest(artifact_copy, verify=False)
    assert m.max_streams == 8
    for name in ("backbone", "depformer"):
        assert m.graph(name).dims["streams"] == 8 and m.graph(name).dims["stream_rows"] == 16


def test_a_missing_field_is_named(artifact_copy):
    edit_manifest(artifact_copy, lambda raw: raw["codec"].pop("sample_rate"))
    _refused(artifact_copy, "missing field 'sample_rate'")


# --- the directory and its manifest file --------------------------------------------------------


def test_missing_artifacts(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_manifest(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="manifest.json not found"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("edit,message", [
    ("{not json", "corrupt manifest"),
    (lambda m: json.dumps({**m, "format": "other"}), "not a dia2-trt artifact"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "delays"}), "missing field 'delays'"),
    (lambda m: json.dumps({**m, "graphs": {**m["graphs"], "backbone": {**m["graphs"]["backbone"],
                                                                        "file": "gone.onnx"}}}), "graph file missing"),
])
def test_bad_artifacts(artifact_copy, edit, message):
    manifest = artifact_copy / "manifest.json"
    manifest.write_text(edit(json.loads(manifest.read_text())) if callable(edit) else edit)
    with pytest.raises(ArtifactError, match=message) as info:
        Dia2Runtime.load(artifact_copy)
    assert "\n" not in str(info.value)
