"""The exported graphs against the PyTorch model, and the build/validate CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dia2_trt.export.graphs import BackboneStep
from dia2_trt.models.reference import guidance, mask_special_audio
from dia2_trt.models.sources import load_model, resolve_checkpoint
from dia2_trt.models.tokens import resolve_token_ids
from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.manifest import (
    CACHE_ROWS,
    STREAM_ROWS,
    STREAMS,
    VERSION,
    EngineEntry,
    EngineValidation,
    Manifest,
    QuantizationRecord,
    cache_name,
)
from dia2_trt.runtime.params import GenerationParams


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tiny_artifacts):
    files = resolve_checkpoint(checkpoint=tiny_checkpoint)
    model = load_model(files)
    return model, resolve_token_ids(model.config, files.tokenizer_dir), load_manifest(tiny_artifacts)


def _session(artifacts: Path, manifest: Manifest, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(manifest.graph(graph).path), providers=["CPUExecutionProvider"])


def test_backbone_matches_pytorch_over_50_teacher_forced_steps(tiny, tiny_artifacts):
    model, _, manifest = tiny
    session = _session(tiny_artifacts, manifest, "backbone")
    gen = torch.Generator().manual_seed(1)
    tokens = BackboneStep.example_inputs(model, manifest.cache_capacity, streams=1)[0]
    cfg = model.config
    dec = cfg.model.decoder
    # Stacked [L, B, Hkv, S, D] for the reference path; the graph takes one layer per input.
    k_cache = torch.zeros(dec.n_layer, 2, dec.kv_heads, manifest.cache_capacity, dec.gqa_head_dim)
    v_cache = torch.zeros_like(k_cache)
    worst = 0.0
    for t in range(50):
        tokens[:, :2] = torch.randint(0, cfg.data.text_vocab_size, (2, 2), generator=gen)
        tokens[:, 2:] = torch.randint(0, cfg.data.audio_vocab_size, (2, cfg.data.audio_channels), generator=gen)
        # The reference path writes the cache itself and attends with SDPA: an independent check.
        positions = torch.full((2, 1), t)
        with torch.no_grad():
            ref_hidden, ref_action, ref_cb0 = model.transformer.step_reference(
                tokens.unsqueeze(-1), positions, k_cache, v_cache, torch.tensor(t))
        feeds = {"tokens": tokens.numpy(), "position": np.array([t]), "cache_length": np.array([t]),
                 **{f"k_cache.{i}": k_cache[i].numpy() for i in range(dec.n_layer)},
                 **{f"v_cache.{i}": v_cache[i].numpy() for i in range(dec.n_layer)}}
        hidden, action, cb0, k_new, v_new = session.run(None, feeds)
        for ours, ref in ((hidden, ref_hidden[:, 0]), (action, ref_action[:, 0]), (cb0, ref_cb0[:, 0])):
            worst = max(worst, float(np.abs(ours - ref.numpy()).max()))
        # k_new must be exactly what the reference wrote at row t (used by the next step).
        np.testing.assert_allclose(k_new, k_cache[:, :, :, t].numpy(), atol=1e-5)
        np.testing.assert_allclose(v_new, v_cache[:, :, :, t].numpy(), atol=1e-5)
    assert worst <= 1e-4


STREAMS_IN_ONE_CALL = 3


def _stream_feeds(manifest: Manifest, rng: np.random.Generator) -> tuple[dict, dict]:
    """Backbone and depformer feeds for 3 streams, each at its own position, cache length, sampler
    settings and noise (greedy and sampled, CFG on and off, a filter past TOPK_MAX)."""
    s, topo = STREAMS_IN_ONE_CALL, manifest.topology
    bb = manifest.graph("backbone")
    rows = 40  # the caches' valid rows: stream 2 reads all of them, the others fewer
    tokens = rng.integers(0, min(topo.text_vocab_size, topo.audio_vocab_size), (2 * s, topo.channels))
    caches = {t.name: rng.standard_normal((2 * s, t.shape[1], rows, t.shape[3])).astype(t.dtype)
              for t in bb.inputs if t.name.startswith(("k_cache.", "v_cache."))}
    backbone = {"tokens": tokens, "position": np.array([3, 17, 38]), "cache_length": np.array([4, 17, 40]),
                **caches}
    depformer = {"text_tokens": rng.integers(0, topo.text_vocab_size, (s, 2)),
                 "noise": rng.random((s, manifest.audio_channels), dtype=np.float32),
                 "temperature": np.array([0.0, 0.9, 1.2], np.float32), "top_k": np.array([50, 0, 3]),
                 "cfg_scale": np.array([1.0, 3.0, 0.3], np.float32), "cfg_filter_k": np.array([50, 65, 2])}
    return backbone, depformer


def _solo_feeds(feeds: dict, s: int, pair_rows: set[str]) -> dict:
    """Stream ``s``'s part of ``feeds``: its two rows of the ``pair_rows`` inputs, its entry of the others."""
    return {k: v[2 * s:2 * s + 2] if k in pair_rows else v[s:s + 1] for k, v in feeds.items()}


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_streams_in_one_call_are_their_solo_calls(artifacts_factory, precision):
    """S = 3 streams in one backbone and one depformer call give, row for row, what three one-stream calls
    give: logits and K/V rows equal to float tolerance with the same greedy picks, identical tokens."""
    manifest = load_manifest(artifacts_factory("default", 0, precision))
    backbone, depformer = (_session(manifest.root, manifest, g) for g in ("backbone", "depformer"))
    bb_feeds, dep_feeds = _stream_feeds(manifest, np.random.default_rng(7))
    names = [o.name for o in backbone.get_outputs()]
    batched = dict(zip(names, backbone.run(None, bb_feeds)))
    cache_inputs = {k for k in bb_feeds if k.startswith(("k_cache.", "v_cache.")) or k == "tokens"}
    worst = 0.0
    for s in range(STREAMS_IN_ONE_CALL):
        solo = dict(zip(names, backbone.run(None, _solo_feeds(bb_feeds, s, cache_inputs))))
        for name, value in solo.items():
            mine = batched[name][:, 2 * s:2 * s + 2] if name in ("k_new", "v_new") else batched[name][2 * s:2 * s + 2]
            worst = max(worst, float(np.abs(mine - value).max()))
            if name.endswith("_logits"):
                np.testing.assert_array_equal(mine.argmax(-1), value.argmax(-1))
    # ONNX Runtime may pick other GEMM kernels for other batch sizes: equal up to float rounding
    assert worst <= 1e-4, worst
    # the depformer: from the batched backbone's rows, the same tokens alone as together
    feeds = {"hidden": batched["hidden"], "cb0_logits": batched["cb0_logits"] * 4, **dep_feeds}
    (tokens,) = depformer.run(None, feeds)
    assert tokens.shape == (STREAMS_IN_ONE_CALL, manifest.audio_channels)
    for s in range(STREAMS_IN_ONE_CALL):
        (alone,) = depformer.run(None, _solo_feeds(feeds, s, {"hidden", "cb0_logits"}))
        np.testing.assert_array_equal(tokens[s], alone[0])


def _reference_frame(model, ids, hidden, cb0_logits, main, second, params):
    """The PyTorch loop's per-stage path (models/reference.py) at temperature 0."""
    dep = model.depformer
    cfg = model.config
    dshape = (len(dep.layers), 2, cfg.model.depformer.kv_heads, max(dep.num_depth, 1), cfg.model.depformer.gqa_head_dim)
    dk, dv = torch.zeros(dshape), torch.zeros(dshape)
    token = int(torch.argmax(mask_special_audio(guidance(cb0_logits, params), ids)))
    out = [token]
    mains, seconds = torch.full((2,), main), torch.full((2,), second)
    for stage in range(dep.num_depth):
        logits = dep.stage_reference(stage, torch.full((2,), token), hidden, mains, seconds, dk, dv)
        token = int(torch.argmax(guidance(logits, params)))
        out.append(token)
    return out


# filter_k 65: past graphs.TOPK_MAX, so cb0's 66 guided logits take the full-sort branch
@pytest.mark.parametrize("cfg_scale,filter_k", [(2.0, 50), (1.0, 50), (2.0, 65), (2.0, 0)])
def test_depformer_graph_is_exactly_the_pytorch_loop_at_temperature_0(tiny, tiny_artifacts, cfg_scale, filter_k):
    model, ids, manifest = tiny
    session = _session(tiny_artifacts, manifest, "depformer")
    params = GenerationParams(audio_temperature=0.0, cfg_scale=cfg_scale, cfg_filter_k=filter_k)
    gen = torch.Generator().manual_seed(2)
    cfg = model.config
    q, vocab = cfg.data.audio_channels, cfg.data.audio_vocab_size
    for _ in range(40):
        hidden = torch.randn(2, cfg.model.decoder.n_embd, generator=gen) * 3
        cb0 = torch.randn(2, vocab, generator=gen) * 4
        main, second = (int(x) for x in torch.randint(0, cfg.data.text_vocab_size, (2,), generator=gen))
        with torch.no_grad():
            expected = _reference_frame(model, ids, hidden, cb0[:, None], main, second, params)
        feeds = {"hidden": hidden.numpy(), "cb0_logits": cb0.numpy(), "text_tokens": np.array([[main, second]]),
                 "noise": np.random.default_rng(0).random((1, q), dtype=np.float32),
                 "temperature": np.zeros(1, np.float32), "top_k": np.array([50]),
                 "cfg_scale": np.array([cfg_scale], np.float32), "cfg_filter_k": np.array([filter_k])}
        (tokens,) = session.run(None, feeds)
        assert tokens.shape == (1, q) and tokens[0].tolist() == expected


def _reference_cb0_distribution(cb0: torch.Tensor, ids, temperature: float, top_k: int, params) -> np.ndarray:
    """Exact probabilities of the reference sampler (softmax -> top-k -> renormalise) for cb0."""
    logits = mask_special_audio(guidance(cb0[:, None], params), ids).reshape(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    top, idx = torch.topk(probs, top_k)
    out = torch.zeros_like(probs)
    out[idx] = top / top.sum()
    return out.numpy().astype(np.float64)


def test_depformer_sampling_follows_the_reference_distribution(tiny, tiny_artifacts):
    """Chi-square goodness of fit of the in-graph inverse-CDF sampler for cb0."""
    model, ids, manifest = tiny
    session = _session(tiny_artifacts, manifest, "depformer")
    cfg = model.config
    q, vocab = cfg.data.audio_channels, cfg.data.audio_vocab_size
    params = GenerationParams(cfg_scale=2.0, cfg_filter_k=12)
    torch.manual_seed(3)
    cb0 = torch.randn(2, vocab)
    temperature, top_k, draws = 0.9, 8, 3000
    expected = _reference_cb0_distribution(cb0, ids, temperature, top_k, params)
    rng = np.random.default_rng(4)
    feeds = {"hidden": np.zeros((2, cfg.model.decoder.n_embd), np.float32), "cb0_logits": cb0.numpy(),
             "text_tokens": np.array([[5, 6]]), "temperature": np.array([temperature], np.float32),
             "top_k": np.array([top_k]), "cfg_scale": np.array([2.0], np.float32), "cfg_filter_k": np.array([12])}
    counts = np.zeros(vocab)
    for _ in range(draws):
        feeds["noise"] = rng.random((1, q), dtype=np.float32)
        counts[session.run(None, feeds)[0][0, 0]] += 1
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token outside the reference's support"
    stat = float(((counts[support] - draws * expected[support]) ** 2 / (draws * expected[support])).sum())
    # 99.9% quantile of chi-square with (support - 1) <= 7 degrees of freedom is 24.3.
    assert stat < 24.3, f"chi-square {stat:.1f} over {support.sum()} tokens"


@pytest.mark.parametrize("k", [1, 3, 64, 65, 200, 2050])
def test_kth_largest_is_the_sorted_order_with_ties(k):
    """Both branches (TopK up to TOPK_MAX, else the full sort) give the k-th sorted value, ties included."""
    from dia2_trt.export.graphs import kth_largest

    gen = torch.Generator().manual_seed(k)
    values = torch.randint(-20, 20, (1, 2050), generator=gen).float()  # every value repeats ~50 times
    expected = torch.sort(values, descending=True).values[0, k - 1]
    assert kth_largest(values, torch.tensor([k])).item() == expected.item()


def test_kth_largest_takes_each_rows_own_k():
    """Rows with k on both sides of TOPK_MAX in one call: each row's own k-th value, whichever branch runs."""
    from dia2_trt.export.graphs import TOPK_MAX, kth_largest

    values = torch.randint(-20, 20, (4, 2050), generator=torch.Generator().manual_seed(5)).float()
    ordered = torch.sort(values, dim=1, descending=True).values
    for ks in ([1, 3, TOPK_MAX, 2], [1, TOPK_MAX + 1, 200, 2050]):
        got = kth_largest(values, torch.tensor(ks))
        assert got.shape == (4, 1)
        assert got[:, 0].tolist() == [ordered[row, k - 1].item() for row, k in enumerate(ks)]


def test_graphs_are_portable_onnx(tiny_artifacts):
    for name, graph in load_manifest(tiny_artifacts).graphs.items():
        model = onnx.load(str(graph.path))
        domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
        assert not domains, f"{name} uses non-standard ops: {domains}"
        if name != "codec_encoder":  # the encoder takes clips of any length
            for value in list(model.graph.input) + list(model.graph.output):
                dims = value.type.tensor_type.shape.dim
                # the one open axis a step graph has is bounded by the manifest: the backbone cache's rows
                assert all(d.HasField("dim_value") or d.dim_param in graph.dims for d in dims), \
                    f"{name}.{value.name} has an unbounded dynamic shape"
        assert graph.sha256


def test_manifest_describes_the_artifacts(tiny_artifacts, tiny_checkpoint):
    raw = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert raw["format"] == "dia2-trt-artifacts" and raw["version"] == VERSION
    manifest = load_manifest(tiny_artifacts)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert list(manifest.delays) == config["data"]["delay_pattern"]
    assert manifest.cache_capacity == config["runtime"]["max_context_steps"] + 1
    assert manifest.token_ids.bos == 1 and manifest.max_padding == 6
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.tools)
    assert set(manifest.source.files) == {"config.json", "model.safetensors"}
    backbone = manifest.graph("backbone")
    assert backbone.input(cache_name("k", 0)).shape[2] == CACHE_ROWS
    n = manifest.max_streams
    assert raw["max_streams"] == n == 8  # the build's default
    assert backbone.dims == {STREAMS: n, STREAM_ROWS: 2 * n, CACHE_ROWS: manifest.cache_capacity}
    assert backbone.input("tokens").shape[0] == STREAM_ROWS and backbone.input("position").shape == (STREAMS,)
    assert manifest.graph("depformer").dims == {STREAMS: n, STREAM_ROWS: 2 * n}
    assert manifest.graph("depformer").output("audio_tokens").shape == (STREAMS, manifest.audio_channels)
    assert {cache_name("v", i) for i in range(manifest.topology.n_layer)} <= {t.name for t in backbone.inputs}
    assert manifest.codec.samples_per_frame * manifest.codec.frame_rate == manifest.codec.sample_rate
    assert [p.input for p in manifest.graph("codec_decoder").state] and not manifest.graph("codec_encoder").state
    assert "tokenizer.json" in manifest.tokenizer.files and (manifest.tokenizer_dir / "tokenizer.json").is_file()


def test_manifest_round_trips_through_json(tiny_artifacts):
    raw = json.loads((tiny_artifacts / "manifest.json").read_text())
    manifest = Manifest.from_json(raw, tiny_artifacts)
    assert manifest.to_json() == raw
    again = Manifest.from_json(json.loads(json.dumps(manifest.to_json())), tiny_artifacts)
    assert again == manifest


def test_manifest_round_trips_optional_entries(tiny_artifacts):
    """Engine and quantization records (written by other tools) survive a round trip unchanged too."""
    manifest = load_manifest(tiny_artifacts).with_engine("backbone", EngineEntry(
        file="backbone.plan", sha256="0" * 64, tensorrt="10.13.0", gpu="NVIDIA H200", compute_capability="9.0",
        built_at="2026-12-01T04:00:00+00:00", validation=EngineValidation(True, 8, 1e-3, 1e-3)))
    quantized = replace(manifest.graph("depformer"), quantization=QuantizationRecord(
        scheme="int8-qdq", bits=8, symmetric=True, block_size=None, ops=("MatMul", "Gemm"), calibration="minmax"))
    manifest = replace(manifest, graphs={**manifest.graphs, "depformer": quantized})
    raw = json.loads(json.dumps(manifest.to_json()))
    assert Manifest.from_json(raw, tiny_artifacts) == manifest
    assert Manifest.from_json(raw, tiny_artifacts).to_json() == raw
    assert raw["graphs"]["backbone"]["engine"]["gpu"] == "NVIDIA H200"


def test_max_streams_is_recorded_and_bounds_the_graphs(tiny_checkpoint, tmp_path):
    """--max-streams N: the manifest records it, the step graphs' stream axes (the codec decoder's too)
    are bounded by it, and the TensorRT profiles span 1..N; an int4 copy made from them keeps it."""
    from dia2_trt.export.build import BuildOptions, quantize_artifacts
    from dia2_trt.export.tensorrt import axis_ranges

    result = _run_cli("build", "--checkpoint", str(tiny_checkpoint), "--max-streams", "3", "--out",
                      str(tmp_path / "fp32"))
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / "fp32")
    assert manifest.max_streams == 3
    for name in ("backbone", "depformer"):
        spec = manifest.graph(name)
        assert spec.dims[STREAMS] == 3 and spec.dims[STREAM_ROWS] == 6
        ranges = axis_ranges(manifest, spec)
        assert ranges[STREAMS] == (1, 3, 3) and ranges[STREAM_ROWS] == (2, 6, 6)
    codec = manifest.graph("codec_decoder")
    assert codec.dims == {STREAMS: 3} and axis_ranges(manifest, codec)[STREAMS] == (1, 3, 3)
    int4 = quantize_artifacts(tmp_path / "fp32", tmp_path / "int4", BuildOptions(precision="int4"))
    assert int4.max_streams == 3 and int4.graph("depformer").dims == manifest.graph("depformer").dims
    assert int4.graph("codec_decoder").dims == codec.dims  # its weight-only copy keeps the bound


def test_fp16_artifacts_validate(artifacts_factory, tiny_checkpoint):
    art = artifacts_factory("default", 0, "fp16")
    backbone = load_manifest(art).graph("backbone")
    assert backbone.input("k_cache.0").dtype == np.float16 and backbone.input("tokens").dtype == np.int64
    result = _run_cli("validate", str(art), "--checkpoint", str(tiny_checkpoint), "--steps", "12",
                      "--codec-frames", "8", "--report", str(art / "report.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((art / "report.json").read_text())
    assert report["passed"] and report["precision"] == "fp16"


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dia2_trt.export", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert lines and lines[-1].startswith("Error: "), result.stderr
    return lines[-1]


def test_validate_refuses_another_checkpoint(tiny_artifacts, checkpoint_factory):
    """The manifest's source.files hashes say which weights the graphs came from."""
    other = checkpoint_factory("default", 1)
    line = _error_line(_run_cli("validate", str(tiny_artifacts), "--checkpoint", str(other), "--steps", "1"))
    assert "is not the checkpoint these artifacts were built from" in line


def test_validate_cli_reports_per_output_errors(tiny_artifacts, tiny_checkpoint, tmp_path):
    report = tmp_path / "report.json"
    result = _run_cli("validate", str(tiny_artifacts), "--checkpoint", str(tiny_checkpoint), "--steps", "50",
                      "--codec-frames", "310", "--report", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    backbone = data["graphs"]["backbone"]
    assert backbone["iterations"] == 50 and backbone["outputs"]["cb0_logits"]["max_abs"] <= 1e-4
    assert data["graphs"]["codec_decoder"]["vs_batch_decode_max_abs"] <= 1e-4
    assert data["graphs"]["depformer"]["token_agreement"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--size", "3B"], "invalid value for '--size'"),
    (["--size", "tiny", "--precision", "int3"], "unknown precision"),
    (["--size", "tiny", "--max-streams", "0"], "invalid value for '--max-streams'"),
    (["--size", "tiny", "--max-streams", "65"], "invalid value for '--max-streams'"),
])
def test_build_rejects_bad_options(tmp_path, args, message):
    out = tmp_path / "out"
    result = _run_cli("build", *args, "--out", str(out))
    assert message in _error_line(result).lower()
    assert not out.exists()


def test_build_rejects_missing_checkpoint_files(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    out = tmp_path / "out"
    line = _error_line(_run_cli("build", "--checkpoint", str(broken), "--out", str(out)))
    assert "model.safetensors" in line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_build_rejects_unwritable_output(tiny_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root ignores directory modes; /proc refuses new entries to everyone.
    parent = Path("/proc") if os.access(locked, os.W_OK) else locked
    try:
        line = _error_line(_run_cli("build", "--checkpoint", str(tiny_checkpoint), "--out", str(parent / "dia2-out")))
        assert "cannot write" in line
        assert not (parent / "dia2-out").exists()
    finally:
        locked.chmod(0o700)


def test_build_refuses_to_clobber_a_non_empty_directory(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _error_line(_run_cli("build", "--checkpoint", str(tiny_checkpoint), "--out", str(out)))
    assert "--overwrite" in line and (out / "keep.txt").read_text() == "mine"


def test_build_refuses_a_tokenizer_the_runtime_would_read_differently(tiny_checkpoint, monkeypatch):
    from dia2_trt.models import tokens
    from dia2_trt.runtime.tokenizer import TextTokenizer

    tokens.check_tokenizer(tiny_checkpoint)  # the tiny tokenizer agrees
    monkeypatch.setattr(TextTokenizer, "encode", lambda self, text: [0])
    with pytest.raises(tokens.TokenizerMismatch, match="would not match the reference"):
        tokens.check_tokenizer(tiny_checkpoint)


def test_build_shows_stages_and_one_summary(tiny_checkpoint, tmp_path):
    out = tmp_path / "art"
    result = subprocess.run([sys.executable, "-m", "dia2_trt.export", "build", "--checkpoint", str(tiny_checkpoint),
                             "--out", str(out)], capture_output=True, text=True)  # warnings not silenced here
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("[build ") for line in lines[:-1]), result.stderr
    assert len(lines) >= 5 and lines[-1].startswith(f"built {out} (fp32) in ")
    assert "backbone.onnx" in lines[-1] and "in all" in lines[-1]


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_build_output_drops_python_and_native_writes(verbose):
    code = textwrap.dedent(f"""
        import os, sys, warnings
        from dia2_trt.export.console import quiet_descriptors
        with quiet_descriptors({verbose}) as console:
            print("chatter on stdout")
            warnings.warn("a third-party warning")
            os.write(2, b"native chatter\\n")
            print("[build] stage", file=console)
        print("after")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "[build] stage" in result.stderr and result.stdout.strip().endswith("after")
    noisy = "chatter on stdout" in result.stdout and "native chatter" in result.stderr and "warning" in result.stderr
    assert noisy == verbose, (result.stdout, result.stderr)
