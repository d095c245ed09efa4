"""The squeeze-excitation steps of a compiled graph `Program` (decolla.graph.program):
its gate from the whole map on `kernels.se`, then either the map scaled by it or the
weight rows of the pointwise conv that reads the map (conv(x * g) = x conv(g W))."""
from __future__ import annotations

import numpy as np

from decolla import ops as K
from decolla.graph import ops as gops
from decolla.graph.ir import Node
from decolla.kernels import load

_se = load("se")
NONE = _se.NONE     # no activation (kernels.act / kernels.se codes)


def act_args(act) -> tuple[int, float, float]:
    """(code, a, b) of an activation for kernels.act / kernels.se (NONE for None)."""
    if act is None:
        return _se.NONE, 0.0, 0.0
    code = gops.act_code(act)
    params = tuple(act[1:3]) + (0.0,) * (2 - len(act[1:3]))
    return code, float(params[0]), float(params[1])


def _gate(prog, fc1: Node, fc2: Node, xname: str):
    """(gate vector, fill(x, x0)): a squeeze-excitation's gate from its whole map."""
    w1, b1 = gops.prepared(fc1)["w"], gops.prepared(fc1)["b"]
    w2, b2 = gops.prepared(fc2)["w"], gops.prepared(fc2)["b"]
    f1, f2 = act_args(fc1.attrs["act"]), act_args(fc2.attrs["act"])
    gate = np.empty(w2.shape[1], np.float32)
    work = np.empty(w1.shape[0] + w1.shape[1], np.float32)
    H = prog.shapes[xname][0]

    def fill(src, s0):
        whole = src if (s0, src.shape[0]) == (0, H) else src[-s0:H - s0]
        _se.gate(whole, w1, b1, *f1, w2, b2, *f2, gate, work)
    return gate, fill

def gated_weight(prog, w: np.ndarray, bias: np.ndarray, relu6: bool, gate: tuple,
                  pixels: int):
    """(prepare(x, x0), conv(x, out, xr0, res, rr0)) of a pointwise conv whose weight rows
    are scaled by a squeeze-excitation's gate on every call (packed for the packed
    kernel when it would take this many pixels, as decolla.ops.pwconv_kernel)."""
    g, fill = _gate(prog, *gate)
    wg = np.empty_like(w)
    cin, cout = w.shape
    packed = K.uses_packed(pixels, cin, cout)
    nr = K._gemm.PACK_NR
    wpk = np.empty(((cout + nr - 1) // nr, cin, nr), np.float32) if packed else None
    nt = prog.nt

    def prepare(src, s0):
        fill(src, s0)
        np.multiply(w, g[:, None], out=wg)
        if packed:
            K._gemm.pack_pw(wg, 0, cout, wpk)

    def conv(x, out, xr0, res, rr0):
        if packed:
            K._gemm.pwconv_packed(x, wpk, bias, out, 0, xr0, relu6, res, rr0, 0, nt)
        else:
            K._gemm.pwconv(x, wg, bias, out, 0, xr0, relu6, res, rr0, 0, nt)
    return prepare, conv

def se_step(prog, fc1: Node, fc2: Node, mul: Node, xname: str):
    """Squeeze-excitation: the gate from the whole map, then rows of map * gate."""
    a, b = prog.need.get(mul.name, (0, 0))
    get = prog._input(xname)
    gate, fill = _gate(prog, fc1, fc2, xname)
    mact = mul.attrs.get("act")

    def make(out, is_last):
        def step(x, x0, dst):
            o = dst if is_last and dst is not None else out
            if b <= a:
                return
            src, s0 = get(x, x0)
            fill(src, s0)
            _se.scale(src, a - s0, gate, o)
            gops.apply_act(o, mact, prog.nt)
        return step
    return make
