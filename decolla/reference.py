"""Plain numpy reference forward: slow, obviously correct, the oracle for every test.

Shapes follow decolla.model: one image (H, W, C) float32, NHWC without batch.
"""
from __future__ import annotations

import numpy as np

from decolla.model import Layer, Model


def _pad(x: np.ndarray) -> np.ndarray:
    return np.pad(x, ((1, 1), (1, 1), (0, 0)))


def _taps(x: np.ndarray, stride: int):
    """The 9 shifted views of x (pad 1) that a 3x3 window of this stride reads, with their
    (dy, dx): a 3x3 convolution is the sum over taps of view x weight[dy, dx]."""
    h, wd, _ = x.shape
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    xp = _pad(x.astype(np.float64))
    rows, cols = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    for dy in range(3):
        for dx in range(3):
            yield dy, dx, xp[dy:dy + rows:stride, dx:dx + cols:stride]


def conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """Full 3x3 convolution, pad 1. x (H, W, Cin), w (3, 3, Cin, Cout)."""
    return sum(patch @ w[dy, dx].astype(np.float64) for dy, dx, patch in _taps(x, stride)) + b


def dwconv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """Depthwise 3x3 convolution, pad 1. x (H, W, C), w (3, 3, C)."""
    return sum(patch * w[dy, dx] for dy, dx, patch in _taps(x, stride)) + b


def pwconv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pointwise 1x1 convolution. x (H, W, Cin), w (Cin, Cout)."""
    return x.astype(np.float64) @ w.astype(np.float64) + b


def gap(x: np.ndarray) -> np.ndarray:
    """Global average pool (H, W, C) -> (C,)."""
    return x.astype(np.float64).mean(axis=(0, 1))


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x (Cin,) @ w (Cin, Cout) + b."""
    return x.astype(np.float64) @ w.astype(np.float64) + b


def layer_forward(layer: Layer, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """One layer with bias, optional ReLU6 and optional residual add; returns float32."""
    if layer.kind == "conv3x3":
        y = conv3x3(x, layer.weight, layer.bias, layer.stride)
    elif layer.kind == "dwconv3x3":
        y = dwconv3x3(x, layer.weight, layer.bias, layer.stride)
    elif layer.kind == "pwconv":
        y = pwconv(x, layer.weight, layer.bias)
    elif layer.kind == "gap":
        y = gap(x)
    elif layer.kind == "linear":
        y = linear(x, layer.weight, layer.bias)
    elif layer.kind in ("graph", "graph-global"):   # an imported segment runs its own nodes
        y = layer.run(np.ascontiguousarray(x, np.float32))
    else:
        raise ValueError(f"unknown layer kind {layer.kind!r}")
    if layer.relu6:
        y = np.clip(y, 0.0, 6.0)
    if residual is not None:
        y = y + residual
    return y.astype(np.float32)


def forward(model: Model, image: np.ndarray, keep: bool = False):
    """Logits for one image (H, W, 3); with keep=True also every layer's output by name."""
    tensors = {"input": np.asarray(image, dtype=np.float32)}
    x = tensors["input"]
    for layer in model.layers:
        res = tensors[layer.residual] if layer.residual else None
        x = layer_forward(layer, x, res)
        tensors[layer.name] = x
    return (x, tensors) if keep else x
