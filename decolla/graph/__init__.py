"""Bring-your-own CNN: ONNX import into a graph IR (ir), its rewrites (rewrite), operators
on row windows (ops), and the graph cut into segments that run as a Model's layers
(segments). `load_onnx_model(path)` is the one entry point `decolla.loader` uses.
"""
from decolla.graph.ir import Graph, GraphError, Node
from decolla.graph.onnx_import import load_onnx
from decolla.graph.segments import GraphLayer, to_model


def load_onnx_model(path) -> "Model":  # noqa: F821  (decolla.model.Model)
    """The Model of an ONNX file: its graph cut into segments (GraphError if unsupported)."""
    return to_model(load_onnx(path), {"file": str(path)})


__all__ = ["Graph", "GraphError", "GraphLayer", "Node", "load_onnx", "load_onnx_model",
           "to_model"]
