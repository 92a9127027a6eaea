"""Weight-only INT8/INT4 artifacts: standard ONNX, fused by ONNX Runtime, smaller, and still speaking."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dia2_trt.export.build import BuildOptions, quantize_artifacts
from dia2_trt.export.weight_only import WeightOnlyScheme, pack_int4, quantize_blocks, quantize_model_file
from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.backends import OrtBackend
from dia2_trt.runtime.params import GenerationParams

PRECISIONS = ("int8", "int4")
STEP_GRAPHS = ("backbone", "depformer")
QUANTIZED_GRAPHS = (*STEP_GRAPHS, "codec_decoder")  # the codec decoder in 8 bits in both (build.CODEC_BITS)
# Goals for the 2B backbone: int8 weights <= 30% and int4 <= 17% of the fp32 bytes.
MAX_RATIO = {"int8": 0.30, "int4": 0.17}
GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)


@pytest.fixture(scope="module")
def tiny_artifacts() -> Path:
    """The committed fp32 tiny fixture (python -m dia2_trt.export.tiny_fixture): no torch export needed."""
    return Path(__file__).parent / "data" / "tiny-artifacts"


@pytest.fixture(scope="module")
def quantized(tiny_artifacts, tmp_path_factory):
    """precision -> artifact dir, quantized from the fp32 tiny artifacts."""
    root = tmp_path_factory.mktemp("quantized")
    return {p: Path(_quantize(tiny_artifacts, root / p, BuildOptions(precision=p))) for p in PRECISIONS}


def _quantize(src: Path, out: Path, options: BuildOptions) -> Path:
    quantize_artifacts(src, out, options)
    return out


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _dq_matmul_pairs(model: onnx.ModelProto) -> int:
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq_outputs)


def _optimized(path: Path, out: Path, accuracy_level: int | None) -> onnx.ModelProto:
    opts = OrtBackend(threads=1).session_options(1, accuracy_level)
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", QUANTIZED_GRAPHS)
def test_onnxruntime_fuses_every_dequantized_matmul(quantized, tmp_path, precision, graph):
    art = quantized[precision]
    spec = _manifest(art)["graphs"][graph]
    model = onnx.load(str(art / spec["file"]))
    pairs = _dq_matmul_pairs(model)  # more than the weights: a shared weight is stored once per reader
    assert pairs >= spec["quantization"]["weights"]["matmul_weights"]["count"] > 0
    level = spec["quantization"]["ort_accuracy_level"]
    optimized = _optimized(art / spec["file"], tmp_path / "opt.onnx", level)
    fused = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == pairs, "ONNX Runtime stopped fusing DequantizeLinear -> MatMul into MatMulNBits"
    assert _dq_matmul_pairs(optimized) == 0
    bits = 8 if precision == "int8" or graph == "codec_decoder" else 4
    assert spec["quantization"]["bits"] == bits
    for node in fused:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == bits and attrs["accuracy_level"] == level


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_graphs_are_standard_onnx(quantized, precision):
    for graph in QUANTIZED_GRAPHS:
        qtype = TensorProto.INT8 if precision == "int8" or graph == "codec_decoder" else TensorProto.INT4
        path = quantized[precision] / f"{graph}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        inits = {t.name: t for t in model.graph.initializer}
        dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert dqs
        for node in dqs:
            assert len(node.input) == 2, "symmetric: no zero point (TensorRT rejects unsigned + zero point)"
            assert {a.name for a in node.attribute} == {"axis", "block_size"}
            if node.input[0] in inits:  # a MatMul weight: blocked along the input axis
                assert {a.name: a.i for a in node.attribute}["axis"] == 0
                assert inits[node.input[0]].data_type == qtype


@pytest.mark.parametrize("precision", PRECISIONS)
def test_weight_bytes_shrink(quantized, tiny_artifacts, precision):
    """The quantized weights meet the 2B byte goals; whole tiny graphs shrink too, less (tiny's RoPE tables
    and sub-1024-element weights stay float and are a large share of so small a model)."""
    manifest = _manifest(quantized[precision])
    for graph in STEP_GRAPHS:
        record = manifest["graphs"][graph]["quantization"]
        matmul = record["weights"]["matmul_weights"]
        assert matmul["bytes"] <= MAX_RATIO[precision] * matmul["fp32_bytes"]
        tables = record["weights"]["gather_tables"]
        assert tables["bits"] == 8 and tables["bytes"] <= MAX_RATIO["int8"] * tables["fp32_bytes"]
        before = _weight_bytes(tiny_artifacts / f"{graph}.onnx")
        assert _weight_bytes(quantized[precision] / f"{graph}.onnx") < 0.6 * before


@pytest.mark.parametrize("precision", PRECISIONS)
def test_int8_codec_decodes_close_to_fp32(quantized, tiny_artifacts, precision):
    """The same random codes through the fp32 and the quantized decoder, streaming 12 frames."""
    spec = _manifest(tiny_artifacts)["graphs"]["codec_decoder"]
    sessions = [OrtBackend(threads=1).open_session(load_manifest(art).graph("codec_decoder"))
                for art in (tiny_artifacts, quantized[precision])]
    rng = np.random.default_rng(1)
    def one_stream(shape):
        return [1 if d == "streams" else d for d in shape]

    codes_shape = one_stream(next(t["shape"] for t in spec["inputs"] if t["name"] == "codes"))
    states = [{t["name"]: np.zeros(one_stream(t["shape"]), t["dtype"]) for t in spec["inputs"]
               if t["name"] not in ("codes", "active")} for _ in sessions]
    pcm = [[], []]
    for _ in range(12):
        codes = rng.integers(0, 64, size=codes_shape).astype(np.int64)
        for k, session in enumerate(sessions):
            names = [o.name for o in session.get_outputs()]
            out = dict(zip(names, session.run(None, {"codes": codes, "active": np.ones(1, np.bool_), **states[k]})))
            pcm[k].append(out["pcm"].ravel())
            states[k] = {p["input"]: out[p["output"]] for p in spec["state"]}
    ref, got = np.concatenate(pcm[0]), np.concatenate(pcm[1])
    snr = 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())
    assert snr > 30, f"int8 codec decoder: {snr:.1f} dB SNR against fp32"


def _weight_bytes(path: Path) -> int:
    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)


def test_int8_is_closer_to_fp32_than_int4(quantized, tiny_artifacts):
    """One backbone step on random inputs: both close to fp32, int8 closer (a wrong scale or
    nibble order would not be)."""
    spec = _manifest(tiny_artifacts)["graphs"]["backbone"]
    rng = np.random.default_rng(0)
    feeds = {}
    for t in spec["inputs"]:
        # every stream (8 at the bound) and all cache rows
        shape = [spec["dims"].get(d, d) if isinstance(d, str) else d for d in t["shape"]]
        if t["dtype"] == "int64":
            feeds[t["name"]] = rng.integers(0, 60, size=shape).astype(np.int64)
        else:
            feeds[t["name"]] = rng.standard_normal(shape).astype(np.float32) * 0.1
    feeds["position"] = np.full_like(feeds["position"], 3)
    ref = _run(tiny_artifacts, feeds)
    error = {p: _run(quantized[p], feeds) for p in PRECISIONS}
    for name, value in ref.items():
        scale = float(np.abs(value).max()) or 1.0
        e8, e4 = (float(np.abs(error[p][name] - value).max()) / scale for p in PRECISIONS)
        assert e8 < 0.05 and e4 < 0.5 and e8 < e4, (name, e8, e4)


def _run(art: Path, feeds: dict) -> dict:
    session = ort.InferenceSession(str(art / "backbone.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_greedy_speak_runs_end_to_end(quantized, precision):
    runtime = Dia2Runtime.load(quantized[precision], threads=1)
    result = runtime.speak("[S1] Hello there, how are you? [S2] I am fine.", GenerationParams(**GREEDY))
    assert result.pcm.size > 0 and np.isfinite(result.pcm).all()
    assert runtime.manifest.precision == precision
    assert runtime.manifest.graph("backbone").quantization.ort_accuracy_level == 4


def test_external_data_is_streamed_to_the_same_graph(tiny_artifacts, tmp_path):
    """A graph past 2 GB keeps its weights in FILE.data: quantizing it gives what quantizing inline does."""
    inline, external = tmp_path / "inline.onnx", tmp_path / "external.onnx"
    shutil.copy(tiny_artifacts / "backbone.onnx", inline)
    onnx.save_model(onnx.load(str(inline)), str(external), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.onnx.data", size_threshold=0)
    scheme = WeightOnlyScheme(4, 32)
    quantize_model_file(inline, scheme)
    quantize_model_file(external, scheme)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["external.onnx", "external.onnx.data", "inline.onnx"]
    a, b = onnx.load(str(inline)), onnx.load(str(external))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        assert ta.name == tb.name
        np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))


def test_weight_shared_by_two_matmuls_is_fused_twice(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    quantize_model_file(path, WeightOnlyScheme(4, 32))
    ops = Counter(n.op_type for n in _optimized(path, tmp_path / "opt.onnx", 4).graph.node)
    assert ops["MatMulNBits"] == 2 and ops["MatMul"] == 0


def test_weight_read_through_transpose_is_quantized_as_its_transpose(tmp_path):
    """The exporter keeps a weight the depformer's stages share as W[out, in] with a Transpose per
    reader (593 of the 2B depformer's 660 MatMuls): each reader gets its own fused W^T."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32) / 8  # [out, in]
    nodes = [helper.make_node("Transpose", ["w"], ["wt0"], perm=[1, 0]),
             helper.make_node("Transpose", ["w"], ["wt1"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt0"], ["h"]), helper.make_node("MatMul", ["h", "wt1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "transposed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    quantize_model_file(path, WeightOnlyScheme(8, 32))
    model = onnx.load(str(path))
    assert not [n for n in model.graph.node if n.op_type == "Transpose"]
    ops = Counter(n.op_type for n in _optimized(path, tmp_path / "opt.onnx", 4).graph.node)
    assert ops["MatMulNBits"] == 2 and ops["MatMul"] == 0
    x = rng.standard_normal((2, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    expected = x @ w.T @ w.T
    np.testing.assert_allclose(y, expected, atol=0.05 * np.abs(expected).max())


@pytest.mark.parametrize("bits", (8, 4))
def test_blocks_round_trip_within_half_a_step(bits):
    w = np.random.default_rng(1).standard_normal((128, 48)).astype(np.float32)
    q, scale = quantize_blocks(w, bits, 32, axis=0)
    assert scale.shape == (4, 48) and np.abs(q).max() <= 2 ** (bits - 1) - 1
    error = np.abs(q * np.repeat(scale, 32, axis=0) - w)
    assert (error <= np.repeat(scale, 32, axis=0) / 2 + 1e-6).all()


def test_int4_packing_is_what_onnx_reads():
    q = np.array([[-7, 3, 0], [7, -1, 5]], dtype=np.int8)
    tensor = TensorProto(name="q", data_type=TensorProto.INT4, dims=q.shape, raw_data=pack_int4(q))
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int8), q)


@pytest.mark.parametrize("options,message", [
    (BuildOptions(precision="int2"), "unknown precision 'int2'"),
    (BuildOptions(precision="int4", block_size=48), "must be a power of two"),
    (BuildOptions(precision="int4", block_size=128), "block size 128 does not divide"),
    (BuildOptions(precision="fp32", block_size=32), "--block-size applies to int8 and int4"),
    (BuildOptions(precision="int8", opset=20), "needs opset >= 21"),
])
def test_bad_requests_fail_in_one_line_leaving_nothing(tiny_artifacts, tmp_path, options, message):
    with pytest.raises(ValueError, match=message) as info:
        quantize_artifacts(tiny_artifacts, tmp_path / "out", options)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary sibling


def test_cli_rejects_unknown_precision_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dia2_trt.export", "build", "--size", "tiny", "--precision",
                           "int3", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("Error: unknown precision 'int3'")
    assert not (tmp_path / "out").exists()
