"""Stage constructors: groups of layers -> stages of chunks, shared by the named builders
and the `auto` planner.

A `Group` says which layers form a stage and how to split it; `group_stage` turns it into
a `Stage` whose chunks name their input slices and costs: `channel_stage` (output
channels, or a partial sum over the expanded channels), `spatial_stage` (output-row
strips carrying their halos), and `swaps` (how the strips of an exchange stage trade halo
rows instead of recomputing them).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from decolla.cost import ChunkCost
from decolla.plans.data import (CHANNELWISE, ROWWISE, WHOLE_CHANNELS, Chunk, Need, Stage, Swap,
                                nbytes, split_bounds, split_rows)


@dataclass
class Group:
    """Layers of one future stage: how it is split and into how many chunks."""
    layers: list[dict]
    split: str = "channel"        # 'channel' | 'spatial'
    k: int = 1
    psum: bool = False            # channel split whose last (pointwise) layer is a partial sum
    local: bool = False           # a one-chunk stage for the requester's own device
    swap_every: int = 0           # strips swap halo rows every this many 3x3 layers (Swap)
    swap_at: tuple | None = None  # ... or exactly at the inputs of these layers (overrides)


def group_stage(g: Group, index: int, prev: str, shapes: dict, k: int | None = None) -> Stage:
    """The stage of group `g` (numbered `index`, reading tensor `prev`), in `k` chunks
    (default `g.k`)."""
    k = g.k if k is None else k
    if g.split == "spatial":
        return spatial_stage(index, g.layers, k, prev, shapes, g.swap_every, g.swap_at)
    return channel_stage(index, g.layers, k, prev, shapes, g.psum)


def channel_groups(specs: list[dict], kind: str, k: int) -> list[Group]:
    """Stages of the channel plans: 'layer' (one per layer), 'fused' (channel-wise layers
    join their producer) or 'block' (also a depthwise + pointwise pair as a partial sum)."""
    groups: list[Group] = []
    sources = {s["residual"] for s in specs if s.get("residual")}
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


def channel_stage(si: int, group: list[dict], k: int, prev: str, shapes: dict,
                  psum: bool) -> Stage:
    """Stage `si` of `group` split by the first layer's output channels into k chunks; with
    `psum` the last (pointwise) layer sums over them: each chunk returns a partial sum."""
    first = group[0]
    if any(s["kind"] in WHOLE_CHANNELS for s in group):
        k = 1
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
        bytes_in = sum(nbytes(n.shape(shapes[n.tensor])) for n in needs)
        width = out_shape[-1] if psum else (c1 - c0)
        bytes_out = nbytes(out_shape[:-1]) * width
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


def rows_needed(kind: str, stride: int, r0: int, r1: int, in_height: int,
                rf=None) -> tuple[int, int]:
    """Input rows [lo, hi) output rows [r0, r1) read: `decolla.ops.input_rows_needed`
    without its argument checks (the planner calls it thousands of times); a graph
    segment's from its receptive field `rf` (S, A, B): [r0*S - A, (r1-1)*S + B)."""
    if kind == "pwconv":
        return r0, r1
    if kind == "graph":       # (a border row may read only padding: an empty range)
        S, A, B = rf
        lo = min(in_height, max(0, r0 * S - A))
        return lo, lo if r1 <= r0 else max(lo, min(in_height, (r1 - 1) * S + B))
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
        lo, hi = rows_needed(s["kind"], s["stride"], a, b, s["in_shape"][0], s.get("rf"))
        want(src, lo, hi)
        if s.get("residual"):
            want(s["residual"], a, b)
    rows.reverse()
    rows += [(r0, r1)] * (len(group) - len(body))
    inside = {s["name"] for s in group}
    external = {t: r for t, r in need.items() if t not in inside}
    return rows, external


def strip_cost(group: Sequence[dict], rows: Sequence[tuple[int, int]], needs, shapes: dict,
               height: int, tail: bool) -> ChunkCost:
    """Cost of a strip computing `rows` of each layer of `group` from the slices `needs`;
    `height`: rows of the body's last output (a pool's share follows it), `tail`: the group
    ends in a summed pool (every strip returns a whole partial output)."""
    macs = 0.0
    for s, (a, b) in zip(group, rows):
        h = s["out_shape"][0] if s["kind"] in ROWWISE else (height if s["kind"] == "gap" else 0)
        macs += int(s["macs"]) * ((b - a) / h if h else 1.0)
    bytes_in = sum(nbytes(n.shape(shapes[n.tensor])) for n in needs)
    out_shape = tuple(group[-1]["out_shape"])
    a, b = rows[-1]
    bytes_out = nbytes(out_shape) if tail or len(out_shape) < 3 else \
        nbytes(out_shape) * (b - a) // height
    return ChunkCost(macs=int(round(macs)), bytes_in=bytes_in, bytes_out=bytes_out)


def spatial_stage(si: int, group: list[dict], k: int, prev: str, shapes: dict,
                  swap_every: int = 0, swap_at=None) -> Stage:
    """Stage `si` of `group` split into k output-row strips, each computing its halos; with
    `swap_every` (every N 3x3 layers) or `swap_at` (at these layers) the strips also know how
    to swap halo rows when they run together (`swaps`). A group strips cannot compute (a
    classifier without its pool) is one whole chunk."""
    parts = split_tail(group)
    if parts is None:
        k, body, tail = 1, list(group), []
    else:
        body, tail = parts
    height = shapes[body[-1]["name"] if body else prev][0]
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
        cost = strip_cost(group, rows, needs, shapes, height, bool(tail))
        chunks.append(Chunk(si, ci, 0, group[-1]["out_shape"][-1], tuple(needs), cost,
                            rows=None if whole else (r0, r1), layer_rows=tuple(rows)))
    strips = swaps(group, len(chunks), prev, shapes, swap_every, swap_at) \
        if (swap_every or swap_at is not None) and parts else None
    if strips:
        chunks = [replace(c, swap=w) for c, w in zip(chunks, strips)]
    kind = group[0]["kind"] if len(group) == 1 else "fused"
    reduce = "sum" if tail and len(chunks) > 1 else "concat"
    return Stage(si, tuple(s["name"] for s in group), kind, "spatial",
                 tuple(group[-1]["out_shape"]), tuple(chunks),
                 axis=0, reduce=reduce, exchange=bool(strips))


def swaps(group: list[dict], k: int, prev: str, shapes: dict, every: int = 1,
          at=None) -> list[Swap] | None:
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
    own, rows, wants, swap_at = _swap_rows(body, k, every, at)
    inside = {s["name"] for s in group}
    halo_in: list[list] = [[] for _ in range(k)]
    halo_out: list[list] = [[] for _ in range(k)]
    needs: list[list] = [[] for _ in range(k)]
    for j, s in enumerate(body):
        for i in range(k):
            if j == 0:
                needs[i].append((prev, rows_needed(s["kind"], s["stride"], *rows[i][0],
                                                   s["in_shape"][0], s.get("rf"))))
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
        ns: list[Need] = []
        for t, r in needs[i]:
            whole = r == (0, shapes[t][0]) or len(shapes[t]) < 3
            n = Need(t, None, None if whole else r)
            if n not in ns:
                ns.append(n)
        halo = sum(nbytes((hi - lo,) + tuple(body[j]["in_shape"][1:]))
                   for j, _, lo, hi in halo_in[i])
        cost = strip_cost(group, done, ns, shapes, heights[-1], bool(tail))
        out.append(Swap(tuple(done), tuple(ns), cost, tuple(halo_in[i]), tuple(halo_out[i]),
                        halo))
    return out


def _swap_rows(body: list[dict], k: int, every: int, at) -> tuple[list, list, list, set]:
    """For k strips over the row-wise `body`: the rows each owns of every layer, the rows it
    computes (owned plus recomputed halos), the rows it must hold of each layer's output,
    and the layers whose input rows the strips swap; walked from the last layer down."""
    splits = [split_rows(s["out_shape"][0], k) for s in body]
    own = [[split[i] for split in splits] for i in range(k)]
    rows = [list(o) for o in own]
    wants = [list(o) for o in own]
    index = {s["name"]: j for j, s in enumerate(body)}
    swap_at, since = set(), 0            # 3x3 layers since the last swap

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
            window = rows_needed(s["kind"], s["stride"], *rows[i][j], s["in_shape"][0],
                                 s.get("rf"))
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
    return own, rows, wants, swap_at
