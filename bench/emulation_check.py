"""How faithfully the testbed's two slow-CPU emulations make a device k× slower.

    sudo .venv/bin/python -m bench.emulation_check [-k 8] [--repeats 12]

Three hosts of the testbed: one unthrottled (the host's CPU time, the reference), one
slowed by a CFS quota, one by time dilation (decolla.emulation), each calibrated on the
whole forward as bench.plans_cluster does (dilation's f comes out a little below k: a
device's CPU time grows with the caches it finds cold after each sleep). In each, one
process runs
- `forward`: the whole MobileNetV2 forward, `--repeats` times;
- `chunks`: the chunks a device computes in a `layer` plan with 3 devices (chunk 0 of
  every stage: decode its fp16 input, compute, encode its output, as a worker does), one
  after another with `--gap-ms` of idle time before each (waiting for the next message);
  the sequence's time is the sum of its chunks' times, idle gaps excluded.
Reported per probe and mode: median of wall / (k × host CPU time) (1.00 is a device
exactly k× slower), and its run-to-run spread (min, max, and (max − min) / median over the
repeats); for dilation also the mechanism's own accuracy, wall / (f × the process's own
CPU time). Writes bench/results/emulation_check.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL = "mobilenet_v2:seed=0"


def _sequence(model, gap_s: float):
    """A closure timing one pass over the device's chunks: (wall s, CPU s), gaps excluded."""
    import numpy as np
    from decolla import emulation
    from decolla.plans import build_plan
    from decolla.plans.compute import chunk_inputs, compute_chunk
    from decolla.plans.run import run_plan
    from decolla.runtime import wire
    plan = build_plan(model.layer_specs(), 3, "layer")
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    _, _, tensors = run_plan(model, plan, x, keep=True)
    layers = {l.name: l for l in model.layers}
    work = [(st, st.chunks[0], {n: wire.encode(v, "float16") for n, v in
                                chunk_inputs(st.chunks[0], tensors, False).items()})
            for st in plan.stages]
    cache: dict = {}

    def one() -> tuple[float, float]:
        wall = cpu = 0.0
        for st, c, blobs in work:
            time.sleep(gap_s)
            t0, c0 = time.perf_counter(), time.process_time()
            inputs = {n: wire.decode(b) for n, b in blobs.items()}
            wire.encode(compute_chunk(layers, st, c, inputs, cache=cache), "float16")
            emulation.settle()            # where a worker's send settles
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
        return wall, cpu
    return one


def probe(kind: str, repeats: int, gap_s: float) -> dict:
    """Inside a host: `repeats` timed runs of `kind` after one warm-up: walls and CPU times."""
    import numpy as np
    from decolla import emulation
    from decolla.forward import forward
    from decolla.loader import load_model
    model = load_model(MODEL)
    if kind == "forward":
        x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)

        def one():
            t0, c0 = time.perf_counter(), time.process_time()
            forward(model, x, threads=1)
            emulation.settle()
            return time.perf_counter() - t0, time.process_time() - c0
    else:
        one = _sequence(model, gap_s)
    one()
    runs = [one() for _ in range(repeats)]
    return {"wall_s": [w for w, _ in runs], "cpu_s": [c for _, c in runs]}


def _run_probe(host, kind: str, repeats: int, gap_ms: float) -> dict:
    proc = host.python("bench.emulation_check", "--probe", kind, "--repeats", str(repeats),
                       "--gap-ms", str(gap_ms), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True, env={"OMP_NUM_THREADS": "1"})
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {kind} in {host.name} exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def summarize(walls: list[float], host_cpu: float, k: float) -> dict:
    """wall / (k × host CPU) per run: median, min, max and relative spread."""
    import numpy as np
    r = np.array(walls) / (k * host_cpu)
    med = float(np.median(r))
    return {"median": med, "min": float(r.min()), "max": float(r.max()),
            "spread": float((r.max() - r.min()) / med), "n": len(r)}


def drive(args) -> int:
    import numpy as np
    from bench.plans_cluster import PROBE_REPEATS
    from bench.testbed import Testbed, check_environment
    reason = check_environment()
    if reason:
        print(f"bench.emulation_check needs the testbed: {reason}", file=sys.stderr)
        return 2
    doc = {"k": args.k, "repeats": args.repeats, "model": MODEL, "command": " ".join(sys.argv),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": os.getloadavg(),
           "probes": {}}
    with Testbed(prefix="dcec") as tb:
        fwd = [sys.executable, "-m", "bench.fig6_probe", "--model", MODEL, "--repeats",
               str(PROBE_REPEATS)]
        cal = {m: tb.calibrate(fwd, k=args.k, mode=m).as_dict() for m in ("quota", "dilation")}
        doc["calibration"] = cal
        hosts = {"host": tb.add_host("host"),
                 "quota": tb.add_host("quota", cpu_quota=cal["quota"]["quota"]),
                 "dilation": tb.add_host("dilation", cpu_dilation=cal["dilation"]["dilation"])}
        probes = [("forward", 0.0)] + [("chunks", g) for g in args.gaps_ms]
        for kind, gap in probes:
            name = kind if kind == "forward" else f"chunks, {gap:g} ms gaps"
            got = {m: _run_probe(h, kind, args.repeats, gap) for m, h in hosts.items()}
            host_cpu = float(np.median(got["host"]["cpu_s"]))
            f = cal["dilation"]["dilation"]
            own = [w / (f * c) for w, c in zip(got["dilation"]["wall_s"], got["dilation"]["cpu_s"])]
            doc["probes"][name] = {
                "host_cpu_ms": host_cpu * 1e3, "raw": got,
                "dilation_own_cpu_ms": float(np.median(got["dilation"]["cpu_s"])) * 1e3,
                "dilation_mechanism": summarize(own, 1.0, 1.0),
                **{m: summarize(got[m]["wall_s"], host_cpu, args.k)
                   for m in ("quota", "dilation")}}
            print(name, {m: round(doc["probes"][name][m]["median"], 3)
                         for m in ("quota", "dilation")}, flush=True)
        doc["emulated"] = tb.describe()
    doc["loadavg_end"] = os.getloadavg()
    _save(doc, args.out)
    return 0


def _save(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "emulation_check.json").write_text(json.dumps(doc, indent=1, default=str))
    q, d = doc["calibration"]["quota"], doc["calibration"]["dilation"]
    lines = [f"# Slow-CPU emulation accuracy (k = {doc['k']:g}, {doc['repeats']} repeats)", "",
             f"wall / (k × host CPU time); 1.00 = exactly k× slower. Quota: "
             f"{q['quota']:.3f} cores (calibration on the forward: {q['achieved_slowdown']:.2f}x). "
             f"Dilation: f = {d['dilation']:.3f} (calibration: {d['achieved_slowdown']:.2f}x); "
             f"mechanism = wall / (f × the dilated process's own CPU time). Started "
             f"{doc['started']}: `{doc['command']}`.", "",
             "| probe | host CPU ms | quota median | quota min–max | quota spread | "
             "dilation median | dilation min–max | dilation spread | dilated CPU ms | "
             "mechanism median (spread) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in doc["probes"].items():
        cells = [f"{p[m]['median']:.3f} | {p[m]['min']:.3f}–{p[m]['max']:.3f} | "
                 f"{p[m]['spread'] * 100:.1f} %" for m in ("quota", "dilation")]
        mech = p["dilation_mechanism"]
        lines.append(f"| {name} | {p['host_cpu_ms']:.1f} | {cells[0]} | {cells[1]} | "
                     f"{p['dilation_own_cpu_ms']:.1f} | {mech['median']:.3f} "
                     f"({mech['spread'] * 100:.1f} %) |")
    (out / "emulation_check.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.emulation_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", choices=("forward", "chunks"), help=argparse.SUPPRESS)
    p.add_argument("-k", type=float, default=8.0, help="device slowdown vs one host core")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--gap-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--gaps-ms", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.0, 5.0], help="idle gaps before each chunk to measure (ms)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.probe:
        print(json.dumps(probe(args.probe, args.repeats, args.gap_ms / 1e3)))
        return 0
    return drive(args)


if __name__ == "__main__":
    raise SystemExit(main())
