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

import heapq
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
    made_by = {out: (node.name, i) for node in model.graph.node for i, out in enumerate(node.output)}
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + _FP32_OPS,
        # Shapes are inferred beforehand (by file path, which works past 2 GB).
        node_block_list=blocked, disable_shape_infer=True,
    )
    _fp16_boundary(converted, set(fp16_io))
    _reconnect_captures(converted.graph, made_by)
    _sort_topologically(converted.graph)
    return converted


def _reconnect_captures(graph: onnx.GraphProto, made_by: dict[str, tuple[str, int]]) -> None:
    """Point If branches back at the values they read from the enclosing graph.

    The converter renames a kept-fp32 node's output (``where`` -> ``node_where_output_cast_0``)
    and rewires the consumers it sees, but not reads from inside a subgraph: the depformer's
    TopK threshold branches then name a value nothing produces. Both sides are fp32, so the
    renamed output is the right one."""
    produced = {out for node in graph.node for out in node.output} | {v.name for v in graph.input}
    produced |= {t.name for t in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    renamed = {}
    for name, (node_name, index) in made_by.items():
        node = nodes.get(node_name)
        if name not in produced and node is not None and index < len(node.output):
            renamed[name] = node.output[index]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_reads(attr.g, renamed)


def _rename_reads(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_reads(attr.g, renamed)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Put every node after the producers of what it reads, subgraphs' outer-scope reads included.

    The converter appends the casts it inserts for a kept-fp32 node inside an If branch (the
    depformer's TopK threshold) after that If, which the ONNX checker refuses."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _sort_topologically(attr.g)
    produced = {out: i for i, node in enumerate(graph.node) for out in node.output}
    users: list[list[int]] = [[] for _ in graph.node]
    waiting = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        for j in {produced[name] for name in _reads(node) if name in produced} - {i}:
            users[j].append(i)
            waiting[i] += 1
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)  # Kahn's algorithm, smallest original index first: valid orders stay as they are
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(graph.node[i])
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(graph.node):
        raise ValueError(f"graph {graph.name!r} has a cycle")
    del graph.node[:]
    graph.node.extend(order)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads: its inputs, and what its subgraphs take from the enclosing scope."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            inner = {out for n in attr.g.node for out in n.output}
            inner |= {v.name for v in attr.g.input} | {t.name for t in attr.g.initializer}
            names |= {name for n in attr.g.node for name in _reads(n)} - inner
    return names


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
