"""Calibrated Q/DQ (INT8 or FP8 E4M3) for TensorRT's strongly typed engines, measured on ONNX Runtime CPU.

Every linear layer (a MatMul with a constant 2-D weight) gets
``QuantizeLinear -> DequantizeLinear`` on its activation (per tensor, symmetric,
scale from the largest |x| seen while the fp32 artifacts spoke the calibration
scripts) and a ``DequantizeLinear`` on its weight, which is stored quantized
(per output channel, symmetric). Zero points are explicit zeros of the quantized
type: TensorRT accepts only symmetric Q/DQ, and a QuantizeLinear without one
would default to uint8. What stays float: the text-action, cb0 and codebook
logits heads and all of guidance/sampling (the same nodes fp16 keeps in fp32),
attention's activation x activation MatMuls, norms, RoPE and softmax.

Written here rather than with NVIDIA ModelOpt's ONNX PTQ: ModelOpt 0.47 does run
on CPU (installed --no-deps with 15 hand-picked dependencies), but its [onnx]
extra pins onnx ~1.21 and onnxruntime-gpu ~1.24 and would replace the
project's onnx/onnxruntime, so it cannot be a declared dependency; this pass is
the same standard-domain result in ~150 lines with no new dependency.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dia2_trt.export.onnx_graph import reads, sort_topologically
from dia2_trt.export.precision import keep_fp32
from dia2_trt.export.weight_only import transposed_weights
from dia2_trt.runtime.manifest import BACKBONE, DEPFORMER, QDQ_PRECISIONS


@dataclass(frozen=True)
class Scheme:
    name: str
    dtype: int  # ONNX element type of the quantized values
    qmax: float  # largest representable magnitude
    min_opset: int


INT8_QDQ, FP8_QDQ = QDQ_PRECISIONS
SCHEMES = {  # one per QDQ_PRECISIONS
    INT8_QDQ: Scheme(INT8_QDQ, TensorProto.INT8, 127.0, 13),
    # FP8 QuantizeLinear/DequantizeLinear arrived in opset 19.
    FP8_QDQ: Scheme(FP8_QDQ, TensorProto.FLOAT8E4M3FN, 448.0, 19),
}
QUANTIZED_GRAPHS = (BACKBONE, DEPFORMER)


def linear_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls with a constant 2-D float weight (or its Transpose: the depformer's shared weights),
    minus the heads and sampling kept in float."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT}
    weights |= {out for out, w in transposed_weights(model.graph).items() if w in weights}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in weights and not keep_fp32(n)]


def activation_names(model: onnx.ModelProto) -> list[str]:
    """The tensors whose ranges calibration must observe (inputs of the quantized MatMuls)."""
    return sorted({n.input[0] for n in linear_matmuls(model)})


def ranges_by_weight(model: onnx.ModelProto, amax: dict[str, float], base_dir: Path) -> dict[tuple, float]:
    """Each quantized MatMul's calibrated input range, keyed by its weight's content (see _weight_key)."""
    found: dict[tuple, float] = {}
    for node, key in _keyed_matmuls(model, base_dir):
        found[key] = max(found.get(key, 0.0), amax[node.input[0]])
    return found


def ranges_for(model: onnx.ModelProto, by_weight: dict[tuple, float], base_dir: Path, what: str) -> dict[str, float]:
    """Ranges for ``model``'s activations from another graph's (``ranges_by_weight``) through the weights
    both hold: the prefill graph is the backbone's layers over T rows at once, so its MatMuls take the
    backbone's scales and its rows quantize as stepping would."""
    amax: dict[str, float] = {}
    for node, key in _keyed_matmuls(model, base_dir):
        if key not in by_weight:
            raise ValueError(f"{what}: MatMul {node.name or node.output[0]!r} reads a weight the calibrated "
                             f"graph does not hold; cannot give it the same scales")
        amax[node.input[0]] = max(amax.get(node.input[0], 0.0), by_weight[key])
    return amax


def _keyed_matmuls(model: onnx.ModelProto, base_dir: Path):
    """(MatMul, weight key) per quantized MatMul; weights are read one at a time (external data too)."""
    transposed = transposed_weights(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    keys: dict[tuple[str, bool], tuple] = {}
    for node in linear_matmuls(model):
        w = node.input[1]
        name, flipped = (transposed[w], True) if w in transposed else (w, False)
        if (name, flipped) not in keys:
            keys[name, flipped] = _weight_key(inits[name], flipped, base_dir)
        yield node, keys[name, flipped]


def _weight_key(tensor: onnx.TensorProto, flipped: bool, base_dir: Path) -> tuple:
    """A weight's identity across two exports of one model: the exporter names constants per graph
    (``val_25`` in one, ``val_101`` in the other), so names cannot match them; contents can."""
    values = numpy_helper.to_array(tensor, base_dir=str(base_dir))
    return flipped, values.shape, hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def quantize_in_place(model: onnx.ModelProto, amax: dict[str, float], scheme: Scheme) -> dict:
    """Insert the Q/DQ pairs into ``model`` (edited in place: a 2B graph has no room for a copy).

    Returns what was done, for the manifest.
    """
    targets = linear_matmuls(model)
    missing = sorted({n.input[0] for n in targets} - set(amax))
    if missing:
        raise ValueError(f"no calibrated range for {len(missing)} activations (e.g. {missing[0]})")
    inits = {t.name: t for t in model.graph.initializer}
    transposed = transposed_weights(model.graph)
    target_ids = {id(n) for n in targets}
    # original tensor -> its dequantized replacement; a weight is keyed with whether it is read as W^T
    acts: dict[str, str] = {}
    weights: dict[tuple[str, bool], str] = {}
    nodes, new_inits = [], []
    for node in model.graph.node:
        if id(node) in target_ids:
            x, w = node.input[0], node.input[1]
            if x not in acts:
                acts[x] = _activation_qdq(x, amax[x], scheme, nodes, new_inits)
            key = (transposed[w], True) if w in transposed else (w, False)  # W^T: once for all its Transposes
            if key not in weights:
                weights[key] = _weight_dq(inits[key[0]], scheme, nodes, new_inits, transpose=key[1])
            node.input[0], node.input[1] = acts[x], weights[key]
        nodes.append(node)
    nodes = _without_unread_transposes(nodes, transposed, model.graph)
    used = {name for n in nodes for name in reads(n)}  # If branches read initializers too (TopK's k)
    kept = [t for t in model.graph.initializer if t.name in used]  # float weights now read only via DQ go
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    sort_topologically(model.graph)
    return {"scheme": scheme.name, "quantized_matmuls": len(targets),
            "activations": len(acts), "weights": len(weights)}


def _without_unread_transposes(nodes: list, transposed: dict[str, str], graph: onnx.GraphProto) -> list:
    read = {name for n in nodes for name in reads(n)} | {o.name for o in graph.output}
    unread = {name for name in transposed if name not in read}
    return [n for n in nodes if not (n.op_type == "Transpose" and n.output[0] in unread)]


def _activation_qdq(x: str, amax: float, scheme: Scheme, nodes: list, inits: list) -> str:
    scale = np.float32(max(float(amax), 1e-8) / scheme.qmax)  # a never-nonzero input still needs a scale
    inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{x}__scale"))
    inits.append(_zeros(f"{x}__zero", (), scheme))
    nodes.append(helper.make_node("QuantizeLinear", [x, f"{x}__scale", f"{x}__zero"], [f"{x}__q"], name=f"{x}__Q"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{x}__q", f"{x}__scale", f"{x}__zero"], [f"{x}__dq"],
                                  name=f"{x}__DQ"))
    return f"{x}__dq"


def _weight_dq(tensor: onnx.TensorProto, scheme: Scheme, nodes: list, inits: list, transpose: bool = False) -> str:
    """[K, N] weight (or the transpose of an [N, K] one) -> quantized values with one scale per
    output column (axis 1)."""
    w = numpy_helper.to_array(tensor).astype(np.float32)
    if transpose:
        w = np.ascontiguousarray(w.T)
    amax = np.abs(w).max(axis=0)
    scale = (np.where(amax > 0, amax, 1.0) / scheme.qmax).astype(np.float32)
    name = tensor.name + ("__T" if transpose else "")
    inits.append(_quantized(f"{name}__w", w / scale, scheme))
    inits.append(numpy_helper.from_array(scale, f"{name}__wscale"))
    inits.append(_zeros(f"{name}__wzero", scale.shape, scheme))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}__w", f"{name}__wscale", f"{name}__wzero"],
                                  [f"{name}__dq"], name=f"{name}__DQ", axis=1))
    return f"{name}__dq"


def _quantized(name: str, values: np.ndarray, scheme: Scheme) -> onnx.TensorProto:
    if scheme.dtype == TensorProto.INT8:
        # Symmetric: -127..127 (TensorRT's INT8 range), so -128 never appears.
        return numpy_helper.from_array(np.clip(np.rint(values), -127, 127).astype(np.int8), name)
    import ml_dtypes  # an onnx dependency

    fp8 = np.clip(values, -scheme.qmax, scheme.qmax).astype(ml_dtypes.float8_e4m3fn)
    return helper.make_tensor(name, scheme.dtype, fp8.shape, fp8.view(np.uint8).tobytes(), raw=True)


def _zeros(name: str, shape: tuple, scheme: Scheme) -> onnx.TensorProto:
    if scheme.dtype == TensorProto.INT8:
        return numpy_helper.from_array(np.zeros(shape, np.int8), name)
    return helper.make_tensor(name, scheme.dtype, shape, np.zeros(shape, np.uint8).tobytes(), raw=True)
