"""Graph operators on row windows: output rows [a, b) of one node from windows of its inputs.

A window is (array, row0): rows [row0, row0 + len) of a tensor (the whole tensor when
row0 = 0 and it is complete). A windowed op (conv, pools) pads the rows and columns it
reads outside the tensor itself, so a strip of rows computes exactly the rows of the
whole map. Convolutions run on DeColla's Cython kernels: pointwise through the gemm
kernel, depthwise 3x3 (pad 1, stride 1/2) through dwconv, depthwise of any other size
through `kernels.dwconvk`, dense ones (any kernel, stride, padding, dilation) through
`gemm.conv_packed` in the builds with a packed-weight kernel (the AVX-512 build reads the
input in place, the others copy patches by chunks of rows in C), and every other
convolution (grouped; any dense one in the baseline build) as im2col + the gemm kernel.
"""
from __future__ import annotations

import numpy as np

from decolla import ops as K
from decolla.graph.ir import GraphError, Node
from decolla.kernels import load

_dwk = load("dwconvk")
_act = load("act")
_gemm = load("gemm")
_pool = load("pool")
IM2COL_BLOCK = 256   # output pixels per im2col block (packed-weight kernel, cache-sized)


_ACT_CODES = {"relu": _act.RELU, "clip": _act.CLIP, "sigmoid": _act.SIGMOID,
              "hardsigmoid": _act.HARDSIGMOID, "hardswish": _act.HARDSWISH, "silu": _act.SILU}


def apply_act(y: np.ndarray, act, threads: int = 1) -> np.ndarray:
    """The activation `act` (None or (fn, *params)) applied to y (C-contiguous) in place."""
    if act is None or y.size == 0:
        return y
    _act.apply(y.reshape(-1), act_code(act), *act[1:3], threads)
    return y


def act_code(act) -> int:
    """The kernels.act code of an activation (fn, *params); GraphError if there is none."""
    code = _ACT_CODES.get(act[0])
    if code is None:
        raise GraphError(f"unknown activation {act[0]!r}")
    return code


RELU6 = ("clip", 0.0, 6.0)


def ir_kind(node: Node) -> str | None:
    """The layer IR kind a conv node is (pwconv, dwconv3x3: pad 1, stride 1 or 2; conv3x3:
    dense, pad 1, stride 1 or 2), or None."""
    kh, kw, cin_g, cout = node.arrays["weight"].shape
    a = node.attrs
    s, pads, d, g = a["stride"], a["pads"], a["dilation"], a["groups"]
    if (kh, kw) == (1, 1) and s == (1, 1) and pads == (0, 0, 0, 0) and g == 1:
        return "pwconv"
    if (kh, kw) != (3, 3) or pads != (1, 1, 1, 1) or s[0] != s[1] or s[0] not in (1, 2) \
            or d != (1, 1):
        return None
    if cin_g == 1 and g == cout:
        return "dwconv3x3"
    return "conv3x3" if g == 1 else None


def conv_path(node: Node) -> str:
    """Which kernel computes a conv node: 'pw' (gemm), 'dw3' (dwconv), 'dw' (dwconvk),
    'dense' (groups 1: gemm.conv_packed, im2col in the baseline build) or 'im2col'
    (grouped). Dense 3x3 convolutions take 'dense' too: faster than the conv3x3 kernel,
    which re-reads a wide layer's weight every few rows."""
    kind = ir_kind(node)
    if kind == "pwconv":
        return "pw"
    kh, kw, cin_g, cout = node.arrays["weight"].shape
    if cin_g == 1 and node.attrs["groups"] == cout and node.attrs["dilation"] == (1, 1):
        return "dw3" if kind == "dwconv3x3" else "dw"
    return "dense" if node.attrs["groups"] == 1 else "im2col"


def prepared(node: Node) -> dict:
    """Kernel-ready weights of a conv or gemm node, made once."""
    if node.prep is None:
        w, p = node.arrays["weight"], {}
        if node.op == "conv":
            kh, kw, cin_g, cout = w.shape
            p["path"] = path = conv_path(node)
            if path in ("dw3", "dw"):
                p["w"] = np.ascontiguousarray(w.reshape(kh, kw, cout))
            else:
                p["w"] = np.ascontiguousarray(w.reshape(kh * kw * cin_g, cout))
        else:
            p["w"] = np.ascontiguousarray(w)
        p["b"] = np.ascontiguousarray(node.arrays["bias"])
        node.prep = p
    return node.prep


def _check_window(x: np.ndarray, x0: int, H: int, lo: int, hi: int) -> None:
    """GraphError unless x (rows [x0, x0 + len(x))) holds rows [lo, hi) clipped to [0, H)."""
    s, e = max(lo, 0), min(hi, H)
    if s < e and (s < x0 or e > x0 + x.shape[0]):
        raise GraphError(f"rows [{s}, {e}) are needed but the window holds "
                         f"[{x0}, {x0 + x.shape[0]})")


def padded(x: np.ndarray, x0: int, H: int, lo: int, hi: int, pl: int, pr: int,
           fill: float) -> np.ndarray:
    """Rows [lo, hi) of a tensor of height H, of which x holds rows [x0, x0 + len(x)),
    with rows outside [0, H) and pl/pr extra columns set to `fill`."""
    _check_window(x, x0, H, lo, hi)
    s, e = max(lo, 0), min(hi, H)
    if (s, e) == (lo, hi) and pl == pr == 0:
        return x[s - x0:e - x0]
    out = np.full((hi - lo, x.shape[1] + pl + pr, x.shape[2]), fill, np.float32)
    out[s - lo:e - lo, pl:pl + x.shape[1]] = x[s - x0:e - x0]
    return out


def window_rows(node: Node, a: int, b: int) -> tuple[int, int]:
    """Input rows [lo, hi) (unclipped: may reach into the padding) that output rows
    [a, b) of a windowed node read."""
    k, s, pt, d = node.window()
    return a * s - pt, (b - 1) * s - pt + (k - 1) * d + 1


def _taps(node: Node, xp: np.ndarray, rows: int, wo: int):
    """(i, j, view) for every kernel tap: the input pixels tap (i, j) of each output reads."""
    (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
    dh, dw = node.attrs.get("dilation", (1, 1))
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[i * dh:i * dh + (rows - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw]


_FUSED = {("relu",): _gemm.ACT_RELU, ("hardswish",): _gemm.ACT_HARDSWISH,
          ("silu",): _gemm.ACT_SILU}


def epilogue(act, fused: bool) -> tuple[int, tuple | None]:
    """(the kernel epilogue's activation code, the activation left to apply after it):
    ReLU6 is in every kernel's epilogue, ReLU, hard-swish and SiLU where `fused` (the
    AVX-512 packed ones)."""
    if act == RELU6:
        return _gemm.ACT_RELU6, None
    if fused and act in _FUSED:
        return _FUSED[act], None
    return _gemm.ACT_NONE, act


def pw_epilogue(act, pixels: int, cin: int, cout: int) -> tuple[int, tuple | None]:
    """`epilogue` of a pointwise conv over `pixels` pixels: fused where the packed kernel
    that takes them has the activation."""
    return epilogue(act, _gemm.RELU_FUSED and K.uses_packed(pixels, cin, cout))


def conv(node: Node, x, x0: int, H: int, a: int, b: int, nt: int, dst=None) -> np.ndarray:
    """Output rows [a, b) of a conv node (into `dst` when given)."""
    p = prepared(node)
    path, w, bias = p["path"], p["w"], p["b"]
    act = node.attrs["act"]
    wo, cout = node.shape[1], node.shape[2]
    out = np.empty((b - a, wo, cout), np.float32) if dst is None else dst
    if b == a:
        return out
    x = np.ascontiguousarray(x)
    code, rest = epilogue(act, False)
    if path == "pw":
        _check_window(x, x0, H, a, b)
        code, rest = pw_epilogue(act, (b - a) * wo, w.shape[0], cout)
        K.pwconv_kernel(x, w, bias, out, 0, a - x0, code, None, 0, 0, nt)
    elif path == "dw3":
        _check_window(x, x0, H, *window_rows(node, a, b))
        K._dw.dwconv3x3(x, w, bias, out, node.attrs["stride"][0], 0, 0, a, x0, H, code, nt)
    elif path == "dw":
        lo, hi = window_rows(node, a, b)
        _check_window(x, x0, H, lo, hi)
        (sh, sw), (dh, dw), pads = node.attrs["stride"], node.attrs["dilation"], node.attrs["pads"]
        _dwk.dwconv(x, w, bias, out, a, x0, H, sh, sw, pads[0], pads[1], dh, dw, code, nt)
    else:
        lo, hi = window_rows(node, a, b)
        pads = node.attrs["pads"]
        xp = np.ascontiguousarray(padded(x, x0, H, lo, hi, pads[1], pads[3], 0.0))
        if path == "dense" and K.PACKED_MAX_PIXELS:
            code, rest = epilogue(act, _gemm.RELU_FUSED)
            (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
            dh, dw = node.attrs["dilation"]
            _gemm.conv_packed(xp, K.packed_weight(w, 0, cout), bias, out, kh, kw, sh, sw, dh,
                              dw, code, nt)
        else:
            _im2col_conv(node, xp, w, bias, out, code, nt)
    return apply_act(out, rest, nt)


def _im2col_conv(node: Node, xp, w, bias, out, code: int, nt: int) -> None:
    """Any convolution: per group, the patches as rows of a matrix times the weight."""
    kh, kw, cin_g, cout = node.arrays["weight"].shape
    g = node.attrs["groups"]
    rows, wo = out.shape[:2]
    cout_g = cout // g
    cols = np.empty((rows, wo, kh, kw, cin_g), np.float32)
    tmp = out if g == 1 else np.empty((rows, wo, cout_g), np.float32)
    (sh, sw), (dh, dw) = node.attrs["stride"], node.attrs["dilation"]
    if g == 1 and dw == 1:
        # The kw taps of a kernel row read kw * cin contiguous floats: one copy per row.
        # By blocks of output rows whose patches stay in cache, multiplied by the weight
        # packed once (the packed kernel below IM2COL_BLOCK pixels): BLAS would repack it.
        st = xp.strides
        K_ = kh * kw * cin_g
        rb = max(1, min(rows, IM2COL_BLOCK // wo)) if K.PACKED_MAX_PIXELS else rows
        for r in range(0, rows, rb):
            n = min(rb, rows - r)
            blk = cols[r:r + n]
            for i in range(kh):
                blk[:, :, i] = np.lib.stride_tricks.as_strided(
                    xp[r * sh + i * dh:], (n, wo, kw, cin_g), (st[0] * sh, st[1] * sw, st[1], st[2]))
            K.pwconv_kernel(blk.reshape(n, wo, K_), w, bias, out[r:r + n], 0, 0, code, None,
                            0, 0, nt)
        return
    for gi in range(g):
        for i, j, view in _taps(node, xp, rows, wo):
            cols[:, :, i, j, :] = view[..., gi * cin_g:(gi + 1) * cin_g]
        K.pwconv_kernel(cols.reshape(rows, wo, kh * kw * cin_g), w, bias, tmp, gi * cout_g, 0,
                        code, None, 0, 0, nt)
        if g > 1:
            out[..., gi * cout_g:(gi + 1) * cout_g] = tmp


def pool(node: Node, x, x0: int, H: int, a: int, b: int, nt: int = 1) -> np.ndarray:
    """Output rows [a, b) of a max or average pool."""
    rows, wo = b - a, node.shape[1]
    pads = node.attrs["pads"]
    lo, hi = window_rows(node, a, b)
    (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
    if node.op == "maxpool":
        _check_window(x, x0, H, lo, hi)
        out = np.empty((rows, wo, x.shape[2]), np.float32)
        dh, dw = node.attrs.get("dilation", (1, 1))
        _pool.maxpool(np.ascontiguousarray(x), out, a, x0, H, kh, kw, sh, sw, pads[0], pads[1],
                      dh, dw, nt)
        return out
    xp = padded(x, x0, H, lo, hi, pads[1], pads[3], 0.0)
    out = None
    for _, _, view in _taps(node, xp, rows, wo):
        if out is None:
            out = np.array(view, np.float32)
        else:
            out += view
    if node.attrs["count_pad"]:
        out *= np.float32(1.0 / (kh * kw))
        return out
    ones = padded(np.ones((H, x.shape[1], 1), np.float32), 0, H, lo, hi, pads[1], pads[3], 0.0)
    count = sum(view for _, _, view in _taps(node, ones, rows, wo))
    out /= count
    return out


def gemm(node: Node, x: np.ndarray, nt: int) -> np.ndarray:
    p = prepared(node)
    y = np.empty(p["w"].shape[1], np.float32)
    # the gemm kernel's single-threaded BLAS (numpy's own may start a thread pool)
    K._gemm.linear(np.ascontiguousarray(x, np.float32), p["w"], p["b"], y, 0, False)
    return apply_act(y, node.attrs["act"], nt)


def rows_of(t: np.ndarray, t0: int, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of a window, or the whole (1, 1, C) vector it broadcasts."""
    if t.ndim == 3 and t.shape[0] == 1 and t0 == 0 and (a, b) != (0, 1):
        return t
    return t[a - t0:b - t0]


def run(node: Node, ins: list, heights: list, a: int, b: int, nt: int,
        dst: np.ndarray | None = None) -> np.ndarray:
    """Output rows [a, b) of `node` (all of a vector) from its input windows `ins`
    ((array, row0) per input; `heights`: each input's full height); written into `dst`
    (C-contiguous, of the output's shape, overlapping no input) when given."""
    op = node.op
    x, x0 = ins[0]
    if op == "conv":
        return conv(node, x, x0, heights[0], a, b, nt, dst)
    if op in ("maxpool", "avgpool"):
        return _into(dst, pool(node, x, x0, heights[0], a, b, nt))
    if op in ("add", "mul"):
        y = (np.add if op == "add" else np.multiply)(rows_of(x, x0, a, b),
                                                     rows_of(*ins[1], a, b), out=dst)
        return apply_act(np.ascontiguousarray(y, np.float32), node.attrs.get("act"), nt)
    if op == "concat":
        return np.concatenate([rows_of(t, t0, a, b) for t, t0 in ins], axis=2, out=dst)
    if op == "act":
        y = np.array(rows_of(x, x0, a, b), np.float32) if dst is None else \
            _into(dst, rows_of(x, x0, a, b))
        return apply_act(y, node.attrs["act"], nt)
    return _into(dst, _other(node, x, x0, a, b, nt))


def _into(dst, y: np.ndarray) -> np.ndarray:
    if dst is None:
        return y
    np.copyto(dst, y)
    return dst


def _other(node: Node, x, x0: int, a: int, b: int, nt: int) -> np.ndarray:
    op = node.op
    if op == "scale":
        y = rows_of(x, x0, a, b) * node.arrays["scale"] + node.arrays["shift"]
        return np.asarray(y, np.float32)
    if op == "gap":
        y = np.empty(x.shape[2], np.float32)
        K._gemm.gap(np.ascontiguousarray(x), y, 0)
        return y.reshape(1, 1, -1)
    if op == "flatten":
        return np.ascontiguousarray(x.transpose(2, 0, 1)).reshape(-1)
    if op == "gemm":
        return gemm(node, x, nt)
    raise GraphError(f"node {node.name}: op {op!r} cannot run")
