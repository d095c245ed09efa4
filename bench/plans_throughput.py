"""Concurrent throughput on the testbed: the `auto` plan vs whole requests spread over devices.

    sudo .venv/bin/python -m bench.plans_throughput [--bandwidth 100] [--concurrency 12]

Issue 6 target: with many concurrent requests, `auto` + the allocator reach at least the
throughput of giving each device whole requests. 3 emulated Pi-class devices (network
namespace, tc tbf on each device link, cgroup CPU quota calibrated so the whole
MobileNetV2-224 forward runs k≈8x slower than on one host core), an edge host (leader), an
unshaped requester host running this module with --agent. Methods, each a closed loop of
`concurrency` threads issuing `requests` inferences in total (after one warm-up round):
- `auto`: plan `auto:bandwidth_mbit=B,shared_link=0` through the runtime (k = 3 devices,
  the requester's allocator (`--allocator`, default `eft`: earliest finish, counting the
  work already queued on each device) places every chunk; the planner uses the devices'
  calibrated speed from their start-up check);
- `single`: plan `single` through the runtime (one chunk per request, the same allocator
  places it: with `eft` whole requests spread over the devices, with `average` they all go
  to the first device);
- `mobile`: the mobile-only baseline (decolla.baselines), which sends each request whole to
  the least-loaded device;
- `onnxruntime`: the same weights in ONNX on every device (bench.ort_device, one thread,
  the same emulation), each device running its third of the requests back to back with
  the image already there: whole requests at the best single-device speed.
Devices are slowed by `--emulation` (time dilation or a CFS quota, bench.plans_cluster).
Rounds alternate the methods, each leading a round in turn, so drift in the shared
machine's load and the first method's cold start hit all of them.
Throughput = requests / wall time of the loop; load averages of the host are recorded.
Writes bench/results/<--name, default plans_throughput_<emulation>>.json and .md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench import ort_device
from bench.plans_cluster import EMULATIONS, ask, plans_cluster, reply

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METHODS = ("auto", "single", "mobile")      # through the requester host's agent
ORT = "onnxruntime"


class _Runner:
    """Requester-host side: the three ways of running a request, and the closed loop."""

    def __init__(self, args):
        from decolla.api import Client
        from decolla.baselines.client import BaselineClient
        from decolla.forward import forward
        from decolla.loader import load_model
        model = load_model(args.model)
        self.images = [np.random.default_rng(s).standard_normal(model.input_shape)
                       .astype(np.float32) for s in range(4)]
        self.refs = [forward(model, x) for x in self.images]
        common = dict(bind=args.bind, min_devices=3, wire_dtype="float16", allocator=args.allocator,
                      # no faults here: a generous deadline keeps a queue of concurrent
                      # requests from triggering duplicate chunks
                      deadline_floor=args.cap / 4, request_timeout=args.cap, connect_timeout=120)
        self.clients = {
            "auto": Client(args.leader, name="tp-auto", k=3,
                           plan=f"auto:bandwidth_mbit={args.bandwidth:g},shared_link=0", **common),
            "single": Client(args.leader, name="tp-single", k=1, plan="single", **common)}
        self.base = BaselineClient(args.leader, edge="edge", name="tp-base", bind=args.bind,
                                   request_timeout=args.cap)
        self.devices = sorted(self.base.wait_for_devices(3, 120))
        self.base.prepare(self.devices + ["edge"], reprofile=False)
        self.args = args

    def one(self, method: str, i: int) -> dict:
        x, ref = self.images[i % 4], self.refs[i % 4]
        t0 = time.perf_counter()
        if method == "mobile":
            r = self.base.infer(x, "mobile", bandwidth_mbit=self.args.bandwidth,
                                devices=self.devices, timeout=self.args.cap)
        else:
            r = self.clients[method].infer(x, timeout=self.args.cap)
        lat = time.perf_counter() - t0
        used = collections.Counter(rec.device for rec in r.trace.records if rec.attempt == 0)
        return {"latency_s": lat, "bytes": int(r.trace.bytes_moved()),
                "top1_ok": int(np.argmax(r.logits)) == int(np.argmax(ref)),
                "rel_err": float(np.abs(r.logits - ref).max() / np.abs(ref).max()),
                "chunks_by_device": dict(used),
                "retries": sum(1 for rec in r.trace.records if rec.attempt > 0)}

    def loop(self, method: str, concurrency: int, requests: int) -> dict:
        """`concurrency` threads issue `requests` inferences back to back; wall time."""
        counter, lock, rows, errors = iter(range(requests)), threading.Lock(), [], []

        def worker():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    rows.append(self.one(method, i))
                except Exception as exc:  # recorded: a failed request is a result, not a crash
                    errors.append(repr(exc)[:300])

        load0 = os.getloadavg()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(worker) for _ in range(concurrency)]:
                f.result()
        wall = time.perf_counter() - t0
        return {"method": method, "wall_s": wall, "ok": len(rows), "errors": errors,
                "throughput": len(rows) / wall, "rows": rows,
                "loadavg_before": load0, "loadavg_after": os.getloadavg()}

    def close(self) -> None:
        for c in (*self.clients.values(), self.base):
            try:
                c.close()
            except Exception:
                pass


def agent(args) -> int:
    """Runs inside the requester host: one JSON command per stdin line, one JSON reply."""
    from decolla import log as dlog
    dlog.configure(level="warning", node="requester")
    runner = _Runner(args)
    print(json.dumps({"ready": True, "devices": runner.devices}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            try:
                if cmd["cmd"] == "status":
                    result = runner.clients["auto"].status()
                else:
                    result = runner.loop(cmd["method"], cmd["concurrency"], cmd["requests"])
                print(json.dumps({"ok": True, "result": result}), flush=True)
            except Exception as exc:
                print(json.dumps({"ok": False, "error": repr(exc)}), flush=True)
    finally:
        runner.close()
    return 0


def drive(args) -> int:
    from bench.testbed import check_environment
    reason = check_environment()
    if reason:
        print(f"bench.plans_throughput needs the testbed: {reason}", file=sys.stderr)
        return 2
    doc = {"model": args.model, "k": args.k, "bandwidth_mbit": args.bandwidth,
           "allocator": args.allocator, "emulation": args.emulation,
           "command": " ".join(sys.argv),
           "concurrency": args.concurrency, "requests": args.requests, "rounds": args.rounds,
           "points": [], "loadavg_start": os.getloadavg(), "name": args.name,
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    logs = Path("/tmp") / f"dctp-ort-{os.getpid()}"
    logs.mkdir(exist_ok=True)
    onnx_path = str(logs / "model.onnx")
    if args.ort:
        ort_device.export(args.model, onnx_path)
    with plans_cluster("dctp", args.model, args.k, args.bandwidth, "bench.plans_throughput",
                       ["--bandwidth", str(args.bandwidth), "--cap", str(args.cap),
                        "--allocator", args.allocator], emulation=args.emulation) as pc:
        proc = pc.agent
        orts = [ort_device.start(pc.tb.host(f"dev{i}"), onnx_path, logs / f"ort{i}.log")
                for i in (1, 2, 3)] if args.ort else []
        methods = METHODS + ((ORT,) if orts else ())
        doc["calibration"] = pc.calibration.as_dict()
        doc["emulation_line"] = pc.describe_emulation()
        doc["device_forward_s"] = pc.forward_s
        doc["planner_gmacs_from_calibration"] = pc.gmacs
        try:
            st = ask(proc, 60, cmd="status")
            doc["status"] = st.get("result")
            speeds = [d["speed_gmacs"] for d in (st.get("result") or {}).get("devices", [])]
            print(f"devices' start-up speed (Client.status): {speeds} GMAC/s", flush=True)
            wait = args.cap * (args.requests + args.concurrency) + 120
            for method in METHODS:                # warm-up: plans, caches, profiles
                ask(proc, wait, cmd="run", method=method, concurrency=args.concurrency,
                    requests=args.concurrency)
            for rnd in range(args.rounds):
                # each method leads a round in turn: the one after `mobile` (other actors,
                # other weights in the caches) would otherwise always start cold
                for method in methods[rnd % len(methods):] + methods[:rnd % len(methods)]:
                    if method == ORT:
                        rep = _ort_loop(orts, args.requests, wait)
                    else:
                        rep = ask(proc, wait, cmd="run", method=method,
                                  concurrency=args.concurrency, requests=args.requests)
                    point = {"round": rnd, **(rep["result"] if rep.get("ok") else
                                              {"method": method, "error": rep.get("error")})}
                    doc["points"].append(point)
                    print(f"round {rnd} {method}: {point.get('throughput', 0):.3f} inf/s "
                          f"(ok {point.get('ok')}, load {os.getloadavg()[0]:.2f})", flush=True)
                    _save(doc, args.out)
        finally:
            doc["emulated"] = pc.tb.describe()
            for o in orts:
                o.stdin.close()
                o.wait(timeout=30)
    doc["loadavg_end"] = os.getloadavg()
    _save(doc, args.out)
    return 0


def _ort_loop(orts: list, requests: int, timeout: float) -> dict:
    """Every device's onnxruntime runs its share of `requests` back to back, all at once."""
    shares = [requests // len(orts) + (i < requests % len(orts)) for i in range(len(orts))]
    load0, t0 = os.getloadavg(), time.perf_counter()
    for o, n in zip(orts, shares):
        o.stdin.write(json.dumps({"cmd": "run", "repeats": n}) + "\n")
        o.stdin.flush()
    replies = [reply(o, timeout) for o in orts]
    wall = time.perf_counter() - t0
    if not all(r.get("ok") for r in replies):
        return {"ok": False, "error": "an onnxruntime agent failed"}
    rows = [{"latency_s": r["latency_s"], "bytes": 0, "top1_ok": True, "rel_err": 0.0,
             "chunks_by_device": {f"dev{i}": 1}, "retries": 0}
            for i, rep in enumerate(replies, 1) for r in rep["result"]]
    return {"ok": True, "result": {"method": ORT, "wall_s": wall, "ok": len(rows), "errors": [],
                                   "throughput": len(rows) / wall, "rows": rows,
                                   "loadavg_before": load0, "loadavg_after": os.getloadavg()}}


def summary(doc: dict) -> dict:
    """method -> median throughput, latency, MB, ok count, chunks per device (all rounds)."""
    out = {}
    for m in METHODS + (ORT,):
        pts = [p for p in doc["points"] if p.get("method") == m and "throughput" in p]
        if not pts:
            continue
        rows = [r for p in pts for r in p["rows"]]
        by_dev: collections.Counter = collections.Counter()
        for r in rows:
            by_dev.update(r["chunks_by_device"])
        out[m] = {"throughput": float(np.median([p["throughput"] for p in pts])),
                  "throughputs": [p["throughput"] for p in pts],
                  "latency_median_s": float(np.median([r["latency_s"] for r in rows])),
                  "mb": float(np.median([r["bytes"] for r in rows]) / 1e6),
                  "ok": sum(p["ok"] for p in pts), "n": len(pts) * doc["requests"],
                  "top1_ok": sum(r["top1_ok"] for r in rows),
                  "retries": sum(r["retries"] for r in rows),
                  "chunks_by_device": dict(sorted(by_dev.items())),
                  "load1": [p["loadavg_after"][0] for p in pts]}
    return out


def _save(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc["summary"] = s = summary(doc)
    (out / f"{doc['name']}.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [f"# Concurrent throughput on the testbed ({doc['model']}, 3 emulated Pi-class "
             f"devices, {doc['bandwidth_mbit']:g} Mb/s per device link, fp16 wire)", "",
             f"Emulation {doc.get('emulation_line', doc.get('emulation', 'quota'))}; "
             f"`{doc.get('command', '')}`.", "",
             f"Runtime allocator `{doc.get('allocator', 'average')}`. "
             f"{doc['concurrency']} threads in a closed loop, {doc['requests']} requests per "
             f"round, {doc['rounds']} rounds alternating the methods (each leads one round in "
             f"turn); throughput = median over rounds. Ratios vs the best whole-request "
             f"method with our kernels (`single`, `mobile`) and vs onnxruntime's whole "
             f"requests, of the same run.", "",
             "| method | inferences/s (median) | per round | vs best whole-request (ours) | "
             "vs onnxruntime whole requests | median latency s "
             "| MB / inference | ok | top-1 ok | retries | chunks per device | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    whole = max([s[m]["throughput"] for m in ("single", "mobile") if m in s] or [0])
    ort = s.get(ORT, {}).get("throughput")
    for m, v in s.items():
        ratio = f"{v['throughput'] / whole:.2f}x" if whole else "-"
        ratio += f" | {v['throughput'] / ort:.2f}x" if ort else " | -"
        lines.append(f"| {m} | {v['throughput']:.3f} | "
                     f"{', '.join(f'{t:.3f}' for t in v['throughputs'])} | {ratio} | "
                     f"{v['latency_median_s']:.2f} | {v['mb']:.3f} | {v['ok']}/{v['n']} | "
                     f"{v['top1_ok']} | {v['retries']} | "
                     f"{', '.join(f'{d} {c}' for d, c in v['chunks_by_device'].items())} | "
                     f"{', '.join(f'{x:.2f}' for x in v['load1'])} |")
    speeds = [d["speed_gmacs"] for d in (doc.get("status") or {}).get("devices", [])]
    if speeds:
        lines += ["", f"Devices' start-up speed check (`Client.status()`): "
                      f"{', '.join(f'{x:g}' for x in speeds)} GMAC/s; the planner's `gmacs` that "
                      f"matches the calibrated whole-model time: "
                      f"{doc.get('planner_gmacs_from_calibration', 0):.2f}."]
    (out / f"{doc['name']}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plans_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--leader")
    p.add_argument("--bind")
    p.add_argument("--model", default="mobilenet_v2:seed=0")
    p.add_argument("--bandwidth", type=float, default=100.0)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--requests", type=int, default=48, help="requests per round and method")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-k", type=float, default=8.0, help="device slowdown vs one host core")
    p.add_argument("--cap", type=float, default=120.0, help="per-request time cap, s")
    p.add_argument("--allocator", default="eft", help="the runtime requester's allocator")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None,
                   help="result file name (no suffix; default plans_throughput_<emulation>)")
    p.add_argument("--emulation", choices=EMULATIONS, default="dilation",
                   help="how devices are slowed: time dilation (continuous) or a CFS quota")
    p.add_argument("--no-ort", dest="ort", action="store_false",
                   help="leave out the onnxruntime baseline (it needs torch and onnxruntime)")
    args = p.parse_args(argv)
    args.name = args.name or f"plans_throughput_{args.emulation}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return agent(args) if args.agent else drive(args)


if __name__ == "__main__":
    raise SystemExit(main())
