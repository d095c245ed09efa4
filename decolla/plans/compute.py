"""Executing a plan's pieces: a stage's tensors split into each chunk's inputs, a chunk
computed from them (channel slices, partial sums, row strips), and the chunk results
merged back into the stage output.

The split (`chunk_inputs`) sits beside its inverse (`merge`, with `chunk_output_shape`
checking each part), as torch.distributed.pipelining keeps splitting a batch into
microbatches beside merging their results: the two must agree on the layout. Workers and
the requester call `compute_chunk`; `decolla.plans.exchange` computes exchange strips one
layer at a time with `strip_buffers` and `strip_layer`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from decolla import fusion, ops
from decolla.model import Layer
from decolla.plans.data import CHANNELWISE, ROWWISE, Chunk, Need, PlanError, Stage

# --------------------------------------------------------------------------- split and merge


def chunk_inputs(chunk: Chunk, tensors: Mapping[str, np.ndarray],
                 swapped: bool = False) -> dict[Need, np.ndarray]:
    """The slices of `tensors` chunk needs (run beside the other strips of its exchange
    stage when `swapped`), keyed by `Need` as `compute_chunk` takes them."""
    return {n: n.select(tensors[n.tensor]) for n in chunk.run_as(swapped)[0]}


def chunk_output_shape(stage: Stage, chunk: Chunk) -> tuple[int, ...]:
    """Shape a chunk's result must have."""
    if stage.reduce == "sum":
        return tuple(stage.out_shape)
    if stage.split == "spatial":
        if chunk.rows is None:
            return tuple(stage.out_shape)
        return (chunk.rows[1] - chunk.rows[0],) + tuple(stage.out_shape[1:])
    return tuple(stage.out_shape[:-1]) + (chunk.c1 - chunk.c0,)


def merge(stage: Stage, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate (or, for partial sums, add) the chunk results of a stage in chunk order."""
    if len(parts) != len(stage.chunks):
        raise PlanError(f"stage {stage.index}: {len(parts)} parts for {len(stage.chunks)} chunks")
    if stage.reduce == "sum":
        out = np.array(parts[0], dtype=np.float32, copy=True)
        for p in parts[1:]:
            if p.shape != out.shape:
                raise PlanError(f"stage {stage.index}: partial sum shape {p.shape} != {out.shape}")
            out += p
        if stage.relu6:
            np.clip(out, 0.0, 6.0, out=out)
    else:
        out = np.concatenate(parts, axis=stage.axis)
    if tuple(out.shape) != tuple(stage.out_shape):
        raise PlanError(f"stage {stage.index}: merged shape {out.shape} != {stage.out_shape}")
    return out


# --------------------------------------------------------------------------- channel chunks

def slice_layer(layer: Layer, c0: int, c1: int) -> Layer:
    """A channel-wise layer restricted to channels [c0, c1) (weights sliced, contiguous)."""
    if layer.kind not in CHANNELWISE:
        raise PlanError(f"layer {layer.name} ({layer.kind}) is not channel-wise")
    n = c1 - c0
    sub = Layer(f"{layer.name}[{c0}:{c1}]", layer.kind, tuple(layer.in_shape[:-1]) + (n,),
                tuple(layer.out_shape[:-1]) + (n,), stride=layer.stride, relu6=layer.relu6,
                residual=layer.residual)
    if layer.weight is not None:
        sub.weight = np.ascontiguousarray(layer.weight[..., c0:c1])
        sub.bias = np.ascontiguousarray(layer.bias[c0:c1])
    return sub


def partial_layer(layer: Layer, c0: int, c1: int, first: bool) -> Layer:
    """A pointwise layer reading only input channels [c0, c1): its partial sum, with the
    bias and the residual only in the `first` chunk's part, and no ReLU6 (applied after
    the sum)."""
    if layer.kind != "pwconv":
        raise PlanError(f"layer {layer.name} ({layer.kind}) cannot be a partial sum")
    n = c1 - c0
    sub = Layer(f"{layer.name}<{c0}:{c1}>", "pwconv", tuple(layer.in_shape[:-1]) + (n,),
                tuple(layer.out_shape), relu6=False,
                residual=layer.residual if first and not layer.relu6 else None)
    sub.weight = np.ascontiguousarray(layer.weight[c0:c1])
    sub.bias = np.ascontiguousarray(layer.bias if first else np.zeros_like(layer.bias))
    return sub


def compute_chunk(layers: Mapping[str, Layer], stage: Stage, chunk: Chunk,
                  inputs: Mapping[Need, np.ndarray], run_layer=None,
                  cache: dict | None = None) -> np.ndarray:
    """Compute one chunk from the slices it needs; returns its part of the stage output.

    `run_layer` defaults to `decolla.ops.run_layer`; `cache` keeps sliced layers
    between calls (worker-lifetime dict). With the default, whole inverted-residual
    blocks (and a `block` stage's partial sums of one) run as one `decolla.fusion` call
    where fusion is active: the same bits.
    """
    fuse = run_layer is None and fusion.active()
    run_layer = ops.run_layer if run_layer is None else run_layer
    missing = [n for n in chunk.needs if n not in inputs]
    if missing:
        raise PlanError(f"chunk {chunk.key} is missing inputs {missing}")
    if stage.split == "spatial":
        return _compute_strip(layers, stage, chunk, inputs, run_layer, cache, fuse)
    if stage.split != "channel":
        raise PlanError(f"split {stage.split!r} is not implemented")
    x = np.ascontiguousarray(inputs[chunk.needs[0]], dtype=np.float32)
    blk = _psum_block(layers, stage, chunk, cache) if fuse else None
    if blk is not None:
        return blk(x)
    c0, c1 = chunk.c0, chunk.c1
    by_tensor = {n.tensor: n for n in chunk.needs[1:]}
    last = len(stage.layers) - 1
    for i, name in enumerate(stage.layers):
        layer = layers[name]
        psum = stage.reduce == "sum" and i == last
        if i == 0 and layer.kind not in CHANNELWISE and not psum:
            res = _residual(layer, inputs, chunk, by_tensor, (c0, c1))
            x = run_layer(layer, x, res, c0, c1)
            continue
        sub = _sliced(layer, c0, c1, psum, chunk.index == 0, cache)
        res = _residual(sub, inputs, chunk, by_tensor, None if psum else (c0, c1))
        x = run_layer(sub, x, res, 0, None)
    return x


def _sliced(layer: Layer, c0: int, c1: int, psum: bool, first: bool, cache) -> Layer:
    """The channel slice [c0, c1) of `layer`, or its partial sum over them, kept in `cache`."""
    key = (layer.name, c0, c1, "psum" if psum else "slice", first and psum)
    sub = cache.get(key) if cache is not None else None
    if sub is None:
        sub = partial_layer(layer, c0, c1, first) if psum else slice_layer(layer, c0, c1)
        if cache is not None:
            cache[key] = sub
    return sub


def _psum_block(layers, stage: Stage, chunk: Chunk, cache) -> "fusion.Block | None":
    """A partial-sum chunk of a whole block (expand ->) depthwise -> project as one fused
    call: its channels [c0, c1) of the expanded tensor, and its share of the projection
    (with the bias and the residual in chunk 0's). None when it does not fuse."""
    if stage.reduce != "sum" or len(stage.layers) not in (2, 3):
        return None
    c0, c1, first, src = chunk.c0, chunk.c1, chunk.index == 0, chunk.needs[0].tensor
    key = ("fused-psum", stage.layers, c0, c1, first, src)
    if cache is not None and key in cache:
        return cache[key]
    *head, dw, pj = (layers[n] for n in stage.layers)
    blk = None
    if dw.kind in CHANNELWISE and pj.kind == "pwconv" and all(l.kind == "pwconv" for l in head):
        blk = fusion.block(head[0] if head else None, _sliced(dw, c0, c1, False, first, cache),
                           _sliced(pj, c0, c1, True, first, cache), src,
                           cols=(c0, c1) if head else None)
    if cache is not None:
        cache[key] = blk
    return blk


def _residual(layer, inputs, chunk, by_tensor, channels):
    """The residual tensor `layer` adds: its channel slice when the chunk was sent one,
    else the slice the chunk needs of it (or its main input)."""
    if not layer.residual:
        return None
    need = Need(layer.residual, channels)
    if need not in inputs:
        need = by_tensor.get(layer.residual, chunk.needs[0])
    return np.ascontiguousarray(inputs[need], dtype=np.float32)


# --------------------------------------------------------------------------- row strips

def strip_buffers(layers, names: tuple[str, ...], rows: tuple, cache: dict | None) -> list:
    """Output buffers for layers `names` of a strip computing `rows` of each (None:
    allocate; the last layer's result is handed out), shared like
    `decolla.forward.Forward`'s: a layer writes into a buffer whose tensor nobody reads any
    more, so a few buffers stay in cache instead of one per layer (fresh large arrays cost
    page faults on first touch). Kept in `cache` per (layers, rows)."""
    if cache is None:
        return [None] * len(names)
    key = ("strip-buffers", names, rows)
    outs = cache.get(key)
    if outs is not None:
        return outs
    last_use: dict[str, int] = {}
    for j, name in enumerate(names):
        if j:
            last_use[names[j - 1]] = j
        r = layers[name].residual
        if r:
            last_use[r] = max(last_use.get(r, 0), j)
    shapes = [(b - a,) + tuple(layers[name].out_shape[1:])
              for name, (a, b) in zip(names, rows)]
    pooled = [j < len(names) - 1 and layers[name].kind in ROWWISE for j, name in enumerate(names)]
    size = max([math.prod(s) for s, p in zip(shapes, pooled) if p], default=0)
    free: list = []
    owner: dict = {}
    outs = []
    for j, name in enumerate(names):
        if not pooled[j]:
            outs.append(None)
            continue
        buf = free.pop() if free else np.empty(size, np.float32)
        outs.append(buf[:math.prod(shapes[j])].reshape(shapes[j]))
        owner[name] = buf
        for done in [n for n, last in last_use.items() if last == j and n in owner]:
            free.append(owner.pop(done))
    cache[key] = outs
    return outs


def _compute_strip(layers, stage: Stage, chunk: Chunk, inputs, run_layer, cache=None,
                   fuse=False):
    outs = strip_buffers(layers, stage.layers, chunk.layer_rows, cache)
    have = {}
    for n in chunk.needs:
        have[n.tensor] = (np.ascontiguousarray(inputs[n], dtype=np.float32),
                          n.rows[0] if n.rows else 0)
    src = chunk.needs[0].tensor
    blocks = _stage_blocks(layers, stage, src, cache) if fuse else {}
    y, skip = None, 0
    for j, (name, (a, b)) in enumerate(zip(stage.layers, chunk.layer_rows)):
        if j < skip:
            continue
        x, x0 = have[src]
        blk = blocks.get(j)
        ran = None if blk is None else _run_block(
            blk, layers, chunk.layer_rows[j:j + len(blk.names)], x, x0,
            outs[j + len(blk.names) - 1], j + len(blk.names) == len(stage.layers), cache)
        if ran is not None:
            skip = j + len(blk.names)
            src = stage.layers[skip - 1]
            y, have[src] = ran[0], ran
            continue
        layer = layers[name]
        res = None
        if layer.residual:
            r, rr0 = have[layer.residual]
            res = r[a - rr0:b - rr0] if r.ndim == 3 else r
        y = strip_layer(layer, stage, chunk.index, x, x0, a, b, res, run_layer, outs[j])
        have[name] = (y, a)
        src = name
    return y


def _stage_blocks(layers, stage: Stage, src: str, cache) -> dict:
    """`fusion.find` over a stage's layers, kept in `cache`."""
    key = ("fused-blocks", stage.layers, src)
    found = cache.get(key) if cache is not None else None
    if found is None:
        found = fusion.find([layers[n] for n in stage.layers], src)
        if cache is not None:
            cache[key] = found
    return found


def _run_block(blk, layers, rows, x, x0: int, out, last: bool, cache):
    """A fused block's rows of a strip as (output, its first row), or None where it does
    not fuse (a strip of a stride-2 block, an input short of the rows it needs). A strip
    of a stride-1 block computes one row more on each side (`fusion.Block.rows`); the
    stage's last layer hands out only its own rows."""
    if _whole(blk, layers, rows, x, x0):
        return blk(x, None if out is None or np.may_share_memory(out, x) else out), 0
    a, b = rows[-1]
    window = blk.window(a, b)
    if window is None or x0 > window[0] or x0 + x.shape[0] < window[1]:
        return None
    key = ("fused-rows", blk.names, window)
    buf = None if last or cache is None else cache.get(key)
    y = blk.rows(x, x0, a, b, buf)
    if not last and cache is not None:
        cache[key] = y
    return (y[a - window[0]:b - window[0]], a) if last else (y, window[0])


def _whole(blk, layers, rows, x, x0: int) -> bool:
    """Whether a strip computes all rows of every layer of `blk` from all rows of its input
    (then the block runs as on a whole map, into the strip's pooled buffer)."""
    return x0 == 0 and x.shape[0] == blk.in_shape[0] and all(
        r == (0, layers[n].out_shape[0]) for n, r in zip(blk.names, rows))


def strip_layer(layer: Layer, stage: Stage, index: int, x, x0: int, a: int, b: int, res,
                run_layer, out=None) -> np.ndarray:
    """Rows [a, b) of one layer of strip `index` of a spatial stage, from input rows
    starting at row `x0` (a pool or linear layer of a summed stage: this strip's share)."""
    if layer.kind in ROWWISE:
        return run_layer(layer, x, res, 0, None, a, b, x0, layer.in_shape[0], out)
    if stage.reduce == "sum" and layer.kind == "gap":
        # this strip's share of the mean over all rows
        strip = np.ascontiguousarray(x[a - x0:b - x0])
        y = strip.sum(axis=(0, 1), dtype=np.float64) / (layer.in_shape[0] * layer.in_shape[1])
        return y.astype(np.float32)
    if stage.reduce == "sum" and layer.kind == "linear":
        y = x @ layer.weight
        if index == 0:
            y = y + layer.bias
        return np.ascontiguousarray(y, dtype=np.float32)
    return run_layer(layer, x, res)
