"""The depformer's weight-sharing stages as one ONNX Loop (export/depformer_loop.py) and its unrolling.

A tiny checkpoint with the schedule [0, 1, 1, 1] has a repeated tail of three stages, like the 2B's
[0, 1, 2, 3, 4 x 27]: the Loop runs three iterations and its head tree splits 1 | 2.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dia2_trt.runtime.backends import OrtBackend

torch = pytest.importorskip("torch")

from dia2_trt.export.build import BuildOptions, build_artifacts, quantize_artifacts  # noqa: E402
from dia2_trt.export.depformer_loop import tail_stages  # noqa: E402
from dia2_trt.export.graphs import DepformerFrame  # noqa: E402
from dia2_trt.export.onnx_io import export_module  # noqa: E402
from dia2_trt.export.unroll import flat_graph, has_loop  # noqa: E402
from dia2_trt.export.weight_only import scopes  # noqa: E402

SCHEDULE = [0, 1, 1, 1]
TAIL = 3


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """(checkpoint files, model, token ids, fp32 artifacts, unrolled depformer.onnx) of the tail checkpoint."""
    from dia2_trt.models.sources import load_model, resolve_checkpoint
    from dia2_trt.models.tiny import build_tiny_checkpoint
    from dia2_trt.models.tokens import resolve_token_ids

    root = tmp_path_factory.mktemp("looped")
    ckpt = build_tiny_checkpoint(root / "ckpt", seed=2, overrides={"runtime.weights_schedule": SCHEDULE})
    files = resolve_checkpoint(checkpoint=ckpt)
    build_artifacts(files, root / "fp32", BuildOptions())
    model = load_model(files)
    ids = resolve_token_ids(model.config, files.tokenizer_dir)
    unrolled = root / "unrolled" / "depformer.onnx"
    unrolled.parent.mkdir()
    export_module(DepformerFrame(model, ids), DepformerFrame.example_inputs(model), DepformerFrame.input_names,
                  DepformerFrame.output_names, unrolled, 23, dynamic=DepformerFrame.dynamic_shapes)
    return files, model, ids, root / "fp32", unrolled


@pytest.fixture(scope="module")
def quantized(looped, tmp_path_factory):
    root = tmp_path_factory.mktemp("looped-q")
    out = {}
    for precision in ("int8", "int4"):
        quantize_artifacts(looped[3], root / precision, BuildOptions(precision=precision))
        out[precision] = root / precision
    return out


STREAMS = 3


def _frames(model, count: int = 12, seed: int = 0, streams: int = STREAMS) -> list[tuple]:
    """Depformer inputs for ``streams`` streams: greedy and sampled, CFG on and off, mixed in one call."""
    gen = torch.Generator().manual_seed(seed)
    example = DepformerFrame.example_inputs(model, streams)
    frames = []
    for i in range(count):
        per = [i + s for s in range(streams)]
        frames.append((torch.randn(example[0].shape, generator=gen), torch.randn(example[1].shape, generator=gen) * 3,
                       torch.randint(0, 64, (streams, 2), generator=gen), torch.rand(example[3].shape, generator=gen),
                       torch.tensor([0.0 if j % 2 == 0 else 0.8 for j in per]), torch.full((streams,), 50),
                       torch.tensor([2.0 if j % 4 < 2 else 1.0 for j in per]), torch.full((streams,), 50)))
    return frames


def _solo(args: tuple, s: int) -> tuple:
    """Stream ``s``'s inputs alone: its CFG pair's rows of hidden and cb0_logits, its entry of the rest."""
    rows = slice(2 * s, 2 * s + 2)
    return tuple(a[rows] if i < 2 else a[s:s + 1] for i, a in enumerate(args))


def _session(path, accuracy_level: int | None = None) -> ort.InferenceSession:
    opts = OrtBackend(threads=1).session_options(1, accuracy_level)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _tokens(session: ort.InferenceSession, frames: list[tuple]) -> list[np.ndarray]:
    return [session.run(None, {n: a.numpy() for n, a in zip(DepformerFrame.input_names, args)})[0]
            for args in frames]


def _op_counts(graph: onnx.GraphProto) -> Counter:
    return Counter(n.op_type for g in scopes(graph) for n in g.node)


@pytest.mark.parametrize("schedule,tail", [
    ([0, 1, 2, 3] + [4] * 27, 27),  # the 2B's
    ([0, 1, 1, 2], 0),  # the tiny default: the repeat is not at the end
    ([0, 1, 1, 1], 3),
    ([0, 0, 0], 2),  # stage 0 stays unrolled (it alone may add the text embedding)
    ([0, 1], 0),
    ([0], 0),
])
def test_tail_stages(schedule, tail):
    assert tail_stages(schedule) == tail


def test_loop_gives_torchs_and_the_unrolled_graphs_tokens(looped):
    _, model, ids, art, unrolled = looped
    graph = onnx.load(str(art / "depformer.onnx"))
    loops = [n for n in graph.graph.node if n.op_type == "Loop"]
    assert len(loops) == 1
    assert _op_counts(graph.graph)["If"] >= TAIL - 1  # the head tree, besides the sampler's
    frames = _frames(model)
    frame = DepformerFrame(model, ids).eval()
    with torch.no_grad():
        expected = [frame(*args).numpy() for args in frames]
    for got in (_tokens(_session(art / "depformer.onnx"), frames), _tokens(_session(unrolled), frames)):
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(g, e)
    assert len({tuple(e.ravel()) for e in expected}) > 1


@pytest.mark.parametrize("form", ["fp32", "int4"])
def test_each_stream_gets_its_solo_tokens(looped, quantized, form):
    """S = 3 streams with their own sampler settings and noise in one call: row for row the tokens of
    three one-stream calls, in the Loop form, fp32 and weight-only int4."""
    _, model, _, art, _ = looped
    session = _session((art if form == "fp32" else quantized[form]) / "depformer.onnx")
    frames = _frames(model, seed=3)
    for args, batched in zip(frames, _tokens(session, frames)):
        assert batched.shape == (STREAMS, model.config.data.audio_channels)
        for s in range(STREAMS):
            np.testing.assert_array_equal(batched[s], _tokens(session, [_solo(args, s)])[0][0])


def test_unrolled_copy_is_flat_and_gives_the_same_tokens(looped, tmp_path):
    _, model, _, art, _ = looped
    flat = flat_graph(art / "depformer.onnx")
    assert not has_loop(flat.graph) and _op_counts(flat.graph)["Loop"] == 0
    onnx.checker.check_model(flat, full_check=True)
    onnx.save(flat, str(tmp_path / "flat.onnx"))
    frames = _frames(model, seed=1)
    loop_tokens = _tokens(_session(art / "depformer.onnx"), frames)
    for a, b in zip(loop_tokens, _tokens(_session(tmp_path / "flat.onnx"), frames)):
        np.testing.assert_array_equal(a, b)


def _integer_weights(graph: onnx.GraphProto) -> list[bytes]:
    return [t.raw_data for g in scopes(graph) for t in g.initializer
            if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4) and len(t.dims) == 2]


def _dq_matmuls(graph: onnx.GraphProto) -> int:
    count = 0
    for g in scopes(graph):
        dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
        count += sum(1 for n in g.node if n.op_type == "MatMul" and n.input[1] in dq)
    return count


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_loop_holds_each_weight_once_and_fuses_it(looped, quantized, precision, tmp_path):
    from dia2_trt.export.weight_only import WeightOnlyScheme, fit_block_size, quantize_model_file

    path = quantized[precision] / "depformer.onnx"
    model = onnx.load(str(path))
    body = next(a.g for n in model.graph.node if n.op_type == "Loop" for a in n.attribute)
    in_loop = _integer_weights(body)
    assert len(in_loop) == len(set(in_loop)), "a weight is stored more than once in the loop"
    # Outside it, the unrolled stages before the tail share the MLP: one copy per reader, as before.
    held = _integer_weights(model.graph)
    assert max(Counter(held).values()) <= 1 + len(SCHEDULE) - TAIL
    # The unrolled graph needs a copy per reader: the loop holds fewer integer bytes.
    unrolled = tmp_path / "depformer.onnx"
    unrolled.write_bytes(looped[4].read_bytes())
    graph = onnx.load(str(unrolled), load_external_data=False).graph
    quantize_model_file(unrolled, fit_block_size(graph, WeightOnlyScheme(int(precision[-1]), 64)))
    unrolled_held = _integer_weights(onnx.load(str(unrolled)).graph)
    assert sum(map(len, held)) < sum(map(len, unrolled_held))
    # ONNX Runtime fuses every dequantized MatMul, in the Loop body and its If leaves too.
    pairs = _dq_matmuls(model.graph)
    manifest = json.loads((quantized[precision] / "manifest.json").read_text())
    level = manifest["graphs"]["depformer"]["quantization"]["ort_accuracy_level"]
    opts = OrtBackend(threads=1).session_options(1, level)
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "opt.onnx"))
    assert _op_counts(optimized.graph)["MatMulNBits"] == pairs >= TAIL + 2 * 4  # tail heads + body layers
    assert _dq_matmuls(optimized.graph) == 0


def test_quantized_loop_gives_the_unrolled_quantized_tokens(looped, quantized, tmp_path):
    """The same integer weights through the same fused kernel: the loop changes nothing but the copies."""
    from dia2_trt.export.weight_only import WeightOnlyScheme, fit_block_size, quantize_model_file

    unrolled = tmp_path / "depformer.onnx"
    unrolled.write_bytes(looped[4].read_bytes())
    quantize_model_file(unrolled, fit_block_size(onnx.load(str(unrolled)).graph, WeightOnlyScheme(4, 64)))
    level = json.loads((quantized["int4"] / "manifest.json").read_text())["graphs"]["depformer"]["quantization"]
    frames = _frames(looped[1], seed=2)
    a = _tokens(_session(quantized["int4"] / "depformer.onnx", level["ort_accuracy_level"]), frames)
    b = _tokens(_session(unrolled, level["ort_accuracy_level"]), frames)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("copy_quantized", [True, False])
def test_laid_out_quantized_graph_fuses_only_with_its_own_copies(looped, quantized, tmp_path, copy_quantized):
    """The accuracy report reads the stages' logits from an unrolled copy: with a weight copy per stage
    it runs the Loop's fused kernels (same tokens); sharing one, ONNX Runtime would dequantize instead."""
    art = quantized["int4"]
    level = json.loads((art / "manifest.json").read_text())["graphs"]["depformer"]["quantization"]
    level = level["ort_accuracy_level"]
    onnx.save(flat_graph(art / "depformer.onnx", copy_quantized=copy_quantized), str(tmp_path / "flat.onnx"))
    opts = OrtBackend(threads=1).session_options(1, level)
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "flat.onnx"), opts, providers=["CPUExecutionProvider"])
    assert (_dq_matmuls(onnx.load(str(tmp_path / "opt.onnx")).graph) == 0) == copy_quantized
    if copy_quantized:
        frames = _frames(looped[1], seed=3)
        loop = _tokens(_session(art / "depformer.onnx", level), frames)
        for a, b in zip(loop, _tokens(_session(tmp_path / "flat.onnx", level), frames)):
            np.testing.assert_array_equal(a, b)


def test_quantized_loop_speaks_greedily(quantized):
    from dia2_trt.runtime import Dia2Runtime
    from dia2_trt.runtime.params import GenerationParams

    for art in quantized.values():
        result = Dia2Runtime.load(art, threads=1).speak(
            "[S1] Hello there. [S2] Hi!", GenerationParams(text_temperature=0.0, audio_temperature=0.0))
        assert result.tokens.shape[0] == 1 + len(SCHEDULE) and result.pcm.size > 0


def test_accuracy_report_finds_every_codebook_head(looped):
    from dia2_trt.export.accuracy import _head_outputs

    heads = _head_outputs(looped[3] / "depformer.onnx")
    assert len(heads) == len(SCHEDULE)


def test_calibrated_qdq_lays_the_stages_out(looped, tmp_path):
    """Q/DQ calibration observes every stage's activations, so its graphs are the unrolled ones."""
    from dia2_trt.calibration.calibrate import calibrate_artifacts
    from dia2_trt.calibration.qdq import linear_matmuls
    from dia2_trt.runtime import Dia2Runtime
    from dia2_trt.runtime.params import GenerationParams

    art = looped[3]
    calibrate_artifacts(art, ["[S1] Hello there, how are you? [S2] I am fine."], tmp_path / "qdq", "int8-qdq")
    model = onnx.load(str(tmp_path / "qdq" / "depformer.onnx"))
    assert not has_loop(model.graph)
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq]
    assert len(quantized) == len(linear_matmuls(flat_graph(art / "depformer.onnx"))) > 0
    heads = [n for n in model.graph.node if n.op_type == "MatMul"
             and "depformer.logits." in next((p.value for p in n.metadata_props if "name_scopes" in p.key), "")]
    assert len(heads) == len(SCHEDULE) and all(n.input[1] not in dq for n in heads)
    result = Dia2Runtime.load(tmp_path / "qdq", threads=1).speak(
        "[S1] Hello.", GenerationParams(text_temperature=0.0, audio_temperature=0.0))
    assert result.pcm.size > 0


def test_tensorrt_gets_the_stages_laid_out(looped):
    """TensorRT's loops take no If inside: engines are built from an unrolled copy, removed afterwards."""
    from dia2_trt.export.tensorrt import laid_out
    from dia2_trt.runtime.graph_io import read_io

    art = looped[3]
    before = set(art.iterdir())
    with laid_out(art / "depformer.onnx") as source:
        assert source.parent == art and source != art / "depformer.onnx"
        assert not has_loop(onnx.load(str(source)).graph)
        assert read_io(source) == read_io(art / "depformer.onnx")
    assert set(art.iterdir()) == before
    with laid_out(art / "backbone.onnx") as source:
        assert source == art / "backbone.onnx"


def test_replay_copy_leaves_the_looped_artifact_loadable(looped, tmp_path):
    """ONNX Runtime refuses a Loop body's weights from a data file with a second hard link, so the
    replay (validate, calibrate) copies a looped graph's side file where it links the others."""
    import os

    from dia2_trt.export.accuracy import _head_outputs
    from dia2_trt.export.replay import _with_outputs

    src, work = tmp_path / "art", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    onnx.save_model(onnx.load(str(looped[3] / "depformer.onnx")), str(src / "depformer.onnx"),
                    save_as_external_data=True, location="depformer.onnx.data", size_threshold=1024)
    out = _with_outputs(src / "depformer.onnx", _head_outputs(src / "depformer.onnx"), work)
    assert os.stat(src / "depformer.onnx.data").st_nlink == 1
    frames = _frames(looped[1], count=2, seed=4)
    for a, b in zip(_tokens(_session(src / "depformer.onnx"), frames), _tokens(_session(out), frames)):
        np.testing.assert_array_equal(a, b)
    # What the copy avoids: a second link makes the looped graph unloadable, said in one line.
    from dia2_trt.runtime.artifacts import ArtifactError, load_manifest

    os.link(src / "depformer.onnx.data", tmp_path / "second-link.data")
    spec = load_manifest(looped[3]).graph("depformer")
    with pytest.raises(ArtifactError, match="more than one hard link; copy artifact directories"):
        OrtBackend(threads=1).open_session(spec, src / "depformer.onnx")
