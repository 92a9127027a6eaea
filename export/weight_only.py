"""fp32 ONNX -> weight-only INT8 / INT4 ONNX, in the standard ONNX domain.

Every constant ``MatMul`` weight W[K, N] becomes a signed, symmetric (no zero
point) integer tensor and a float scale per block of ``block_size`` rows along
the input axis K, read through one ``DequantizeLinear`` (opset 21 blocked form,
axis 0) feeding the MatMul. ONNX Runtime's CPU provider fuses that pair into its
``MatMulNBits`` kernel; TensorRT reads the same Q/DQ form.

Embedding tables E[V, D] read by ``Gather`` are blocked along D and rewritten as
Gather(int rows) and Gather(scale rows) -> DequantizeLinear: only the looked-up
rows are dequantized each step, not the table.

Everything else (norms, RoPE tables, softmax, sampling, biases) stays float.

The pass streams: weights are read one tensor at a time (from the external data
file when there is one) and written straight into the new data
file, so a 6.6 GB backbone needs about one tensor of memory, not two models.
A weight read by several MatMuls is written once per reader (see _matmul_readers), and
one read through Transpose(W) is quantized as W^T (see transposed_weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dia2_trt.runtime.manifest import QuantizationRecord

from .onnx_io import EXTERNAL_DATA_BYTES
from .precision import keep_fp32

QUANT_MIN_OPSET = 21  # blocked DequantizeLinear and INT4
_QTYPES = {8: TensorProto.INT8, 4: TensorProto.INT4}
# Gather has no INT4 type (ONNX Gather-13), so tables stay 8-bit in the int4 scheme too.
EMBEDDING_BITS = 8
# benchmarks/weight_only_kernels.py (two 2B MLP layers, 2 threads, ORT 1.32, busy machine), speed
# over fp32 at block 32/64/128: int8 2.3x/2.8x/2.0x, int4 4.1x/5.0x/5.3x. 64 is best for int8, near
# best for int4, and int4 at 32 would miss the 17%-of-fp32 byte goal on the 2B backbone (17.3%).
DEFAULT_BLOCK_SIZE = 64
# MatMulNBits' accuracy level 4 computes with int8 activations (ONNX Runtime's
# "session.qdq_matmulnbits_accuracy_level"; the manifest carries it to the runtime). Same
# benchmark, block 64: level 1 (fp32 compute) ran int8 at 0.06x and int4 at 0.71x of fp32.
# ORT 1.32 defaults to 4 when unset; it is set explicitly so an older ORT does not fall back.
ORT_ACCURACY_LEVEL = 4
# Tensors smaller than this stay float: their bytes do not matter, their error would.
MIN_ELEMENTS = 1024


class QuantizeError(ValueError):
    """A graph or scheme the weight-only pass cannot apply (one line)."""


@dataclass(frozen=True)
class WeightOnlyScheme:
    bits: int
    block_size: int
    embeddings: bool = True  # Gather tables too (they are 14% of the 2B backbone's bytes)

    def __post_init__(self) -> None:
        if self.bits not in _QTYPES:
            raise QuantizeError(f"weight-only quantization supports 8 or 4 bits, not {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise QuantizeError(f"block size {self.block_size} must be a power of two >= 16 "
                                "(ONNX Runtime's MatMulNBits kernel requires it)")

    def record(self, report: QuantizeReport, label: str) -> QuantizationRecord:
        """The manifest's per-graph quantization record, under the precision name ``label``."""
        return QuantizationRecord(
            scheme=label, bits=self.bits, symmetric=True, block_size=self.block_size,
            ops=("MatMul", "Gather") if report.kinds["gather"][0] else ("MatMul",),
            ort_accuracy_level=ORT_ACCURACY_LEVEL,
            # Bytes count each weight once, though a weight shared by several MatMuls is stored once per reader.
            weights={"matmul_weights": report.record("matmul", self.bits),
                     "gather_tables": report.record("gather", EMBEDDING_BITS)},
            kept_float=("norms", "RoPE", "softmax", "sampling", f"weights under {MIN_ELEMENTS} elements",
                        "MatMul weights applied to looked-up embedding rows", "scales (fp32)"),
        )


@dataclass
class QuantizeReport:
    """What the pass did to one graph, per kind ("matmul", "gather"): [count, fp32 bytes, quantized bytes]."""

    kinds: dict[str, list[int]] = field(default_factory=lambda: {"matmul": [0, 0, 0], "gather": [0, 0, 0]})

    def add(self, kind: str, fp32_bytes: int, quantized_bytes: int) -> None:
        entry = self.kinds[kind]
        entry[0] += 1
        entry[1] += fp32_bytes
        entry[2] += quantized_bytes

    def record(self, kind: str, bits: int) -> dict:
        count, fp32_bytes, quantized_bytes = self.kinds[kind]
        return {"count": count, "bits": bits, "fp32_bytes": fp32_bytes, "bytes": quantized_bytes}


# --- numerics ----------------------------------------------------------------

def quantize_blocks(w: np.ndarray, bits: int, block: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block quantization along ``axis`` of a 2-D array -> (int8 values, fp32 scales).

    Values lie in [-qmax, qmax] (int4: [-7, 7]); the scale is the block's max |w| / qmax.
    """
    qmax = 2 ** (bits - 1) - 1
    wb = np.moveaxis(np.asarray(w, dtype=np.float32), axis, -1)  # [..., D]
    lead, d = wb.shape[:-1], wb.shape[-1]
    wb = wb.reshape(*lead, d // block, block)
    scale = np.abs(wb).max(axis=-1) / qmax
    safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(wb / safe[..., None]), -qmax, qmax).astype(np.int8).reshape(*lead, d)
    return np.moveaxis(q, -1, axis), np.moveaxis(safe, -1, axis).astype(np.float32)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block: int, axis: int) -> np.ndarray:
    return q.astype(np.float32) * np.repeat(scale, block, axis=axis)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two values a byte, the first in the low nibble."""
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


# --- tensor storage -----------------------------------------------------------

class _Storage:
    """Reads initializers (inline or external) and appends new ones to one data file.

    With ``out`` None (a graph small enough for one protobuf) new tensors are stored inline.
    """

    def __init__(self, base: Path, out: Path | None, location: str) -> None:
        self.base = base
        self.location = location  # the data file's final name, as the graph names it
        self._out = open(out, "wb") if out else None
        self._files: dict[str, BinaryIO] = {}

    def array(self, t: TensorProto) -> np.ndarray:
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        location = info["location"]
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise QuantizeError(f"{t.name}: external data path {location!r} leaves the model's folder")
        if location not in self._files:
            self._files[location] = open(self.base / location, "rb")
        # Read, not memory-mapped: mapped pages of a 6.6 GB file would all count as resident.
        source = self._files[location]
        source.seek(int(info.get("offset", 0)))
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        count = int(info["length"]) // np.dtype(dtype).itemsize
        return np.fromfile(source, dtype=dtype, count=count).reshape(tuple(t.dims))

    def put(self, t: TensorProto, raw: bytes | memoryview) -> None:
        t.ClearField("raw_data")
        del t.external_data[:]
        if self._out is None:
            t.data_location = TensorProto.DEFAULT
            t.raw_data = bytes(raw)
            return
        offset = self._out.tell()
        pad = (-offset) % 64  # aligned, so ONNX Runtime can map tensors in place
        self._out.write(b"\0" * pad)
        self._out.write(raw)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset + pad)), ("length", str(len(raw)))):
            t.external_data.add(key=key, value=value)

    def keep(self, t: TensorProto) -> None:
        """Carry an unquantized tensor over: external ones are copied into the new data file."""
        if t.data_location == TensorProto.EXTERNAL:
            self.put(t, np.ascontiguousarray(self.array(t)).view(np.uint8).data.cast("B"))

    def close(self) -> None:
        if self._out:
            self._out.close()
            self._out = None
        for f in self._files.values():
            f.close()
        self._files.clear()


def _raw(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


# --- the pass -----------------------------------------------------------------

def quantize_model_file(path: Path, scheme: WeightOnlyScheme) -> QuantizeReport:
    """Rewrite the ONNX file at ``path`` (and its ``.data`` file, if any), atomically.

    The new graph and data are written next to the old ones and renamed over them
    only when complete: the input is never edited while it is read.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    _check_opset(model, path)
    data = path.with_name(path.name + ".data")
    # Per-reader copies can outgrow the source: the unrolled 2B depformer (1.06 GB inline in fp32)
    # came to ~1.9 GB in int8, near protobuf's 2 GiB limit.
    external = (any(t.data_location == TensorProto.EXTERNAL for g in scopes(model.graph) for t in g.initializer)
                or sum(_projected_bytes(g, scheme) for g in scopes(model.graph)) > EXTERNAL_DATA_BYTES)
    tmp_model = path.with_name(f".{path.name}.quant")
    tmp_data = data.with_name(f".{data.name}.quant") if external else None
    storage = _Storage(path.parent, tmp_data, data.name)
    try:
        report = _rewrite(model, storage, scheme)
        storage.close()
        onnx.save_model(model, str(tmp_model))
        if tmp_data is not None:
            os.chmod(tmp_data, path.stat().st_mode & 0o777)
            os.replace(tmp_data, data)
        os.chmod(tmp_model, path.stat().st_mode & 0o777)
        os.replace(tmp_model, path)
    except BaseException:
        storage.close()
        for tmp in (tmp_model, tmp_data):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    onnx.checker.check_model(str(path))  # by path: works past 2 GB
    return report


def _projected_bytes(graph: onnx.GraphProto, scheme: WeightOnlyScheme) -> int:
    """About how many bytes of weights the quantized graph will hold (copies included)."""
    plan = plan_weights(graph, scheme)
    readers = _matmul_readers(graph, plan)
    total = 0
    for t in graph.initializer:
        size = int(np.prod(t.dims)) if t.dims else 1
        kind = plan.get(t.name)
        if kind is None:
            total += size * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        else:
            bits = EMBEDDING_BITS if kind == "gather" else scheme.bits
            total += readers.get(t.name, 1) * (size * bits // 8 + size // scheme.block_size * 4)
    return total


def _check_opset(model: onnx.ModelProto, path: Path) -> None:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < QUANT_MIN_OPSET:
        raise QuantizeError(f"{path.name}: opset {opset} has no blocked DequantizeLinear; "
                            f"export with --opset {QUANT_MIN_OPSET} or later")


def scopes(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it (a Loop body, If branches), innermost first.

    Each scope's weights are its own initializers: the depformer's Loop body holds the
    tail's shared weights and its If leaves one codebook head each (export/depformer_loop.py).
    """
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from scopes(attr.g)
    yield graph


def _rewrite(model: onnx.ModelProto, storage: _Storage, scheme: WeightOnlyScheme) -> QuantizeReport:
    report = QuantizeReport()
    # innermost first: rewriting a graph re-adds (copies) its nodes, subgraphs included
    for graph in scopes(model.graph):
        _rewrite_graph(graph, storage, scheme, report)
    return report


def _rewrite_graph(graph: onnx.GraphProto, storage: _Storage, scheme: WeightOnlyScheme,
                   report: QuantizeReport) -> None:
    plan = plan_weights(graph, scheme)
    readers = _matmul_readers(graph, plan)
    transposed = transposed_weights(graph)  # before the weights are swapped for their quantized copies
    initializers = []
    for t in graph.initializer:
        kind = plan.get(t.name)
        if kind is None:
            storage.keep(t)
            initializers.append(t)
            continue
        bits = EMBEDDING_BITS if kind == "gather" else scheme.bits
        w = storage.array(t)
        if kind == "matmul_t":  # read through Transpose: the MatMul weight is W^T
            w = np.ascontiguousarray(w.T)
        q, scale = quantize_blocks(w, bits, scheme.block_size, axis=1 if kind == "gather" else 0)
        for copy in range(readers.get(t.name, 1)):
            initializers += _quantized_tensors(t.name, copy, q, scale, bits, storage)
        report.add("gather" if kind == "gather" else "matmul", w.size * 4, (q.size * bits + 7) // 8 + scale.nbytes)
        del w, q, scale  # one tensor at a time
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    _rewire(graph, plan, transposed, scheme.block_size)


def _matmul_readers(graph: onnx.GraphProto, plan: dict[str, str]) -> dict[str, int]:
    """How many MatMuls read each planned weight: each gets its own quantized copy.

    ONNX Runtime's MatMulNBits fusion repacks the integer initializer it consumes, so
    it fuses no DequantizeLinear whose initializer is shared (measured: a weight read
    by two MatMuls, through one or two DequantizeLinear nodes, stayed unfused); unfused,
    each reader would dequantize it whole every run. The depformer's stages that share
    weights are a Loop for this reason (export/depformer_loop.py): there each has one reader.
    """
    counts: dict[str, int] = {}
    transposed = transposed_weights(graph)
    for node in graph.node:
        weight = _planned_matmul_weight(node, plan, transposed)
        if weight is not None:
            counts[weight] = counts.get(weight, 0) + 1
    return counts


def transposed_weights(graph: onnx.GraphProto) -> dict[str, str]:
    """Output -> initializer of each Transpose(perm [1, 0]) of a 2-D initializer.

    The exporter keeps a weight that several stages share (the depformer's MLP and its
    weights-schedule projections) as W[out, in] with a Transpose per reader; on the 2B
    depformer 593 of 660 MatMuls read their weight that way."""
    inits = {t.name for t in graph.initializer if len(t.dims) == 2}
    return {n.output[0]: n.input[0] for n in graph.node
            if n.op_type == "Transpose" and n.input[0] in inits and _perm(n) in ([1, 0], None)}


def _perm(node: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _planned_matmul_weight(node: onnx.NodeProto, plan: dict[str, str], transposed: dict[str, str]) -> str | None:
    """The planned weight a MatMul reads (directly, or through a planned Transpose), else None."""
    if node.op_type != "MatMul":
        return None
    weight = node.input[1]
    if plan.get(weight) == "matmul":
        return weight
    if weight in transposed and plan.get(transposed[weight]) == "matmul_t":
        return transposed[weight]
    return None


def _quantized_tensors(name: str, copy: int, q: np.ndarray, scale: np.ndarray, bits: int,
                       storage: _Storage) -> list[TensorProto]:
    qt = TensorProto(name=qname(name, copy), data_type=_QTYPES[bits], dims=q.shape)
    storage.put(qt, pack_int4(q) if bits == 4 else _raw(q))
    st = TensorProto(name=scale_name(name, copy), data_type=TensorProto.FLOAT, dims=scale.shape)
    storage.put(st, _raw(scale))
    return [qt, st]


def qname(name: str, copy: int = 0) -> str:
    return f"{name}_quantized" + (f"_{copy}" if copy else "")


def scale_name(name: str, copy: int = 0) -> str:
    return f"{name}_scale" + (f"_{copy}" if copy else "")


def plan_weights(graph: onnx.GraphProto, scheme: WeightOnlyScheme) -> dict[str, str]:
    """Initializer name -> "matmul" | "matmul_t" (read as W^T through Transpose) | "gather": 2-D fp32
    weights whose every reader can take the int form."""
    shapes = {t.name: tuple(t.dims) for t in graph.initializer
              if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    transposed = {out: w for out, w in transposed_weights(graph).items() if w in shapes}
    constant = {t.name for t in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    roles: dict[str, set[str]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in shapes and not (node.op_type == "Transpose" and node.output[0] in transposed):
                role = _role(node, i)
                if role == "gather" and (node.input[1] in constant or keep_fp32(node)):
                    # a lookup at a fixed index (RoPE at a stage's position: folded at load), or
                    # of a float-kept module (RoPE rows looked up by the depformer loop's stage)
                    role = "other"
                roles.setdefault(name, set()).add(role)
            elif name in transposed:  # a read of W^T: a MatMul weight, or something that stays float
                role = _role(node, i)
                roles.setdefault(transposed[name], set()).add("matmul_t" if role == "matmul" else "other")
    plan = {}
    for name, used_as in roles.items():
        rows, cols = shapes[name]
        if rows * cols < MIN_ELEMENTS or len(used_as) != 1:
            continue  # a weight read both as a MatMul weight and as a table (tied) stays float
        role = next(iter(used_as))
        if role in ("matmul", "matmul_t") or (role == "gather" and scheme.embeddings):
            plan[name] = role
    for name in _weights_on_dequantized_rows(graph, plan):
        del plan[name]
    return plan


def _weights_on_dequantized_rows(graph: onnx.GraphProto, plan: dict[str, str]) -> set[str]:
    """MatMul weights applied straight to looked-up (dequantized) embedding rows.

    ONNX Runtime reads DequantizeLinear on both MatMul inputs as a QDQ MatMul and
    does not fuse it into MatMulNBits, leaving a dequantize of the whole weight per
    step (seen on the backbone's text-embedding projections): these stay float.
    """
    rows = {n.output[0] for n in graph.node if n.op_type == "Gather" and plan.get(n.input[0]) == "gather"}
    transposed = transposed_weights(graph)
    found = (_planned_matmul_weight(n, plan, transposed) for n in graph.node if n.input and n.input[0] in rows)
    return {weight for weight in found if weight is not None}


def _blocked_dims(graph: onnx.GraphProto, scheme: WeightOnlyScheme) -> dict[str, int]:
    dims = {}
    for scope in scopes(graph):
        shapes = {t.name: tuple(t.dims) for t in scope.initializer}
        # the input axis: W's rows for a MatMul weight, its columns when read as W^T; a table's columns
        dims.update({name: shapes[name][0 if kind == "matmul" else 1]
                     for name, kind in plan_weights(scope, scheme).items()})
    return dims


def fit_block_size(graph: onnx.GraphProto, scheme: WeightOnlyScheme) -> WeightOnlyScheme:
    """The default block size, halved until it divides every blocked axis (tiny's are 32 wide)."""
    block = scheme.block_size
    while block > 16 and any(dim % block for dim in _blocked_dims(graph, scheme).values()):
        block //= 2
    return WeightOnlyScheme(scheme.bits, block, scheme.embeddings)


def check_block_size(graph: onnx.GraphProto, scheme: WeightOnlyScheme, where: str) -> None:
    """Every planned weight's blocked axis must divide by the block size (one line otherwise)."""
    for name, dim in _blocked_dims(graph, scheme).items():
        if dim % scheme.block_size:
            raise QuantizeError(f"block size {scheme.block_size} does not divide {where} weight {name!r} "
                                f"(blocked axis has {dim} elements)")


def _role(node: onnx.NodeProto, index: int) -> str:
    if node.op_type == "MatMul" and index == 1:
        return "matmul"
    if node.op_type == "Gather" and index == 0 and _axis(node) == 0:
        return "gather"
    return "other"


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _rewire(graph: onnx.GraphProto, plan: dict[str, str], transposed: dict[str, str], block: int) -> None:
    """Insert the dequantizing nodes: one DequantizeLinear (over its own copy) per MatMul reader."""
    nodes, copies = [], {}
    for node in graph.node:
        source = transposed.get(node.output[0])
        if node.op_type == "Transpose" and source is not None and plan.get(source) == "matmul_t":
            continue  # its readers now take their own dequantized W^T
        weight = _planned_matmul_weight(node, plan, transposed)
        if weight is not None:
            copy = copies[weight] = copies.get(weight, -1) + 1
            out = f"{weight}_dequantized" + (f"_{copy}" if copy else "")
            nodes.append(_dq(qname(weight, copy), scale_name(weight, copy), out, axis=0, block=block))
            node.input[1] = out
        if node.op_type == "Gather" and plan.get(node.input[0]) == "gather":
            nodes += _gather_dq(node, node.input[0], block)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _dq(q: str, scale: str, out: str, *, axis: int, block: int) -> onnx.NodeProto:
    return helper.make_node("DequantizeLinear", [q, scale], [out], name=f"{out}_dequantize",
                            axis=axis, block_size=block)


def _gather_dq(node: onnx.NodeProto, table: str, block: int) -> list[onnx.NodeProto]:
    """Gather the int rows and their scales; ``node`` becomes the DequantizeLinear of just those rows."""
    ids, out = node.input[1], node.output[0]
    rows_q, rows_s = f"{out}_rows_quantized", f"{out}_rows_scale"
    gathers = [helper.make_node("Gather", [qname(table), ids], [rows_q], name=f"{node.name}_quantized", axis=0),
               helper.make_node("Gather", [scale_name(table), ids], [rows_s], name=f"{node.name}_scale", axis=0)]
    node.op_type = "DequantizeLinear"
    del node.input[:]
    node.input.extend([rows_q, rows_s])
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("axis", -1), helper.make_attribute("block_size", block)])
    return gathers
