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

from .onnx_graph import reads, sort_topologically

_FP32_MODULES = ("RMSNorm", "Rotary")  # by class, from the exporter's class hierarchy
_FP32_HEADS = re.compile(r"(^|\.)(action_head|cb0_head|logits\.\d+)$")  # by module path
_FP32_OPS = ["Softmax"]
FP16_IO = ("k_cache.", "v_cache.", "k_new", "v_new", "hidden")  # a trailing "." matches per-layer names


def _meta(node: onnx.NodeProto, key: str) -> str:
    return next((p.value for p in node.metadata_props if p.key == key), "")


def keep_fp32(node: onnx.NodeProto) -> bool:
    """Whether a node stays float in every reduced precision (fp16, weight-only, Q/DQ): the logits
    heads, norms and the like (_FP32_MODULES, _FP32_HEADS) and guidance/sampling."""
    if any(cls in _meta(node, "pkg.torch.onnx.class_hierarchy") for cls in _FP32_MODULES):
        return True
    scopes = [s.strip(" '\"") for s in _meta(node, "pkg.torch.onnx.name_scopes").strip("[]").split(",")]
    if any(_FP32_HEADS.search(s) for s in scopes):
        return True
    # Guidance and sampling: code of the graph wrappers themselves, in the depformer frame (the
    # only graph that samples; the exporter also attributes hoisted ops, such as the backbone
    # cache's transposes once its rows are a dynamic axis, to a wrapper's forward).
    frames = re.findall(r'File "([^"]+)"', _meta(node, "pkg.torch.onnx.stack_trace"))
    in_frame = "DepformerFrame" in _meta(node, "pkg.torch.onnx.class_hierarchy")
    return in_frame and bool(frames) and frames[-1].endswith("export/graphs.py")


def _fp32_nodes(nodes, inherited: bool = False):
    """Nodes to keep in fp32, subgraphs included: an If of the sampler (graphs.kth_largest) keeps its branches."""
    for node in nodes:
        keep = inherited or keep_fp32(node)
        if keep:
            yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _fp32_nodes(attr.g.node, keep)


def to_fp16(model: onnx.ModelProto, fp16_io: tuple[str, ...] = FP16_IO) -> onnx.ModelProto:
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    made_by = {out: (node.name, i) for node in model.graph.node for i, out in enumerate(node.output)}
    # Nodes with subgraphs are the sampler's Ifs (graphs.kth_largest): kept fp32 whole, with the
    # nodes making what their branches read from outside (a branch has no casts of its own).
    ifs = [n for n in model.graph.node if _has_graphs(n)]
    captured = {name for n in ifs for name in reads(n) - set(n.input)}
    blocked = ([n.name for n in _fp32_nodes(model.graph.node)] + [n.name for n in ifs]
               + [made_by[name][0] for name in captured if name in made_by])
    float_inits = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    captured_inits = {name: onnx.TensorProto.FromString(float_inits[name].SerializeToString())
                      for name in captured if name in float_inits}
    branches = _detach_branches(model.graph, set(blocked))
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + _FP32_OPS,
        # Shapes are inferred beforehand (by file path, which works past 2 GB).
        node_block_list=blocked, disable_shape_infer=True,
    )
    _attach_branches(converted.graph, branches)
    _attach_branches(model.graph, branches)  # the caller's model is left as it came
    _fp16_boundary(converted, set(fp16_io))
    _reconnect_captures(converted.graph, made_by, captured_inits)
    sort_topologically(converted.graph)
    return converted


def _detach_branches(graph: onnx.GraphProto, blocked: set[str]) -> dict[str, list]:
    """Take the subgraphs off the kept-fp32 nodes (the sampler's Ifs) for the conversion.

    The converter walks into If branches on its own and leaves them half converted (a kept
    TopK's output renamed and cast, the branch still declaring fp16); whole fp32 branches
    put back afterwards are consistent, and ``_reconnect_captures`` points them at fp32 values."""
    taken = {}
    for node in graph.node:
        graphs = [a for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        if node.name in blocked and graphs:
            taken[node.name] = [onnx.AttributeProto.FromString(a.SerializeToString()) for a in graphs]
            kept = [a for a in node.attribute if a.type != onnx.AttributeProto.GRAPH]
            del node.attribute[:]
            node.attribute.extend(kept)
    return taken


def _has_graphs(node: onnx.NodeProto) -> bool:
    return any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)


def _attach_branches(graph: onnx.GraphProto, taken: dict[str, list]) -> None:
    """Put the fp32 branches back, and drop the outer graph's (converted) type notes on values
    made inside them: ONNX Runtime would check the fp32 branch against those fp16 notes."""
    inner = set()
    for node in graph.node:
        if node.name in taken:
            node.attribute.extend(attr for attr in taken[node.name]
                                  if attr.name not in {a.name for a in node.attribute})
            inner |= {out for attr in taken[node.name] for n in attr.g.node for out in n.output}
    stale = [v for v in graph.value_info if v.name in inner]
    for value in stale:
        graph.value_info.remove(value)


def _reconnect_captures(graph: onnx.GraphProto, made_by: dict[str, tuple[str, int]],
                        captured_inits: dict[str, onnx.TensorProto]) -> None:
    """Point the fp32 If branches back at the fp32 values they read from the enclosing graph.

    For a kept-fp32 node the converter renames its output (``div`` -> ``node_div_output_cast_0``)
    and gives the old name to an fp16 cast for the converted consumers it sees; reads from
    inside a subgraph it does not see, so they would get the fp16 cast (or nothing at all).
    A float initializer a branch reads (the sampler's clamp bounds) was converted to fp16 in
    place: the branch gets an fp32 copy of it (``captured_inits``: the originals)."""
    nodes = {node.name: node for node in graph.node}
    renamed = {}
    for name, (node_name, index) in made_by.items():
        node = nodes.get(node_name)
        if node is not None and index < len(node.output) and node.output[index] != name:
            renamed[name] = node.output[index]
    converted = {i.name: i for i in graph.initializer}
    for name, original in captured_inits.items():
        if name in converted and converted[name].data_type != TensorProto.FLOAT:
            copy = onnx.TensorProto.FromString(original.SerializeToString())
            copy.name = renamed[name] = f"{name}_fp32"
            graph.initializer.append(copy)
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


def _fp16_boundary(model: onnx.ModelProto, names: set[str]) -> None:
    """Make the I/O in ``names`` fp16: drop the converter's boundary cast, or add one
    where the neighbouring node was kept in fp32."""
    graph = model.graph
    for value in graph.input:
        if _named(value.name, names) and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            # every boundary cast goes: the converter may cast an input more than once (a dynamic
            # cache has two, one for the Shape that reads its row count)
            dropped = False
            name = value.name
            while _drop_cast(graph, lambda n, name=name: n.input[0] == name, TensorProto.FLOAT16, keep=name):
                dropped = True
            if not dropped:
                _insert_cast(graph, value.name, TensorProto.FLOAT, for_input=True)
    for value in graph.output:
        if _named(value.name, names) and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            name = value.name
            if not _drop_cast(graph, lambda n, name=name: n.output[0] == name, TensorProto.FLOAT, keep=name):
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
