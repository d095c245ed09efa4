"""The graph IR: a DAG of operator nodes over single-image NHWC tensors.

A tensor is (H, W, C) float32 (a pooled vector stays (1, 1, C) so that it broadcasts
against maps), or (N,) after `flatten`. The input tensor is named "input"; every node
produces one tensor named after the node; nodes are kept in a topological order.
BatchNorm is folded and activations fused where the importer could (`act` attribute).

Ops and their attributes (weights in `Node.arrays`, float32):
  conv      kernel (kh, kw), stride (sh, sw), pads (top, left, bottom, right),
            dilation (dh, dw), groups, act; weight (kh, kw, Cin/groups, Cout), bias (Cout,)
  gemm      act; weight (Cin, Cout), bias (Cout,)                 (N,) -> (Cout,)
  add, mul  act; two inputs of one shape, or one of them (1, 1, C) broadcast over a map
  concat    inputs joined along channels
  act       fn (relu | clip | hardswish | hardsigmoid | sigmoid | silu) with its params
  scale     a BatchNorm that follows no conv: y = x * scale + shift (arrays scale, shift)
  maxpool, avgpool   kernel, stride, pads (end pads include ceil-mode rows/columns);
            avgpool: count_pad (padding counted in the divisor)
  gap       global average pool -> (1, 1, C)
  flatten   (H, W, C) -> (C*H*W,) in ONNX's (C, H, W) order
`act` is None or (fn, *params), e.g. ("clip", 0.0, 6.0), ("hardsigmoid", alpha, beta).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from decolla.model import ModelError

OPS = ("conv", "gemm", "add", "mul", "concat", "act", "scale", "maxpool", "avgpool", "gap",
       "flatten")
ACTS = ("relu", "clip", "hardswish", "hardsigmoid", "sigmoid", "silu")
WINDOWED = ("conv", "maxpool", "avgpool")   # a row of output reads a window of input rows


class GraphError(ModelError):
    """A graph that cannot be imported, built or run (names the node)."""


@dataclass
class Node:
    """One operator: its output tensor is named `name`."""
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    prep: dict | None = field(default=None, repr=False, compare=False)   # kernel-ready weights

    def window(self) -> tuple[int, int, int, int]:
        """(kernel rows, stride, top pad, dilation) along H of a windowed op; (1, 1, 0, 1)
        for the others."""
        if self.op not in WINDOWED:
            return 1, 1, 0, 1
        return (self.attrs["kernel"][0], self.attrs["stride"][0], self.attrs["pads"][0],
                self.attrs.get("dilation", (1, 1))[0])

    @property
    def macs(self) -> int:
        """Multiply-accumulates (pools and element-wise ops: one per input element read)."""
        out = math.prod(self.shape)
        if self.op == "conv":
            kh, kw, cin_g, _ = self.arrays["weight"].shape
            return out * kh * kw * cin_g
        if self.op == "gemm":
            return int(self.arrays["weight"].size)
        if self.op in ("maxpool", "avgpool"):
            return out * self.attrs["kernel"][0] * self.attrs["kernel"][1]
        return out

    @property
    def cost_kind(self) -> str:
        """The cost model's kind of this node (decolla.cost KIND_SPEED)."""
        if self.op == "conv":
            kh, kw, cin_g, cout = self.arrays["weight"].shape
            if kh == kw == 1 and self.attrs["groups"] == 1:
                return "pwconv" if self.attrs["stride"] == (1, 1) else "conv"
            if cin_g == 1 and self.attrs["groups"] == cout:
                return "dwconv3x3" if (kh, kw) == (3, 3) else "dwconv"
            return "conv3x3" if (kh, kw) == (3, 3) else "conv"
        if self.op == "gemm":
            return "linear"
        if self.op in ("maxpool", "avgpool", "gap"):
            return "pool"
        return "eltwise"

    def spec(self) -> dict:
        """Architecture of the node, JSON-ready (no weights)."""
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.attrs.items()}
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), "attrs": attrs,
                "shape": list(self.shape),
                "arrays": {k: list(a.shape) for k, a in sorted(self.arrays.items())}}


@dataclass
class Graph:
    """Nodes in topological order from tensor "input" (H, W, C) to tensor `output`."""
    name: str
    input_shape: tuple[int, int, int]
    nodes: list[Node]
    output: str

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"input": tuple(self.input_shape)} | {n.name: tuple(n.shape) for n in self.nodes}

    def consumers(self) -> dict[str, list[Node]]:
        """Nodes reading each tensor (in order)."""
        out: dict[str, list[Node]] = {"input": []} | {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for t in n.inputs:
                out[t].append(n)
        return out

    def digest(self) -> str:
        """sha256 over the architecture and every weight."""
        h = hashlib.sha256(json.dumps({"input": list(self.input_shape), "output": self.output,
                                       "nodes": [n.spec() for n in self.nodes]},
                                      sort_keys=True).encode())
        for n in self.nodes:
            for k in sorted(n.arrays):
                h.update(np.ascontiguousarray(n.arrays[k], np.float32).tobytes())
        return h.hexdigest()


def check(graph: Graph) -> None:
    """Topological order, known ops, defined inputs and finite weights (GraphError)."""
    seen = {"input"}
    for n in graph.nodes:
        if n.op not in OPS:
            raise GraphError(f"node {n.name}: unknown op {n.op!r}")
        for t in n.inputs:
            if t not in seen:
                raise GraphError(f"node {n.name}: input {t!r} is not an earlier tensor")
        if n.name in seen:
            raise GraphError(f"node {n.name}: the name is used twice")
        for k, a in n.arrays.items():
            if a.dtype != np.float32 or not np.isfinite(a).all():
                raise GraphError(f"node {n.name}: array {k} is not finite float32")
        seen.add(n.name)
    if graph.output not in seen:
        raise GraphError(f"the output {graph.output!r} is not a tensor of the graph")


def pooled_size(size: int, k: int, s: int, pad0: int, pad1: int, d: int = 1) -> int:
    """Output length of a window op over `size` with pads (floor mode)."""
    return (size + pad0 + pad1 - (k - 1) * d - 1) // s + 1


def out_shape(op: str, attrs: dict, arrays: dict, ins: list[tuple[int, ...]]) -> tuple:
    """Shape of a node's output from its inputs' shapes (GraphError on a mismatch)."""
    x = ins[0]
    if op in WINDOWED:
        if len(x) != 3:
            raise GraphError(f"{op} needs an (H, W, C) map, got shape {x}")
        (kh, kw), (sh, sw), (pt, pl, pb, pr) = attrs["kernel"], attrs["stride"], attrs["pads"]
        dh, dw = attrs.get("dilation", (1, 1))
        h, w = pooled_size(x[0], kh, sh, pt, pb, dh), pooled_size(x[1], kw, sw, pl, pr, dw)
        if h < 1 or w < 1:
            raise GraphError(f"{op}: a {kh}x{kw} window does not fit in a {x[0]}x{x[1]} map")
        if op != "conv":
            return (h, w, x[2])
        wt = arrays["weight"]
        if wt.shape[2] * attrs["groups"] != x[2]:
            raise GraphError(f"conv: weight {wt.shape} with {attrs['groups']} groups does not "
                             f"take {x[2]} input channels")
        return (h, w, wt.shape[3])
    if op == "gemm":
        if len(x) != 1 or x[0] != arrays["weight"].shape[0]:
            raise GraphError(f"gemm: input {x} does not fit weight {arrays['weight'].shape}")
        return (arrays["weight"].shape[1],)
    if op in ("add", "mul"):
        a, b = ins
        if a == b or (len(a) == len(b) == 3 and a[2] == b[2] and (a[:2] == (1, 1) or b[:2] == (1, 1))):
            return a if a[:2] != (1, 1) else b
        raise GraphError(f"{op}: shapes {a} and {b} do not broadcast (same shape, or one "
                         f"(1, 1, C))")
    if op == "concat":
        if any(len(s) != 3 or s[:2] != x[:2] for s in ins):
            raise GraphError(f"concat along channels needs maps of one size, got {ins}")
        return x[:2] + (sum(s[2] for s in ins),)
    if op == "gap":
        if len(x) != 3:
            raise GraphError(f"gap needs an (H, W, C) map, got shape {x}")
        return (1, 1, x[2])
    if op == "flatten":
        return (math.prod(x),)
    return tuple(x)   # act, scale
