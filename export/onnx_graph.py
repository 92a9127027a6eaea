"""Whole-graph helpers for the ONNX passes (fp16, Q/DQ): torch-free, unlike onnx_io."""

from __future__ import annotations

import heapq

import onnx


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Put every node after the producers of what it reads, subgraphs' outer-scope reads included.

    Graph passes that append nodes (fp16's casts, the Q/DQ pairs) can leave a value read inside an
    If branch (the depformer's TopK thresholds) produced after that If, which the ONNX checker refuses."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                sort_topologically(attr.g)
    produced = {out: i for i, node in enumerate(graph.node) for out in node.output}
    users: list[list[int]] = [[] for _ in graph.node]
    waiting = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        for j in {produced[name] for name in reads(node) if name in produced} - {i}:
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


def reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads: its inputs, and what its subgraphs take from the enclosing scope."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            inner = {out for n in attr.g.node for out in n.output}
            inner |= {v.name for v in attr.g.input} | {t.name for t in attr.g.initializer}
            names |= {name for n in attr.g.node for name in reads(n)} - inner
    return names
