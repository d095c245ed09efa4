"""Layer operations on chunks: the API workers and the single-device forward call.

PLACEHOLDER IMPLEMENTATION (numpy reference, then slicing). The kernels helper
replaces the bodies with the Cython kernels; the signatures stay.
"""
from __future__ import annotations

import numpy as np

from decolla import reference
from decolla.model import Layer


def run_layer(layer: Layer, x: np.ndarray, residual: np.ndarray | None = None,
              c0: int = 0, c1: int | None = None) -> np.ndarray:
    """Output channels [c0, c1) of `layer` on the whole input `x`.

    `residual`, when the layer has one, is the residual tensor's channels [c0, c1).
    Returns a C-contiguous float32 array (..., c1 - c0).
    """
    c1 = layer.out_shape[-1] if c1 is None else c1
    y = reference.layer_forward(layer, x)[..., c0:c1]
    if residual is not None:
        y = y + residual
    return np.ascontiguousarray(y, dtype=np.float32)
