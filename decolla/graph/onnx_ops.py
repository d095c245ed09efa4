"""The ONNX operators the importer supports: one handler per op type, turning an ONNX
node into graph IR nodes on the `Importer` (decolla.graph.onnx_import) it is given, or
raising GraphError naming the node, the op and what is supported."""
from __future__ import annotations

import numpy as np

from decolla.graph.ir import GraphError


def _unused(node, attrs: dict, allowed: dict) -> None:
    """GraphError for an attribute outside `allowed` (name -> accepted values or None)."""
    for k, v in attrs.items():
        if k not in allowed:
            raise GraphError(f"node {node.name!r} ({node.op_type}): attribute {k!r} is not "
                             f"supported (supported: {', '.join(allowed) or 'none'})")
        if allowed[k] is not None and v not in allowed[k]:
            raise GraphError(f"node {node.name!r} ({node.op_type}): {k}={v!r} is not "
                             f"supported (supported: {allowed[k]})")

def _window(node, attrs: dict, kernel, x) -> dict:
    """kernel, stride, pads, dilation of a 2-D conv or pool (auto_pad resolved)."""
    if len(kernel) != 2:
        raise GraphError(f"node {node.name!r} ({node.op_type}): only 2-D kernels are "
                         f"supported, got kernel {list(kernel)}")
    stride = tuple(attrs.get("strides", (1, 1)))
    dil = tuple(attrs.get("dilations", (1, 1)))
    pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(x[:2], kernel, stride, dil):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            pads.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        pads = (pads[0][0], pads[1][0], pads[0][1], pads[1][1])
    elif auto == "VALID":
        pads = (0, 0, 0, 0)
    # ONNX orders pads (top, left, bottom, right): begins then ends
    return {"kernel": tuple(kernel), "stride": stride, "pads": pads, "dilation": dil}


def _op_Conv(imp, node, attrs, _):
    _unused(node, attrs, {"kernel_shape": None, "strides": None, "pads": None,
                               "dilations": None, "group": None, "auto_pad": None})
    x = imp._map(node, "input")
    w = imp._const(node.input[1], node, "the weight")
    if w.ndim != 4:
        raise GraphError(f"node {node.name!r} (Conv): only 2-D convolutions are supported, "
                         f"weight shape {w.shape}")
    b = imp._const(node.input[2], node, "the bias") if len(node.input) > 2 and \
        node.input[2] else np.zeros(w.shape[0], np.float32)
    a = _window(node, attrs, attrs.get("kernel_shape", w.shape[2:]), x)
    a.update(groups=int(attrs.get("group", 1)), act=None)
    imp._add(node, "conv", [imp._t(node.input[0], node)], a,
              {"weight": w.transpose(2, 3, 1, 0), "bias": b})

def _op_BatchNormalization(imp, node, attrs, _):
    _unused(node, attrs, {"epsilon": None, "momentum": None, "training_mode": (0,),
                               "spatial": (1,)})
    imp._map(node, "input")
    gamma, beta, mean, var = (imp._const(i, node, "the statistics").astype(np.float64)
                              for i in node.input[1:5])
    s = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
    imp._add(node, "scale", [imp._t(node.input[0], node)], {},
              {"scale": s, "shift": beta - mean * s})

def _op_Gemm(imp, node, attrs, _):
    _unused(node, attrs, {"alpha": None, "beta": None, "transA": (0,), "transB": None})
    w = imp._const(node.input[1], node, "B (the weight)").astype(np.float64)
    w = (w.T if attrs.get("transB", 0) else w) * attrs.get("alpha", 1.0)
    c = imp._const(node.input[2], node, "C (the bias)") if len(node.input) > 2 and \
        node.input[2] else np.zeros(w.shape[1])
    _linear(imp, node, w, np.broadcast_to(c * attrs.get("beta", 1.0), (w.shape[1],)))

def _op_MatMul(imp, node, attrs, _):
    w = imp._const(node.input[1], node, "the second operand (the weight)")
    if w.ndim != 2:
        raise GraphError(f"node {node.name!r} (MatMul): the weight must be 2-D, got {w.shape}")
    _linear(imp, node, w, np.zeros(w.shape[1]))

def _linear(imp, node, w, b):
    x = imp._t(node.input[0], node)
    if len(imp.shapes[x]) != 1:
        raise GraphError(f"node {node.name!r} ({node.op_type}): supported at the head only, "
                         f"on a flattened vector; its input has shape {imp.shapes[x]} "
                         f"(H, W, C)")
    imp._add(node, "gemm", [x], {"act": None}, {"weight": w, "bias": b})

def _binary(imp, node, op: str):
    a, b = node.input[:2]
    if a in imp.consts and b in imp.consts:
        raise GraphError(f"node {node.name!r}: constant {node.op_type} not folded")
    if a in imp.consts or b in imp.consts:
        const, t = (imp.consts[a], b) if a in imp.consts else (imp.consts[b], a)
        x = imp._t(t, node)
        shape = imp.shapes[x]
        c, n = np.asarray(const, np.float64), shape[-1]
        if c.size == 1:
            v = np.full(n, c.item())
        elif c.size == n and (c.shape[-1] == n if len(shape) == 1 else
                              c.ndim >= 3 and c.shape[-3:] == (n, 1, 1)):
            v = c.reshape(n)
        else:
            raise GraphError(f"node {node.name!r} ({node.op_type}): a constant operand of "
                             f"shape {c.shape} is not supported (a scalar or one value per "
                             f"channel)")
        scale, shift = (v, np.zeros_like(v)) if op == "mul" else (np.ones_like(v), v)
        imp._add(node, "scale", [x], {}, {"scale": scale, "shift": shift})
        return
    imp._add(node, op, [imp._t(a, node), imp._t(b, node)], {"act": None})

def _op_Add(imp, node, attrs, _):
    _binary(imp, node, "add")

def _op_Mul(imp, node, attrs, _):
    _binary(imp, node, "mul")

def _op_Concat(imp, node, attrs, _):
    axis = attrs.get("axis")
    if axis not in (1, -3):
        raise GraphError(f"node {node.name!r} (Concat): axis {axis} is not supported "
                         f"(channels only: axis 1)")
    imp._add(node, "concat", [imp._t(i, node) for i in node.input])

def _act(imp, node, act):
    imp._add(node, "act", [imp._t(node.input[0], node)], {"act": act})

def _op_Relu(imp, node, attrs, _):
    _act(imp, node, ("relu",))

def _op_Sigmoid(imp, node, attrs, _):
    _act(imp, node, ("sigmoid",))

def _op_HardSwish(imp, node, attrs, _):
    _act(imp, node, ("hardswish",))

def _op_HardSigmoid(imp, node, attrs, _):
    _unused(node, attrs, {"alpha": None, "beta": None})
    _act(imp, node, ("hardsigmoid", float(attrs.get("alpha", 0.2)),
                     float(attrs.get("beta", 0.5))))

def _op_Clip(imp, node, attrs, opset):
    _unused(node, attrs, {"min": None, "max": None})
    lo, hi = attrs.get("min", -np.inf), attrs.get("max", np.inf)
    for i, name in ((1, "min"), (2, "max")):
        if len(node.input) > i and node.input[i]:
            v = float(imp._const(node.input[i], node, name))
            lo, hi = (v, hi) if i == 1 else (lo, v)
    _act(imp, node, ("clip", float(lo), float(hi)))

def _op_MaxPool(imp, node, attrs, _):
    _pool(imp, node, attrs, "maxpool")

def _op_AveragePool(imp, node, attrs, _):
    _pool(imp, node, attrs, "avgpool")

def _pool(imp, node, attrs, op):
    allowed = {"kernel_shape": None, "strides": None, "pads": None, "ceil_mode": None,
               "auto_pad": None, "dilations": None,
               "storage_order": (0,), "count_include_pad": None}
    _unused(node, attrs, allowed)
    if len(node.output) > 1 and node.output[1]:
        raise GraphError(f"node {node.name!r} (MaxPool): the indices output is not supported")
    x = imp._map(node, "input")
    a = _window(node, attrs, attrs["kernel_shape"], x)
    if op == "avgpool" and a["dilation"] != (1, 1):
        raise GraphError(f"node {node.name!r} (AveragePool): dilations are not supported")
    if attrs.get("ceil_mode", 0):
        pads = list(a["pads"])
        for ax, size in enumerate(x[:2]):
            k, s, d = a["kernel"][ax], a["stride"][ax], a["dilation"][ax]
            span = size + pads[ax] + pads[ax + 2] - (k - 1) * d - 1
            n = -(-span // s) + 1
            if (n - 1) * s >= size + pads[ax]:   # the last window must start inside
                n -= 1
            pads[ax + 2] += max(0, (n - 1) * s - span)
        if op == "avgpool" and tuple(pads) != a["pads"]:
            raise GraphError(f"node {node.name!r} (AveragePool): ceil_mode=1 that changes "
                             f"the output size is not supported")
        a["pads"] = tuple(pads)
    if op == "avgpool":
        a["count_pad"] = int(attrs.get("count_include_pad", 0))
    imp._add(node, op, [imp._t(node.input[0], node)], a)

def _op_GlobalAveragePool(imp, node, attrs, _):
    imp._map(node, "input")
    imp._add(node, "gap", [imp._t(node.input[0], node)])

def _op_ReduceMean(imp, node, attrs, _):
    imp._map(node, "input")
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1:
        axes = imp._const(node.input[1], node, "axes")
    if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
        raise GraphError(f"node {node.name!r} (ReduceMean): only the mean over H and W "
                         f"(axes 2, 3) is supported, got axes {axes}")
    n = imp._add(node, "gap", [imp._t(node.input[0], node)])
    if not attrs.get("keepdims", 1):
        imp._add(node, "flatten", [n.name])

def _op_Flatten(imp, node, attrs, _):
    if attrs.get("axis", 1) != 1:
        raise GraphError(f"node {node.name!r} (Flatten): axis {attrs['axis']} is not "
                         f"supported (axis 1 only)")
    _flatten(imp, node)

def _flatten(imp, node):
    x = imp._t(node.input[0], node)
    if len(imp.shapes[x]) == 1:
        imp.alias[node.output[0]] = x
    else:
        imp._add(node, "flatten", [x])

def _op_Reshape(imp, node, attrs, _):
    shape = [int(v) for v in imp._const(node.input[1], node, "the shape")]
    if len(shape) != 2 or shape[0] not in (1, -1, 0):
        raise GraphError(f"node {node.name!r} (Reshape): only (1, -1) / (1, N) at the head "
                         f"is supported, got {shape}")
    _flatten(imp, node)

def _op_Squeeze(imp, node, attrs, _):
    x = imp._t(node.input[0], node)
    s = imp.shapes[x]
    if len(s) != 3 or s[:2] != (1, 1):
        raise GraphError(f"node {node.name!r} (Squeeze): only a pooled (1, C, 1, 1) "
                         f"tensor can be squeezed, got (H, W, C) {s}")
    _flatten(imp, node)

def _alias(imp, node, attrs, _):
    imp.alias[node.output[0]] = imp._t(node.input[0], node)

_op_Dropout = _op_Identity = _alias

def _unsupported(imp, node, attrs, _):
    raise GraphError(f"node {node.name!r}: op {node.op_type} is supported on constants "
                     f"only (shape arithmetic), and its inputs are not constant")

_op_Shape = _op_Gather = _op_Unsqueeze = _op_Cast = _op_Constant = _unsupported


HANDLERS = {name[len("_op_"):]: fn for name, fn in list(globals().items())
            if name.startswith("_op_")}
