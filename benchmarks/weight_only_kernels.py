"""Pick the weight-only block size and ORT accuracy level: one 2B-shaped MLP, every variant side by side.

    python benchmarks/weight_only_kernels.py [--layers 2] [--repeats 30] [--threads 2] [--json FILE]
    python benchmarks/weight_only_kernels.py --rows 2,16     # the same at 2 rows (one stream) and 16 (8)

Each variant is the same random fp32 graph (a stack of the 2B backbone's MLP
matmuls, 2048 -> 12288 and 6144 -> 2048, batch 2 as the CFG pair runs)
quantized by ``export.weight_only``. Runs alternate between variants so
machine noise lands on all alike. Reports median ms per run, speed over fp32,
whether ORT fused every MatMul into MatMulNBits, and the output error relative
to fp32 (max |diff| / max |fp32|). With ``--rows`` each variant runs at each row count (2 = one
stream's CFG pair, 16 = eight streams batched): how much a batch shares its weight reads. Measured
(2 threads, AVX-512 VNNI): fp32 16 rows 1.51x the time of 2, int4 at accuracy level 4 3.24x,
level 1 1.70x -- ONNX Runtime's int8-compute MatMulNBits does per-row work that a batch does not
share, which bounds what batching streams gains on this CPU for int4 artifacts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dia2_trt.export.weight_only import WeightOnlyScheme, quantize_model_file
from dia2_trt.runtime.backends import OrtBackend

D, HIDDEN = 2048, 6144  # the 2B backbone's n_embd and n_hidden


def mlp_graph(path: Path, layers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        wi = rng.standard_normal((D, 2 * HIDDEN), dtype=np.float32) * D ** -0.5
        wo = rng.standard_normal((HIDDEN, D), dtype=np.float32) * HIDDEN ** -0.5
        inits += [numpy_helper.from_array(wi, f"wi{i}"), numpy_helper.from_array(wo, f"wo{i}")]
        nodes += [helper.make_node("MatMul", [x, f"wi{i}"], [f"h{i}"]),
                  helper.make_node("Split", [f"h{i}"], [f"g{i}", f"u{i}"], axis=-1, num_outputs=2),
                  helper.make_node("Sigmoid", [f"g{i}"], [f"s{i}"]),
                  helper.make_node("Mul", [f"g{i}", f"s{i}"], [f"a{i}"]),
                  helper.make_node("Mul", [f"a{i}", f"u{i}"], [f"m{i}"]),
                  helper.make_node("MatMul", [f"m{i}", f"wo{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 1, D])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["rows", 1, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def variants() -> list[tuple[str, int | None, int, int | None]]:
    """(name, bits, block, accuracy level); level None leaves ORT's default."""
    out: list[tuple[str, int | None, int, int | None]] = [("fp32", None, 0, None)]
    for bits in (8, 4):
        for block in (32, 64, 128):
            out.append((f"int{bits}-b{block}-acc4", bits, block, 4))
        out.append((f"int{bits}-b64-acc1", bits, 64, 1))
        out.append((f"int{bits}-b64-default", bits, 64, None))
    return out


def session(path: Path, threads: int, level: int | None) -> tuple[ort.InferenceSession, int]:
    opts = OrtBackend(threads).session_options(threads, level)
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = sum(n.op_type == "MatMulNBits" for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return s, fused


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rows", default="2", help="row counts to run each variant at, e.g. 2,16")
    args = parser.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    work = Path(tempfile.mkdtemp(prefix="wo-kernels-"))
    try:
        report = run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, r in report.items():
        print(f"{name:28s} {r['median_ms']:8.2f} ms  x{r['speedup']:5.2f}  fused {r['fused']:2d}  "
              f"rel err {r['rel_error']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def run(work: Path, args) -> dict:
    base = work / "fp32.onnx"
    mlp_graph(base, args.layers)
    sessions = {}
    for name, bits, block, level in variants():
        path = base
        if bits:
            path = work / f"int{bits}-b{block}.onnx"
            if not path.exists():
                shutil.copy(base, path)
                shutil.copy(base.with_name(base.name + ".data"), path.with_name(path.name + ".data"))
                quantize_model_file(path, WeightOnlyScheme(bits, block))
        sessions[name] = session(path, args.threads, level)
    report = {}
    for rows in args.rows:
        x = np.random.default_rng(1).standard_normal((rows, 1, D), dtype=np.float32)
        for name, r in _time(sessions, x, args.repeats).items():
            report[name if len(args.rows) == 1 else f"{name} rows={rows}"] = r
    return report


def _time(sessions: dict, x: np.ndarray, repeats: int) -> dict:
    outputs = {name: s.run(None, {"x": x})[0] for name, (s, _) in sessions.items()}
    times = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, (s, _) in sessions.items():
            started = time.perf_counter()
            s.run(None, {"x": x})
            times[name].append(time.perf_counter() - started)
    ref, ref_ms = outputs["fp32"], statistics.median(times["fp32"]) * 1e3
    report = {}
    for name, (_, fused) in sessions.items():
        ms = statistics.median(times[name]) * 1e3
        report[name] = {"median_ms": ms, "speedup": ref_ms / ms, "fused": fused,
                        "rel_error": float(np.abs(outputs[name] - ref).max() / np.abs(ref).max())}
    return report


if __name__ == "__main__":
    main()
