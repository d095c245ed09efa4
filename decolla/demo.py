"""`decolla demo` (and `make demo`): a local cluster, one device beside the paper's plan
and `auto`.

Starts a LocalCluster and sends the same image through `single` (the whole network on
one device), `layer` (the paper's per-layer split) and `auto` (the planner, the default
plan), plus the plan asked for if it is another. For each it prints the median latency,
the MB moved per inference, the speed-up over `single` and the error against
decolla.forward run in this process, so a first look shows the system at its best with
the paper as the reference. On one machine's loopback `auto` usually runs the request
whole on one device (splitting does not pay there): the table says how it split.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from decolla.api import Client, LocalCluster, Result
from decolla.forward import forward
from decolla.loader import load_model
from decolla.runtime.trace import merge_chrome

SHOWN = (("single", "one device"), ("layer", "the paper's plan"), ("auto", "the planner (default)"))


@dataclass
class PlanRow:
    """One plan's runs."""
    plan: str
    what: str
    results: list[Result] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    ok: bool = True

    @property
    def median_ms(self) -> float:
        return statistics.median(r.latency for r in self.results) * 1e3

    @property
    def mb(self) -> float:
        return statistics.median(r.trace.bytes_moved() for r in self.results) / 1e6


def plans_to_show(plan: str) -> list[tuple[str, str]]:
    """single, layer and auto, then `plan` when it is none of them."""
    shown = list(SHOWN)
    if plan not in dict(SHOWN):
        shown.append((plan, "asked for"))
    return shown


def _check(row: PlanRow, r: Result, want, tol: float) -> None:
    err = float(np.abs(r.logits - want).max() / max(1e-12, np.abs(want).max()))
    row.results.append(r)
    row.errors.append(err)
    row.ok &= err <= tol and r.top_k[0][0] == int(np.argmax(want))


def _measure(clients: list, rows: list[PlanRow], image, want, runs: int, warm: int,
             tol: float) -> None:
    """`runs` rounds of one request per plan, after `warm` per plan: links measured and
    every device's buffers allocated (the allocator may rotate over devices, and a
    device's first whole network runs about twice as long). Rounds, not one plan after
    the other, so that the machine's other load weighs on every plan alike."""
    for client in clients:
        for _ in range(warm):
            client.infer(image)
    for _ in range(runs):
        for client, row in zip(clients, rows):
            _check(row, client.infer(image), want, tol)


def table(rows: list[PlanRow]) -> str:
    """The side-by-side table."""
    base = next((r.median_ms for r in rows if r.plan == "single"), None)
    lines = [f"{'plan':12} {'what':22} {'stages x chunks':>15} {'median ms':>9} {'MB moved':>9} "
             f"{'speed-up':>8} {'rel.err':>8}  check"]
    for r in rows:
        speed = f"{base / r.median_ms:7.2f}x" if base else "       -"
        last = r.results[-1].stats
        split = f"{last.get('stages', '?')} x {last.get('k', '?')}"
        lines.append(f"{r.plan:12} {r.what:22} {split:>15} {r.median_ms:9.1f} {r.mb:9.2f} {speed} "
                     f"{max(r.errors):8.1e}  {'OK' if r.ok else 'MISMATCH'}")
    return "\n".join(lines)


def run(model: str, devices: int, runs: int, seed: int, plan: str = "auto",
        allocator: str = "average", k: int | None = None, wire_dtype: str = "float32",
        trace: str | None = None, out=print) -> bool:
    """Run the demo, printing as it goes; True when every plan's answers were right."""
    m = load_model(model)
    image = np.random.default_rng(seed).standard_normal(m.input_shape).astype(np.float32)
    want = forward(m, image, threads=1)
    t0 = time.perf_counter()
    forward(m, image, threads=1)
    out(f"one process, no cluster (decolla.forward, 1 thread): "
        f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
    tol = 1e-5 if wire_dtype == "float32" else 5e-2
    common = dict(allocator=allocator, wire_dtype=wire_dtype)
    out(f"starting {devices} local devices with {model} ...", flush=True)
    t0 = time.perf_counter()
    rows = []
    with LocalCluster(devices=devices, model=model, plan=plan, k=k, **common) as cluster:
        out(f"cluster ready in {time.perf_counter() - t0:.1f} s; leader {cluster.leader}; "
            f"{runs} rounds of one request per plan, after {devices} warm-up requests per plan",
            flush=True)
        with contextlib.ExitStack() as stack:
            clients = []
            for name, what in plans_to_show(plan):
                rows.append(PlanRow(name, what))
                clients.append(cluster.client if name == plan else stack.enter_context(
                    Client(cluster.leader, plan=name, k=1 if name == "single" else k,
                           bind=cluster.host, min_devices=devices, **common)))
            _measure(clients, rows, image, want, runs, devices, tol)
    out(table(rows))
    if trace:
        with open(trace, "w") as fh:
            json.dump(merge_chrome([r.trace for row in rows for r in row.results]), fh)
        out(f"Chrome trace of every run written to {trace} (open it in https://ui.perfetto.dev)")
    ok = all(r.ok for r in rows)
    out("demo", "passed" if ok else "FAILED")
    return ok
