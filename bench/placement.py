"""How the testbed's CPU placement of the emulated devices changes `single` and `auto`.

    sudo .venv/bin/python -m bench.placement [--bandwidth 1000] [--rounds 5]

One testbed cluster (bench.plans_cluster: 3 calibrated Pi-class devices, leader, requester);
each round switches the placement (`DECOLLA_TESTBED_PIN`: pack, spread, none; see
bench/testbed/README.md) on the running hosts, then runs 4 `single` and 4 `auto` requests
(`auto` told the bandwidth and the calibrated speed). Placements take turns, so the shared
machine's drift hits them alike. Per placement: median latency of each plan and their
ratio. Writes bench/results/placement.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.plans_cluster import ask, plans_cluster
from bench.testbed import cgroup

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
MODES = ("pack", "spread", "none")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bandwidth", type=float, default=1000.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=4, help="requests per plan per round")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    lat: dict = {m: {"single": [], "auto": []} for m in MODES}
    doc = {"bandwidth_mbit": args.bandwidth, "rounds": args.rounds, "block": args.block,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "latency_ms": lat}
    with plans_cluster("dcpp", "mobilenet_v2:seed=0", 8.0, args.bandwidth,
                       "bench.plans_testbed", []) as pc:
        doc["calibration"] = pc.calibration.as_dict()
        auto = (f"auto:bandwidth_mbit={args.bandwidth:g},shared_link=0,gmacs={pc.gmacs:.2f},"
                "overhead_ms=1")
        try:
            for _ in range(args.rounds):
                for mode in MODES:
                    os.environ[cgroup.PIN_ENV] = mode
                    pc.tb._place()
                    for name, plan in (("single", "single"), ("auto", auto)):
                        rep = ask(pc.agent, 600, cmd="run", plan=plan, repeats=args.block, cap_s=60)
                        if not rep.get("ok"):
                            raise RuntimeError(rep.get("error"))
                        lat[mode][name] += [r["latency_s"] * 1e3 for r in rep["result"]]
        finally:
            os.environ[cgroup.PIN_ENV] = "pack"
            doc["emulated"] = pc.tb.describe()
    lines = [f"# Testbed CPU placement: `single` and `auto` at {args.bandwidth:g} Mb/s", "",
             f"One cluster, placements taking turns ({args.rounds} rounds x {args.block} requests "
             f"per plan); device quota {doc['calibration']['quota']:.3f} core; started "
             f"{doc['started']}. Medians.", "",
             "| placement | single ms | auto ms | auto vs single |", "|---|---|---|---|"]
    for mode in MODES:
        s, a = np.median(lat[mode]["single"]), np.median(lat[mode]["auto"])
        lines.append(f"| {mode} | {s:.1f} | {a:.1f} | {s / a:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "placement.json").write_text(json.dumps(doc, indent=1, default=str))
    (args.out / "placement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
