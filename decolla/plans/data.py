"""Plan data: stages -> chunks -> the input slices each chunk needs, and what they cost.

A plan is pure data built from layer specs (``Model.layer_specs()``), so a requester can
plan without holding the weights; it travels to workers inside their work messages.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from decolla.cost import ChunkCost
from decolla.model import Layer

CHANNELWISE = ("dwconv3x3", "gap")   # output channel c depends only on input channel c
# layers a row strip can compute ('graph': an imported segment, halo from its `rf`)
ROWWISE = ("conv3x3", "dwconv3x3", "pwconv", "graph")
# imported graph segments: a slice of their output channels costs the whole segment, so a
# stage holding one is never cut by channels
WHOLE_CHANNELS = ("graph", "graph-global")


class PlanError(ValueError):
    """A plan that cannot be built or a chunk that cannot be computed."""


@dataclass(frozen=True)
class Need:
    """A slice of a tensor a chunk needs: rows [r0, r1) x channels [c0, c1) (None: all of them)."""
    tensor: str
    channels: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None

    def select(self, x: np.ndarray) -> np.ndarray:
        """The slice of tensor `x` this need names."""
        if self.rows is not None:
            x = x[self.rows[0]:self.rows[1]]
        if self.channels is not None:
            x = x[..., self.channels[0]:self.channels[1]]
        return x

    def shape(self, full_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(full_shape)
        if self.rows is not None:
            shape[0] = self.rows[1] - self.rows[0]
        if self.channels is not None:
            shape[-1] = self.channels[1] - self.channels[0]
        return tuple(shape)

    @property
    def key(self) -> tuple:
        """Identity of the slice (blob key on the wire)."""
        return (self.tensor, self.channels) if self.rows is None else \
            (self.tensor, self.channels, self.rows)


@dataclass(frozen=True)
class Chunk:
    """One unit of work: channels [c0, c1) of its stage (all rows), or, for a spatial
    stage, output rows `rows` (all channels) with `layer_rows` the rows each layer of
    the stage computes (halos included)."""
    stage: int
    index: int
    c0: int
    c1: int
    needs: tuple[Need, ...]
    cost: ChunkCost
    rows: tuple[int, int] | None = None
    layer_rows: tuple[tuple[int, int], ...] = ()
    swap: "Swap | None" = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.stage, self.index)

    def run_as(self, swapped: bool) -> tuple[tuple["Need", ...], ChunkCost]:
        """The input slices and cost of this chunk run beside the other strips of its
        exchange stage (`swapped`), or alone."""
        return (self.swap.needs, self.swap.cost) if swapped else (self.needs, self.cost)


@dataclass(frozen=True)
class Swap:
    """How a strip of an exchange stage runs beside the other strips: it computes the rows it
    owns of every layer, plus those it recomputes between two swaps (`own_rows`: the rows
    it computes of each layer), and gets the other halo rows of a layer's input from the
    strips owning them (`needs`, `cost`: its input slices and cost when run this way).
    `halo_in`: (layer j, from strip, lo, hi) rows of layer j's input it receives;
    `halo_out`: (layer j, to strip, lo, hi) rows of layer j's input it sends."""
    own_rows: tuple[tuple[int, int], ...]
    needs: tuple[Need, ...]
    cost: ChunkCost
    halo_in: tuple[tuple[int, int, int, int], ...]
    halo_out: tuple[tuple[int, int, int, int], ...]
    halo_bytes: int = 0           # fp32 bytes of the halos it receives


@dataclass(frozen=True)
class Stage:
    """A run of layers whose chunks are independent; results merge along `axis`
    (``reduce='concat'``) or are summed (``reduce='sum'``, then ReLU6 when `relu6`)."""
    index: int
    layers: tuple[str, ...]
    kind: str                     # layer kind, or 'fused'
    split: str                    # 'channel' | 'spatial'
    out_shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    axis: int = -1
    reduce: str = "concat"
    relu6: bool = False
    local: bool = False           # one chunk the requester may compute itself (no bytes moved)
    exchange: bool = False        # strips that swap halo rows (Chunk.swap) when run together

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
    notes: dict = field(default_factory=dict)                 # planner's explanation, if any

    @property
    def num_chunks(self) -> int:
        return sum(len(s.chunks) for s in self.stages)

    def bytes_moved(self, itemsize: int = 4) -> int:
        """Uncompressed bytes sent to and received from workers for one inference
        (one copy of every input slice per chunk), at `itemsize` bytes per value."""
        return sum(stage_bytes(s) for s in self.stages) * itemsize // 4


def stage_bytes(stage: Stage) -> int:
    """fp32 bytes in + out of all chunks of a stage (of an exchange stage: as its strips
    run together, the halos they swap included)."""
    halos = sum(c.swap.halo_bytes for c in stage.chunks) if stage.exchange else 0
    return halos + sum(cost.bytes_in + cost.bytes_out
                       for cost in (c.run_as(stage.exchange)[1] for c in stage.chunks))


def nbytes(shape) -> int:
    """fp32 bytes of a tensor of `shape`."""
    return 4 * math.prod(int(v) for v in shape)


def as_spec(layer) -> dict:
    """A layer spec dict from a `Layer` or a spec mapping (plans work on specs)."""
    return layer.spec() if isinstance(layer, Layer) else dict(layer)


def tensor_shapes(specs: Sequence[dict], input_shape=None) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of a network: its input and each layer's output."""
    shapes = {"input": tuple(input_shape or specs[0]["in_shape"])}
    return shapes | {s["name"]: tuple(s["out_shape"]) for s in specs}


def split_rows(n: int, k: int) -> list[tuple[int, int]]:
    """Split rows range(n) into min(k, n) contiguous strips, sizes differing by at most one,
    the larger ones at the edges: an inner strip has halos on two sides, an edge strip on
    one, so an inner strip's extra row would cost it more."""
    k = max(1, min(k, n))
    base, extra = divmod(n, k)
    order = [i for pair in zip(range(k), range(k - 1, -1, -1)) for i in pair][:k]
    sizes = [base] * k
    for i in dict.fromkeys(order[:extra]):
        sizes[i] += 1
    edges = list(itertools.accumulate(sizes, initial=0))
    return [(edges[i], edges[i + 1]) for i in range(k)]


def split_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """Split range(n) into min(k, n) contiguous near-equal parts."""
    k = max(1, min(k, n))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]
