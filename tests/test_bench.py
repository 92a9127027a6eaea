"""dia2-rt bench on the tiny checkpoint: the JSON has every field with sane values (no timing claims)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dia2_trt.benchmarks.harness import weight_elements_per_frame

torch = pytest.importorskip("torch")

FEW = ["--frames", "5", "--repeats", "2", "--warmup-frames", "2", "--backend", "onnxruntime"]


def bench(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from dia2_trt.runtime.cli import main; main()", "bench", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def check_contender(c: dict, frame_rate: float) -> None:
    assert c["frames_per_run"] and all(0 < n <= 5 for n in c["frames_per_run"])
    fps = c["frames_per_second"]
    assert 0 < fps["p10"] <= fps["median"] <= fps["p90"]
    per_run = [r["wall_seconds"] * frame_rate / r["frames"] for r in c["raw"]["runs"]]
    assert min(per_run) - 1e-9 <= c["real_time_factor"]["median"] <= max(per_run) + 1e-9
    assert c["first_audio_seconds"] is None or c["first_audio_seconds"]["median"] > 0
    if c["first_audio_seconds"] is not None:  # time to first audio in steady frame-times
        assert c["first_audio_frame_times"] == pytest.approx(
            c["first_audio_seconds"]["median"] / c["frame_seconds"]["median"])
    assert c["frame_seconds"]["median"] > 0
    parts = c["breakdown_seconds_per_frame"]
    assert set(parts) == {"backbone", "depformer", "codec", "host"}
    assert all(parts[k] > 0 for k in ("backbone", "depformer"))
    assert c["peak_rss_bytes"] >= c["peak_rss_load_bytes"] > 10 * 2**20
    line = c["roofline"]
    assert line["min_frame_seconds"] == pytest.approx(
        line["weight_bytes_per_frame"]["total"] / line["bandwidth_bytes_per_second"])
    assert 0 < line["achieved_over_roofline"] < 1


def test_bench_reference_and_runtime(tiny_artifacts, tmp_path):
    out = tmp_path / "bench"
    proc = bench(["--artifacts", str(tiny_artifacts), *FEW, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "bench.json").read_text())
    assert [c["name"] for c in result["contenders"]] == ["reference", "onnxruntime-fp32"]
    assert result["bandwidth"]["read_bytes_per_second"] > 1e8
    assert result["settings"]["schedule"] == "interleaved"
    frame_rate = json.loads((tiny_artifacts / "manifest.json").read_text())["codec"]["frame_rate"]
    for c in result["contenders"]:
        check_contender(c, frame_rate)
    ref, rt = result["contenders"]
    assert ref["speedup_vs_reference"] == 1.0 and rt["speedup_vs_reference"] > 0
    table = (out / "bench.md").read_text()
    assert "| onnxruntime-fp32 |" in table and "| first audio ms | first audio frames |" in table
    assert (out / "latency.png").stat().st_size > 0 and (out / "breakdown.png").stat().st_size > 0


def test_bench_without_torch_skips_the_reference(tiny_artifacts, tmp_path):
    """A torch that cannot be imported (shadowed on PYTHONPATH) leaves the runtime contenders running."""
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('torch is hidden for this test')\n")
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    out = tmp_path / "bench"
    proc = bench(["--artifacts", str(tiny_artifacts), *FEW, "--no-plots", "--out", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "bench.json").read_text())
    assert [c["name"] for c in result["contenders"]] == ["onnxruntime-fp32"]
    assert result["skipped"][0]["contender"] == "reference" and "torch" in result["skipped"][0]["reason"]
    assert result["contenders"][0]["speedup_vs_reference"] is None
    assert "skipped reference" in proc.stdout


def _used_parameters(model, topology: dict) -> dict[str, int]:
    """Weight elements one frame reads, counted from the torch model's parameters."""
    rows = 2
    backbone = sum(p.numel() for name, p in model.transformer.named_parameters() if "embed" not in name
                   or "proj" in name)
    e = topology["n_embd"]
    base = topology.get("low_rank_dim") or e
    backbone += 2 * rows * base + topology["audio_channels"] * rows * e
    dep = model.depformer
    depformer = 0
    for stage, sid in enumerate(dep.schedule):
        sid = str(sid)
        depformer += dep.depformer_in[sid].weight.numel() + dep.logits[stage].weight.numel()
        depformer += rows * dep.audio_embeds[stage].weight.shape[1] + dep.norm.weight.numel()
        for layer in dep.layers:
            att = layer.self_attention
            depformer += att.in_proj[sid].weight.numel() + att.out_proj[sid].weight.numel()
            depformer += sum(p.numel() for p in (*layer.mlp.parameters(), *layer.pre_norm.parameters(),
                                                 *layer.post_norm.parameters(), *att.q_norm.parameters(),
                                                 *att.k_norm.parameters()))
    if dep.text_embed is not None:  # stage 0 only
        depformer += 2 * rows * dep.text_embed.embedding.weight.shape[1]
        depformer += dep.text_embed.main_proj.weight.numel() + dep.text_embed.second_proj.weight.numel()
    return {"backbone": backbone, "depformer": depformer}


@pytest.mark.parametrize("which", ["tiny", "text_embedding", "2b"])
def test_roofline_counts_match_the_model(which, checkpoint_factory):
    from dia2_trt.export.manifest import topology
    from dia2_trt.models.config import load_config
    from dia2_trt.models.dia2 import Dia2Model
    from dia2_trt.models.tiny import default_topology_path, meta_model_from_topology

    if which != "2b":
        variant = "default" if which == "tiny" else which
        model = Dia2Model(load_config(Path(checkpoint_factory(variant)) / "config.json"))
    else:
        model = meta_model_from_topology(default_topology_path())
    topo = topology(model.config)
    assert weight_elements_per_frame(topo) == _used_parameters(model, topo.to_json())


def test_bench_profile_lists_each_graphs_top_ops(tiny_artifacts, tmp_path):
    out = tmp_path / "bench"
    proc = bench(["--artifacts", str(tiny_artifacts), *FEW, "--no-reference", "--no-plots", "--profile",
                  "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    (c,) = json.loads((out / "bench.json").read_text())["contenders"]
    graphs = c["node_profile"]
    assert set(graphs) == {"backbone", "depformer", "codec_decoder"}
    for summary in graphs.values():
        # warm-up (one run per frame, up to 2) plus two repeats of up to 5 frames
        assert summary["runs"] >= 3 and summary["ops"]
        assert all(o["ms"] > 0 and 0 < o["percent"] <= 100 and o["calls"] >= 1 for o in summary["ops"])
        assert sum(o["percent"] for o in summary["ops"]) <= 100 + 1e-6
    assert "onnxruntime-fp32 / depformer" in (out / "bench.md").read_text()


def test_node_profile_summary_counts_kernels(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from dia2_trt.benchmarks.node_profile import markdown, summarize

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    nodes = [helper.make_node("Add", ["x", "x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["b", "x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "g.onnx")
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "trace")
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"x": np.ones(4, np.float32)})
    summary = summarize(session.end_profiling())
    assert summary["runs"] == 3
    calls = {o["op"]: o["calls"] for o in summary["ops"]}
    assert calls == {"Add": 6, "Relu": 3}
    assert "| Add |" in markdown({"c": {"g": summary}})
