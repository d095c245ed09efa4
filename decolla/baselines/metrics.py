"""Device busy / idle / waiting time and utilisation variance, from traces of any method.

A trace is a decolla.runtime.trace.Trace (the runtime's, or a baseline's: one record per hop). Only
records with worker-side `start`/`end` count as computation; worker and requester clocks are
the same machine's here (the testbed), otherwise `ChunkRecord.offset()` would be needed.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def busy_seconds(traces: Iterable, devices: Sequence[str] | None = None) -> dict[str, float]:
    """Seconds each device spent computing (union of its compute intervals) over `traces`."""
    spans: dict[str, list] = {d: [] for d in devices or ()}
    for t in traces:
        for r in t.records:
            if r.start is not None and r.end is not None and r.end >= r.start:
                spans.setdefault(r.device, []).append((r.start, r.end))
    return {d: _union(iv) for d, iv in spans.items()}


def waiting(trace, devices: Sequence[str], exclude_s: float = 0.0) -> dict[str, float]:
    """Per device: seconds of the inference it was not computing (idle, waiting for input).

    Devices that took part (computed something) only; the window is the whole inference
    minus `exclude_s` (e.g. the delivery of the image, which the paper's latency excludes).
    """
    window = trace.finished - trace.started - exclude_s
    busy = busy_seconds([trace], devices)
    return {d: max(0.0, window - b) for d, b in busy.items() if b > 0}


def utilisation(traces: Sequence, devices: Sequence[str], window_s: float) -> dict[str, float]:
    """Fraction of `window_s` each device spent computing."""
    busy = busy_seconds(traces, devices)
    return {d: busy.get(d, 0.0) / window_s if window_s > 0 else 0.0 for d in devices}


def normalized_variance(util: Sequence[float]) -> float:
    """Variance of utilisations across devices over its maximum for that mean: 0 = perfectly
    balanced, 1 = all work on one device (squared coefficient of variation / (n - 1))."""
    u = np.asarray(list(util), dtype=float)
    if len(u) < 2 or u.mean() <= 0:
        return 0.0
    return float(u.var() / u.mean() ** 2 / (len(u) - 1))
