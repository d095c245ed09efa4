"""The baselines' routes: contiguous layer segments, what crosses a cut, split points,
running a segment, and the per-layer times on this host that splits are planned with.

A *route* is a list of `Segment(device, start, end)`: layers [start, end) of the model run on
`device`, in order; each segment hands its output (plus any tensor a later residual still
needs) to the next. mobile-only is a one-segment route, partition-offloading a device
segment followed by an edge segment, hierarchical one segment per device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from decolla import ops


class RouteError(ValueError):
    """A route or split that cannot be built."""


@dataclass(frozen=True)
class Segment:
    """Layers [start, end) computed on `device`."""
    device: str
    start: int
    end: int

    @property
    def layers(self) -> int:
        return self.end - self.start


def _spec(s) -> dict:
    return s.spec() if hasattr(s, "spec") else dict(s)


def crossing(specs: Sequence, cut: int) -> list[str]:
    """Tensors produced before layer `cut` and read at or after it (what a cut must carry).

    'input' names the image; a layer's output is named after the layer.
    """
    specs = [_spec(s) for s in specs]
    if not 0 <= cut <= len(specs):
        raise RouteError(f"cut {cut} outside 0..{len(specs)}")
    if cut == len(specs):
        return [specs[-1]["name"]]
    produced = ["input"] + [s["name"] for s in specs[:cut]]
    needed = {produced[-1]}                                  # the next layer's input
    needed |= {s["residual"] for s in specs[cut:] if s.get("residual")}
    return [t for t in produced if t in needed]


def cut_bytes(specs: Sequence, cut: int, itemsize: int = 4) -> int:
    """Uncompressed bytes that cross cut `cut` (see `crossing`)."""
    specs = [_spec(s) for s in specs]
    shapes = {"input": specs[0]["in_shape"], **{s["name"]: s["out_shape"] for s in specs}}
    return sum(itemsize * int(np.prod(shapes[t])) for t in crossing(specs, cut))


def split_balanced(weights: Sequence[float], n: int) -> list[tuple[int, int]]:
    """Cut a sequence of per-layer costs into `n` contiguous non-empty groups of near-equal sum.

    Cut i goes after the layer whose running sum is closest to i/n of the total (each group
    keeps at least one layer). Returns [(start, end), ...] covering range(len(weights)).
    """
    w = np.asarray(weights, dtype=float)
    if n < 1 or n > len(w):
        raise RouteError(f"cannot cut {len(w)} layers into {n} groups")
    if (w < 0).any():
        raise RouteError("layer costs must be >= 0")
    cum = np.cumsum(w)
    total = cum[-1] if cum[-1] > 0 else 1.0
    cuts = [0]
    for i in range(1, n):
        target = total * i / n
        j = min(int(np.searchsorted(cum, target, side="left")), len(w) - 1)
        if j > 0 and target - cum[j - 1] <= cum[j] - target:
            j -= 1
        c = j + 1
        c = max(c, cuts[-1] + 1)                         # non-empty
        c = min(c, len(w) - (n - i))                     # leave a layer for each later group
        cuts.append(c)
    cuts.append(len(w))
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def hierarchical_route(devices: Sequence[str], weights: Sequence[float], start: int = 0,
                       cut_sizes: Sequence[int] | None = None,
                       tolerance: float = 0.25) -> list[Segment]:
    """Layers [start, len(weights)) cut into contiguous groups, one per device, in device order.

    `weights` are per-layer costs of the whole model (e.g. profiled seconds); with fewer
    remaining layers than devices only the first devices are used. With `cut_sizes`
    (bytes crossing each cut 0..n) every cut moves to the narrowest cut whose running cost
    is within `tolerance` × (one group's share) of the balanced position, so a group
    boundary does not land on a wide early activation when a narrow one is close by.
    """
    if not devices:
        raise RouteError("no device to route through")
    rest = list(weights)[start:]
    if not rest:
        raise RouteError(f"no layers left after {start}")
    n = min(len(devices), len(rest))
    groups = split_balanced(rest, n)
    if cut_sizes is not None and n > 1:
        groups = _narrow_cuts(rest, groups, list(cut_sizes)[start:], tolerance)
    return [Segment(devices[i], start + a, start + b) for i, (a, b) in enumerate(groups)]


def _narrow_cuts(w: list[float], groups: list[tuple[int, int]], sizes: list[int],
                 tolerance: float) -> list[tuple[int, int]]:
    cum = np.concatenate([[0.0], np.cumsum(w)])          # cum[c] = cost of layers [0, c)
    share = cum[-1] / len(groups)
    cuts = [0]
    for i, (_, balanced) in enumerate(groups[:-1]):
        lo, hi = cuts[-1] + 1, len(w) - (len(groups) - 1 - i)
        window = [c for c in range(lo, hi + 1)
                  if abs(cum[c] - cum[balanced]) <= tolerance * share]
        # an earlier cut that moved right may have passed this one's balanced position
        best = min(window or [min(max(balanced, lo), hi)],
                   key=lambda c: (sizes[c], abs(c - balanced)))
        cuts.append(best)
    cuts.append(len(w))
    return [(cuts[i], cuts[i + 1]) for i in range(len(groups))]


@dataclass(frozen=True)
class SplitChoice:
    """Neurosurgeon's decision: layers [0, p) on the device, [p, n) on the edge."""
    p: int
    predicted_s: float
    device_s: float
    transfer_s: float
    edge_s: float
    bytes: int


def neurosurgeon_split(device_s: Sequence[float], edge_s: Sequence[float],
                       cut_sizes: Sequence[int], bandwidth_bps: float,
                       latency_s: float = 0.0) -> SplitChoice:
    """Split point p minimising device time of layers [0, p) + transfer of cut p + edge time of [p, n).

    device_s/edge_s: per-layer seconds on each side (profiles); cut_sizes[p]: bytes crossing
    cut p (len n + 1; cut n carries the logits back, which every split also pays from the edge
    side, so it is only used when p == n); bandwidth_bps: the device link in bits/s.
    Ties go to the larger p (keep work on the device, as Neurosurgeon prefers when equal).
    """
    d = np.asarray(device_s, dtype=float)
    e = np.asarray(edge_s, dtype=float)
    n = len(d)
    if len(e) != n or len(cut_sizes) != n + 1:
        raise RouteError("profiles must cover the same n layers and cut_sizes n + 1 cuts")
    if bandwidth_bps <= 0:
        raise RouteError("bandwidth must be > 0")
    dev_prefix = np.concatenate([[0.0], np.cumsum(d)])            # device time for [0, p)
    edge_suffix = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])  # edge time for [p, n)
    xfer = np.array([8.0 * b / bandwidth_bps + latency_s for b in cut_sizes])
    total = dev_prefix + xfer + edge_suffix
    p = int(n - np.argmin(total[::-1]))                           # last index of the minimum
    return SplitChoice(p, float(total[p]), float(dev_prefix[p]), float(xfer[p]),
                       float(edge_suffix[p]), int(cut_sizes[p]))


def partition_route(device: str, edge: str, p: int, n: int) -> list[Segment]:
    """Route for a split at p: device runs [0, p), edge runs [p, n) (empty parts dropped)."""
    if not 0 <= p <= n:
        raise RouteError(f"split {p} outside 0..{n}")
    route = []
    if p > 0:
        route.append(Segment(device, 0, p))
    if p < n:
        route.append(Segment(edge, p, n))
    return route


def run_segment(layers: Sequence, tensors: Mapping[str, np.ndarray], start: int, end: int,
                run_layer=None) -> dict[str, np.ndarray]:
    """Compute layers [start, end) from `tensors` (those crossing cut `start`).

    Returns the tensors crossing cut `end` (for the last segment: the logits under the last
    layer's name). `layers` are decolla.model.Layer objects of the whole model.
    """
    run_layer = run_layer or ops.run_layer
    specs = [l.spec() for l in layers]
    env = dict(tensors)
    prev = "input" if start == 0 else layers[start - 1].name
    for i in range(start, end):
        layer = layers[i]
        res = env[layer.residual] if layer.residual else None
        env[layer.name] = run_layer(layer, env[prev], res)
        prev = layer.name
    return {t: env[t] for t in crossing(specs, end)}


def profile_layers(layers, repeats: int = 2, min_total_s: float = 0.3,
                   max_passes: int = 20, run_layer=None) -> list[float]:
    """Seconds per layer on this host, as the host experiences them on average.

    Every layer is timed inside whole passes over the model (at least `repeats` passes, and
    as many as fit `min_total_s`, at most `max_passes`), and its times are averaged. Under a
    CPU quota a layer timed on its own runs as a burst at full speed when it is short and is
    throttled when it is long, which skews the shares towards the long layers.
    """
    run_layer = run_layer or ops.run_layer
    index = {l.name: i for i, l in enumerate(layers)}
    total = np.zeros(len(layers))

    def timed(layer, x, res):
        t0 = time.perf_counter()
        y = run_layer(layer, x, res)
        total[index[layer.name]] += time.perf_counter() - t0
        return y

    image = np.random.default_rng(0).random(layers[0].in_shape, dtype=np.float32)
    passes, t0 = 0, time.perf_counter()
    while passes < max(1, repeats) or (passes < max_passes
                                       and time.perf_counter() - t0 < min_total_s):
        run_segment(layers, {"input": image}, 0, len(layers), timed)
        passes += 1
    return list(total / passes)
