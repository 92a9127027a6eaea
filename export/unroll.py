"""Loop with a constant trip count -> straight-line nodes (torch-free, works on graphs loaded without data).

The depformer's stage Loop (depformer_loop.py) suits ONNX Runtime on CPU; the Q/DQ
calibration must observe every stage's activations as graph outputs, and TensorRT
wants the stages laid out (its loops take no If inside and no growing carried
values). Unrolling gives them the same straight-line graph DepformerFrame exports:

* the body's initializers are hoisted once, shared by every iteration;
* each iteration's names get an ``@j`` suffix, the iteration number becomes a constant;
* an ``If`` whose condition is ``Less`` of two constants (the head-picking tree) is
  decided here, and the chosen branch inlined: each stage reads its own head again.

Tensors are moved, never read, so external data keeps pointing at the same file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def has_loop(graph: onnx.GraphProto) -> bool:
    return any(n.op_type == "Loop" for n in graph.node)


def unroll_loops(model: onnx.ModelProto, copy_quantized: bool = False) -> bool:
    """Unroll every top-level Loop of ``model`` in place; False if there was none.

    ``copy_quantized``: give each iteration its own copy of the body's weights that a
    DequantizeLinear reads (the same external bytes, under a name of its own), as the
    weight-only pass does for unrolled graphs: ONNX Runtime fuses no shared integer weight
    into MatMulNBits, and unfused it dequantizes the weight every run and computes in fp32,
    not as the Loop's fused kernels do. For ONNX Runtime runs of a quantized graph (the
    accuracy report); TensorRT takes shared weights.
    """
    graph = model.graph
    if not has_loop(graph):
        return False
    constants = _constants(graph)
    nodes = []
    for node in graph.node:
        if node.op_type == "Loop":
            nodes += _unroll(node, graph, constants, copy_quantized)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)  # the trip counts
    return True


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Small integer constants (inline initializers and Constant nodes) a trip count or condition may read."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if t.data_location != TensorProto.EXTERNAL and _small_int(t)}
    for node in graph.node:
        _note_constant(node, values)
    return values


def _small_int(t: TensorProto) -> bool:
    return t.data_type == TensorProto.INT64 and int(np.prod(t.dims)) <= 1


def _note_constant(node: onnx.NodeProto, known: dict) -> None:
    if node.op_type == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is not None and _small_int(value):
            known[node.output[0]] = numpy_helper.to_array(value)


def _unroll(loop: onnx.NodeProto, graph: onnx.GraphProto, constants: dict,
            copy_quantized: bool) -> list[onnx.NodeProto]:
    body = next(a.g for a in loop.attribute if a.name == "body")
    trip, cond = loop.input[0], loop.input[1] if len(loop.input) > 1 else ""
    if cond or trip not in constants:
        raise ValueError(f"Loop {loop.name!r}: only a constant trip count and no condition can be unrolled")
    carried = list(loop.input[2:])
    n_carried = len(carried)
    dequantized = {name for n in body.node if n.op_type == "DequantizeLinear" for name in n.input[:2]}
    copied = [t for t in body.initializer if copy_quantized and t.name in dequantized]
    hoisted = {t.name: f"{loop.name}/{t.name}" for t in body.initializer if t.name not in dequantized
               or not copy_quantized}
    for t in body.initializer:
        if t.name in hoisted:
            graph.initializer.append(_renamed_tensor(t, hoisted[t.name]))
    always = f"{loop.name}/cond"  # no condition input: every iteration runs
    nodes = [helper.make_node("Constant", [], [always], value=numpy_helper.from_array(np.array(True)))]
    scans = [[] for _ in body.output[1 + n_carried:]]
    defined = defined_names(body)
    for j in range(int(constants[trip])):
        iteration = f"{loop.name}/iteration@{j}"
        index = numpy_helper.from_array(np.array(j, np.int64))
        nodes.append(helper.make_node("Constant", [], [iteration], value=index))
        rename = {name: f"{name}@{j}" for name in defined}
        rename.update(hoisted)
        graph.initializer.extend(_renamed_tensor(t, rename[t.name]) for t in copied)
        rename[body.input[0].name] = iteration
        rename[body.input[1].name] = always
        rename.update({v.name: c for v, c in zip(body.input[2:], carried)})
        known = {**constants, iteration: np.array(j, np.int64)}
        for node in body.node:
            nodes += _place(_copied(node, rename, f"@{j}"), graph, known)
        outputs = [rename.get(o.name, o.name) for o in body.output]
        carried = outputs[1:1 + n_carried]
        for scan, name in zip(scans, outputs[1 + n_carried:]):
            scan.append(name)
    nodes += [helper.make_node("Identity", [c], [out]) for c, out in zip(carried, loop.output[:n_carried])]
    for scan, out in zip(scans, loop.output[n_carried:]):
        axes = f"{out}/axes"
        nodes.append(helper.make_node("Constant", [], [axes], value=numpy_helper.from_array(np.array([0], np.int64))))
        stacked = [f"{name}/stacked" for name in scan]
        nodes += [helper.make_node("Unsqueeze", [name, axes], [s]) for name, s in zip(scan, stacked)]
        nodes.append(helper.make_node("Concat", stacked, [out], axis=0))
    return nodes


def _place(node: onnx.NodeProto, graph: onnx.GraphProto, known: dict) -> list[onnx.NodeProto]:
    """``node``, or for an If decided by ``known`` constants the nodes of the branch it takes."""
    _note_constant(node, known)
    if node.op_type == "Less" and all(name in known for name in node.input):
        known[node.output[0]] = np.less(known[node.input[0]], known[node.input[1]])
    if node.op_type != "If" or node.input[0] not in known:
        return [node]
    branch = next(a.g for a in node.attribute if a.name == ("then_branch" if known[node.input[0]] else "else_branch"))
    graph.initializer.extend(branch.initializer)
    nodes = []
    for inner in branch.node:
        nodes += _place(inner, graph, known)
    nodes += [helper.make_node("Identity", [o.name], [out]) for o, out in zip(branch.output, node.output)]
    return nodes


def _copied(node: onnx.NodeProto, rename: dict[str, str], suffix: str) -> onnx.NodeProto:
    node = copy.deepcopy(node)
    rename_node(node, rename, lambda name: name + suffix)  # node names too: ONNX Runtime wants them unique
    return node


def rename_node(node: onnx.NodeProto, rename: dict[str, str], node_name: Callable[[str], str]) -> None:
    """Apply ``rename`` to the values a node reads and writes, its subgraphs' included."""
    node.input[:] = [rename.get(n, n) for n in node.input]
    node.output[:] = [rename.get(n, n) for n in node.output]
    if node.name:
        node.name = node_name(node.name)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            rename_graph(attr.g, rename, node_name)


def rename_graph(graph: onnx.GraphProto, rename: dict[str, str], node_name: Callable[[str], str]) -> None:
    for seq in (graph.input, graph.output, graph.value_info):
        for v in seq:
            v.name = rename.get(v.name, v.name)
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for node in graph.node:
        rename_node(node, rename, node_name)


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Every name a graph and its subgraphs define."""
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= defined_names(attr.g)
    return names


def _renamed_tensor(t: TensorProto, name: str) -> TensorProto:
    out = TensorProto()
    out.CopyFrom(t)
    out.name = name
    return out


def flat_graph(path, load_external_data: bool = True, copy_quantized: bool = False) -> onnx.ModelProto:
    """The ONNX file at ``path``, its Loops unrolled (``copy_quantized``: see unroll_loops)."""
    model = onnx.load(str(path), load_external_data=load_external_data)
    unroll_loops(model, copy_quantized)
    return model


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    from .onnx_graph import reads

    used = {name for node in graph.node for name in reads(node)} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
