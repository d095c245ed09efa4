"""How much compute this device offers: the start-up speed check and the host's free CPU.

The speed check must see a CPU quota: under a CFS quota a burst shorter than one period runs
at full host speed, so the check spans several periods of the quota on this process's cgroups.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from decolla.model import Model
from decolla.plans import build_plan
from decolla.plans.compute import compute_chunk

UNKNOWN_QUOTA_WINDOW_S = 0.3    # 3 periods of the kernel's default 100 ms CFS period


class FreeCpuMeter:
    """Free CPU fraction of the host between two calls (from /proc/stat)."""

    def __init__(self):
        self.prev = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as fh:
                vals = [int(v) for v in fh.readline().split()[1:]]
            return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals)
        except (OSError, ValueError, IndexError):
            return None

    def available(self) -> float:
        cur = self._read()
        if cur is None or self.prev is None:
            load = os.getloadavg()[0] / max(1, os.cpu_count() or 1)
            return float(min(1.0, max(0.0, 1.0 - load)))
        (idle0, tot0), (idle1, tot1) = self.prev, cur
        self.prev = cur
        return float((idle1 - idle0) / (tot1 - tot0)) if tot1 > tot0 else 1.0


def _cpu_cgroups(cgroup_root: str, proc_cgroup: str) -> list[tuple[str, bool, list[str]]]:
    """(hierarchy dir, is v2, path parts) of this process's CPU cgroups, from /proc/self/cgroup."""
    try:
        with open(proc_cgroup) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        parts = [p for p in path.split("/") if p]
        if controllers == "":
            out.append((cgroup_root, True, parts))
        elif "cpu" in controllers.split(","):
            out.append((os.path.join(cgroup_root, controllers), False, parts))
    return out


def _quota_period(d: str, v2: bool) -> float | None:
    """The CFS period (s) of the quota set on cgroup dir `d`; None when unlimited.
    Raises OSError when the directory cannot be read."""
    def read(name: str) -> str:
        with open(os.path.join(d, name)) as fh:
            return fh.read().strip()
    if v2:
        quota, period = read("cpu.max").split()
        return None if quota == "max" else int(period) / 1e6
    quota, period = read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")
    return None if quota.startswith("-") else int(period) / 1e6


def cfs_period_s(cgroup_root: str = "/sys/fs/cgroup",
                 proc_cgroup: str = "/proc/self/cgroup") -> tuple[float | None, bool]:
    """(longest CFS period in s of a CPU quota on this process's cgroup or its ancestors, or
    None; whether some cgroup of ours could not be read, e.g. under `ip netns exec`, which
    mounts a fresh /sys without the cgroup hierarchies)."""
    periods, unreadable = [], False
    for base, v2, parts in _cpu_cgroups(cgroup_root, proc_cgroup):
        for depth in range(len(parts), -1, -1):
            try:
                period = _quota_period(os.path.join(base, *parts[:depth]), v2)
            except (OSError, ValueError):
                unreadable = unreadable or depth > 0
                continue
            if period:
                periods.append(period)
    return (max(periods) if periods else None), unreadable


def calibration_window(min_s: float = 0.05, periods: int = 5, max_s: float = 2.0) -> float:
    """Seconds of wall time the start-up speed check must span: at least `periods` CFS
    periods (a fixed 0.3 s when our cgroup exists but cannot be read).
    DECOLLA_SPEED_CHECK_S overrides."""
    env = os.environ.get("DECOLLA_SPEED_CHECK_S")
    if env:
        return float(env)
    period, unreadable = cfs_period_s()
    if period:
        return min(max_s, max(min_s, periods * period))
    return UNKNOWN_QUOTA_WINDOW_S if unreadable else min_s


def measure_speed(run, macs: float, window_s: float, min_runs: int = 3) -> float:
    """MAC/s of `run()` (doing `macs` MACs) as total work over total wall time across at least
    `window_s` seconds and `min_runs` runs, after one warm-up run. Averaging (not the
    fastest run) is what makes CPU-quota throttling visible."""
    run()
    n, t0 = 0, time.perf_counter()
    while True:
        run()
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= min_runs and elapsed >= window_s:
            return n * macs / max(elapsed, 1e-9)


def calibrate(model: Model) -> float:
    """MAC/s of this device on a representative chunk of `model` (the heaviest pointwise
    layer, 1/6 of its channels)."""
    pw = [l for l in model.layers if l.kind == "pwconv"] or model.layers
    layer = dataclasses.replace(max(pw, key=lambda l: l.macs), residual=None)
    p = build_plan([layer.spec()], 6)
    stage, chunk = p.stages[0], p.stages[0].chunks[0]
    x = np.random.default_rng(0).random(layer.in_shape, dtype=np.float32)
    inputs = {n: (n.select(x) if n.tensor == "input" else
                  np.zeros(n.shape(layer.out_shape), np.float32)) for n in chunk.needs}
    cache: dict = {}     # as real chunks run: sliced (and packed) weights kept
    return measure_speed(lambda: compute_chunk({layer.name: layer}, stage, chunk, inputs,
                                               cache=cache),
                         chunk.cost.macs, calibration_window())
