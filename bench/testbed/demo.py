"""Demo: 3 devices + requester + edge; measure that shaping, quotas, load and faults really work."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from . import measure
from .core import Testbed
from .cpuwork import spin


def run_demo(prefix: str = "dcl", k: float = 8.0, bandwidth_mbit: float = 20.0, load: float = 0.3,
             out: Path | None = None) -> dict:
    """Bring the testbed up, measure, print a table, tear down; return the measured numbers."""
    results: dict = {}
    with Testbed(prefix=prefix) as tb:
        cal = tb.calibrate(functools.partial(spin, 600_000), k=k)
        devs = [tb.add_host(f"dev{i}", bandwidth_mbit=bandwidth_mbit, cpu_quota=cal.quota,
                            background_load=load) for i in (1, 2, 3)]
        req = tb.add_host("requester", role="requester")
        edge = tb.add_host("edge", role="edge")

        rows = []
        def row(what, emulated, measured):
            rows.append((what, emulated, measured))
            print(f"  {what:<34} {emulated:<22} {measured}", flush=True)

        print(f"\ncalibration: quota {cal.quota:.4f} cores -> probe {cal.achieved_slowdown:.1f}x slower "
              f"than one host core (target {k:g}x, {cal.rounds} rounds)\n")
        print(f"  {'measurement':<34} {'emulated':<22} measured")
        r = measure.throughput(devs[0], req)
        results["dev1_to_requester_mbit"] = r["mbit_per_s"]
        row("TCP dev1 -> requester", f"{bandwidth_mbit:g} Mbit/s cap", f"{r['mbit_per_s']:.2f} Mbit/s")
        r = measure.throughput(req, devs[1])
        results["requester_to_dev2_mbit"] = r["mbit_per_s"]
        row("TCP requester -> dev2 (download)", f"{bandwidth_mbit:g} Mbit/s cap", f"{r['mbit_per_s']:.2f} Mbit/s")
        tb.set_bandwidth("dev3", 5)
        r = measure.throughput(devs[2], edge)
        results["dev3_at_5mbit_to_edge_mbit"] = r["mbit_per_s"]
        row("TCP dev3 -> edge after set 5", "5 Mbit/s cap", f"{r['mbit_per_s']:.2f} Mbit/s")
        r = measure.throughput(edge, req, seconds=1.0)
        results["edge_to_requester_unshaped_mbit"] = r["mbit_per_s"]
        row("TCP edge -> requester", "unshaped", f"{r['mbit_per_s']:.0f} Mbit/s")

        # Reference = the loop's CPU time on the unthrottled edge: its time on a free host core.
        ref = measure.cpu_probe(edge, iters=600_000, repeats=3)["cpu_seconds"]
        loaded = measure.cpu_probe(devs[0], iters=600_000, repeats=2)["seconds"]
        tb.set_background_load("dev2", 0.0)
        idle = measure.cpu_probe(devs[1], iters=600_000, repeats=2)["seconds"]
        results.update(cpu_host_core_s=ref, cpu_dev_loaded_s=loaded, cpu_dev_idle_s=idle)
        row("CPU loop, dev2 idle vs host core", f"{k:g}x slower", f"{idle / ref:.1f}x  ({idle:.2f}s / {ref:.3f}s)")
        row("CPU loop, dev1 loaded vs host core", f"{k / (1 - load):.1f}x ({load:.0%} load)",
            f"{loaded / ref:.1f}x  ({loaded:.2f}s / {ref:.3f}s)")

        tb.link_down("dev3")
        ok_down, err = measure.can_connect(req, devs[2], timeout=1.0)
        tb.link_up("dev3")
        ok_up, _ = measure.can_connect(req, devs[2], timeout=3.0)
        results.update(connect_while_down=ok_down, connect_after_up=ok_up)
        row("connect requester -> dev3", "link down / up", f"{'ok' if ok_down else 'fails'} ({err}) / "
            f"{'ok' if ok_up else 'fails'}")

        tb.kill("dev1")
        for p in devs[0].procs:
            p.wait(timeout=5)
        results["dev1_processes_after_kill"] = left = len(devs[0].pids())
        row("kill -9 dev1", "all its processes die", f"{left} left")
        results["emulated"] = tb.describe()
    if out is not None:
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {out}")
    return results
