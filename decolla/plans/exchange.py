"""Strips of an exchange stage: each computes its own rows of every layer (and those it
recomputes between swaps) and gets the other halo rows of a layer's input from the strips
that own them (`decolla.plans.data.Swap`).

Why: a strip that recomputes its halos (the `spatial` plan) grows a pyramid of extra rows
through every 3x3 layer; over a whole network the strips of 3 devices sum to 1.4-1.8x the
network's MACs and the critical path stays long. Swapping rows at every block keeps the
work at ≈ 1.1x, at the price of one small message per neighbour and swap, and a wait for
the slowest neighbour at each swap.

`StripExchange` is one strip's state; `run_lockstep` advances the strips one device holds,
layer by layer, with the caller's `send` and `take` moving halo rows (in memory in
`decolla.plans.run`, over the data plane between workers).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

import numpy as np

from decolla import emulation, ops
from decolla.plans.compute import strip_buffers, strip_layer
from decolla.plans.data import Chunk, Need, PlanError, Stage


class HaloMissing(RuntimeError):
    """A halo a strip waits for did not come in time (its sender is slow or gone)."""


class StripExchange:
    """One strip of an exchange stage, computed one layer per `step`."""

    def __init__(self, layers: Mapping, stage: Stage, chunk: Chunk,
                 inputs: Mapping[Need, np.ndarray], run_layer=None, cache=None):
        if chunk.swap is None:
            raise PlanError(f"chunk {chunk.key} is not a strip of an exchange stage")
        needs = chunk.run_as(True)[0]
        missing = [n for n in needs if n not in inputs]
        if missing:
            raise PlanError(f"chunk {chunk.key} is missing inputs {missing}")
        self.layers, self.stage, self.chunk = layers, stage, chunk
        self.run_layer = ops.run_layer if run_layer is None else run_layer
        self.outs = strip_buffers(layers, stage.layers, chunk.swap.own_rows, cache)
        self.have = {n.tensor: (np.ascontiguousarray(inputs[n], dtype=np.float32),
                                n.rows[0] if n.rows else 0) for n in needs}
        self.src = needs[0].tensor
        self.j = 0
        self.y = None

    @property
    def done(self) -> bool:
        return self.j == len(self.stage.layers)

    def outgoing(self) -> list[tuple[int, np.ndarray]]:
        """(strip, rows) this strip owns of the next layer's input and that strip needs."""
        x, x0 = self.have[self.src]
        return [(to, x[lo - x0:hi - x0]) for j, to, lo, hi in self.chunk.swap.halo_out
                if j == self.j]

    def incoming(self) -> list[int]:
        """Strips whose rows the next layer needs."""
        return [m for j, m, _, _ in self.chunk.swap.halo_in if j == self.j]

    def step(self, halos: Mapping[int, np.ndarray]) -> None:
        """Compute the next layer, given the halo rows `incoming()` named."""
        j, swap = self.j, self.chunk.swap
        name = self.stage.layers[j]
        layer = self.layers[name]
        a, b = swap.own_rows[j]
        x, x0 = self.have[self.src]
        parts = [(x0, x)] + [(lo, np.asarray(halos[m], np.float32))
                             for jj, m, lo, _ in swap.halo_in if jj == j]
        if len(parts) > 1:
            parts.sort(key=lambda p: p[0])
            x0, x = parts[0][0], np.concatenate([p[1] for p in parts], axis=0)
            # later layers may add these rows as a residual too
            self.have[self.src] = (x, x0)
        res = None
        if layer.residual:
            r, r0 = self.have[layer.residual]
            res = r[a - r0:b - r0] if r.ndim == 3 else r
        self.y = strip_layer(layer, self.stage, self.chunk.index, x, x0, a, b, res,
                             self.run_layer, self.outs[j])
        self.have[name] = (self.y, a)
        self.src = name
        self.j += 1

    def result(self) -> np.ndarray:
        if not self.done:
            raise PlanError(f"chunk {self.chunk.key} stopped at layer {self.j}")
        return self.y


def run_lockstep(strips: Mapping[int, StripExchange],
                 send: Callable[[int, int, int, np.ndarray], None],
                 take: Callable[[int, int, int], np.ndarray]) -> dict[int, np.ndarray]:
    """Advance `strips` (chunk index -> strip, all of one stage) layer by layer to the end.
    Before each layer every strip hands out its halo rows with `send(from, to, layer, rows)`,
    then each computes the layer with the rows `take(from, to, layer)` returns; sending all
    before taking any is what keeps strips on one device, and devices, from waiting on each
    other in a circle. Returns chunk index -> result."""
    n = len(next(iter(strips.values())).stage.layers) if strips else 0
    for j in range(n):
        for i, s in strips.items():
            for to, rows in s.outgoing():
                send(i, to, j, rows)
        for i, s in strips.items():
            s.step({m: take(m, i, j) for m in s.incoming()})
    return {i: s.result() for i, s in strips.items()}


class HaloBox:
    """Halos that arrived for this device, by (request, stage, src, dst, layer); `take` waits
    for one. Filled from the data plane's reader threads; halos nobody took are dropped
    after `keep_s` (their strip failed or ran elsewhere)."""

    def __init__(self, keep_s: float = 30.0):
        self.keep_s = keep_s
        self._cv = threading.Condition()
        self._items: dict = {}

    def put(self, halo) -> None:
        now = time.monotonic()
        with self._cv:
            self._items[halo.key] = (halo.blob, now)
            if len(self._items) > 256:
                self._items = {k: v for k, v in self._items.items() if now - v[1] < self.keep_s}
            self._cv.notify_all()

    def take(self, key: tuple, deadline: float) -> bytes:
        """The blob of halo `key`, waiting until `deadline` (time.monotonic) at most."""
        emulation.settle()     # an emulated slow device reaches this wait only after its work
        with self._cv:
            while key not in self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HaloMissing(f"no halo from strip {key[2]} for layer {key[4]}")
                self._cv.wait(left)
            return self._items.pop(key)[0]

    def forget(self, request: str) -> None:
        with self._cv:
            self._items = {k: v for k, v in self._items.items() if k[0] != request}
