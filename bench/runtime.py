"""Runtime benchmark: collaborative MobileNetV2 over 1, 2, 3 local devices.

    python -m bench.runtime [--model mobilenet_v2:seed=0] [--repeats 5] [--plans layer,fused]

Measured in one run, on one machine: the single-process kernel forward
(decolla.forward, 1 thread) as the baseline, then LocalClusters of 1, 2 and 3
device processes (1 thread each) over loopback. Per configuration: median
latency, ratio to the single-process forward, bytes moved per inference (encoded,
both directions), runtime overhead per chunk (round trip minus worker compute,
median over chunks), chunks and stages. With the most devices each plan also runs
with chunk traffic as actor messages instead of on the workers' data plane
(decolla.runtime.dataplane), the transport before it existed. Every distributed result is
checked against the single-process forward. Writes bench/results/runtime.json and .md.

On a 2-core machine the devices, the requester and the leader share 2 cores and
loopback has no bandwidth limit: the numbers measure the runtime's own cost
(messaging, codec, per-stage synchronisation), not a speed-up from more devices.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from tqdm import tqdm

from bench import procs
from bench.report import write_json_md

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _median_ms(values) -> float:
    return float(np.median(values) * 1e3)


def run(model_spec: str, devices: list[int], plans: list[str], repeats: int,
        allocator: str, fp16: bool = True) -> dict:
    from decolla import forward as fwd
    from decolla.api import LocalCluster
    from decolla.loader import load_model
    from decolla.plans import build_plan

    mark = procs.tag()       # the device processes' CPU time, read from /proc
    model = load_model(model_spec)
    image = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    want = fwd.forward(model, image, threads=1)
    single = []
    for _ in range(max(5, repeats)):
        t = time.perf_counter()
        fwd.forward(model, image, threads=1)
        single.append(time.perf_counter() - t)
    base_ms = _median_ms(single)
    rows = []
    configs = [(p, n, "float32", True) for p in plans for n in devices]
    if fp16:
        configs.append((plans[-1], max(devices), "float16", True))
    configs += [(p, max(devices), "float32", False) for p in plans]
    for plan, n, wire_dtype, data_plane in tqdm(configs, desc="clusters", unit="cfg"):
        with LocalCluster(devices=n, model=model_spec, plan=plan, allocator=allocator,
                          wire_dtype=wire_dtype, data_plane=data_plane) as c:
            c.infer(image)                               # warm-up: estimates, connections
            lat, moved, ovh, errs, retries, chunks = [], [], [], [], [], 0
            devices_pids = [p for name, ps in procs.by_node(procs.tagged(mark)).items()
                            if name.startswith("dev") for p in ps]
            cpu0, computed, compute_s = procs.cpu_seconds(devices_pids), 0, 0.0
            for _ in range(repeats):
                r = c.infer(image)
                lat.append(r.latency)
                moved.append(r.trace.bytes_moved())
                won = [x for x in r.trace.records if x.status == "won"]
                chunks = len(won)
                ovh.extend((x.returned - x.sent) - (x.end - x.start) for x in won)
                ran = [x for x in r.trace.records
                       if x.end > x.start and x.device.startswith("dev")]
                computed += len(ran)
                compute_s += sum(x.end - x.start for x in ran)
                errs.append(float(np.abs(r.logits - want).max() / np.abs(want).max()))
                retries.append(r.retries)
            device_cpu_s = procs.cpu_seconds(devices_pids) - cpu0
            k = r.stats["k"]
        p = build_plan(model.layer_specs(), k, plan)
        rows.append({
            "plan": plan, "devices": n, "wire": wire_dtype, "k": k,
            "transport": "data plane" if data_plane else "actor messages", "stages": len(p.stages), "chunks": chunks,
            "latency_ms": _median_ms(lat), "latency_ms_all": [round(x * 1e3, 2) for x in lat],
            "ratio_vs_single": _median_ms(lat) / base_ms,
            "bytes_per_inference": int(np.median(moved)),
            "plan_bytes_uncompressed": p.bytes_moved(),
            "overhead_ms_per_chunk": _median_ms(ovh),
            # the devices' CPU beyond their chunks' compute (1 thread each), per chunk run
            "device_cpu_ms_per_chunk": (device_cpu_s - compute_s) / max(1, computed) * 1e3,
            "overhead_ms_per_stage": _median_ms(lat) / len(p.stages),
            "max_rel_err": max(errs), "retries": int(sum(retries)),
        })
    return {
        "model": model_spec, "macs": model.macs, "repeats": repeats, "allocator": allocator,
        "single_process_forward_ms": base_ms,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg": os.getloadavg()},
        "emulation": "none: loopback, no bandwidth shaping, all processes share this machine's CPUs",
        "rows": rows,
    }


def table(res: dict) -> str:
    lines = [f"# Runtime benchmark: {res['model']} ({res['macs'] / 1e6:.0f} M MACs)", "",
             f"Single-process kernel forward (1 thread): **{res['single_process_forward_ms']:.1f} ms** "
             f"(median). Machine: {res['machine']['cpus']} CPUs, load average at the end "
             f"{res['machine']['loadavg'][0]:.2f}. {res['emulation']}.", "",
             "| plan | devices | wire | transport | K | stages | latency ms (median) | x single | "
             "MB moved | overhead ms/chunk | device CPU ms/chunk | ms/stage | max rel err | "
             "retries |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['plan']} | {r['devices']} | {r['wire']} | "
                     f"{r.get('transport', 'actor messages')} | {r['k']} | {r['stages']} | "
                     f"{r['latency_ms']:.1f} | {r['ratio_vs_single']:.1f} | "
                     f"{r['bytes_per_inference'] / 1e6:.2f} | {r['overhead_ms_per_chunk']:.2f} | "
                     f"{r.get('device_cpu_ms_per_chunk', float('nan')):.2f} | "
                     f"{r['overhead_ms_per_stage']:.1f} | {r['max_rel_err']:.1e} | {r['retries']} |")
    lines += ["", "Latency is end to end as the caller sees it; MB moved counts encoded "
              "(lz4) payloads both ways; overhead/chunk is a chunk's round trip minus the "
              "worker's compute (transport, codec, queueing); device CPU/chunk is the device "
              "processes' CPU time beyond their chunks' compute, per chunk they ran (receive, "
              "decode, encode, send, their heartbeats), what a device pays per chunk. On this machine all device "
              "processes, the requester and the leader share the same CPUs, so more devices "
              "add messaging without adding compute: the table measures the runtime's cost, "
              "not a multi-device speed-up."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2:seed=0")
    ap.add_argument("--devices", default="1,2,3")
    ap.add_argument("--plans", default="layer,fused")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--allocator", default="average")
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16-wire row")
    ap.add_argument("--out", default=os.path.join(RESULTS, "runtime.json"))
    args = ap.parse_args(argv)
    from decolla import log
    log.configure(level="warning")
    res = run(args.model, [int(x) for x in args.devices.split(",")], args.plans.split(","),
              args.repeats, args.allocator, fp16=not args.no_fp16)
    write_json_md(args.out, res, table(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
