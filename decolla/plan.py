"""Partition plans: stages -> chunks -> the input slices each chunk needs -> how results merge.

A plan is pure data built from layer specs (``Model.layer_specs()``), so a requester
can plan without holding the weights. Workers compute a chunk with `compute_chunk`,
the requester merges a completed stage with `merge`.

Plans (``PLANS``):
  ``layer``         the paper's plan: one stage per layer, output channels split into K chunks.
  ``fused``         channel-wise layers (depthwise, global pool) fuse into their producer's
                    stage: the intermediate tensor never travels.
  ``block-gather``  the same stages as ``fused`` (expand + depthwise per channel chunk, then
                    the projection split by output channels over the gathered input).
  ``block``         expand + depthwise + projection in one stage per block: a chunk of the
                    expanded channels computes the projection's *partial sum* over its
                    channels; the requester adds the K partial sums (split='channel',
                    reduce='sum'). MobileNetV1's depthwise + pointwise likewise.
  ``spatial``       the high-resolution prefix (outputs taller than `spatial_until` rows,
                    default 28 rows at 224 px) as one stage of output-row strips with halos
                    carried through all its layers (split='spatial', merged along axis 0),
                    the rest as ``block`` stages; ``spatial:exchange=N`` makes that stage
                    an exchange stage swapping every N 3x3 layers (below).
  ``exchange``      the whole network as one stage of row strips that swap halo rows with
                    each other layer by layer (`Swap`, `decolla.exchange`) instead of
                    recomputing them (``exchange:every=N``: every N 3x3 layers, recomputing
                    in between); a strip sent alone (a retry) recomputes all its halos.
  ``auto``          chosen per segment by the cost model of `decolla.planner`.
  ``single``        the whole network as one chunk on one device (mobile-only through
                    the runtime: the image goes to one device, the logits come back).
A plan name may carry options: ``"auto:bandwidth_mbit=100,devices=3"``,
``"spatial:spatial_until=14"``. With ``auto:...,local=1`` the one-chunk stages the planner
keeps on one device are marked `Stage.local`: the requester computes them itself when it
can load the model (no bytes on the network), else sends them to a worker as usual.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from decolla.allocators import ChunkCost
from decolla.model import Layer

CHANNELWISE = ("dwconv3x3", "gap")   # output channel c depends only on input channel c
ROWWISE = ("conv3x3", "dwconv3x3", "pwconv")   # layers a row strip can compute
PLANS = ("layer", "fused", "block", "block-gather", "spatial", "exchange", "auto", "single")


class PlanError(ValueError):
    """A plan that cannot be built or a chunk that cannot be computed."""


@dataclass(frozen=True)
class Need:
    """A slice of a tensor a chunk needs: rows [r0, r1) (None: all) x channels [c0, c1) (None: all)."""
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
    exchange: bool = False        # spatial strips that swap halo rows (Chunk.swap) when run together

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


def _spec(layer) -> dict:
    return layer.spec() if isinstance(layer, Layer) else dict(layer)


def parse_plan_name(kind: str) -> tuple[str, dict]:
    """'auto:bandwidth_mbit=100,devices=3' -> ('auto', {'bandwidth_mbit': 100.0, 'devices': 3})."""
    name, _, rest = str(kind).partition(":")
    opts: dict = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise PlanError(f"plan option {item!r} is not KEY=VALUE")
        try:
            num = float(val)
            opts[key.strip()] = int(num) if num.is_integer() and "." not in val else num
        except ValueError:
            opts[key.strip()] = val.strip()
    return name, opts


# --------------------------------------------------------------------------- grouping

@dataclass
class Group:
    """Layers of one future stage: how it is split and into how many chunks."""
    layers: list[dict]
    split: str = "channel"        # 'channel' | 'spatial'
    k: int = 1
    psum: bool = False            # channel split whose last (pointwise) layer is a partial sum
    local: bool = False           # a one-chunk stage for the requester's own device
    exchange: int = 0             # spatial strips that swap halo rows every this many 3x3 layers (Swap)
    swap_at: tuple | None = None  # ... or exactly at the inputs of these layers (overrides)


def _residual_sources(specs: list[dict]) -> set[str]:
    return {s["residual"] for s in specs if s.get("residual")}


def channel_groups(specs: list[dict], kind: str, k: int) -> list[Group]:
    """Stages of the channel plans ('layer', 'fused', 'block-gather', 'block')."""
    groups: list[Group] = []
    sources = _residual_sources(specs)
    closed = True
    for s in specs:
        last = groups[-1].layers[-1] if groups else None
        free = last is not None and not closed and last["name"] not in sources
        if kind != "layer" and free and s["kind"] in CHANNELWISE:
            groups[-1].layers.append(s)
        elif (kind == "block" and free and last["kind"] == "dwconv3x3" and s["kind"] == "pwconv"
              and not (s["relu6"] and s.get("residual"))):
            groups[-1].layers.append(s)
            groups[-1].psum = True
            closed = True
            continue
        else:
            groups.append(Group([s], "channel", k))
        closed = False
    return groups


def clean_cuts(specs: list[dict]) -> list[int]:
    """Layer counts n such that layers [n:] read nothing produced before layer n-1 except
    its output (a stage boundary there hands over one tensor)."""
    cuts = []
    index = {s["name"]: i for i, s in enumerate(specs)}
    for n in range(1, len(specs) + 1):
        if all(index.get(s.get("residual"), n - 1) >= n - 1 for s in specs[n:]
               if s.get("residual")):
            cuts.append(n)
    return cuts


def spatial_prefix(specs: list[dict], until: int) -> int:
    """Number of leading layers the `spatial` plan strips: through the first clean cut whose
    output is at most `until` rows tall, choosing among the cuts at that height the one
    handing over the smallest tensor (a block output, not an expanded one)."""
    best, height = 0, None
    for n in clean_cuts(specs):
        if any(s["kind"] not in ROWWISE for s in specs[:n]):
            break
        shape = specs[n - 1]["out_shape"]
        if height is not None and shape[0] != height:
            break
        if height is None and shape[0] > until:
            best = n
            continue
        height = shape[0]
        size = int(np.prod(shape))
        if best == 0 or specs[best - 1]["out_shape"][0] != height or \
                size < int(np.prod(specs[best - 1]["out_shape"])):
            best = n
    return best


def _every(opts: dict, key: str, default: int) -> int:
    try:
        every = int(opts.get(key, default))
    except (TypeError, ValueError):
        every = -1
    if every < 0:
        raise PlanError(f"plan option {key} must be a whole number >= 0, got {opts.get(key)!r}")
    return every


def build_groups(specs: list[dict], k: int, kind: str, opts: dict) -> tuple[list[Group], dict]:
    if kind in ("layer", "fused", "block-gather", "block"):
        base = "fused" if kind == "block-gather" else kind
        return channel_groups(specs, base, k), {}
    if kind == "spatial":
        until = int(opts.get("spatial_until", max(1, round(specs[0]["in_shape"][0] / 8))))
        n = spatial_prefix(specs, until)
        head = [Group(specs[:n], "spatial", k, exchange=_every(opts, "exchange", 0))] if n else []
        return head + channel_groups(specs[n:], "block", k), {}
    if kind == "exchange":
        return [Group(specs, "spatial", k, exchange=_every(opts, "every", 1))], {}
    if kind == "single":
        return [Group(specs, "spatial", 1)], {}
    if kind == "auto":
        from decolla import planner
        return planner.plan_groups(specs, k, opts)
    raise PlanError(f"unknown plan {kind!r}; choose from {PLANS}")


# --------------------------------------------------------------------------- building

def build_plan(specs: Sequence, k: int, kind: str = "layer", input_shape=None,
               min_chunk_macs: int = 0, **options) -> Plan:
    """Plan for layer specs (dicts from `Model.layer_specs()` or Layer objects).

    `k` chunks per stage (capped by the channel/row count, and by `min_chunk_macs`
    when given, so tiny stages are not cut into pieces smaller than that). `kind` is
    a plan name from PLANS, optionally with options (see the module docstring);
    keyword `options` are merged over those.
    """
    name, opts = parse_plan_name(kind)
    opts.update(options)
    if name not in PLANS:
        raise PlanError(f"unknown plan {kind!r}; choose from {PLANS}")
    if k < 1:
        raise PlanError(f"k must be >= 1, got {k}")
    specs = [_spec(s) for s in specs]
    if not specs:
        raise PlanError("model has no layers")
    input_shape = tuple(input_shape or specs[0]["in_shape"])
    groups, notes = build_groups(specs, k, name, opts)
    shapes = {"input": input_shape} | {s["name"]: tuple(s["out_shape"]) for s in specs}
    stages: list[Stage] = []
    last_use: dict[str, int] = {}
    prev = "input"
    for si, g in enumerate(groups):
        k_eff = g.k
        if min_chunk_macs > 0:
            macs = sum(int(s["macs"]) for s in g.layers)
            k_eff = max(1, min(k_eff, macs // max(1, min_chunk_macs)))
        if g.split == "spatial":
            stage = _spatial_stage(si, g.layers, k_eff, prev, shapes, g.exchange, g.swap_at)
        else:
            stage = _channel_stage(si, g.layers, k_eff, prev, shapes, g.psum)
        if g.local and len(stage.chunks) == 1:
            stage = replace(stage, local=True)
        for c in stage.chunks:
            for n in c.needs:
                last_use[n.tensor] = si
        stages.append(stage)
        prev = stage.output
    return Plan(kind, input_shape, stages, last_use, notes)


def _nbytes(shape) -> int:
    return 4 * math.prod(int(v) for v in shape)


def _channel_stage(si, group, k, prev, shapes, psum) -> Stage:
    first = group[0]
    cout = first["out_shape"][-1]
    macs = sum(int(s["macs"]) for s in group)
    out_shape = tuple(group[-1]["out_shape"])
    chunks = []
    for ci, (c0, c1) in enumerate(split_bounds(cout, k)):
        frac = (c1 - c0) / cout
        needs = [Need(prev, (c0, c1) if first["kind"] in CHANNELWISE else None)]
        for j, s in enumerate(group):
            if not s.get("residual"):
                continue
            if psum and j == len(group) - 1:
                extra = Need(s["residual"], None) if ci == 0 else None   # chunk 0 adds it
            else:
                extra = Need(s["residual"], (c0, c1))
            if extra is not None and extra not in needs:
                needs.append(extra)
        bytes_in = sum(_nbytes(n.shape(shapes[n.tensor])) for n in needs)
        width = out_shape[-1] if psum else (c1 - c0)
        bytes_out = _nbytes(out_shape[:-1]) * width
        cost = ChunkCost(macs=int(round(macs * frac)), bytes_in=bytes_in, bytes_out=bytes_out)
        chunks.append(Chunk(si, ci, c0, c1, tuple(needs), cost))
    kind = first["kind"] if len(group) == 1 else "fused"
    return Stage(si, tuple(s["name"] for s in group), kind, "channel", out_shape, tuple(chunks),
                 reduce="sum" if psum else "concat",
                 relu6=bool(psum and group[-1]["relu6"]))


def split_tail(group: Sequence[dict]) -> tuple[list, list] | None:
    """(row-wise body, reducible tail) of a group a row-strip split can compute: the tail is
    empty, or a global pool followed by linear layers without ReLU6/residual (each strip's
    share is a partial sum). None when strips cannot compute the group."""
    n = len(group)
    while n and group[n - 1]["kind"] not in ROWWISE:
        n -= 1
    body, tail = list(group[:n]), list(group[n:])
    if any(s["kind"] not in ROWWISE for s in body):
        return None
    if tail and (tail[0]["kind"] != "gap" or any(
            s["kind"] != "linear" or s["relu6"] or s.get("residual") for s in tail[1:])):
        return None
    return body, tail


def _rows_needed(kind: str, stride: int, r0: int, r1: int, in_height: int) -> tuple[int, int]:
    """Input rows [lo, hi) output rows [r0, r1) read: `decolla.ops.input_rows_needed`
    without its argument checks (the planner calls it thousands of times)."""
    if kind == "pwconv":
        return r0, r1
    return max(0, r0 * stride - 1), min(in_height, (r1 - 1) * stride + 2)


def strip_rows(group: Sequence[dict], r0: int, r1: int, prev: str) -> tuple[list, dict]:
    """Rows each row-wise layer of a spatial group computes for final output rows [r0, r1)
    (rows of the pooled tensor when the group ends in a pool), and the rows it needs of
    every tensor produced outside the group."""
    body = [s for s in group if s["kind"] in ROWWISE]
    top = body[-1]["name"] if body else prev
    need: dict[str, tuple[int, int]] = {top: (r0, r1)}

    def want(name, lo, hi):
        if name in need:
            a, b = need[name]
            lo, hi = min(a, lo), max(b, hi)
        need[name] = (lo, hi)

    rows = []
    for j in range(len(body) - 1, -1, -1):
        s = body[j]
        a, b = need[s["name"]]
        rows.append((a, b))
        src = body[j - 1]["name"] if j else prev
        lo, hi = _rows_needed(s["kind"], s["stride"], a, b, s["in_shape"][0])
        want(src, lo, hi)
        if s.get("residual"):
            want(s["residual"], a, b)
    rows.reverse()
    rows += [(r0, r1)] * (len(group) - len(body))
    inside = {s["name"] for s in group}
    external = {t: r for t, r in need.items() if t not in inside}
    return rows, external


def _spatial_stage(si, group, k, prev, shapes, exchange: int = 0, swap_at=None) -> Stage:
    out_shape = tuple(group[-1]["out_shape"])
    parts = split_tail(group)
    if parts is None:                  # e.g. a classifier without its pool: one whole chunk
        k, body, tail = 1, list(group), []
    else:
        body, tail = parts
    in_rows = shapes[body[-1]["name"] if body else prev]
    height = in_rows[0]
    chunks = []
    for ci, (r0, r1) in enumerate(split_rows(height, k)):
        whole = (r0, r1) == (0, height)
        if parts is None:
            rows = [(0, s["out_shape"][0] if s["kind"] in ROWWISE else 1) for s in group]
            inside = {s["name"] for s in group}
            external = {prev: None} | {s["residual"]: None for s in group
                                       if s.get("residual") and s["residual"] not in inside}
        else:
            rows, external = strip_rows(group, r0, r1, prev)
        needs = []
        for t in [prev] + sorted(t for t in external if t != prev):
            r = external[t]
            full = r is None or len(shapes[t]) < 3 or (whole and tuple(r) == (0, shapes[t][0]))
            needs.append(Need(t, None, None if full else tuple(r)))
        macs = 0.0
        for s, (a, b) in zip(group, rows):
            h = s["out_shape"][0] if s["kind"] in ROWWISE else \
                (height if s["kind"] == "gap" else 0)
            macs += int(s["macs"]) * ((b - a) / h if h else 1.0)
        bytes_in = sum(_nbytes(n.shape(shapes[n.tensor])) for n in needs)
        if tail or len(out_shape) < 3:         # a partial sum, or a whole 1-D output
            bytes_out = _nbytes(out_shape)
        else:
            bytes_out = _nbytes(out_shape) * (r1 - r0) // height
        cost = ChunkCost(macs=int(round(macs)), bytes_in=bytes_in, bytes_out=bytes_out)
        chunks.append(Chunk(si, ci, 0, out_shape[-1], tuple(needs), cost,
                            rows=None if whole else (r0, r1), layer_rows=tuple(rows)))
    swaps = _swaps(group, len(chunks), prev, shapes, exchange, swap_at) \
        if (exchange or swap_at is not None) and parts else None
    if swaps:
        chunks = [replace(c, swap=w) for c, w in zip(chunks, swaps)]
    kind = group[0]["kind"] if len(group) == 1 else "fused"
    reduce = "sum" if tail and len(chunks) > 1 else "concat"
    return Stage(si, tuple(s["name"] for s in group), kind, "spatial", out_shape, tuple(chunks),
                 axis=0, reduce=reduce, exchange=bool(swaps))


def _swaps(group, k, prev, shapes, every: int = 1, at=None) -> list[Swap] | None:
    """Each strip's `Swap` for a spatial group cut into k strips; None when some layer has
    fewer than k rows (a strip would own none) or k < 2.

    A strip owns rows of every layer (`split_rows`). Where later layers want rows of a
    tensor the strip does not compute (a 3x3 layer's input window, a residual), either the
    strips swap them (a halo) or the strip computes them too (a pyramid, as `spatial`
    strips do): they swap once every `every` 3x3 layers (fewer, larger exchanges for
    devices that pay much per exchange). A pointwise layer that widens the channels always
    computes the rows the next layer needs, so the halo crosses at the narrow tensor.
    `at` (layer indices of the group) overrides `every`: swap exactly at the inputs of those
    layers (the `auto` planner's choice), recompute everywhere else."""
    body, tail = split_tail(group)
    heights = [s["out_shape"][0] for s in body]
    if k < 2 or not body or min(heights) < k:
        return None
    splits = [split_rows(h, k) for h in heights]
    own = [[split[i] for split in splits] for i in range(k)]
    rows = [list(o) for o in own]        # rows each strip computes of each layer
    wants = [list(o) for o in own]       # rows each strip must hold of each layer's output
    index = {s["name"]: j for j, s in enumerate(body)}
    swap_at, since = set(), 0            # layers whose input rows are swapped; 3x3 layers since

    def union(a, b):
        return (min(a[0], b[0]), max(a[1], b[1]))

    for j in range(len(body) - 1, -1, -1):
        s = body[j]
        if s.get("residual") in index:
            r = index[s["residual"]]
            for i in range(k):
                wants[i][r] = union(wants[i][r], rows[i][j])
        if j == 0:
            break
        since += s["kind"] != "pwconv"
        for i in range(k):
            window = _rows_needed(s["kind"], s["stride"], *rows[i][j], s["in_shape"][0])
            wants[i][j - 1] = union(wants[i][j - 1], window)
        if all(rows[i][j - 1][0] <= lo and hi <= rows[i][j - 1][1]
               for i, (lo, hi) in enumerate(w[j - 1] for w in wants)):
            continue
        if at is not None:
            swap = j in at
        else:
            # (a widening layer of a map only a few rows per strip tall: there the extra
            # rows would cost more to compute than the wider halo costs to send)
            p = body[j - 1]
            widening = p["kind"] == "pwconv" and not p.get("residual") and \
                p["out_shape"][-1] > p["in_shape"][-1] and p["out_shape"][0] >= 4 * k
            swap = not widening and since >= every
        if swap:
            swap_at.add(j)
            since = 0
        else:
            for i in range(k):
                rows[i][j - 1] = union(rows[i][j - 1], wants[i][j - 1])
    inside = {s["name"] for s in group}
    halo_in: list[list] = [[] for _ in range(k)]
    halo_out: list[list] = [[] for _ in range(k)]
    needs: list[list] = [[] for _ in range(k)]
    for j, s in enumerate(body):
        for i in range(k):
            if j == 0:
                needs[i].append((prev, _rows_needed(s["kind"], s["stride"], *rows[i][0],
                                                    s["in_shape"][0])))
            elif j in swap_at:
                lo, hi = wants[i][j - 1]
                a0, b0 = rows[i][j - 1]
                for m in range(k):
                    for x, y in ((lo, min(hi, a0)), (max(lo, b0), hi)):   # above, below its own
                        x, y = max(x, own[m][j - 1][0]), min(y, own[m][j - 1][1])
                        if m != i and x < y:
                            halo_in[i].append((j, m, x, y))
                            halo_out[m].append((j, i, x, y))
            r = s.get("residual")
            if r and r not in inside:
                needs[i].append((r, rows[i][j]))
    out = []
    for i in range(k):
        done = [tuple(r) for r in rows[i]] + [own[i][-1]] * len(tail)
        ns = []
        for t, r in needs[i]:
            whole = r == (0, shapes[t][0]) or len(shapes[t]) < 3
            n = Need(t, None, None if whole else r)
            if n not in ns:
                ns.append(n)
        macs = 0.0
        for s, (a, b) in zip(group, done):
            h = s["out_shape"][0] if s["kind"] in ROWWISE else \
                (heights[-1] if s["kind"] == "gap" else 0)
            macs += int(s["macs"]) * ((b - a) / h if h else 1.0)
        bytes_in = sum(_nbytes(n.shape(shapes[n.tensor])) for n in ns)
        out_shape = tuple(group[-1]["out_shape"])
        bytes_out = _nbytes(out_shape) if tail or len(out_shape) < 3 else \
            _nbytes(out_shape) * (done[-1][1] - done[-1][0]) // out_shape[0]
        halo = sum(_nbytes((hi - lo,) + tuple(body[j]["in_shape"][1:]))
                   for j, _, lo, hi in halo_in[i])
        out.append(Swap(tuple(done), tuple(ns), ChunkCost(int(round(macs)), bytes_in, bytes_out),
                        tuple(halo_in[i]), tuple(halo_out[i]), halo))
    return out


# --------------------------------------------------------------------------- computing

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
    between calls (worker-lifetime dict).
    """
    if run_layer is None:
        from decolla.ops import run_layer
    missing = [n for n in chunk.needs if n not in inputs]
    if missing:
        raise PlanError(f"chunk {chunk.key} is missing inputs {missing}")
    if stage.split == "spatial":
        return _compute_strip(layers, stage, chunk, inputs, run_layer, cache)
    if stage.split != "channel":
        raise PlanError(f"split {stage.split!r} is not implemented")
    x = np.ascontiguousarray(inputs[chunk.needs[0]], dtype=np.float32)
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
        first = chunk.index == 0
        key = (name, c0, c1, "psum" if psum else "slice", first and psum)
        sub = cache.get(key) if cache is not None else None
        if sub is None:
            sub = partial_layer(layer, c0, c1, first) if psum else slice_layer(layer, c0, c1)
            if cache is not None:
                cache[key] = sub
        res = _residual(sub, inputs, chunk, by_tensor, None if psum else (c0, c1))
        x = run_layer(sub, x, res, 0, None)
    return x


def _residual(layer, inputs, chunk, by_tensor, channels):
    if not layer.residual:
        return None
    need = Need(layer.residual, channels)
    if need not in inputs:
        need = by_tensor.get(layer.residual, chunk.needs[0])
    return np.ascontiguousarray(inputs[need], dtype=np.float32)


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


def _compute_strip(layers, stage: Stage, chunk: Chunk, inputs, run_layer, cache=None):
    outs = strip_buffers(layers, stage.layers, chunk.layer_rows, cache)
    have = {}
    for n in chunk.needs:
        have[n.tensor] = (np.ascontiguousarray(inputs[n], dtype=np.float32),
                          n.rows[0] if n.rows else 0)
    src = chunk.needs[0].tensor
    y = None
    for j, (name, (a, b)) in enumerate(zip(stage.layers, chunk.layer_rows)):
        layer = layers[name]
        x, x0 = have[src]
        res = None
        if layer.residual:
            r, rr0 = have[layer.residual]
            res = r[a - rr0:b - rr0] if r.ndim == 3 else r
        y = strip_layer(layer, stage, chunk.index, x, x0, a, b, res, run_layer, outs[j])
        have[name] = (y, a)
        src = name
    return y


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


def chunk_output_shape(stage: Stage, chunk: Chunk) -> tuple[int, ...]:
    """Shape a chunk's result must have."""
    if stage.reduce == "sum":
        return tuple(stage.out_shape)
    if stage.split == "spatial":
        if chunk.rows is None:
            return tuple(stage.out_shape)
        return (chunk.rows[1] - chunk.rows[0],) + tuple(stage.out_shape[1:])
    return tuple(stage.out_shape[:-1]) + (chunk.c1 - chunk.c0,)
