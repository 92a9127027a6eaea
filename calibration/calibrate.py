"""``dia2-export calibrate``: fp32 artifacts + scripts -> calibrated Q/DQ artifacts (int8-qdq, fp8-qdq).

1. The runtime speaks each script over the fp32 artifacts (``collect.record``).
2. The fp32 backbone and depformer replay those steps with every quantized
   MatMul's activation exposed; the largest |x| per tensor is its range.
3. ``qdq.quantize_in_place`` rewrites both graphs, and the prefill graph where
   there is one, with the backbone's ranges (qdq.ranges_for); the codec graphs and
   the tokenizer are copied as they are. The result is written into a temporary
   sibling and renamed into place, so a failure leaves no directory behind.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from dia2_trt.export.artifact_dir import atomic_dir, check_output_dir, copy_tree, tree_bytes
from dia2_trt.export.manifest import write_manifest
from dia2_trt.export.replay import Replay, Trace, record
from dia2_trt.export.unroll import flat_graph
from dia2_trt.runtime.artifacts import load_manifest, sha256
from dia2_trt.runtime.manifest import BACKBONE, BACKBONE_PREFILL, DEPFORMER, FileRef, Manifest, QuantizationRecord
from dia2_trt.runtime.params import GenerationParams

from .qdq import QUANTIZED_GRAPHS, SCHEMES, activation_names, quantize_in_place, ranges_by_weight, ranges_for

# Calibration speaks with the runtime's default sampling (seeded): the activations
# a deployment sees, rather than a greedy run's often repetitive ones.
CALIBRATION_PARAMS = GenerationParams()


def check_calibrate_request(fp32_dir: Path, out: Path, precision: str, overwrite: bool) -> None:
    if precision not in SCHEMES:
        raise ValueError(f"unknown calibrated precision {precision!r}; choose one of {', '.join(SCHEMES)}")
    manifest = load_manifest(fp32_dir)
    if manifest.precision != "fp32":
        raise ValueError(f"{fp32_dir} is {manifest.precision}; calibrate from fp32 artifacts")
    if manifest.opset < SCHEMES[precision].min_opset:
        raise ValueError(f"{precision} needs opset >= {SCHEMES[precision].min_opset}; "
                         f"{fp32_dir} was built with opset {manifest.opset}")
    if Path(out).resolve() == Path(fp32_dir).resolve():
        raise ValueError("--out must differ from the fp32 artifact directory")
    check_output_dir(Path(out), overwrite)


def read_scripts(path: Path) -> list[str]:
    """One script per non-blank line; each must be a valid script."""
    from dia2_trt.runtime.script import check_script

    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"calibration scripts not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read calibration scripts {path}: {exc}") from None
    scripts = [line.strip() for line in lines if line.strip()]
    if not scripts:
        raise ValueError(f"{path} holds no calibration scripts (one script per line)")
    for number, script in enumerate(scripts, 1):
        try:
            check_script(script)
        except ValueError as exc:
            raise ValueError(f"{path}: script {number}: {exc}") from None
    return scripts


def calibrate_artifacts(fp32_dir: Path, scripts: Sequence[str], out: Path, precision: str, *,
                        every: int = 1, overwrite: bool = False,
                        progress: Callable[[str], None] = lambda msg: None) -> Manifest:
    """Build through export.artifact_dir's atomic_dir: a failure, SIGTERM or a full disk leaves nothing."""
    fp32_dir, out = Path(fp32_dir), Path(out)
    check_calibrate_request(fp32_dir, out, precision, overwrite)
    return atomic_dir(out, overwrite, _calibrate_bytes(load_manifest(fp32_dir)),
                      lambda tmp: _calibrate_into(fp32_dir, scripts, tmp, precision, every, progress))


def _calibrate_bytes(source: Manifest) -> int:
    """About the peak: the size of the fp32 artifacts (tiny: 3.03 MB seen, 3.6 estimated). The
    Replay's re-saved graphs hard-link big side files, and the Q/DQ graphs are smaller than fp32."""
    return tree_bytes(source.root)


def _calibrate_into(fp32_dir: Path, scripts, tmp: Path, precision: str, every: int, progress) -> None:
    started = time.perf_counter()
    source = load_manifest(fp32_dir)
    progress(f"speaking {len(scripts)} calibration script(s) with the fp32 runtime")
    traces = record(fp32_dir, scripts, CALIBRATION_PARAMS)
    targets = {g: activation_names(flat_graph(source.graph(g).path, load_external_data=False))
               for g in QUANTIZED_GRAPHS}
    progress(f"observing {sum(map(len, targets.values()))} activations over "
             f"{sum(t.steps for t in traces)} steps (every {every})")
    amax, observed = observe_ranges(fp32_dir, traces, targets, every, workdir=tmp)
    graphs = dict(source.graphs)
    if BACKBONE_PREFILL in graphs:
        amax[BACKBONE_PREFILL] = _prefill_ranges(source, amax[BACKBONE])
    for name in _quantized_names(source):
        progress(f"quantizing {name} ({precision})")
        spec = source.graph(name)
        stats = _quantize_graph(spec.path, tmp, amax[name], precision)
        graphs[name] = replace(spec, precision=precision, root=tmp, **_file_entry(tmp / spec.file),
                               quantization=_record(precision, stats, traces, observed, every))
    _copy_rest(source, tmp)
    manifest = replace(source, precision=precision, graphs=graphs, root=tmp)
    write_manifest(manifest, tmp)  # atomic_dir has the runtime's loader check it
    progress(f"done in {time.perf_counter() - started:.1f}s")


def _quantized_names(source) -> tuple[str, ...]:
    """The calibrated graphs, and the prefill where there is one: copied in fp32 beside a Q/DQ backbone,
    a prefix warmed through it cached K/V rows 0.07 (int8-qdq) and 0.23 (fp8-qdq) off the step-wise
    ones (rows of magnitude 4) and changed the greedy tokens after it."""
    return QUANTIZED_GRAPHS + ((BACKBONE_PREFILL,) if BACKBONE_PREFILL in source.graphs else ())


def _prefill_ranges(source, backbone_amax: dict[str, float]) -> dict[str, float]:
    """The prefill's activation ranges: the backbone's, matched through the weights both graphs hold."""
    step, prefill = source.graph(BACKBONE), source.graph(BACKBONE_PREFILL)
    by_weight = ranges_by_weight(flat_graph(step.path, load_external_data=False), backbone_amax, step.path.parent)
    return ranges_for(flat_graph(prefill.path, load_external_data=False), by_weight, prefill.path.parent,
                      BACKBONE_PREFILL)


def observe_ranges(fp32_dir: Path, traces: list[Trace], targets: dict[str, list[str]], every: int,
                   workdir: Path | None = None) -> tuple[dict[str, dict[str, float]], int]:
    """Largest |x| per activation and graph over the observed steps, and how many steps were observed."""
    amax = {g: dict.fromkeys(names, 0.0) for g, names in targets.items()}
    replay = Replay(fp32_dir, extra=targets, workdir=workdir)
    observed = 0
    try:
        for trace in traces:
            for t, step in enumerate(replay.run(trace, CALIBRATION_PARAMS, extra_at=lambda t: t % every == 0)):
                if t % every:
                    continue
                observed += 1
                for graph, outputs in ((BACKBONE, step.backbone), (DEPFORMER, step.depformer)):
                    for name in targets[graph]:
                        amax[graph][name] = max(amax[graph][name], float(np.abs(outputs[name]).max()))
    finally:
        replay.close()
    return amax, observed


def _quantize_graph(path: Path, tmp: Path, amax: dict[str, float], precision: str) -> dict:
    from dia2_trt.export.onnx_io import save_model

    model = flat_graph(path)
    stats = quantize_in_place(model, amax, SCHEMES[precision])
    save_model(model, tmp / path.name)
    return stats


def _file_entry(path: Path) -> dict:
    from dia2_trt.export.onnx_io import external_data_path

    data = external_data_path(path)
    return {"sha256": sha256(path),
            "external_data": FileRef(data.name, sha256(data)) if data.exists() else None}


def _copy_rest(source, tmp: Path) -> None:
    """Codec graphs (not quantized) and the tokenizer, as they are."""
    for name, spec in source.graphs.items():
        if name in _quantized_names(source):
            continue
        shutil.copy2(spec.path, tmp / spec.file)
        if spec.external_data_path:
            shutil.copy2(spec.external_data_path, tmp / spec.external_data.file)
    copy_tree(source.tokenizer_dir, tmp / source.tokenizer.directory)


def _record(precision: str, stats: dict, traces: list[Trace], observed: int, every: int) -> QuantizationRecord:
    scheme = SCHEMES[precision]
    steps = sum(t.steps for t in traces)
    return QuantizationRecord(
        scheme=precision, bits=8, symmetric=True, block_size=None, ops=("MatMul",),
        calibration=(f"max |x| per activation tensor over {observed} of {steps} steps (every {every}) of "
                     f"{len(traces)} script(s) spoken by the fp32 runtime (seed {CALIBRATION_PARAMS.seed}); "
                     f"{scheme.name}: activations per tensor, weights per output channel"),
        weights={"matmul_weights": {"count": stats["weights"], "bits": 8},
                 "activations": {"count": stats["activations"], "bits": 8}},
        kept_float=("logits heads", "guidance and sampling", "attention score/value MatMuls", "norms", "RoPE",
                    "softmax", "embeddings", "scales (fp32)"))
