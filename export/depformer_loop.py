"""The depformer frame with its weight-sharing stages as one ONNX ``Loop``.

The weights schedule gives the 2B's last 27 of 31 stages one set of attention
projections, and the MLP serves every stage. Unrolled, a quantized graph must give
each reader its own integer copy (ONNX Runtime fuses no shared initializer into
MatMulNBits): 2.2 GiB of int8 depformer for 0.28 GB of distinct weights. In a Loop
body each weight has one reader, so one fused copy serves every stage.

The graph is ``prefix`` (cb0 and the stages before the schedule's repeated tail,
unrolled as in DepformerFrame) then a Loop over the tail. What differs per stage in
the tail is looked up by the iteration number: the codebook's embedding rows (one
flat table), its RoPE rows, its noise number, and its logits head. A head is a whole
[E, V] matrix, so it is picked by a binary tree of ``If`` nodes whose leaves each
hold one head as a constant: a gathered weight could not be fused, and dequantizing
a gathered int8 head cost 41 ms a frame against 3.5 ms for the tree (27 heads of
the 2B's shape in a 27-iteration Loop, 2 threads, ONNX Runtime 1.32).

Same arithmetic as DepformerFrame, op for op: the loop concatenates each stage's
K/V onto the earlier ones (a loop-carried value that grows by one row), as the
unrolled stages do. ``unroll.unroll_loops`` turns the Loop back into straight-line
stages for the passes and backends that want them (Q/DQ calibration, TensorRT).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dia2_trt.models.dia2 import DepformerLayer, Dia2Model, Rotary, pair_rows, typed
from dia2_trt.runtime.manifest import STREAM_ROWS, STREAMS
from dia2_trt.runtime.state_machine import TokenIds

from .graphs import BRANCHES, EXAMPLE_STREAMS, DepformerFrame, guided_sample
from .onnx_io import export_module, save_model
from .unroll import defined_names, rename_graph

LOOP_PREFIX = "stage_loop/"  # the body's own names, kept apart from the outer graph's
HEAD_TREE = "stage_head"  # node-name prefix of the head-picking If tree
OUTER = ["hidden", "noise", "temperature", "top_k", "cfg_scale", "cfg_filter_k"]  # read by the body from outside
OUTER_AXES = {"hidden": {0: STREAM_ROWS}}  # the others' leading axis is the streams


def tail_stages(schedule: list[int]) -> int:
    """How many final stages share one weights group (0 or 1: nothing to loop over).

    Stage 0 stays unrolled: it alone may add the text embedding.
    """
    run = 1
    while run < len(schedule) - 1 and schedule[-run - 1] == schedule[-1]:
        run += 1
    return run if run >= 2 else 0


class DepformerFramePrefix(DepformerFrame):
    """cb0 and the first ``stages`` depformer stages; also the K/V rows the tail's stages attend to."""

    def __init__(self, model: Dia2Model, ids: TokenIds, stages: int) -> None:
        super().__init__(model, ids)
        self.stages = stages
        self.output_names = ["prefix_tokens", "token", *_kv_names("past", self.n_layer)]

    def forward(self, hidden, cb0_logits, text_tokens, noise, temperature, top_k, cfg_scale, cfg_filter_k):
        tokens, past = self.first_stages(self.stages, hidden, cb0_logits, text_tokens, noise, temperature, top_k,
                                         cfg_scale, cfg_filter_k)
        keys = [torch.cat([kv[0] for kv in layer], dim=2) for layer in past]
        values = [torch.cat([kv[1] for kv in layer], dim=2) for layer in past]
        return torch.stack(tokens, dim=1), tokens[-1], *keys, *values


class StageLogits(nn.Module):
    """The tail's codebook heads as one [S, E, V] stack, looked up by the iteration.

    Only for the export: ``assemble`` swaps the lookup for the If tree of constant heads."""

    def __init__(self, heads: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([h.weight.detach().t() for h in heads]), requires_grad=False)

    def forward(self, x: torch.Tensor, iteration: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight[iteration])


class StageRotary(nn.Module):
    """Rotary._at with the position a tensor: the same products (R holds one +-1 a column).

    A module of its own whose class name says "Rotary": the weight-only and fp16 passes keep
    what a module so named reads in float, and here that is a table looked up by the stage.
    """

    def __init__(self, rotary: Rotary) -> None:
        super().__init__()
        self.tables = rotary

    def forward(self, x: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        eye, zero = torch.eye(half, dtype=x.dtype), torch.zeros(half, half, dtype=x.dtype)
        swap = torch.cat((torch.cat((zero, eye), dim=1), torch.cat((-eye, zero), dim=1)), dim=0)
        return x * self.tables.cos[stage] + torch.matmul(x, swap * self.tables.sin[stage])


class DepformerFrameBody(nn.Module):
    """One stage of the repeated tail: the Loop body, before its names are made the body's own.

    The class name holds "DepformerFrame": the fp16 and Q/DQ passes keep its sampling in fp32.
    """

    def __init__(self, model: Dia2Model, first: int) -> None:
        super().__init__()
        dep = model.depformer
        self.first = first
        self.n_layer = len(dep.layers)
        self.group = str(dep.schedule[first])
        self.vocab = dep.audio_embeds[0].num_embeddings
        self.vocab_limit = dep.vocab_limit
        self.layers = dep.layers
        self.norm = dep.norm
        self.depformer_in = dep.depformer_in[self.group]
        tables = [e.weight.detach() for e in typed(dep.audio_embeds, nn.Embedding)[first : dep.num_depth]]
        self.embeddings = nn.Embedding.from_pretrained(torch.cat(tables), freeze=True)
        self.stage_logits = StageLogits(typed(dep.logits, nn.Linear)[first:])
        self.rotary = StageRotary(dep.rotary) if dep.rotary is not None else None
        self.input_names = ["iteration", "token", *_kv_names("past", self.n_layer), *OUTER]
        self.output_names = ["next_token", *_kv_names("next", self.n_layer)]

    def forward(self, iteration, token, *rest):
        past_k, past_v = rest[: self.n_layer], rest[self.n_layer: 2 * self.n_layer]
        hidden, noise, temperature, top_k, cfg_scale, cfg_filter_k = rest[2 * self.n_layer:]
        stage = iteration + self.first
        emb = self.embeddings(iteration * self.vocab + pair_rows(token))
        x = self.depformer_in(hidden[:, None]) + emb[:, None]
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = self._layer(layer, x, stage, past_k[i], past_v[i])
            keys.append(k)
            values.append(v)
        logits = self.stage_logits(self.norm(x), iteration)[:, 0, : self.vocab_limit]
        uniform = noise.index_select(1, (stage + 1).reshape(1))[:, 0]
        token = guided_sample(logits, uniform, temperature, top_k, cfg_scale, cfg_filter_k)
        return token, *keys, *values

    def _layer(self, layer, x, stage, past_k, past_v):
        """Depformer.stage_split's layer, at a stage given as a tensor."""
        att = layer.self_attention
        b = x.shape[0]
        proj = att.in_proj[self.group](layer.pre_norm(x))
        q, k, v = (part.view(b, 1, att.heads, att.head_dim) for part in proj.chunk(3, dim=-1))
        q, k = att.q_norm(q), att.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, stage), self.rotary(k, stage)
        q, k, v = (y.reshape(b, att.heads, 1, att.head_dim) for y in (q, k, v))
        keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        out = torch.softmax(torch.matmul(q, keys.transpose(-1, -2)), dim=-1) @ values
        x = x + att.out_proj[self.group](out.reshape(b, 1, att.heads * att.head_dim))
        return x + layer.mlp(layer.post_norm(x)), keys, values

    def example_inputs(self, frame_inputs: tuple, rows: int = 2) -> tuple:
        """(iteration, token, past k/v with ``rows`` rows, then the frame's OUTER inputs)."""
        att = typed(self.layers, DepformerLayer)[0].self_attention
        named = dict(zip(DepformerFrame.input_names, frame_inputs))
        streams = named["noise"].shape[0]
        past = [torch.zeros(BRANCHES * streams, att.heads, rows, att.head_dim) for _ in range(2 * self.n_layer)]
        return (torch.tensor(0), torch.zeros(streams, dtype=torch.long), *past, *(named[n] for n in OUTER))

    def dynamic_shapes(self) -> tuple:
        """The streams (and their rows); the past K/V's row axis grows by one a stage."""
        past = tuple({0: STREAM_ROWS, 2: "rows"} for _ in range(2 * self.n_layer))
        return ({}, {0: STREAMS}, (*past, *(OUTER_AXES.get(n, {0: STREAMS}) for n in OUTER)))


def _kv_names(kind: str, n_layer: int) -> list[str]:
    return [f"{kind}_{kv}.{i}" for kv in "kv" for i in range(n_layer)]


def export_depformer_loop(model: Dia2Model, ids: TokenIds, path: Path, opset: int) -> None:
    """Write the depformer frame with its repeated tail as a Loop (``tail_stages`` must be >= 2)."""
    dep = model.depformer
    tail = tail_stages(dep.schedule)
    if tail < 2:
        raise ValueError("the weights schedule has no repeated tail to loop over")
    first = dep.num_depth - tail
    frame_inputs = DepformerFrame.example_inputs(model, EXAMPLE_STREAMS)
    prefix = DepformerFramePrefix(model, ids, first)
    body = DepformerFrameBody(model, first)
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".depformer-") as tmp:
        export_module(prefix, frame_inputs, DepformerFrame.input_names, prefix.output_names,
                      Path(tmp) / "prefix.onnx", opset, dynamic=DepformerFrame.dynamic_shapes)
        export_module(body, body.example_inputs(frame_inputs), body.input_names, body.output_names,
                      Path(tmp) / "body.onnx", opset, dynamic=body.dynamic_shapes())
        outer = onnx.load(str(Path(tmp) / "prefix.onnx"))
        inner = onnx.load(str(Path(tmp) / "body.onnx"))
    save_model(assemble(outer, inner, first, tail, body.n_layer), path)


def assemble(prefix: onnx.ModelProto, body: onnx.ModelProto, first: int, trip: int, n_layer: int) -> onnx.ModelProto:
    """prefix -> Loop(body) over stages ``first`` .. ``first + trip - 1`` -> audio_tokens [streams, 1 + stages].

    The Loop scans each stage's tokens [streams] into [trip, streams]: transposed, they follow the
    prefix's [streams, first + 1] along the codebook axis."""
    loop_body = _as_loop_body(body.graph, n_layer)
    _pick_heads(loop_body, LOOP_PREFIX + "iteration", first)
    graph = prefix.graph
    carried = ["token", *_kv_names("past", n_layer)]
    finals = [f"{LOOP_PREFIX}final_{name}" for name in carried]
    graph.initializer.append(numpy_helper.from_array(_int64(trip), "stage_loop_trips"))
    graph.node.append(helper.make_node("Loop", ["stage_loop_trips", "", *carried],
                                       [*finals, "loop_tokens"], name="stage_loop", body=loop_body))
    graph.node.append(helper.make_node("Transpose", ["loop_tokens"], ["loop_tokens_by_stream"], perm=[1, 0]))
    graph.node.append(helper.make_node("Concat", ["prefix_tokens", "loop_tokens_by_stream"], ["audio_tokens"],
                                       axis=1))
    streams, codebooks = (d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("audio_tokens", TensorProto.INT64,
                                                      [streams, int(codebooks) + trip]))
    model = helper.make_model(graph, opset_imports=prefix.opset_import, ir_version=prefix.ir_version)
    model.producer_name = prefix.producer_name
    return model


def _int64(value) -> np.ndarray:
    return np.array(value, dtype=np.int64)


def _as_loop_body(graph: onnx.GraphProto, n_layer: int) -> onnx.GraphProto:
    """The exported stage graph as a Loop body: (iteration, cond, token, past...) -> (cond, token, next..., token)."""
    keep = set(OUTER)
    renamed = {name: LOOP_PREFIX + name for name in defined_names(graph) if name not in keep}
    rename_graph(graph, renamed, lambda name: LOOP_PREFIX + name)
    iteration, token = (LOOP_PREFIX + n for n in ("iteration", "token"))
    inputs = {v.name: v for v in graph.input}
    past = [inputs[LOOP_PREFIX + n] for n in _kv_names("past", n_layer)]
    outputs = list(graph.output)
    cond_in, cond_out, scan = (LOOP_PREFIX + n for n in ("cond", "cond_out", "scan_token"))
    graph.node.extend([helper.make_node("Identity", [cond_in], [cond_out]),
                       helper.make_node("Identity", [outputs[0].name], [scan])])
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
                        helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
                        inputs[token], *past])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), *outputs,
                         helper.make_tensor_value_info(scan, TensorProto.INT64, [STREAMS])])
    graph.name = "stage_loop_body"
    return graph


def _pick_heads(graph: onnx.GraphProto, iteration: str, first: int) -> None:
    """Gather(head stack, iteration) -> MatMul becomes an If tree over ``iteration`` with one head a leaf."""
    inits = {t.name: t for t in graph.initializer}
    # the stack StageLogits indexes by the iteration (reshaped by the exporter: the tree reads it raw)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
               and n.input[0].endswith("stage_logits.weight") and len(inits[n.input[0]].dims) == 3]
    if len(gathers) != 1:
        raise ValueError(f"expected one stacked head in the loop body, found {len(gathers)}")
    gather = gathers[0]
    readers = [n for n in graph.node if gather.output[0] in n.input]
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[1] != gather.output[0]:
        raise ValueError("the loop body's stacked head is not read by exactly one MatMul")
    matmul = readers[0]
    stack = numpy_helper.to_array(inits[gather.input[0]])
    tree, leaf_inits = _head_nodes(matmul, stack, 0, len(stack), iteration, matmul.output[0], first)
    nodes = []
    for node in graph.node:
        if node is matmul:
            nodes += tree
        elif node is not gather:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.remove(inits[gather.input[0]])
    graph.initializer.extend(leaf_inits)


def _head_nodes(matmul: onnx.NodeProto, stack, lo: int, hi: int, iteration: str, out: str,
                first: int) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes (and their weights) computing ``out`` = ``matmul`` with head ``iteration``, known to lie in [lo, hi)."""
    if hi - lo == 1:
        name = f"{LOOP_PREFIX}depformer.logits.{first + lo}.weight"  # the checkpoint's name for that head
        leaf = helper.make_node("MatMul", [matmul.input[0], name], [out], name=f"{HEAD_TREE}_{lo}")
        _label_head(leaf, matmul, first + lo)
        return [leaf], [numpy_helper.from_array(stack[lo].copy(), name)]
    mid = (lo + hi) // 2
    pivot, cond = f"{out}/{HEAD_TREE}_{lo}_{hi}_pivot", f"{out}/{HEAD_TREE}_{lo}_{hi}_cond"
    branches = []
    for a, b in ((lo, mid), (mid, hi)):
        branch_out = f"{out}/{HEAD_TREE}_{a}_{b}"
        nodes, weights = _head_nodes(matmul, stack, a, b, iteration, branch_out, first)
        value = helper.make_tensor_value_info(branch_out, TensorProto.FLOAT, None)
        branches.append(helper.make_graph(nodes, f"{HEAD_TREE}_{a}_{b}", [], [value], weights))
    return [helper.make_node("Constant", [], [pivot], value=numpy_helper.from_array(_int64(mid), pivot)),
            helper.make_node("Less", [iteration, pivot], [cond]),
            helper.make_node("If", [cond], [out], name=f"{HEAD_TREE}_{lo}_{hi}",
                             then_branch=branches[0], else_branch=branches[1])], []


def _label_head(leaf: onnx.NodeProto, matmul: onnx.NodeProto, stage: int) -> None:
    """The exporter's metadata, with the module scope DepformerFrame's head for ``stage`` has: the fp16
    and Q/DQ passes keep heads in float by it, and the accuracy report finds each codebook's logits."""
    for prop in matmul.metadata_props:
        value = prop.value
        if prop.key == "pkg.torch.onnx.name_scopes":
            value = value.replace("'stage_logits'", f"'depformer.logits.{stage}'")
        leaf.metadata_props.add(key=prop.key, value=value)
