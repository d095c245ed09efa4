"""A graph cut into segments where a single tensor crosses, as the layers of a `Model`.

Between two cuts only one tensor is alive, so residual and concat branches stay inside a
segment. A segment made only of what the layer IR has (3x3 and pointwise convolutions with
ReLU6 or nothing, a residual add after them, the pool and the classifier) becomes those
layers, with their fused kernels and every plan; any other segment becomes one
`GraphLayer` that runs its nodes on row windows: a strip of output rows from an input
window with the halo its receptive field needs (`rf`), through any kernel size and
stride. The plans treat a row-wise GraphLayer ("graph") like any row-wise layer, and one
that needs its whole input for any row ("graph-global": a global pool inside, as in
squeeze-excitation) as a layer computed whole.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from decolla import ops
from decolla.graph import ops as gops
from decolla.graph.ir import WINDOWED, Graph, GraphError, Node
from decolla.graph.program import Program, needed_rows
from decolla.model import Layer, Model, validate

GRAPH_KINDS = ("graph", "graph-global")
MAX_PROGRAMS = 16   # compiled row ranges kept per segment (each holds its buffers)


@dataclass(eq=False)
class GraphLayer(Layer):
    """A segment of a graph as one layer: `nodes` read tensor `source` (the segment's input)
    and the last one is the layer's output."""
    nodes: list = field(default_factory=list)
    source: str = "input"
    rf: tuple | None = None        # output rows [r0, r1) read input rows [r0*S - A, (r1-1)*S + B)

    def __post_init__(self):
        self._shapes = {self.source: tuple(self.in_shape)} | {n.name: tuple(n.shape)
                                                               for n in self.nodes}
        self._programs: dict = {}  # (r0, r1, threads, Python thread) -> Program

    @property
    def macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    def spec(self) -> dict:
        kinds: dict[str, int] = {}
        for n in self.nodes:
            kinds[n.cost_kind] = kinds.get(n.cost_kind, 0) + n.macs
        return super().spec() | {"rf": self.rf, "op_macs": kinds,
                                 "weights": sum(int(a.size) for n in self.nodes
                                                for a in n.arrays.values()),
                                 "nodes": [n.spec() for n in self.nodes]}

    def arrays(self):
        return [n.arrays[k] for n in self.nodes for k in sorted(n.arrays)]

    def run(self, x: np.ndarray, c0: int = 0, c1: int | None = None, r0: int = 0,
            r1: int | None = None, in_row0: int = 0, out: np.ndarray | None = None,
            threads: int | None = None) -> np.ndarray:
        """Output rows [r0, r1) and channels [c0, c1) of the segment from input rows
        [in_row0, in_row0 + len(x)) (a vector input: all of it)."""
        nt = ops._nthreads(threads)
        rank3 = len(self.out_shape) == 3
        r1 = (self.out_shape[0] if rank3 else 1) if r1 is None else r1
        cout = self.out_shape[-1]
        c1 = cout if c1 is None else c1
        whole = (c0, c1) == (0, cout)
        direct = out is not None and whole and out.flags.c_contiguous and \
            out.shape == (r1 - r0,) * rank3 + tuple(self.out_shape[rank3:]) and \
            not np.may_share_memory(out, x)
        y = self.program(r0, r1, nt)(x, in_row0, out if direct else None)
        if not whole:
            y = y[..., c0:c1]
        if out is None:
            return np.array(y, np.float32)     # a copy: the program reuses its buffers
        if y is not out:
            np.copyto(out, y)
        return out

    def program(self, r0: int, r1: int, nt: int) -> Program:
        """The segment compiled for output rows [r0, r1) on nt threads, for this Python
        thread (a program's buffers are reused by its next call)."""
        key = (r0, r1, nt, threading.get_ident())
        prog = self._programs.get(key)
        if prog is None:
            if len(self._programs) >= MAX_PROGRAMS:
                self._programs.pop(next(iter(self._programs)), None)
            prog = self._programs[key] = self.compile(nt, r0, r1)
        return prog

    def compile(self, nt: int, r0: int = 0, r1: int | None = None,
                into_dst: bool = False) -> Program:
        """A new program for output rows [r0, r1) (all by default) on nt threads, with its
        own buffers (the single-device forward keeps one per Forward, and passes the
        output buffer on every call: `into_dst`)."""
        if r1 is None:
            r1 = self.out_shape[0] if len(self.out_shape) == 3 else 1
        return Program(self.nodes, self.source, self._shapes, r0, r1, nt, into_dst)


def node_plan(nodes: list[Node], shapes: dict, r0: int, r1: int) -> tuple[dict, dict]:
    """What `run_nodes` needs for output rows [r0, r1): each tensor's rows (`needed_rows`)
    and the index of each tensor's last reader (when it can be dropped)."""
    return needed_rows(nodes, shapes, r0, r1), {t: i for i, n in enumerate(nodes)
                                                for t in n.inputs}


def run_nodes(nodes: list[Node], source: str, x: np.ndarray, x0: int, shapes: dict,
              r0: int, r1: int, nt: int, dst: np.ndarray | None = None,
              plan: tuple | None = None) -> np.ndarray:
    """Output rows [r0, r1) of the last of `nodes` from rows [x0, x0 + len(x)) of `source`
    (the last node writes into `dst` when given; `plan`: `node_plan`'s, made if None),
    node by node on graph.ops: the plain interpreter the compiled `Program` is checked
    against."""
    need, last_use = plan or node_plan(nodes, shapes, r0, r1)
    lo, hi = need.get(source, (0, 0))
    if len(shapes[source]) == 3 and lo < hi and (lo < x0 or hi > x0 + x.shape[0]):
        raise GraphError(f"segment {nodes[-1].name}: output rows [{r0}, {r1}) need input rows "
                         f"[{lo}, {hi}) but x holds [{x0}, {x0 + x.shape[0]})")
    have = {source: (x, x0)}
    for i, n in enumerate(nodes):
        a, b = need.get(n.name, (0, 0))
        if len(n.shape) == 3 and a >= b:
            y = np.empty((0,) + tuple(n.shape[1:]), np.float32)
        else:
            y = gops.run(n, [have[t] for t in n.inputs], [shapes[t][0] for t in n.inputs],
                         a, b, nt, dst if i == len(nodes) - 1 else None)
        have[n.name] = (y, a)
        for t in n.inputs:
            if last_use.get(t) == i:
                del have[t]
    return have[nodes[-1].name][0]


def receptive_field(nodes: list[Node], source: str, shapes: dict) -> tuple | None:
    """(S, A, B): output rows [r0, r1) of the last node read source rows
    [r0*S - A, (r1-1)*S + B); None when some output row reads every input row."""
    rf: dict = {source: (1, 0, 1)}
    for n in nodes:
        parts = []
        for t in n.inputs:
            if len(shapes[t]) == 3 and shapes[t][0] == 1 and len(n.shape) == 3 and n.shape[0] > 1:
                parts.append(None)       # a pooled vector broadcast over the map
            else:
                parts.append(rf.get(t))
        if n.op in ("gap", "flatten", "gemm") or any(p is None for p in parts) or \
                len({p[0] for p in parts}) != 1:
            rf[n.name] = None
            continue
        S, A, B = parts[0][0], max(p[1] for p in parts), max(p[2] for p in parts)
        if n.op in WINDOWED:
            k, s, pt, d = n.window()
            S, A, B = s * S, pt * S + A, ((k - 1) * d - pt) * S + B
        rf[n.name] = (S, A, B)
    return rf[nodes[-1].name]


def cut_points(graph: Graph) -> list[int]:
    """Node counts n such that after the first n nodes only the n-th node's output is still
    to be read (a segment boundary there hands over that one tensor)."""
    last = {}
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            last[t] = i
    alive = {"input"} if "input" in last else set()
    cuts = []
    for i, n in enumerate(graph.nodes):
        if last.get(n.name, -1) > i or n.name == graph.output:
            alive.add(n.name)
        alive -= {t for t in n.inputs if last[t] == i}
        if alive == {n.name}:
            cuts.append(i + 1)
    return cuts


def to_model(graph: Graph, meta: dict | None = None) -> Model:
    """The graph as a Model: segments between cuts, each as IR layers or one GraphLayer."""
    shapes = graph.shapes()
    readers = graph.consumers()
    alias = {"input": "input"}
    layers: list[Layer] = []
    start = 0
    for end in cut_points(graph):
        seg = graph.nodes[start:end]
        source = "input" if start == 0 else graph.nodes[start - 1].name
        lowered = None
        if _gates_next_conv(layers, seg) or _extends_block(layers, seg):
            prev = layers.pop()
            seg, source = prev.nodes + seg, prev.source
        else:
            lowered = _as_ir_layers(seg, source, alias, shapes, readers, layers)
        if lowered is None:
            lowered = [GraphLayer(seg[-1].name, "graph", tuple(shapes[source]),
                                  tuple(seg[-1].shape), nodes=list(seg), source=source)]
            lowered[0].rf = receptive_field(seg, source, shapes)
            if lowered[0].rf is None:
                lowered[0].kind = "graph-global"
            else:
                lowered[0].stride = lowered[0].rf[0]
            alias[seg[-1].name] = seg[-1].name
        layers += lowered
        start = end
    if not layers:
        raise GraphError(f"graph {graph.name}: no layers")
    model = Model(graph.name, tuple(graph.input_shape), layers,
                  dict(meta or {}, source="onnx", graph_digest=graph.digest()))
    validate(model)
    return model


def _gates_next_conv(layers: list[Layer], seg: list[Node]) -> bool:
    """`seg` is one pointwise conv reading the squeeze-excitation product that ends the
    last layer: it joins that segment, where the gate scales its weight instead of the
    map (graph.program); the segment computes whole either way."""
    prev = layers[-1] if layers else None
    if not isinstance(prev, GraphLayer) or prev.kind != "graph-global" or len(seg) != 1:
        return False
    n, last = seg[0], prev.nodes[-1]
    return last.op == "mul" and any(m.op == "gap" for m in prev.nodes) and n.op == "conv" \
        and n.inputs == (last.name,) and gops.ir_kind(n) == "pwconv"


def _extends_block(layers: list[Layer], seg: list[Node]) -> bool:
    """`seg` is one conv that continues an inverted-residual block the last layer (a
    row-wise segment) began: a depthwise 3x3 after its pointwise expand, or the pointwise
    projection after expand and depthwise. It joins that segment, whose program computes
    the block on `kernels.fused` (graph.fused_steps) instead of sending the expanded map
    to memory and back; the segment stays row-wise, split by rows like each part."""
    prev = layers[-1] if layers else None
    if not isinstance(prev, GraphLayer) or prev.kind != "graph" or len(seg) != 1 or \
            seg[0].op != "conv" or seg[0].inputs != (prev.nodes[-1].name,):
        return False
    kinds = [gops.conv_path(n) if n.op == "conv" else None for n in prev.nodes[-2:]]
    if gops.conv_path(seg[0]) == "dw3":
        return kinds[-1:] == ["pw"] and len(prev.nodes) == 1
    return kinds == ["pw", "dw3"] and gops.conv_path(seg[0]) == "pw" and \
        seg[0].attrs["act"] is None


def _ir_conv(n: Node, in_shape) -> Layer | None:
    """A conv node as an IR layer (3x3 dense or depthwise with pad 1, or pointwise), if it is one."""
    act = n.attrs["act"]
    if act not in (None, gops.RELU6):
        return None
    kind = gops.ir_kind(n)
    w = n.arrays["weight"]
    kh, kw, cin_g, cout = w.shape
    if kind is None:
        return None
    weight = {"pwconv": lambda: w.reshape(cin_g, cout), "dwconv3x3": lambda: w.reshape(3, 3, cout),
              "conv3x3": lambda: w}[kind]()
    return Layer(n.name, kind, tuple(in_shape), tuple(n.shape),
                 np.ascontiguousarray(weight), np.ascontiguousarray(n.arrays["bias"]),
                 stride=n.attrs["stride"][0], relu6=act is not None)


def _as_ir_layers(seg, source, alias, shapes, readers, before) -> list[Layer] | None:
    """The segment as layers of the IR, or None when some node is not expressible there.
    Adds the aliases of the tensors it folds away (a residual add, a flatten) to `alias`."""
    out: list[Layer] = []
    local = dict(alias)
    cur = local.get(source)
    prev_kind = before[-1].kind if before else None
    for n in seg:
        ins = [local.get(t) for t in n.inputs]
        if n.op == "conv" and ins[0] == cur and len(shapes[n.inputs[0]]) == 3:
            layer = _ir_conv(n, shapes[n.inputs[0]])
        elif n.op == "add" and n.attrs["act"] is None and out and cur in ins and \
                shapes[n.inputs[0]] == shapes[n.inputs[1]] and out[-1].residual is None and \
                out[-1].kind != "gap" and len(readers.get(out[-1].name, ())) == 1 and \
                ins[0] != ins[1]:
            out[-1].residual = ins[1] if ins[0] == cur else ins[0]
            local[n.name] = cur
            continue
        elif n.op == "gap" and ins[0] == cur and [r.op for r in readers[n.name]] == ["flatten"]:
            layer = Layer(n.name, "gap", tuple(shapes[n.inputs[0]]), (n.shape[2],))
        elif n.op == "flatten" and ins[0] == cur and (out[-1].kind if out else prev_kind) == "gap":
            local[n.name] = cur
            continue
        elif n.op == "gemm" and ins[0] == cur and n.attrs["act"] in (None, gops.RELU6):
            layer = Layer(n.name, "linear", tuple(shapes[n.inputs[0]]), tuple(n.shape),
                          np.ascontiguousarray(n.arrays["weight"]),
                          np.ascontiguousarray(n.arrays["bias"]), relu6=n.attrs["act"] is not None)
        else:
            return None
        if layer is None:
            return None
        out.append(layer)
        local[n.name] = cur = n.name
    alias.update(local)
    return out
