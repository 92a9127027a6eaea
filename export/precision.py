"""fp32 ONNX -> fp16 ONNX, with the numerically sensitive parts left in fp32.

TensorRT 11 builds fp16 engines from fp16 ONNX (there is no builder flag any
more), so precision is decided here. Kept in fp32, found through the module
scopes the dynamo exporter records on every node:

* RMSNorm statistics (a sum of squares over 2048 channels overflows fp16),
* RoPE tables and rotation (positions up to ~1800 lose their phase in fp16),
* softmax, the logits heads, and all of guidance/sampling (argmax ties and the
  top-k threshold must not be decided at fp16 resolution).

Graph I/O stays fp32 except the large per-step tensors named in ``fp16_io``
(KV cache and hidden state), which would otherwise be cast every step.
"""

from __future__ import annotations

import re

import onnx
from onnx import TensorProto, helper

_FP32_MODULES = ("RMSNorm", "Rotary")  # by class, from the exporter's class hierarchy
_FP32_HEADS = re.compile(r"(^|\.)(action_head|cb0_head|logits\.\d+)$")  # by module path
_FP32_OPS = ["Softmax"]
FP16_IO = ("k_cache.", "v_cache.", "k_new", "v_new", "hidden")  # a trailing "." matches per-layer names


def _meta(node: onnx.NodeProto, key: str) -> str:
    return next((p.value for p in node.metadata_props if p.key == key), "")


def _keep_fp32(node: onnx.NodeProto) -> bool:
    if any(cls in _meta(node, "pkg.torch.onnx.class_hierarchy") for cls in _FP32_MODULES):
        return True
    scopes = [s.strip(" '\"") for s in _meta(node, "pkg.torch.onnx.name_scopes").strip("[]").split(",")]
    if any(_FP32_HEADS.search(s) for s in scopes):
        return True
    # Code written in the graph wrappers themselves is guidance and sampling.
    frames = re.findall(r'File "([^"]+)"', _meta(node, "pkg.torch.onnx.stack_trace"))
    return bool(frames) and frames[-1].endswith("export/graphs.py")


def _fp32_nodes(nodes, inherited: bool = False):
    """Nodes to keep in fp32, subgraphs included: an If of the sampler (graphs.kth_largest) keeps its branches."""
    for node in nodes:
        keep = inherited or _keep_fp32(node)
        if keep:
            yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _fp32_nodes(attr.g.node, keep)


def to_fp16(model: onnx.ModelProto, fp16_io: tuple[str, ...] = FP16_IO) -> onnx.ModelProto:
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = [n.name for n in _fp32_nodes(model.graph.node)]
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + _FP32_OPS,
        # Shapes are inferred beforehand (by file path, which works past 2 GB).
        node_block_list=blocked, disable_shape_infer=True,
    )
    _fp16_boundary(converted, set(fp16_io))
    return converted


def _fp16_boundary(model: onnx.ModelProto, names: set[str]) -> None:
    """Make the I/O in ``names`` fp16: drop the converter's boundary cast, or add one
    where the neighbouring node was kept in fp32."""
    graph = model.graph
    for value in graph.input:
        if _named(value.name, names) and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            if not _drop_cast(graph, lambda n: n.input[0] == value.name, TensorProto.FLOAT16, keep=value.name):
                _insert_cast(graph, value.name, TensorProto.FLOAT, for_input=True)
    for value in graph.output:
        if _named(value.name, names) and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            if not _drop_cast(graph, lambda n: n.output[0] == value.name, TensorProto.FLOAT, keep=value.name):
                _insert_cast(graph, value.name, TensorProto.FLOAT16, for_input=False)


def _named(name: str, names: set[str]) -> bool:
    return name in names or any(n.endswith(".") and name.startswith(n) for n in names)


def _drop_cast(graph: onnx.GraphProto, match, to: int, keep: str) -> bool:
    for node in graph.node:
        if node.op_type == "Cast" and match(node) and node.attribute[0].i == to:
            inner = node.output[0] if node.input[0] == keep else node.input[0]
            graph.node.remove(node)
            _rename(graph, inner, keep)
            return True
    return False


def _insert_cast(graph: onnx.GraphProto, name: str, to: int, *, for_input: bool) -> None:
    inner = f"{name}__{'fp32' if to == TensorProto.FLOAT else 'fp16'}"
    _rename(graph, name, inner)
    if for_input:
        graph.node.insert(0, helper.make_node("Cast", [name], [inner], to=to, name=f"{inner}_cast"))
    else:
        graph.node.append(helper.make_node("Cast", [inner], [name], to=to, name=f"{inner}_cast"))


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value == old:
                node.input[i] = new
        for i, value in enumerate(node.output):
            if value == old:
                node.output[i] = new
