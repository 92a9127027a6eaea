"""dia2-rt bench --positions / --streams, the per-contender roofline and time to first audio in frame-times,
on the committed tiny fixture (no export, no torch): structure and sanity, no timing claims."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from dia2_trt.benchmarks.harness import Contender, roofline, summarize, weight_elements_per_frame
from dia2_trt.benchmarks.streams import load_runtime, scripts
from dia2_trt.runtime import GenerationParams
from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.cli import main
from dia2_trt.runtime.manifest import QuantizationRecord

PNG = b"\x89PNG\r\n\x1a\n"


def _bench(*args: str):
    return CliRunner().invoke(main, ["bench", *args])


def _one_line_error(done) -> str:
    assert done.exit_code == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and not any("Traceback" in line for line in lines)
    return lines[-1]


# --- --positions ---------------------------------------------------------------------------------


def test_positions_measure_each_component_at_each_position(artifacts, tmp_path):
    out = tmp_path / "pos"
    done = _bench("--artifacts", str(artifacts), "--positions", "100,0,208,500", "--frames", "3", "--repeats", "2",
                  "--warmup-frames", "1", "--out", str(out))
    assert done.exit_code == 0, done.stderr
    result = json.loads((out / "positions_bench.json").read_text())
    (run,) = result["artifacts"]
    capacity = load_manifest(artifacts, verify=False).cache_capacity
    assert run["cache_capacity"] == capacity == 209
    assert [row["position"] for row in run["positions"]] == [0, 100, 208]  # sorted, the one past the cache skipped
    assert run["skipped"] == [{"position": 500, "reason": "past the cache capacity (209 rows, positions 0..208)"}]
    rows_read = [row["cache_rows_read"] for row in run["positions"]]
    # ONNX Runtime's cache grows with the rows written: each step reads at least its own row, at most the capacity
    assert all(p + 1 <= r <= capacity for p, r in zip((0, 100, 208), rows_read)) and rows_read == sorted(rows_read)
    for row in run["positions"]:
        assert set(row["seconds"]) == {"backbone", "depformer", "codec"}
        assert all(s["n"] == 3 * 2 and 0 < s["p10"] <= s["median"] <= s["p90"] for s in row["seconds"].values())
        assert row["frame_seconds"] == pytest.approx(sum(s["median"] for s in row["seconds"].values()))
    assert run["positions"][0]["over_first"] == run["positions"][0]["backbone_over_first"] == 1.0
    last = run["positions"][-1]
    assert last["backbone_over_first"] == pytest.approx(
        last["seconds"]["backbone"]["median"] / run["positions"][0]["seconds"]["backbone"]["median"])
    table = (out / "positions_bench.md").read_text()
    assert "| tiny-artifacts (fp32) | 1 | 208 | 209 |" in table and "position 500 skipped" in table
    assert (out / "positions.png").read_bytes().startswith(PNG)
    assert "| backbone ms |" in done.stdout


def test_positions_refused_in_one_line(artifacts, tmp_path):
    out = tmp_path / "pos"
    assert "integers" in _one_line_error(_bench("--artifacts", str(artifacts), "--positions", "0,x", "--out", str(out)))
    assert ">= 0" in _one_line_error(_bench("--artifacts", str(artifacts), "--positions", "-1", "--out", str(out)))
    error = _one_line_error(_bench("--artifacts", str(artifacts), "--positions", "900", "--no-plots",
                                   "--out", str(out)))
    assert "no position fits" in error and "209 rows" in error
    error = _one_line_error(_bench("--artifacts", str(artifacts), "--positions", "0", "--streams", "9",
                                   "--no-plots", "--out", str(out)))
    assert "at most 8 streams" in error
    assert "run one at a time" in _one_line_error(
        _bench("--artifacts", str(artifacts), "--positions", "0", "--prefix", "--out", str(out)))
    assert not out.exists()  # nothing written by a refused run


def test_positions_with_several_streams_step_them_together(artifacts, tmp_path):
    out = tmp_path / "pos"
    done = _bench("--artifacts", str(artifacts), "--positions", "0,150", "--streams", "1,3", "--frames", "2",
                  "--repeats", "1", "--warmup-frames", "1", "--no-plots", "--out", str(out))
    assert done.exit_code == 0, done.stderr
    result = json.loads((out / "positions_bench.json").read_text())
    assert [(a["name"], a["streams"]) for a in result["artifacts"]] == [("tiny-artifacts", 1), ("tiny-artifacts", 3)]
    for a in result["artifacts"]:
        assert [row["position"] for row in a["positions"]] == [0, 150]
        for row in a["positions"]:
            assert row["frame_seconds_per_stream"] == pytest.approx(row["frame_seconds"] / a["streams"])
    assert "| tiny-artifacts (fp32) | 3 | 150 |" in (out / "positions_bench.md").read_text()


# --- --streams ------------------------------------------------------------------------------------


def test_streams_run_together_on_one_runtime(artifacts, tmp_path):
    out = tmp_path / "streams"
    done = _bench("--artifacts", str(artifacts), "--streams", "2,1", "--frames", "12", "--repeats", "1",
                  "--warmup-frames", "2", "--out", str(out))
    assert done.exit_code == 0, done.stderr
    result = json.loads((out / "streams_bench.json").read_text())
    assert result["frame_rate"] == 12.5 and result["settings"]["streams"] == [1, 2]
    assert result["max_streams"] == 2  # batched: the largest count, within the fixture's 8
    for n, row in zip((1, 2), result["counts"]):
        assert row["streams"] == n
        (run,) = row["raw"]
        assert len(run["streams"]) == n
        frames = [len(s["marks"]) for s in run["streams"]]
        assert all(0 < f <= 12 for f in frames) and run["frames"] == sum(frames)
        for s in run["streams"]:  # marks from the common release: in order, audio between start and end
            assert s["marks"] == sorted(s["marks"]) and 0 < s["marks"][-1] <= s["end"] <= run["wall_seconds"]
            assert 0 < s["first_audio"] <= s["end"]
        assert row["aggregate_frames_per_second"] == pytest.approx(run["frames"] / run["wall_seconds"])
        assert row["per_stream_frames_per_second"] == pytest.approx(1e3 / row["ms_per_frame_per_stream"])
        assert 0 <= row["real_time_streams"] <= n and row["streams_without_audio"] == 0
        assert 0 < row["ttfa_ms"]["p50"] <= row["ttfa_ms"]["p99"] and row["ttfa_ms"]["n"] == n
        assert row["ttfa_frame_times"]["p50"] == pytest.approx(row["ttfa_ms"]["p50"] / row["ms_per_frame_per_stream"])
    table = (out / "streams_bench.md").read_text()
    assert "| 1 | " in table and "| 2 | " in table and "TTFA p99 ms" in table
    assert (out / "streams.png").read_bytes().startswith(PNG)


def test_streams_batch_within_the_artifacts_maximum(artifacts):
    rt, batch = load_runtime(str(artifacts), 12, "onnxruntime", 1)
    try:
        assert batch == rt.max_streams == load_manifest(artifacts, verify=False).max_streams == 8
    finally:
        rt.close()


def test_streams_get_different_scripts_that_fit(runtime):
    texts = scripts(runtime, 6, 40)
    assert len(set(texts)) == 6
    m = runtime.manifest
    for text in texts:
        needed = runtime.frames_needed(runtime.parse(text), GenerationParams())
        assert needed <= min(m.max_context_steps, m.cache_capacity)


def test_streams_refused_in_one_line(artifacts, tmp_path):
    out = tmp_path / "streams"
    for bad in ("0", "1,65", "two"):
        assert "--streams" in _one_line_error(_bench("--artifacts", str(artifacts), "--streams", bad,
                                                     "--out", str(out)))


# --- the roofline: each contender's own bytes ------------------------------------------------------


def _int4_copy(artifacts: Path, tmp_path: Path) -> Path:
    """The fixture with its step graphs recorded as int4 weight-only (bytes 14.1 % of fp32): only the
    manifest changes, which is all the roofline reads."""
    copy = Path(shutil.copytree(artifacts, tmp_path / "int4"))
    raw = json.loads((copy / "manifest.json").read_text())
    raw["precision"] = "int4"
    record = QuantizationRecord("int4", 4, True, 64, ("MatMul",), weights={
        "matmul_weights": {"count": 10, "bits": 4, "fp32_bytes": 100_000, "bytes": 14_100}}).to_json()
    for name in ("backbone", "depformer"):
        raw["graphs"][name].update(precision="int4", quantization=record)
    (copy / "manifest.json").write_text(json.dumps(raw))
    return copy


def _run(frame_seconds: list[float], parts: list[tuple[float, float, float]], outside_codec: float = 0.0,
         first_audio: float | None = None) -> dict:
    """A worker's run result: per frame its duration and (backbone, depformer, codec) seconds."""
    frame_parts = [dict(zip(("backbone", "depformer", "codec"), p)) for p in parts]
    totals = {c: sum(p[c] for p in frame_parts) for c in ("backbone", "depformer", "codec")}
    totals["codec"] += outside_codec
    return {"frames": len(parts), "wall_seconds": sum(frame_seconds) + outside_codec, "samples": 1,
            "first_audio_seconds": first_audio, "frame_seconds": frame_seconds, "frame_parts": frame_parts,
            "component_seconds": totals, "peak_rss_bytes": 1}


INFO = {"frame_rate": 12.5, "load_seconds": 0.1, "peak_rss_load_bytes": 1}


def test_roofline_reads_each_contenders_own_graphs(artifacts, tmp_path):
    fp32 = load_manifest(artifacts, verify=False)
    int4_dir = _int4_copy(artifacts, tmp_path)
    elements = weight_elements_per_frame(fp32.topology)
    runs = [_run([0.01] * 4, [(0.003, 0.003, 0.003)] * 4, first_audio=0.03)]


    def bytes_of(kind: str, source: Path) -> dict:
        spec = Contender("c", kind, str(source), "x", "onnxruntime")
        return summarize(spec, INFO, runs, fp32, 1e10)["roofline"]["weight_bytes_per_frame"]

    # the manifest passed is the first --artifacts' (fp32): the int4 contender still gets its own bytes
    assert bytes_of("runtime", artifacts) == {**{k: 4 * v for k, v in elements.items()},
                                              "total": 4 * sum(elements.values())}
    int4 = bytes_of("runtime", int4_dir)
    assert int4["backbone"] == int(elements["backbone"] * 4 * 0.141)
    assert int4["depformer"] == int(elements["depformer"] * 4 * 0.141)
    # the reference reads fp32 tensors whatever the first artifacts hold
    assert roofline(load_manifest(int4_dir, verify=False), 1e10, float_only=True)["weight_bytes_per_frame"] \
        == bytes_of("runtime", artifacts)
    half = replace(fp32, graphs={k: replace(g, precision="fp16") for k, g in fp32.graphs.items()})
    assert roofline(half, 1e10)["weight_bytes_per_frame"]["backbone"] == 2 * elements["backbone"]


def test_steady_frames_leave_out_the_lead_in(artifacts):
    """The fixture's delays reach 3: frames 0-2 skip work (here: no depformer, no codec), frames 3-5 are
    steady. Frame time, breakdown and TTFA in frame-times come from the steady frames; work after the
    last frame (a batch decode) is spread over every frame."""
    manifest = load_manifest(artifacts, verify=False)
    assert manifest.max_delay == 3
    lead_in, steady = [(0.001, 0.0, 0.0)] * 3, [(0.001, 0.006, 0.002)] * 3
    runs = [_run([0.0015] * 3 + [0.01] * 3, lead_in + steady, outside_codec=0.006, first_audio=0.03)]
    spec = Contender("c", "runtime", str(artifacts), "fp32", "onnxruntime")
    summary = summarize(spec, INFO, runs, manifest, 1e10)
    assert summary["steady_from_frame"] == 3
    assert summary["frame_seconds"]["median"] == pytest.approx(0.01) and summary["frame_seconds"]["n"] == 3
    parts = summary["breakdown_seconds_per_frame"]
    assert parts["backbone"] == pytest.approx(0.001) and parts["depformer"] == pytest.approx(0.006)
    assert parts["codec"] == pytest.approx(0.002 + 0.006 / 6)
    assert parts["host"] == pytest.approx(0.01 - 0.009)
    assert summary["breakdown_whole_run_seconds_per_frame"]["depformer"] == pytest.approx(0.003)
    assert summary["first_audio_frame_times"] == pytest.approx(3.0)
    # a run too short to reach the steady state: every frame counts
    short = summarize(spec, INFO, [_run([0.01] * 3, lead_in)], manifest, 1e10)
    assert short["steady_from_frame"] == 0 and short["frame_seconds"]["n"] == 3


def test_speak_summary_gives_first_audio_in_ms_and_frame_times(artifacts, tmp_path):
    done = CliRunner().invoke(main, ["speak", "[S1] Hello there, how are you?", "--artifacts", str(artifacts),
                                     "--out", str(tmp_path / "a.wav"), "--threads", "1"])
    assert done.exit_code == 0, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "first audio after " in line]
    assert " ms (" in line and "frame-times)" in line
    frames = float(line.split(" ms (")[1].split(" frame-times")[0])
    assert frames > 0
