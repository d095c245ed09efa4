"""Inverted-residual blocks of a compiled graph `Program` (decolla.graph.program) on
`kernels.fused`: expand 1x1 -> depthwise 3x3 (pad 1, stride 1 or 2) -> project 1x1
(+ the block's input), by tiles of rows whose expanded and depthwise rows stay in cache.

The layer IR fuses such blocks with ReLU6 (decolla.fusion); imported networks have them
with ReLU or hard-swish too (MobileNetV3's blocks without squeeze-excitation), whose
high-resolution expanded maps otherwise go to memory and back twice. The same conditions
as decolla.fusion: one thread, the whole map, the packed pointwise kernel on both 1x1
layers (so the result is the separate kernels' bits, up to the activations applied in a
pass instead of the epilogue), fusion enabled.
"""
from __future__ import annotations

import numpy as np

from decolla import fusion
from decolla import ops as K
from decolla.graph import ops as gops
from decolla.graph.ir import Node
from decolla.graph.se_steps import act_args


def find(prog) -> dict:
    """{index of a block's first node: (expand or None, depthwise, project, add or None)
    (indices)} for the blocks of `prog` the fused kernel computes."""
    nodes, found = prog.nodes, {}
    if prog.nt != 1 or not fusion.active(1) or not K.PACKED_MAX_PIXELS:
        return found
    i = 0
    while i < len(nodes) - 1:
        blk = _block(prog, i)
        if blk is not None:
            found[i] = blk
            i = max(k for k in blk if k is not None)
        i += 1
    return found


def _conv(n: Node, path: str) -> bool:
    return n.op == "conv" and len(n.shape) == 3 and gops.conv_path(n) == path


def _only_reader(prog, i: int) -> bool:
    return prog._readers.get(prog.nodes[i].name) == [i + 1] and \
        prog.nodes[i + 1].inputs[0] == prog.nodes[i].name


def _whole(prog, n: Node) -> bool:
    return prog.need.get(n.name) == (0, n.shape[0])


def _block(prog, i: int):
    nodes = prog.nodes
    e = nodes[i] if _conv(nodes[i], "pw") else None
    j = i + (e is not None)
    if j + 1 >= len(nodes) or (e is not None and not _only_reader(prog, i)):
        return None
    d, p = nodes[j], nodes[j + 1]
    if not _conv(d, "dw3") or not _conv(p, "pw") or p.attrs["act"] is not None or \
            not _only_reader(prog, j) or p.name in prog._branch or \
            not all(_whole(prog, n) for n in (e, d, p) if n is not None):
        return None
    src = (e or d).inputs[0]
    made_by = [n for n in nodes if n.name == src]
    if len(prog.shapes[src]) != 3 or (made_by and made_by[0].op == "mul"):
        return None     # (a squeeze-excitation's product: its gate may fold into e)
    h, w, cin = prog.shapes[src]
    ho, wo, cout = p.shape
    ce = d.shape[2]
    if (e is not None and not K.uses_packed(h * w, cin, ce)) or \
            not K.uses_packed(ho * wo, ce, cout):
        return None
    add = None
    if prog._fuses_add(j + 1):
        a = nodes[j + 2]
        other = a.inputs[1] if a.inputs[0] == p.name else a.inputs[0]
        if other != src or d.attrs["stride"][0] != 1 or cin != cout:
            return None     # a residual other than the block's input: not fused
        add = j + 2
    return (None if e is None else i, j, j + 1, add)


def fused_step(prog, e: Node | None, d: Node, p: Node, add: Node | None):
    """make(out, is_last) -> step: the block's output (the add's when it has one)."""
    get = prog._input((e or d).inputs[0])
    H = prog.shapes[(e or d).inputs[0]][0]
    wexp = bexp = None
    if e is not None:
        pe = gops.prepared(e)
        wexp = K.packed_weight(pe["w"], 0, pe["w"].shape[1])
        bexp = pe["b"]
    pd, pp = gops.prepared(d), gops.prepared(p)
    wproj = K.packed_weight(pp["w"], 0, pp["w"].shape[1])
    acts = (act_args(None if e is None else e.attrs["act"]), act_args(d.attrs["act"]))
    stride = d.attrs["stride"][0]
    fused = fusion._fused.inverted_residual

    def make(out, is_last):
        def step(x, x0, dst):
            o = dst if is_last and dst is not None else out
            src = np.ascontiguousarray(gops.rows_of(*get(x, x0), 0, H))
            fused(src, wexp, bexp, pd["w"], pd["b"], wproj, pp["b"], o,
                  stride, add is not None, 0, acts)
        return step
    return make
