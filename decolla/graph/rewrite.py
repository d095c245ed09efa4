"""Graph rewrites after import: BatchNorm (a `scale` node) folded into the convolution or
gemm before it, x * sigmoid(x) made one SiLU activation, activations fused into the node
before them, unused nodes dropped.

Each rewrite keeps the numbers (up to float rounding) and only merges a node into a
producer that nobody else reads, so no other consumer sees a changed tensor.
"""
from __future__ import annotations

import numpy as np

from decolla.graph.ir import Graph, Node

_FUSES_ACT = ("conv", "gemm", "add", "mul")


def simplify(graph: Graph) -> Graph:
    """The graph with scale nodes folded, activations fused and dead nodes removed."""
    nodes = list(graph.nodes)
    output = graph.output
    changed = True
    while changed:
        changed = False
        by_name = {n.name: n for n in nodes}
        readers: dict[str, int] = {}
        for n in nodes:
            for t in n.inputs:
                readers[t] = readers.get(t, 0) + 1
        for n in nodes:
            sig = _silu_sigmoid(n, by_name, readers)
            if sig is not None:
                x = sig.inputs[0]
                nodes = [m for m in nodes if m is not sig]
                n.op, n.inputs, n.attrs = "act", (x,), {"act": ("silu",)}
                changed = True
                break
            src = by_name.get(n.inputs[0]) if n.inputs else None
            if src is None or readers.get(src.name) != 1 or src.name == output:
                continue
            if n.op == "scale" and src.op in ("conv", "gemm") and src.attrs["act"] is None:
                _fold_scale(src, n)
            elif n.op == "act" and src.op in _FUSES_ACT and src.attrs.get("act") is None:
                src.attrs["act"] = n.attrs["act"]
            else:
                continue
            nodes, output = _replace(nodes, output, n, src.name)
            changed = True
            break
    return Graph(graph.name, graph.input_shape, _live(nodes, output), output)


def _silu_sigmoid(n: Node, by_name: dict, readers: dict) -> Node | None:
    """The sigmoid node when `n` is mul(x, sigmoid(x)) (either order) and the sigmoid is
    read only there; else None."""
    if n.op != "mul" or n.attrs.get("act") is not None or len(n.inputs) != 2:
        return None
    for s, x in (n.inputs, n.inputs[::-1]):
        sig = by_name.get(s)
        if sig is not None and sig.op == "act" and sig.attrs["act"] == ("sigmoid",) and \
                sig.inputs[0] == x and readers.get(s) == 1:
            return sig
    return None


def _fold_scale(src: Node, scale: Node) -> None:
    s = scale.arrays["scale"].astype(np.float64)
    src.arrays["weight"] = (src.arrays["weight"].astype(np.float64) * s).astype(np.float32)
    src.arrays["bias"] = (src.arrays["bias"].astype(np.float64) * s
                          + scale.arrays["shift"]).astype(np.float32)
    src.prep = None


def _replace(nodes: list[Node], output: str, gone: Node, by: str) -> tuple[list[Node], str]:
    """Nodes without `gone`, its readers reading tensor `by` instead."""
    out = []
    for n in nodes:
        if n is gone:
            continue
        if gone.name in n.inputs:
            n.inputs = tuple(by if t == gone.name else t for t in n.inputs)
        out.append(n)
    return out, by if output == gone.name else output


def _live(nodes: list[Node], output: str) -> list[Node]:
    """Nodes the output depends on, in order."""
    need = {output}
    keep = []
    for n in reversed(nodes):
        if n.name in need:
            keep.append(n)
            need.update(n.inputs)
    return keep[::-1]
