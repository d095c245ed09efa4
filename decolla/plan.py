"""Partition plans: stages -> chunks -> the input slices each chunk needs -> how results merge.

A plan is pure data built from layer specs (``Model.layer_specs()``), so a requester
can plan without holding the weights. Workers compute a chunk with `compute_chunk`,
the requester merges a completed stage with `merge`.

Plans implemented:
  ``layer``  the paper's plan: one stage per layer, output channels split into K chunks.
  ``fused``  channel-wise layers (depthwise, global pool) fuse into their producer's
             stage: a chunk of output channels of the producer is exactly the input
             a chunk of the channel-wise layer needs, so the intermediate tensor never
             travels.
Only ``split='channel'`` is implemented; a spatial (row-strip) split would add a
`Need.rows` range with a halo and merge along axis 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from decolla.allocators import ChunkCost
from decolla.model import Layer

CHANNELWISE = ("dwconv3x3", "gap")   # output channel c depends only on input channel c
PLANS = ("layer", "fused")


class PlanError(ValueError):
    """A plan that cannot be built or a chunk that cannot be computed."""


@dataclass(frozen=True)
class Need:
    """A slice of a tensor a chunk needs: channels [c0, c1), or all when `channels` is None."""
    tensor: str
    channels: tuple[int, int] | None = None

    def select(self, x: np.ndarray) -> np.ndarray:
        """The slice of tensor `x` this need names."""
        if self.channels is None:
            return x
        c0, c1 = self.channels
        return x[..., c0:c1]

    def shape(self, full_shape: Sequence[int]) -> tuple[int, ...]:
        if self.channels is None:
            return tuple(full_shape)
        return tuple(full_shape[:-1]) + (self.channels[1] - self.channels[0],)


@dataclass(frozen=True)
class Chunk:
    """One unit of work: output channels [c0, c1) of every layer of its stage."""
    stage: int
    index: int
    c0: int
    c1: int
    needs: tuple[Need, ...]
    cost: ChunkCost

    @property
    def key(self) -> tuple[int, int]:
        return (self.stage, self.index)


@dataclass(frozen=True)
class Stage:
    """A run of layers whose chunks are independent; results merge along `axis`."""
    index: int
    layers: tuple[str, ...]
    kind: str                     # layer kind, or 'fused'
    split: str                    # 'channel'
    out_shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    axis: int = -1

    @property
    def output(self) -> str:
        """Name of the tensor the stage produces (its last layer's output)."""
        return self.layers[-1]


@dataclass
class Plan:
    """Stages in execution order, plus when each tensor can be forgotten."""
    name: str
    input_shape: tuple[int, ...]
    stages: list[Stage]
    last_use: dict[str, int] = field(default_factory=dict)   # tensor -> last stage needing it

    @property
    def num_chunks(self) -> int:
        return sum(len(s.chunks) for s in self.stages)

    def bytes_moved(self, itemsize: int = 4) -> int:
        """Uncompressed bytes sent to and received from workers for one inference."""
        total = 0
        for s in self.stages:
            for c in s.chunks:
                total += c.cost.bytes_in + c.cost.bytes_out
        return total * itemsize // 4


def split_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """Split range(n) into min(k, n) contiguous near-equal parts."""
    k = max(1, min(k, n))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def _spec(layer) -> dict:
    return layer.spec() if isinstance(layer, Layer) else dict(layer)


def build_plan(specs: Sequence, k: int, kind: str = "layer", input_shape=None,
               min_chunk_macs: int = 0) -> Plan:
    """Plan for layer specs (dicts from `Model.layer_specs()` or Layer objects).

    `k` chunks per stage (capped by the channel count, and by `min_chunk_macs`
    when given, so tiny stages are not cut into pieces smaller than that).
    """
    if kind not in PLANS:
        raise PlanError(f"unknown plan {kind!r}; choose from {PLANS}")
    if k < 1:
        raise PlanError(f"k must be >= 1, got {k}")
    specs = [_spec(s) for s in specs]
    if not specs:
        raise PlanError("model has no layers")
    input_shape = tuple(input_shape or specs[0]["in_shape"])
    groups: list[list[dict]] = []
    residual_sources = {s["residual"] for s in specs if s.get("residual")}
    for s in specs:
        fusable = (kind == "fused" and groups and s["kind"] in CHANNELWISE
                   and groups[-1][-1]["name"] not in residual_sources)
        if fusable:
            groups[-1].append(s)
        else:
            groups.append([s])
    stages: list[Stage] = []
    last_use: dict[str, int] = {}
    prev = "input"
    for si, group in enumerate(groups):
        first = group[0]
        cout = first["out_shape"][-1]
        macs = sum(int(s["macs"]) for s in group)
        k_eff = k if min_chunk_macs <= 0 else max(1, min(k, macs // max(1, min_chunk_macs)))
        chunks = []
        for ci, (c0, c1) in enumerate(split_bounds(cout, k_eff)):
            frac = (c1 - c0) / cout
            needs = [Need(prev, (c0, c1) if first["kind"] in CHANNELWISE else None)]
            for s in group:
                if s.get("residual"):
                    needs.append(Need(s["residual"], (c0, c1)))
            bytes_in = sum(4 * int(np.prod(n.shape(_shape_of(n.tensor, specs, input_shape))))
                           for n in needs)
            out_shape = group[-1]["out_shape"]
            bytes_out = 4 * int(np.prod(out_shape[:-1], dtype=np.int64)) * (c1 - c0)
            cost = ChunkCost(macs=int(round(macs * frac)), bytes_in=bytes_in, bytes_out=bytes_out)
            chunks.append(Chunk(si, ci, c0, c1, tuple(needs), cost))
            for n in needs:
                last_use[n.tensor] = si
        stage_kind = first["kind"] if len(group) == 1 else "fused"
        stages.append(Stage(si, tuple(s["name"] for s in group), stage_kind, "channel",
                            tuple(group[-1]["out_shape"]), tuple(chunks)))
        prev = group[-1]["name"]
    return Plan(kind, input_shape, stages, last_use)


def _shape_of(tensor: str, specs: list[dict], input_shape) -> tuple[int, ...]:
    if tensor == "input":
        return tuple(input_shape)
    for s in specs:
        if s["name"] == tensor:
            return tuple(s["out_shape"])
    raise PlanError(f"unknown tensor {tensor!r}")


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


def compute_chunk(layers: Mapping[str, Layer], stage: Stage, chunk: Chunk,
                  inputs: Mapping[Need, np.ndarray], run_layer=None,
                  cache: dict | None = None) -> np.ndarray:
    """Compute one chunk from the slices it needs; returns its part of the stage output.

    `run_layer` defaults to `decolla.ops.run_layer`; `cache` keeps sliced layers
    between calls (worker-lifetime dict).
    """
    if run_layer is None:
        from decolla.ops import run_layer
    if stage.split != "channel":
        raise PlanError(f"split {stage.split!r} is not implemented")
    missing = [n for n in chunk.needs if n not in inputs]
    if missing:
        raise PlanError(f"chunk {chunk.key} is missing inputs {missing}")
    x = np.ascontiguousarray(inputs[chunk.needs[0]], dtype=np.float32)
    c0, c1 = chunk.c0, chunk.c1
    for i, name in enumerate(stage.layers):
        layer = layers[name]
        residual = None
        if layer.residual:
            residual = np.ascontiguousarray(inputs[Need(layer.residual, (c0, c1))],
                                            dtype=np.float32)
        if i == 0 and layer.kind not in CHANNELWISE:
            x = run_layer(layer, x, residual, c0, c1)
        else:
            key = (name, c0, c1)
            sub = cache.get(key) if cache is not None else None
            if sub is None:
                sub = slice_layer(layer, c0, c1)
                if cache is not None:
                    cache[key] = sub
            x = run_layer(sub, x, residual, 0, c1 - c0)
    return x


def merge(stage: Stage, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate the chunk results of a stage in chunk order."""
    if len(parts) != len(stage.chunks):
        raise PlanError(f"stage {stage.index}: {len(parts)} parts for {len(stage.chunks)} chunks")
    out = np.concatenate(parts, axis=stage.axis)
    if tuple(out.shape) != tuple(stage.out_shape):
        raise PlanError(f"stage {stage.index}: merged shape {out.shape} != {stage.out_shape}")
    return out


def chunk_output_shape(stage: Stage, chunk: Chunk) -> tuple[int, ...]:
    """Shape a chunk's result must have."""
    return tuple(stage.out_shape[:-1]) + (chunk.c1 - chunk.c0,)
