"""Bring-your-own CNN: ONNX import into a graph IR (ir), its rewrites (rewrite), operators
on row windows (ops), and the graph cut into segments that run as a Model's layers
(segments). `load_onnx_model(path)` is the one entry point `decolla.loader` uses.
"""
from __future__ import annotations

import os

from decolla.graph.ir import Graph, GraphError, Node
from decolla.graph.onnx_import import load_onnx
from decolla.graph.segments import GraphLayer, to_model
from decolla.model import Model


def labels_path(path) -> str:
    """Where an ONNX model's optional labels live: `net.onnx` -> `net.labels.txt`."""
    return os.path.splitext(os.fspath(path))[0] + ".labels.txt"


def load_onnx_model(path) -> Model:
    """The Model of an ONNX file: its graph cut into segments (GraphError if unsupported),
    with the class names of `labels_path(path)` (one per line) when that file exists."""
    model = to_model(load_onnx(path), {"file": os.fspath(path)})
    lp = labels_path(path)
    if os.path.exists(lp):
        with open(lp, encoding="utf-8") as fh:
            labels = [line.strip() for line in fh if line.strip()]
        if len(labels) != model.num_classes:
            raise GraphError(f"{lp}: {len(labels)} labels for a model with "
                             f"{model.num_classes} classes (one label per line)")
        model.meta["labels"] = labels
    return model


__all__ = ["Graph", "GraphError", "GraphLayer", "Node", "labels_path", "load_onnx",
           "load_onnx_model", "to_model"]
