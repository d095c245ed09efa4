"""Inverted-residual blocks in one kernel call: the one place that decides which runs of
layers `kernels.fused` computes (expand 1x1 -> depthwise 3x3 -> project 1x1 (+ the
block's input), by tiles of rows whose expanded rows stay in cache instead of going to
memory as whole tensors). `decolla.forward` and `decolla.plans.compute` use it.

A block is fused only where the result is bit for bit that of its separate layers, so
fusing never changes an answer: where `ops` multiplies both pointwise layers by packed
weights as the fused kernel does (not the baseline build, whose BLAS path differs in the
last bits), and on one thread (the kernel has none). The kernel takes whole maps and pads
their top and bottom rows itself; a strip of rows of a stride-1 block runs it on a window
one row wider on each side (`Block.rows`). DECOLLA_FUSE=0, or `set_enabled(False)`, turns
it off (A/B runs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from decolla import ops
from decolla.kernels import load
from decolla.model import Layer

_fused = load("fused")
_enabled = os.environ.get("DECOLLA_FUSE", "1").strip() != "0"


def set_enabled(on: bool) -> None:
    """Turn fusion on or off in this process (default: on unless DECOLLA_FUSE=0)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """Whether fusion is on in this process."""
    return _enabled


def active(threads: int | None = None) -> bool:
    """Whether kernels running on `threads` threads (None: ops' default) fuse blocks."""
    return _enabled and ops._nthreads(threads) == 1


@dataclass(frozen=True, eq=False)
class Block:
    """One fusable block: its layers' names and the fused kernel's arguments (pointwise
    weights packed once, as `ops.packed_weight` packs them)."""
    names: tuple[str, ...]
    wexp: np.ndarray | None
    bexp: np.ndarray | None
    wdw: np.ndarray
    bdw: np.ndarray
    wproj: np.ndarray
    bproj: np.ndarray
    stride: int
    residual: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The block's output for its whole input map `x` (C-contiguous float32), in `out`
        (allocated when None; must not overlap x)."""
        if x.shape != self.in_shape:   # the kernel would take a short map as padded
            raise ValueError(f"fused block {'+'.join(self.names)}: input shape {x.shape}, "
                             f"expected {self.in_shape}")
        if out is None:
            out = np.empty(self.out_shape, np.float32)
        _fused.inverted_residual(x, self.wexp, self.bexp, self.wdw, self.bdw, self.wproj,
                                 self.bproj, out, self.stride, self.residual)
        return out

    def window(self, a: int, b: int) -> tuple[int, int] | None:
        """The input rows [w0, w1) from which `rows` computes output rows [a, b) of a
        stride-1 block: one row more on each side, except at the map's edges. None for a
        stride-2 block (its windows would not keep the map's row parity)."""
        if self.stride != 1:
            return None
        return max(a - 1, 0), min(b + 1, self.in_shape[0])

    def rows(self, x: np.ndarray, x0: int, a: int, b: int,
             out: np.ndarray | None = None) -> np.ndarray:
        """Output rows `window(a, b)` of a stride-1 block, from input `x` whose first row
        is row `x0` of the map: the kernel takes the window as a whole map. Its zero
        padding is right at the map's own edges; the window's other edge rows, which it
        pads wrongly, lie outside [a, b), and every other row gets the separate layers'
        bits (each output row reads only its 3 input rows). `out` (w1 - w0, W, Cout)."""
        w0, w1 = self.window(a, b)
        if x.shape[1:] != self.in_shape[1:] or x0 > w0 or x0 + x.shape[0] < w1:
            raise ValueError(f"fused block {'+'.join(self.names)}: input rows "
                             f"[{x0}, {x0 + x.shape[0]}) of shape {x.shape} do not cover "
                             f"rows [{w0}, {w1}) of a {self.in_shape} map")
        x = x[w0 - x0:w1 - x0]
        if out is None:
            out = np.empty((w1 - w0,) + tuple(self.out_shape[1:]), np.float32)
        _fused.inverted_residual(x, self.wexp, self.bexp, self.wdw, self.bdw, self.wproj,
                                 self.bproj, out, 1, self.residual)
        return out


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def block(expand: Layer | None, dw: Layer, project: Layer, source: str,
          cols: tuple[int, int] | None = None) -> Block | None:
    """Consecutive layers `expand` (optional; only its output channels `cols` when given),
    `dw` and `project`, the first reading tensor `source`, as one Block; None where the
    fused kernel would not give the separate layers' bits (see the module docstring)."""
    if not (dw.kind == "dwconv3x3" and dw.relu6 and dw.residual is None and dw.stride in (1, 2)
            and project.kind == "pwconv" and not project.relu6
            and (expand is None or expand.kind == "pwconv")):
        return None
    first = expand if expand is not None else dw
    h, w, cin = first.in_shape
    ce = dw.in_shape[2]
    ho, wo, cout = project.out_shape
    if project.in_shape[2] != ce or (expand is None and ce != cin):
        return None
    if expand is not None:
        c0, c1 = cols if cols is not None else (0, expand.out_shape[2])
        if not (expand.relu6 and expand.residual is None and c1 - c0 == ce
                and ops.uses_packed(h * w, cin, ce)):
            return None
    residual = project.residual is not None
    if residual and (project.residual != source or dw.stride != 1 or cout != cin):
        return None
    if not ops.uses_packed(ho * wo, ce, cout):
        return None
    wexp = bexp = None
    if expand is not None:
        wexp = ops.packed_weight(_c(expand.weight), c0, c1)
        bexp = _c(expand.bias[c0:c1])
    names = tuple(l.name for l in (expand, dw, project) if l is not None)
    return Block(names, wexp, bexp, _c(dw.weight), _c(dw.bias),
                 ops.packed_weight(_c(project.weight), 0, cout), _c(project.bias), dw.stride,
                 residual, tuple(first.in_shape), tuple(project.out_shape))


def find(layers: Sequence[Layer], source: str) -> dict[int, Block]:
    """The blocks among `layers` that fuse, by the index of each one's first layer.

    `layers` run in order, the first reading tensor `source` and each other the one
    before (plus its residual), and only the last one's output is handed on (a whole
    model, or one stage): a block fuses only when no later layer reads its expanded or
    depthwise tensor as a residual.
    """
    read = {l.residual for l in layers if l.residual}
    found: dict[int, Block] = {}
    i = 0
    while i < len(layers):
        src = layers[i - 1].name if i else source
        for n in (3, 2):
            run = list(layers[i:i + n])
            if len(run) < n or any(l.name in read for l in run[:-1]):
                continue
            blk = block(*([None] * (3 - n) + run), src)
            if blk is not None:
                found[i] = blk
                i += n - 1
                break
        i += 1
    return found
