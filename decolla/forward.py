"""Fast single-device forward pass of a whole model on the Cython kernels."""
from __future__ import annotations

import threading
import weakref

import numpy as np

from decolla import fusion, ops
from decolla.model import Layer, Model, ModelError, validate


def check_image(image, shape: tuple[int, int, int]) -> np.ndarray:
    """The image as float32 (H, W, 3) after checking shape, type and finiteness."""
    if not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"image must be an array of numbers ({exc})") from exc
    if image.dtype.kind not in "fiu":
        raise TypeError(f"image must hold real numbers, got dtype {image.dtype}")
    if tuple(image.shape) != tuple(shape):
        raise ValueError(f"image has shape {image.shape}, the model expects {tuple(shape)} (H, W, C)")
    img = image.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        raise ValueError("image has non-finite values (NaN or inf)")
    return img


class Forward:
    """Reusable forward pass of one model: buffers are allocated once and reused.

    Inverted-residual blocks run through `decolla.fusion` when it is active (one thread,
    fusion on; same bits as the separate layers). Calls from several Python threads are
    serialised (the buffers are shared); use one Forward per thread for parallel inference.
    """

    def __init__(self, model: Model):
        if not isinstance(model, Model):
            raise TypeError(f"model must be a decolla.model.Model, got {type(model).__name__}")
        validate(model)
        self.model = model
        self._lock = threading.Lock()
        self._input = np.empty(model.input_shape, dtype=np.float32)
        self._buffers: list[np.ndarray] = []     # shared by both plans (calls are serialised)
        self._blocks = fusion.find(model.layers, "input")
        self._plans: dict[bool, list] = {}

    @property
    def _plan(self) -> list:
        """The plan running every layer on its own: (layer, w, b, src, res, out) steps."""
        return self._plan_for(False)

    def _plan_for(self, fused: bool) -> list:
        fused = fused and bool(self._blocks)
        if fused not in self._plans:
            self._plans[fused] = self._make_plan(self._steps(fused))
        return self._plans[fused]

    def _steps(self, fused: bool) -> list[tuple]:
        """(layer or fusion.Block, its input tensor, its residual tensor, the layer whose
        output it produces) in order; a fused block reads its residual from its input."""
        layers, steps, i = self.model.layers, [], 0
        while i < len(layers):
            src = layers[i - 1].name if i else "input"
            blk = self._blocks.get(i) if fused else None
            if blk is None:
                steps.append((layers[i], src, layers[i].residual, layers[i]))
                i += 1
            else:
                i += len(blk.names)
                steps.append((blk, src, None, layers[i - 1]))
        return steps

    def _make_plan(self, steps: list[tuple]) -> list:
        """Assign every step's output to a reusable buffer (freed after its last reader)."""
        last_use = {"input": 0}
        for i, (_, src, res, _) in enumerate(steps):
            last_use[src] = i
            if res:
                last_use[res] = max(last_use.get(res, 0), i)
        size = max(int(np.prod(layer.out_shape)) for layer in self.model.layers)
        free = list(self._buffers)
        owner: dict[str, np.ndarray] = {}
        tensors = {"input": self._input}
        plan = []
        for i, (op, src, res, layer) in enumerate(steps):
            buf = free.pop() if free else None
            if buf is None:
                buf = np.empty(size, dtype=np.float32)
                self._buffers.append(buf)
            out = buf[:int(np.prod(layer.out_shape))].reshape(layer.out_shape)
            w = b = None
            if isinstance(op, Layer):
                w = None if op.weight is None else np.ascontiguousarray(op.weight)
                b = None if op.bias is None else np.ascontiguousarray(op.bias)
            if getattr(op, "kind", None) in ("graph", "graph-global"):
                w = {}      # threads -> the segment's program, this Forward's own buffers
            plan.append((op, w, b, tensors[src], tensors[res] if res else None, out))
            tensors[layer.name] = out
            owner[layer.name] = buf
            for name in [n for n, last in last_use.items() if last == i and n in owner]:
                free.append(owner.pop(name))
        return plan

    def __call__(self, image, threads: int | None = None, fuse: bool = True) -> np.ndarray:
        """Logits (num_classes,) float32 for one image (H, W, 3); `fuse=False` runs every
        layer on its own even where fusion is active."""
        img = check_image(image, self.model.input_shape)
        nt = ops._nthreads(threads)
        with self._lock:
            plan = self._plan_for(fuse and fusion.active(nt))
            np.copyto(self._input, img)
            for layer, w, b, src, res, out in plan:
                _run(layer, w, b, src, res, out, nt)
            return plan[-1][-1].copy()


def _run(layer, w, b, x, res, out, nt):
    """One whole layer (or fused block) straight on the kernels (shapes were validated at
    planning time)."""
    if isinstance(layer, fusion.Block):
        layer(x, out)
        return
    k = layer.kind
    if k == "pwconv":
        ops.pwconv_kernel(x, w, b, out, 0, 0, layer.relu6, res, 0, 0, nt)
    elif k == "dwconv3x3":
        ops._dw.dwconv3x3(x, w, b, out, layer.stride, 0, 0, 0, 0, x.shape[0], layer.relu6, nt)
        if res is not None:
            ops._gemm.add_residual(out, res, 0, 0)
    elif k == "conv3x3":
        ops._conv.conv3x3(x, w, b, out, layer.stride, 0, 0, 0, x.shape[0], layer.relu6, res,
                          0, 0, nt)
    elif k == "gap":
        ops._gemm.gap(x, out, 0)
    elif k == "linear":
        ops._gemm.linear(x, w, b, out, 0, layer.relu6)
        if res is not None:
            out += res
    elif k in ("graph", "graph-global"):
        prog = w.get(nt)
        if prog is None:
            prog = w[nt] = layer.compile(nt, into_dst=True)
        prog(x, 0, out)
    else:
        raise ModelError(f"layer {layer.name}: unknown kind {k!r}")


_cache: dict[int, tuple[weakref.ref, tuple, Forward]] = {}


def _signature(model: Model) -> tuple:
    return tuple((l.name, l.kind, tuple(l.in_shape), tuple(l.out_shape), l.stride, l.residual,
                  id(l.weight), id(l.bias)) for l in model.layers)


def forward(model: Model, image, threads: int | None = None, fuse: bool = True) -> np.ndarray:
    """Logits for one image (H, W, 3) on this device (Forward cached per model; `fuse` as
    in Forward.__call__)."""
    sig = _signature(model)
    entry = _cache.get(id(model))
    if entry is None or entry[0]() is not model or entry[1] != sig:
        fwd = Forward(model)
        key = id(model)
        ref = weakref.ref(model, lambda _r, key=key, c=_cache: c.pop(key, None))
        _cache[key] = (ref, sig, fwd)
    else:
        fwd = entry[2]
    return fwd(image, threads=threads, fuse=fuse)
