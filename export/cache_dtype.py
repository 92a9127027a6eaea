"""An fp16 KV cache for backbone graphs that compute in fp32 (fp32, int8 and int4 builds).

With B streams the per-stream caches are read every frame next to the shared weights: at the
2B topology a cache row is 459 KB in fp32 (28 layers x K and V x 2 rows x 8 heads x 128 x 4 B),
so 8 streams at position 750 hold 2.75 GB of cache against int4's 1.8 GB of weights. Storing it
in fp16 halves what the runtime holds and what a device backend reads; the graph casts each
layer's cache to fp32 where it reads it and its new rows to fp16 where it returns them, so the
attention itself still runs in fp32. (ONNX Runtime's CPU kernels do not fuse that Cast into the
MatMul: there it saves memory, not reading; TensorRT fuses it.)

The pass only rewrites the graph's boundary (inputs ``k_cache.i``/``v_cache.i``, outputs
``k_new``/``v_new``) and leaves the weights where they are, so it runs on a 2B graph whose weights
live in external data without loading them.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from dia2_trt.runtime.manifest import cache_name

CACHE_DTYPES = ("float32", "float16")
CACHE_OUTPUTS = ("k_new", "v_new")


def is_cache_input(name: str) -> bool:
    return name.startswith((cache_name("k", 0)[:-1], cache_name("v", 0)[:-1]))


def fp16_cache(path: Path) -> None:
    """Rewrite backbone graph ``path`` in place: fp16 cache inputs and new rows, fp32 inside."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    casts_in, casts_out = [], []
    for value in graph.input:
        if is_cache_input(value.name) and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = value.name + "/fp32"
            _rename_reads(graph, value.name, inner)
            casts_in.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT,
                                             name=f"{value.name}/to_fp32"))
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for value in graph.output:
        if value.name in CACHE_OUTPUTS and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = value.name + "/fp32"
            for node in graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
            casts_out.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT16,
                                              name=f"{value.name}/to_fp16"))
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    if not casts_in or len(casts_out) != len(CACHE_OUTPUTS):
        raise ValueError(f"{path}: not a backbone step with an fp32 cache")
    nodes = [*casts_in, *graph.node, *casts_out]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node (subgraphs included) reading ``old`` reads ``new`` instead."""
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs) if attr.type in (onnx.AttributeProto.GRAPH,
                                                               onnx.AttributeProto.GRAPHS) else ():
                _rename_reads(sub, old, new)
