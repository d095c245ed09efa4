"""ONNX file -> graph IR (decolla.graph.ir), with BatchNorm and constants folded.

Only the `onnx` package (protobuf parsing; the optional `onnx` extra) is needed, no torch
or onnxruntime. Constants (initializers, Constant nodes, and nodes over constants only) are
evaluated here; Dropout and Identity vanish; a BatchNormalization after a convolution is
folded into its weights, and an activation after a conv, gemm, add or mul is fused into
it. An op, attribute or shape this importer does not support raises GraphError naming
the node, the op and what is supported: never a silently wrong network.
"""
from __future__ import annotations

import os

import numpy as np

from decolla.graph.ir import Graph, GraphError, Node, check, out_shape
from decolla.graph.rewrite import simplify

SUPPORTED = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "Relu", "Clip", "HardSwish",
             "HardSigmoid", "Sigmoid", "MaxPool", "AveragePool", "GlobalAveragePool",
             "ReduceMean", "Flatten", "Reshape", "BatchNormalization", "Dropout", "Identity",
             "Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast")
_FOLDABLE = ("Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Concat", "Mul",
             "Add", "Reshape", "Identity")
_ACTS = {"Relu": "relu", "Clip": "clip", "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid",
         "Sigmoid": "sigmoid"}


def load_onnx(path: str | os.PathLike) -> Graph:
    """The graph of an ONNX file (GraphError saying what is wrong or unsupported)."""
    try:
        import onnx
    except ImportError as exc:
        raise GraphError(f"{path}: reading ONNX files needs the onnx package "
                         f"(pip install 'decolla[onnx]')") from exc
    try:
        proto = onnx.load(os.fspath(path))
    except Exception as exc:   # protobuf raises several types for a bad file
        raise GraphError(f"{path}: not a readable ONNX model ({exc})") from None
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return Importer(proto, name).graph()


class Importer:
    """One pass over an ONNX graph's nodes (topological in every valid file)."""

    def __init__(self, proto, name: str):
        from onnx import numpy_helper
        self._to_array = numpy_helper.to_array
        self.proto, self.name = proto, name
        g = proto.graph
        self.consts: dict[str, np.ndarray] = {i.name: self._to_array(i) for i in g.initializer}
        self.alias: dict[str, str] = {}          # ONNX tensor -> IR tensor
        self.nodes: list[Node] = []
        self.shapes: dict[str, tuple] = {}
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise GraphError(f"the model has {len(inputs)} inputs; one image input is supported")
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or any(d is None for d in dims[1:]) or dims[0] not in (1, None):
            raise GraphError(f"input {inputs[0].name!r} has shape {dims}; expected (1, C, H, W) "
                             f"with fixed C, H, W (export with a fixed image size)")
        self.alias[inputs[0].name] = "input"
        self.shapes["input"] = (dims[2], dims[3], dims[1])
        self.used = {"input"}

    # ------------------------------------------------------------------ helpers

    def _t(self, onnx_name: str, node) -> str:
        if onnx_name not in self.alias:
            raise GraphError(f"node {node.name!r} ({node.op_type}): input {onnx_name!r} is "
                             f"neither a tensor computed before it nor a constant")
        return self.alias[onnx_name]

    def _const(self, onnx_name: str, node, what: str) -> np.ndarray:
        if onnx_name not in self.consts:
            raise GraphError(f"node {node.name!r} ({node.op_type}): {what} must be a constant")
        return self.consts[onnx_name]

    def _add(self, node, op: str, inputs: list[str], attrs=None, arrays=None) -> Node:
        base = node.name or node.output[0]
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        attrs, arrays = attrs or {}, {k: np.ascontiguousarray(v, np.float32)
                                      for k, v in (arrays or {}).items()}
        shape = out_shape(op, attrs, arrays, [self.shapes[t] for t in inputs])
        n = Node(name, op, tuple(inputs), attrs, arrays, shape)
        self.nodes.append(n)
        self.shapes[name] = shape
        self.alias[node.output[0]] = name
        return n

    def _map(self, node, what: str) -> tuple[int, ...]:
        """The (H, W, C) map an input must be."""
        shape = self.shapes[self._t(node.input[0], node)]
        if len(shape) != 3:
            raise GraphError(f"node {node.name!r} ({node.op_type}): needs an image-shaped "
                             f"(1, C, H, W) input, got a vector of {shape[0]}")
        return shape

    # ------------------------------------------------------------------ the pass

    def graph(self) -> Graph:
        from onnx import helper
        opsets = {o.domain: o.version for o in self.proto.opset_import}
        for node in self.proto.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise GraphError(f"node {node.name!r}: op {node.domain}.{node.op_type} is not "
                                 f"supported; supported: {', '.join(SUPPORTED)}")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if self._fold(node, attrs):
                continue
            if node.op_type not in SUPPORTED:
                raise GraphError(f"node {node.name!r}: op {node.op_type} is not supported; "
                                 f"supported: {', '.join(SUPPORTED)}")
            getattr(self, "_op_" + node.op_type)(node, attrs, opsets.get("", 0))
        outs = list(self.proto.graph.output)
        if len(outs) != 1 or outs[0].name not in self.alias:
            raise GraphError(f"the model has {len(outs)} outputs; one computed output is supported")
        graph = Graph(self.name, self.shapes["input"], self.nodes, self.alias[outs[0].name])
        graph = simplify(graph)
        check(graph)
        return graph

    def _fold(self, node, attrs: dict) -> bool:
        """Evaluate a node whose inputs are all constants (or a Shape of a known tensor)."""
        op = node.op_type
        if op == "Constant":
            if "value" not in attrs:
                raise GraphError(f"node {node.name!r} (Constant): only the 'value' form is "
                                 f"supported, got {sorted(attrs)}")
            self.consts[node.output[0]] = self._to_array(attrs["value"])
            return True
        if op == "Shape" and node.input[0] in self.alias:
            s = self.shapes[self._t(node.input[0], node)]
            self.consts[node.output[0]] = np.array((1, s[2], s[0], s[1]) if len(s) == 3
                                                   else (1, s[0]), np.int64)
            return True
        if op not in _FOLDABLE or not all(i in self.consts for i in node.input if i):
            return False
        x = [self.consts[i] for i in node.input if i]
        if op == "Gather":
            y = np.take(x[0], x[1], axis=attrs.get("axis", 0))
        elif op in ("Unsqueeze", "Squeeze"):
            axes = tuple(attrs["axes"]) if "axes" in attrs else \
                (tuple(x[1]) if len(x) > 1 else None)
            y = np.expand_dims(x[0], axes) if op == "Unsqueeze" else np.squeeze(x[0], axes)
        elif op == "Cast":
            from onnx import helper
            y = x[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        elif op == "Concat":
            y = np.concatenate(x, axis=attrs["axis"])
        elif op == "Reshape":
            y = x[0].reshape(x[1])
        elif op in ("Mul", "Add"):
            y = x[0] * x[1] if op == "Mul" else x[0] + x[1]
        else:
            y = x[0]
        self.consts[node.output[0]] = np.asarray(y)
        return True

    def _unused(self, node, attrs: dict, allowed: dict) -> None:
        """GraphError for an attribute outside `allowed` (name -> accepted values or None)."""
        for k, v in attrs.items():
            if k not in allowed:
                raise GraphError(f"node {node.name!r} ({node.op_type}): attribute {k!r} is not "
                                 f"supported (supported: {', '.join(allowed) or 'none'})")
            if allowed[k] is not None and v not in allowed[k]:
                raise GraphError(f"node {node.name!r} ({node.op_type}): {k}={v!r} is not "
                                 f"supported (supported: {allowed[k]})")

    def _window(self, node, attrs: dict, kernel, x) -> dict:
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

    # ------------------------------------------------------------------ ops

    def _op_Conv(self, node, attrs, _):
        self._unused(node, attrs, {"kernel_shape": None, "strides": None, "pads": None,
                                   "dilations": None, "group": None, "auto_pad": None})
        x = self._map(node, "input")
        w = self._const(node.input[1], node, "the weight")
        if w.ndim != 4:
            raise GraphError(f"node {node.name!r} (Conv): only 2-D convolutions are supported, "
                             f"weight shape {w.shape}")
        b = self._const(node.input[2], node, "the bias") if len(node.input) > 2 and \
            node.input[2] else np.zeros(w.shape[0], np.float32)
        a = self._window(node, attrs, attrs.get("kernel_shape", w.shape[2:]), x)
        a.update(groups=int(attrs.get("group", 1)), act=None)
        self._add(node, "conv", [self._t(node.input[0], node)], a,
                  {"weight": w.transpose(2, 3, 1, 0), "bias": b})

    def _op_BatchNormalization(self, node, attrs, _):
        self._unused(node, attrs, {"epsilon": None, "momentum": None, "training_mode": (0,),
                                   "spatial": (1,)})
        self._map(node, "input")
        gamma, beta, mean, var = (self._const(i, node, "the statistics").astype(np.float64)
                                  for i in node.input[1:5])
        s = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        self._add(node, "scale", [self._t(node.input[0], node)], {},
                  {"scale": s, "shift": beta - mean * s})

    def _op_Gemm(self, node, attrs, _):
        self._unused(node, attrs, {"alpha": None, "beta": None, "transA": (0,), "transB": None})
        w = self._const(node.input[1], node, "B (the weight)").astype(np.float64)
        w = (w.T if attrs.get("transB", 0) else w) * attrs.get("alpha", 1.0)
        c = self._const(node.input[2], node, "C (the bias)") if len(node.input) > 2 and \
            node.input[2] else np.zeros(w.shape[1])
        self._linear(node, w, np.broadcast_to(c * attrs.get("beta", 1.0), (w.shape[1],)))

    def _op_MatMul(self, node, attrs, _):
        w = self._const(node.input[1], node, "the second operand (the weight)")
        if w.ndim != 2:
            raise GraphError(f"node {node.name!r} (MatMul): the weight must be 2-D, got {w.shape}")
        self._linear(node, w, np.zeros(w.shape[1]))

    def _linear(self, node, w, b):
        x = self._t(node.input[0], node)
        if len(self.shapes[x]) != 1:
            raise GraphError(f"node {node.name!r} ({node.op_type}): supported at the head only, "
                             f"on a flattened vector; its input has shape {self.shapes[x]} "
                             f"(H, W, C)")
        self._add(node, "gemm", [x], {"act": None}, {"weight": w, "bias": b})

    def _binary(self, node, op: str):
        a, b = node.input[:2]
        if a in self.consts and b in self.consts:
            raise GraphError(f"node {node.name!r}: constant {node.op_type} not folded")
        if a in self.consts or b in self.consts:
            const, t = (self.consts[a], b) if a in self.consts else (self.consts[b], a)
            x = self._t(t, node)
            shape = self.shapes[x]
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
            self._add(node, "scale", [x], {}, {"scale": scale, "shift": shift})
            return
        self._add(node, op, [self._t(a, node), self._t(b, node)], {"act": None})

    def _op_Add(self, node, attrs, _):
        self._binary(node, "add")

    def _op_Mul(self, node, attrs, _):
        self._binary(node, "mul")

    def _op_Concat(self, node, attrs, _):
        axis = attrs.get("axis")
        if axis not in (1, -3):
            raise GraphError(f"node {node.name!r} (Concat): axis {axis} is not supported "
                             f"(channels only: axis 1)")
        self._add(node, "concat", [self._t(i, node) for i in node.input])

    def _act(self, node, act):
        self._add(node, "act", [self._t(node.input[0], node)], {"act": act})

    def _op_Relu(self, node, attrs, _):
        self._act(node, ("relu",))

    def _op_Sigmoid(self, node, attrs, _):
        self._act(node, ("sigmoid",))

    def _op_HardSwish(self, node, attrs, _):
        self._act(node, ("hardswish",))

    def _op_HardSigmoid(self, node, attrs, _):
        self._unused(node, attrs, {"alpha": None, "beta": None})
        self._act(node, ("hardsigmoid", float(attrs.get("alpha", 0.2)),
                         float(attrs.get("beta", 0.5))))

    def _op_Clip(self, node, attrs, opset):
        self._unused(node, attrs, {"min": None, "max": None})
        lo, hi = attrs.get("min", -np.inf), attrs.get("max", np.inf)
        for i, name in ((1, "min"), (2, "max")):
            if len(node.input) > i and node.input[i]:
                v = float(self._const(node.input[i], node, name))
                lo, hi = (v, hi) if i == 1 else (lo, v)
        self._act(node, ("clip", float(lo), float(hi)))

    def _op_MaxPool(self, node, attrs, _):
        self._pool(node, attrs, "maxpool")

    def _op_AveragePool(self, node, attrs, _):
        self._pool(node, attrs, "avgpool")

    def _pool(self, node, attrs, op):
        allowed = {"kernel_shape": None, "strides": None, "pads": None, "ceil_mode": None,
                   "auto_pad": None, "dilations": None,
                   "storage_order": (0,), "count_include_pad": None}
        self._unused(node, attrs, allowed)
        if len(node.output) > 1 and node.output[1]:
            raise GraphError(f"node {node.name!r} (MaxPool): the indices output is not supported")
        x = self._map(node, "input")
        a = self._window(node, attrs, attrs["kernel_shape"], x)
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
        self._add(node, op, [self._t(node.input[0], node)], a)

    def _op_GlobalAveragePool(self, node, attrs, _):
        self._map(node, "input")
        self._add(node, "gap", [self._t(node.input[0], node)])

    def _op_ReduceMean(self, node, attrs, _):
        self._map(node, "input")
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1:
            axes = self._const(node.input[1], node, "axes")
        if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            raise GraphError(f"node {node.name!r} (ReduceMean): only the mean over H and W "
                             f"(axes 2, 3) is supported, got axes {axes}")
        n = self._add(node, "gap", [self._t(node.input[0], node)])
        if not attrs.get("keepdims", 1):
            self._add(node, "flatten", [n.name])

    def _op_Flatten(self, node, attrs, _):
        if attrs.get("axis", 1) != 1:
            raise GraphError(f"node {node.name!r} (Flatten): axis {attrs['axis']} is not "
                             f"supported (axis 1 only)")
        self._flatten(node)

    def _flatten(self, node):
        x = self._t(node.input[0], node)
        if len(self.shapes[x]) == 1:
            self.alias[node.output[0]] = x
        else:
            self._add(node, "flatten", [x])

    def _op_Reshape(self, node, attrs, _):
        shape = [int(v) for v in self._const(node.input[1], node, "the shape")]
        if len(shape) != 2 or shape[0] not in (1, -1, 0):
            raise GraphError(f"node {node.name!r} (Reshape): only (1, -1) / (1, N) at the head "
                             f"is supported, got {shape}")
        self._flatten(node)

    def _op_Squeeze(self, node, attrs, _):
        x = self._t(node.input[0], node)
        s = self.shapes[x]
        if len(s) != 3 or s[:2] != (1, 1):
            raise GraphError(f"node {node.name!r} (Squeeze): only a pooled (1, C, 1, 1) "
                             f"tensor can be squeezed, got (H, W, C) {s}")
        self._flatten(node)

    def _alias(self, node, attrs, _):
        self.alias[node.output[0]] = self._t(node.input[0], node)

    _op_Dropout = _op_Identity = _alias

    def _unsupported(self, node, attrs, _):
        raise GraphError(f"node {node.name!r}: op {node.op_type} is supported on constants "
                         f"only (shape arithmetic), and its inputs are not constant")

    _op_Shape = _op_Gather = _op_Unsqueeze = _op_Cast = _op_Constant = _unsupported
