"""A graph segment's nodes compiled for one strip of output rows: a list of bound kernel
calls over buffers allocated once.

Running the nodes one by one costs a Python dispatch per node (windows, shapes and
dicts recomputed on every call): about as much as the kernels in a 60 MMAC network.
A `Program` does that work once per (segment, row range, threads): each node's input
windows and output buffer are resolved (buffers reused after their last reader), its
kernel and weights bound, and a few node patterns run as one call:

- squeeze-excitation, gap -> 1x1 conv -> 1x1 conv -> mul by the map, as `kernels.se`'s
  gate and scale (two calls instead of six passes and dispatches; `graph.se_steps`);
- an inverted-residual block (1x1, depthwise 3x3, 1x1, maybe an add) on the whole map
  and one thread, as `kernels.fused` by tiles of rows (`graph.fused_steps`);
- a pointwise conv whose only reader is an add: the add is the conv kernel's residual;
- the branches of a concat (convs whose only reader it is, as in SqueezeNet's fire
  modules) write their channels of its output buffer: no copies into it;
- an activation the conv kernel's epilogue lacks (in builds without the fused ones, or
  on the BLAS path) is applied strip by strip of `CHUNK_BYTES` of output right after the
  kernel wrote it, while it is in cache.

A program is not thread-safe (its buffers are shared between calls): GraphLayer keeps
one per thread. The result equals running the nodes one by one (`segments.run_nodes`)
up to float rounding of the fused squeeze-excitation.
"""
from __future__ import annotations

import numpy as np

from decolla import ops as K
from decolla.graph import fused_steps
from decolla.graph import ops as gops
from decolla.graph.ir import WINDOWED, GraphError, Node
from decolla.graph.se_steps import NONE, act_args, gated_weight, se_step

CHUNK_BYTES = 256 * 1024   # output of a conv per kernel call when an activation pass follows


def needed_rows(nodes: list[Node], shapes: dict, r0: int, r1: int) -> dict:
    """Rows [lo, hi) of every tensor that output rows [r0, r1) of the last node read
    (clipped to each tensor; a vector's entry is (0, 1))."""
    need = {nodes[-1].name: (r0, r1)}
    for n in reversed(nodes):
        a, b = need.get(n.name, (0, 0))
        for t in n.inputs:
            s = shapes[t]
            if len(s) != 3:
                lo, hi = 0, 1
            elif n.op in WINDOWED:
                lo, hi = gops.window_rows(n, a, b)
                lo, hi = max(0, lo), min(s[0], hi)
            elif n.op in ("gap", "flatten"):
                lo, hi = 0, s[0]
            elif s[0] == 1 and n.shape[0] != 1:
                lo, hi = 0, 1
            else:
                lo, hi = a, b
            if a >= b:
                lo = hi = 0
            if t in need and need[t][0] < need[t][1]:
                if lo < hi:
                    lo, hi = min(lo, need[t][0]), max(hi, need[t][1])
                else:
                    lo, hi = need[t]
            need[t] = (lo, hi)
    return need


def _is_fc(n: Node) -> bool:
    """A 1x1 conv on a pooled (1, 1, C) vector: a fully connected layer."""
    a = n.attrs
    return n.op == "conv" and n.shape[:2] == (1, 1) and a["kernel"] == (1, 1) and \
        a["groups"] == 1 and a["pads"] == (0, 0, 0, 0) and a["stride"] == (1, 1)


class Program:
    """Output rows [r0, r1) of the last of `nodes` from rows of tensor `source`."""

    def __init__(self, nodes: list[Node], source: str, shapes: dict, r0: int, r1: int,
                 nt: int, into_dst: bool = False):
        self.nodes, self.source, self.shapes, self.nt = nodes, source, shapes, nt
        self.into_dst = into_dst      # every call passes dst: no buffer of its own for the output
        self.need = needed_rows(nodes, shapes, r0, r1)
        self.last = nodes[-1].name
        self._readers: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            for t in n.inputs:
                self._readers.setdefault(t, []).append(i)
        self._free: list[np.ndarray] = []                 # flat buffers no tensor holds
        self._win: dict[str, tuple] = {source: None}     # tensor -> (buffer, row0); None: x
        self._owner: dict[str, np.ndarray] = {}          # tensor -> its flat buffer
        self.steps: list = []
        self.step_nodes: list[str] = []   # the node whose output each step writes (profiling)
        self._compile()

    # ------------------------------------------------------------------ running

    def __call__(self, x: np.ndarray, x0: int, dst: np.ndarray | None = None) -> np.ndarray:
        """The output rows, written into `dst` when given (C-contiguous, the output's
        shape, overlapping no input), else into a buffer the next call reuses."""
        lo, hi = self.need.get(self.source, (0, 0))
        if len(self.shapes[self.source]) == 3 and lo < hi and (lo < x0 or hi > x0 + x.shape[0]):
            raise GraphError(f"segment {self.last}: output rows need input rows [{lo}, {hi}) "
                             f"but x holds [{x0}, {x0 + x.shape[0]})")
        if dst is None and self.into_dst:
            raise ValueError(f"segment {self.last}: this program writes only into a given dst")
        x = np.ascontiguousarray(x, np.float32)
        for step in self.steps:
            step(x, x0, dst)
        return dst if dst is not None else self._out

    # ------------------------------------------------------------------ compiling

    def _compile(self) -> None:
        nodes, done = self.nodes, set()
        se = self._se_blocks()
        self._branch = self._concat_branches({v[3] + 1 for v in se.values()})
        self._outs: dict[str, np.ndarray | None] = {}
        blocks = fused_steps.find(self)
        for i, n in enumerate(nodes):
            if i in done:
                continue
            if i in blocks:
                parts = [None if k is None else nodes[k] for k in blocks[i]]
                last = parts[3] or parts[2]
                self._emit(last, fused_steps.fused_step(self, *parts),
                           also=tuple(m.name for m in parts[:3] if m is not None and m is not last))
                done.update(k for k in blocks[i] if k is not None)
                continue
            if n.op == "concat" and n.inputs[0] in self._branch:
                self._emit(n, lambda out, is_last: lambda x, x0, dst: None)   # written
                continue
            if i in se and self._folds_gate(se[i][3]):
                g, c1, c2, m, xname = se[i]
                add = self._fuses_add(m + 1)
                out_node = nodes[m + 2] if add else nodes[m + 1]
                other = None
                if add:
                    other = [t for t in out_node.inputs if t != nodes[m + 1].name][0]
                self._emit(out_node, _conv_step(self, nodes[m + 1], out_node, other,
                                                     (nodes[c1], nodes[c2], xname)),
                           also=(nodes[m].name, nodes[m + 1].name))
                done.update(range(c1, m + 2 + add))
            elif i in se:
                g, c1, c2, m, xname = se[i]
                self._emit(nodes[m], se_step(self, nodes[c1], nodes[c2], nodes[m], xname))
                done.update((c1, c2, m))
            elif self._fuses_add(i):
                add = nodes[i + 1]
                other = add.inputs[1] if add.inputs[0] == n.name else add.inputs[0]
                self._emit(add, _conv_step(self, n, add, other), also=(n.name,))
                done.add(i + 1)
            elif n.op == "conv" and len(n.shape) == 3:
                self._emit(n, _conv_step(self, n, n, None))
            else:
                self._emit(n, _generic_step(self, n))

    def _emit(self, node: Node, make, also: tuple = ()) -> None:
        """Give `node` an output buffer (a concat's branch: its channels of the concat's),
        bind its step (`make(out, is_last)`), then free the buffers of tensors whose last
        reader this was."""
        a, b = self.need.get(node.name, (0, 0))
        is_last = node.name == self.last
        if node.name in self._branch:
            cat, c0, c1 = self._branch[node.name]
            whole = self._out_of(self._node(cat))
            out = None if whole is None else whole[:, :, c0:c1]
            self.steps.append(make(out, cat == self.last, slice(c0, c1)))
        else:
            out = self._out_of(node)
            self.steps.append(make(out, is_last))
        self.step_nodes.append(node.name)
        self._win[node.name] = (out, a)
        if is_last:
            self._out = out
        idx = self.nodes.index(node)
        for t in set(node.inputs) | set(also) | {t for n in also for t in self._node(n).inputs}:
            if t in self._win and t != self.source and t != self.last and \
                    max(self._readers.get(t, [-1])) <= idx:
                del self._win[t]
                if t in self._owner:      # (a concat's branch has no buffer of its own)
                    self._free.append(self._owner.pop(t))

    def _out_of(self, node: Node) -> np.ndarray | None:
        """The output buffer of `node`, allocated on first ask (None: the caller's dst)."""
        if node.name not in self._outs:
            a, b = self.need.get(node.name, (0, 0))
            shape = tuple(node.shape) if len(node.shape) != 3 else \
                (b - a,) + tuple(node.shape[1:])
            out = None
            if not (node.name == self.last and self.into_dst):
                out, self._owner[node.name] = self._alloc(shape)
            self._outs[node.name] = out
        return self._outs[node.name]

    def _node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def _alloc(self, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        """A C-contiguous array of `shape` and the flat buffer it views (a free one that
        fits, the smallest, else a new one)."""
        size = int(np.prod(shape))
        fits = [f for f in self._free if f.size >= size]
        if fits:
            buf = min(fits, key=lambda f: f.size)
            self._free = [f for f in self._free if f is not buf]
        else:
            buf = np.empty(max(size, 1), np.float32)
        return buf[:size].reshape(shape), buf

    def _window(self, t: str, a: int, b: int):
        """A getter (x, x0) -> rows [a, b) of tensor t, as rows_of does (a (1, 1, C)
        vector broadcast as is)."""
        win = self._win[t]
        if win is None:
            return lambda x, x0: gops.rows_of(x, x0, a, b)
        view = gops.rows_of(win[0], win[1], a, b)
        return lambda x, x0: view

    def _input(self, t: str):
        """A getter (x, x0) -> (array, row0) of tensor t's window."""
        win = self._win[t]
        return (lambda x, x0: (x, x0)) if win is None else (lambda x, x0: win)

    def _se_blocks(self) -> dict:
        """{gap index: (gap, fc1, fc2, mul, map tensor)} for squeeze-excitation blocks whose
        inner tensors nobody else reads."""
        nodes, found = self.nodes, {}
        for i in range(len(nodes) - 3):
            g, c1, c2, m = nodes[i:i + 4]
            if g.op != "gap" or not (_is_fc(c1) and _is_fc(c2)) or m.op != "mul" or \
                    c1.inputs != (g.name,) or c2.inputs != (c1.name,) or \
                    sorted(m.inputs) != sorted((g.inputs[0], c2.name)) or \
                    len(self.shapes[m.inputs[0]]) != 3 or m.shape != self.shapes[g.inputs[0]]:
                continue
            if all(self._readers.get(n.name) == [i + k + 1] for k, n in enumerate((g, c1, c2))):
                found[i] = (i, i + 1, i + 2, i + 3, g.inputs[0])
        return found

    def _folds_gate(self, m: int) -> bool:
        """The squeeze-excitation mul at m is read only by a pointwise conv over more pixels
        than it has output channels: the gate scales the conv's weight rows instead of
        the map (conv(x * g) = x conv(g W)), a pass over the map saved."""
        mul = self.nodes[m]
        if m + 1 >= len(self.nodes) or mul.attrs.get("act") is not None:
            return False
        n = self.nodes[m + 1]
        if n.op != "conv" or n.inputs != (mul.name,) or self._readers.get(mul.name) != [m + 1] \
                or gops.prepared(n)["path"] != "pw":
            return False
        a, b = self.need.get(n.name, (0, 0))
        return self.need.get(mul.name) == (a, b) and (b - a) * n.shape[1] > n.shape[2]

    def _concat_branches(self, gated: set) -> dict:
        """{tensor: (concat, c0, c1)} for the inputs of every concat whose inputs are all
        convs of this program read by it alone, none of them with a squeeze-excitation
        gate folded in (`gated`), on a kernel that writes a channel window of a wider
        tensor with the whole activation in its epilogue."""
        index, found = {n.name: i for i, n in enumerate(self.nodes)}, {}
        for j, cat in enumerate(self.nodes):
            a, b = self.need.get(cat.name, (0, 0))
            if cat.op != "concat" or len(cat.shape) != 3 or a >= b or \
                    len(set(cat.inputs)) != len(cat.inputs):
                continue
            part, c0 = {}, 0
            for t in cat.inputs:
                i = index.get(t, -1)
                if i < 0 or i in gated or self._readers.get(t) != [j] or \
                        self.need.get(t) != (a, b) or not _writes_window(self.nodes[i], b - a):
                    break
                part[t] = (cat.name, c0, c0 + self.shapes[t][2])
                c0 += self.shapes[t][2]
            else:
                found.update(part)
        return found

    def _fuses_add(self, i: int) -> bool:
        """Node i is a pointwise conv (no activation or ReLU6) read only by the next node,
        an add without activation of two maps of one shape: the add is its residual."""
        n = self.nodes[i]
        if i + 1 >= len(self.nodes) or n.op != "conv" or len(n.shape) != 3 or \
                gops.prepared(n)["path"] != "pw" or n.attrs["act"] not in (None, gops.RELU6):
            return False
        add = self.nodes[i + 1]
        return add.op == "add" and add.attrs.get("act") is None and \
            self._readers.get(n.name) == [i + 1] and add.inputs[0] != add.inputs[1] and \
            self.shapes[add.inputs[0]] == self.shapes[add.inputs[1]] and \
            self.need.get(add.name) == self.need.get(n.name)


def _writes_window(n: Node, rows: int) -> bool:
    """A conv whose kernel can write `rows` rows into a channel window of a wider tensor,
    activation included (pwconv, pwconv_packed, conv_packed)."""
    if n.op != "conv" or len(n.shape) != 3:
        return False
    p, act = gops.prepared(n), n.attrs["act"]
    if p["path"] == "pw":
        return gops.pw_epilogue(act, rows * n.shape[1], *p["w"].shape)[1] is None
    return p["path"] == "dense" and bool(K.PACKED_MAX_PIXELS) and \
        gops.epilogue(act, K._gemm.RELU_FUSED)[1] is None


def _target(out, is_last: bool, chans: slice | None):
    """dst -> the array a step writes: `out`, or for the last node the caller's dst when
    given (its channels `chans` for a branch of the last node, a concat)."""
    if not is_last:
        return lambda dst: out
    if chans is None:
        return lambda dst: out if dst is None else dst
    return lambda dst: out if dst is None else dst[:, :, chans]


# ---------------------------------------------------------------------- steps
# Each returns make(out, is_last) -> step(x, x0, dst): the node's kernel calls bound to its
# windows and to `out` (or, for the last node, to `dst` when the caller passes one). A
# conv's make takes a third argument: the channels of a concat's branch (`_target`).


def _conv_step(prog: Program, node: Node, out_node: Node, res: str | None, gate: tuple = None):
    """A conv node's rows, on its kernel (`res`: a tensor added after the activation,
    for a fused add whose output tensor is `out_node`'s; `gate`: (fc1, fc2, map) of a
    squeeze-excitation whose gate scales the weight of this pointwise conv)."""
    a, b = prog.need.get(out_node.name, (0, 0))
    H, nt = prog.shapes[node.inputs[0]][0], prog.nt
    get = prog._input(node.inputs[0] if gate is None else gate[2])
    p = gops.prepared(node)
    path, w, bias, act = p["path"], p["w"], p["b"], node.attrs["act"]
    relu6 = act == gops.RELU6
    pre = None if gate is None else \
        gated_weight(prog, w, bias, relu6, gate, (b - a) * node.shape[1])
    code, pa, pb = act_args(None if relu6 else act)
    res_get = None if res is None else prog._input(res)

    def rows_per_call(out):
        if code == NONE or out.shape[0] == 0:
            return max(1, out.shape[0])
        return max(1, CHUNK_BYTES // (4 * out.shape[1] * out.shape[2]))

    if pre is not None:
        def kern(x, x0, o, r, rs):
            pre[1](x, o, a + r - x0, None if rs is None else rs[0],
                   0 if rs is None else a + r - rs[1])
    elif path == "pw":
        kact, rest = gops.pw_epilogue(act, (b - a) * node.shape[1], *w.shape)
        if rest is None:
            code = NONE      # the kernel's epilogue applies it

        def kern(x, x0, o, r, rs):
            K.pwconv_kernel(x, w, bias, o, 0, a + r - x0, kact,
                            None if rs is None else rs[0], 0 if rs is None else a + r - rs[1],
                            0, nt)
    elif path == "dw3":
        st = node.attrs["stride"][0]

        def kern(x, x0, o, r, rs):
            K._dw.dwconv3x3(x, w, bias, o, st, 0, 0, a + r, x0, H, relu6, nt)
    elif path == "dw":
        (sh, sw), (dh, dw), pads = node.attrs["stride"], node.attrs["dilation"], \
            node.attrs["pads"]

        kcode, code = code, NONE      # the kernel applies it, row by row

        def kern(x, x0, o, r, rs):
            gops._dwk.dwconv(x, w, bias, o, a + r, x0, H, sh, sw, pads[0], pads[1], dh, dw,
                             relu6, nt, kcode, pa, pb)
    else:
        def make_other(out, is_last, chans=None):
            pick = _target(out, is_last, chans)

            def step(x, x0, dst):
                o = pick(dst)
                src, s0 = get(x, x0)
                gops.conv(node, src, s0, H, a, b, nt, o)
            return step
        return make_other

    def make(out, is_last, chans=None):
        pick = _target(out, is_last, chans)

        def step(x, x0, dst):
            o = pick(dst)
            if o.shape[0] == 0:
                return
            src, s0 = get(x, x0)
            rs = None if res_get is None else res_get(x, x0)
            if pre is not None:
                pre[0](src, s0)
            rb = rows_per_call(o)
            for r in range(0, o.shape[0], rb):
                part = o[r:r + rb]
                kern(src, s0, part, r, rs)
                if code != NONE:
                    gops._act.apply(part.reshape(-1), code, pa, pb, nt)
        return step
    return make

def _generic_step(prog: Program, node: Node):
    """Any other node through graph.ops.run on its windows."""
    a, b = prog.need.get(node.name, (0, 0))
    empty = len(node.shape) == 3 and a >= b
    gets = [prog._input(t) for t in node.inputs]
    heights = [prog.shapes[t][0] for t in node.inputs]
    nt = prog.nt
    if node.op == "gap":
        get = gets[0]

        def make(out, is_last):
            def step(x, x0, dst):
                o = dst if is_last and dst is not None else out
                K._gemm.gap(get(x, x0)[0], o.reshape(-1), 0)
            return step
        return make
    if node.op in ("add", "mul") and not empty:
        fa, fb = prog._window(node.inputs[0], a, b), prog._window(node.inputs[1], a, b)
        fn, act = (np.add if node.op == "add" else np.multiply), node.attrs.get("act")

        def make(out, is_last):
            def step(x, x0, dst):
                o = dst if is_last and dst is not None else out
                fn(fa(x, x0), fb(x, x0), out=o)
                gops.apply_act(o, act, nt)
            return step
        return make

    def make(out, is_last):
        def step(x, x0, dst):
            if empty:
                return
            o = dst if is_last and dst is not None else out
            gops.run(node, [g(x, x0) for g in gets], heights, a, b, nt, o)
        return step
    return make
