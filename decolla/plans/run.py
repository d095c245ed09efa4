"""Run a plan in one process exactly as the cluster would, wire codec included.

Every chunk's input slices are encoded and decoded with the wire codec, the chunk is
computed, its result encoded and decoded, and the stage merged: the numbers equal a
cluster run's, without actors or sockets. Used to measure wire bytes and the accuracy
of fp16/int8 encodings, and by tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from decolla.model import Model
from decolla.plans.compute import chunk_inputs, compute_chunk, merge
from decolla.plans.data import Plan
from decolla.plans.exchange import StripExchange, run_lockstep
from decolla.runtime import wire


@dataclass
class RunStats:
    """Encoded bytes of one in-process inference."""
    bytes_in: int = 0            # requester -> workers, one copy per chunk
    bytes_out: int = 0           # workers -> requester
    halo: int = 0                # worker -> worker (exchange stages)
    per_stage: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.bytes_in + self.bytes_out + self.halo


def run_plan(model: Model, plan: Plan, image: np.ndarray, wire_dtype: str | None = "float32",
             compress: bool = True, keep: bool = False, cache: dict | None = None,
             swap: bool = True):
    """Logits of `image` through `plan` (wire_dtype None: no codec at all), and RunStats;
    with `keep`, also every stage output tensor. Exchange stages swap halos between their
    strips unless `swap` is False (then every strip recomputes its own, as a retry does)."""
    layers = {l.name: l for l in model.layers}
    tensors = {"input": np.asarray(image, np.float32)}
    stats = RunStats()
    cache = {} if cache is None else cache

    def wire_pass(x):
        if wire_dtype is None:
            return np.ascontiguousarray(x, np.float32), 0
        blob = wire.encode(x, wire_dtype, compress)
        return wire.decode(blob), len(blob)

    for stage in plan.stages:
        parts, s_in, s_out = [], 0, 0
        swapped = stage.exchange and swap
        strips, halos = {}, {}
        for c in stage.chunks:
            inputs = chunk_inputs(c, tensors, swapped)
            for n, x in inputs.items():
                inputs[n], nb = wire_pass(x)
                s_in += nb
            if swapped:
                strips[c.index] = StripExchange(layers, stage, c, inputs, cache=cache)
            else:
                parts.append(compute_chunk(layers, stage, c, inputs, cache=cache))
        if swapped:
            def send(i, to, j, rows):
                nonlocal s_halo
                halos[(i, to, j)], nb = wire_pass(rows)
                s_halo += nb
            s_halo = 0
            done = run_lockstep(strips, send, lambda i, to, j: halos.pop((i, to, j)))
            parts = [done[c.index] for c in stage.chunks]
            stats.halo += s_halo
        for i, y in enumerate(parts):
            parts[i], nb = wire_pass(y)
            s_out += nb
        tensors[stage.output] = merge(stage, parts)
        stats.bytes_in += s_in
        stats.bytes_out += s_out
        stats.per_stage.append((stage.index, s_in, s_out))
        if not keep:
            for t in [t for t in tensors if plan.last_use.get(t, -1) <= stage.index
                      and t != stage.output]:
                del tensors[t]
    logits = tensors[plan.stages[-1].output]
    return (logits, stats, tensors) if keep else (logits, stats)
