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
from decolla.graph.onnx_ops import HANDLERS
from decolla.graph.rewrite import simplify

SUPPORTED = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "Relu", "Clip", "HardSwish",
             "HardSigmoid", "Sigmoid", "MaxPool", "AveragePool", "GlobalAveragePool",
             "ReduceMean", "Flatten", "Reshape", "BatchNormalization", "Dropout", "Identity",
             "Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast")
_FOLDABLE = ("Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Concat", "Mul",
             "Add", "Reshape", "Identity")


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

    # ------------------------------------------------------------------ for the handlers

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
            HANDLERS[node.op_type](self, node, attrs, opsets.get("", 0))
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
