"""What following a request live costs: latency with and without `on_event`.

    python -m bench.events [--model mobilenet_v2:seed=0] [--plans layer,auto] [--repeats 10]

One LocalCluster (1 thread per device); per plan, requests alternate between plain and
followed (`Client.infer(on_event=...)`, the gateway's live view), so both see the same
load. Reports median latency of each, their ratio (target: at most 1.05), the events a
request produced and the events' share of the trace span. Every result is checked
against the single-process forward. Writes bench/results/events.json and .md.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.report import write_json_md

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def run(model_spec: str, plans: list[str], repeats: int, devices: int) -> dict:
    from decolla import forward as fwd
    from decolla.api import Client, LocalCluster
    from decolla.loader import load_model

    model = load_model(model_spec)
    image = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    want = fwd.forward(model, image, threads=1)
    rows = []
    with LocalCluster(devices=devices, model=model_spec) as cluster:
        for plan in plans:
            with Client(cluster.leader, plan=plan, bind=cluster.host) as client:
                client.infer(image)                       # plan built, links measured
                plain, followed, n_events = [], [], []
                for _ in range(repeats):
                    r = client.infer(image)
                    plain.append(r.latency)
                    events: list = []
                    f = client.infer(image, on_event=events.append)
                    followed.append(f.latency)
                    n_events.append(len(events))
                    for res in (r, f):
                        err = float(np.abs(res.logits - want).max() / np.abs(want).max())
                        if err > 1e-4:
                            raise AssertionError(f"{plan}: rel. error {err:.1e}")
                p, q = float(np.median(plain)), float(np.median(followed))
                rows.append({"plan": plan, "devices": devices, "repeats": repeats,
                             "plain_ms": p * 1e3, "followed_ms": q * 1e3, "ratio": q / p,
                             "events_per_request": int(np.median(n_events)),
                             "bytes_moved": r.bytes_moved})
    return {"model": model_spec, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg": list(os.getloadavg()), "rows": rows}


def table(res: dict) -> str:
    lines = [f"# Following a request live ({res['model']}, {res['when']}, "
             f"load {res['loadavg'][0]:.2f})", "",
             "| plan | devices | plain ms (median) | with on_event ms | ratio | events/request "
             "| MB moved |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['plan']} | {r['devices']} | {r['plain_ms']:.1f} | "
                     f"{r['followed_ms']:.1f} | {r['ratio']:.3f} | {r['events_per_request']} | "
                     f"{r['bytes_moved'] / 1e6:.2f} |")
    lines += ["", "Latency is `Result.latency` (the trace's span: submission to answer). Plain "
              "and followed requests alternate on the same client."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2:seed=0", help="model spec")
    ap.add_argument("--plans", default="layer,auto", help="comma-separated plans")
    ap.add_argument("--repeats", type=int, default=10, help="request pairs per plan")
    ap.add_argument("--devices", type=int, default=3, help="device processes")
    ap.add_argument("--out", default=os.path.join(RESULTS, "events.json"), help="result JSON")
    args = ap.parse_args(argv)
    from decolla import log
    log.configure(level="warning")
    res = run(args.model, args.plans.split(","), args.repeats, args.devices)
    write_json_md(args.out, res, table(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
