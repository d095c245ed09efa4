"""The requester side of bench.fig6: runs inside the testbed's requester host.

It joins the cluster as a DeColla `Client` (layer plan), a `BaselineClient`, and for method
`auto` one more `Client` with plan `auto:bandwidth_mbit=B,shared_link=0` (B = the run's
bandwidth; the testbed shapes each device link, hence shared_link=0; one such client at a
time, replaced when the bandwidth changes) — and
answers JSON commands, one per stdin line, with one JSON line on stdout (logs go to stderr):

  {"cmd": "wait", "n": 3, "timeout": 60}             devices ready
  {"cmd": "prepare", "reprofile": true}               (re)profile every host for the baselines
  {"cmd": "run", "method": "decolla"|"auto"|"mobile"|"partition"|"hierarchical",
   "bandwidth": 20, "repeats": 3, "concurrency": 1, "cap_s": 60}
  {"cmd": "quit"}

A run does `repeats` rounds of `concurrency` simultaneous inferences on seeded images and
returns, per inference, latency (end to end, and without the image delivery to the first
device(s), as the paper measures), correctness against the single-device forward, bytes,
the route, and per-device busy/waiting seconds from the trace; per round the wall time and
each device's utilisation. A request that exceeds cap_s ends the point: it is reported as
a timeout (a capped point), not an error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from decolla.baselines import metrics


def _out(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def input_delivery(trace) -> float:
    """Seconds until the image reached the device(s) of the first step (the paper's latency
    excludes this "image transfer between the smartphone and the IoT device").

    Baselines: the first hop's send -> arrival; DeColla: the last arrival of stage 0's input.
    """
    first = [r for r in trace.records if r.attempt == 0 and r.received is not None
             and r.stage == min(q.stage for q in trace.records)]
    if not first:
        return 0.0
    return max(0.0, max(r.received - r.sent for r in first))


class Agent:
    def __init__(self, args):
        from decolla.api import Client
        from decolla.baselines.client import BaselineClient
        from decolla.forward import forward
        from decolla.loader import load_model
        self.args = args
        self.model = load_model(args.model)
        self.forward = forward
        self.decolla = Client(args.leader, name="requester", bind=args.bind, plan="layer",
                              k=args.k, allocator=args.allocator, request_timeout=args.cap,
                              min_devices=args.devices, connect_timeout=120)
        self.baselines = BaselineClient(args.leader, edge=args.edge, name="baselines",
                                        bind=args.bind, request_timeout=args.cap)
        self.devices = sorted(self.baselines.wait_for_devices(args.devices, 120))
        self.images: dict[int, tuple] = {}
        self.auto, self.auto_bw = None, None

    def auto_client(self, bandwidth: float):
        """The `auto`-plan client for this bandwidth (the planner needs it in the plan name)."""
        from decolla.api import Client
        if self.auto is None or self.auto_bw != bandwidth:
            if self.auto is not None:
                self.auto.close()
            self.auto = None
            self.auto = Client(self.args.leader, name=f"auto-{bandwidth:g}", bind=self.args.bind,
                               plan=f"auto:bandwidth_mbit={bandwidth:g},shared_link=0",
                               k=self.args.devices, allocator=self.args.allocator,
                               request_timeout=self.args.cap, min_devices=self.args.devices,
                               connect_timeout=120)
            self.auto_bw = bandwidth
        return self.auto

    def status(self) -> dict:
        """The cluster's device list as the leader reports it (calibrated speed included)."""
        return self.decolla.status()

    def image(self, seed: int):
        if seed not in self.images:
            x = np.random.default_rng(seed).standard_normal(self.model.input_shape).astype(np.float32)
            self.images[seed] = (x, self.forward(self.model, x))
        return self.images[seed]

    # ------------------------------------------------------------ commands
    def wait(self, n: int, timeout: float = 60.0) -> dict:
        t0 = time.monotonic()
        ready = self.decolla.wait_for_devices(n, timeout)
        return {"ready": sorted(ready), "waited_s": time.monotonic() - t0}

    def prepare(self, reprofile: bool = True, fresh: bool = False) -> dict:
        prof = self.baselines.prepare(self.devices + [self.args.edge], reprofile=reprofile,
                                      fresh=fresh)
        return {"profile_s": {h: float(sum(v)) for h, v in prof.items()}}

    def _one(self, method: str, seed: int, bandwidth: float, cap: float, t1_floor: float):
        x, want = self.image(seed)
        t0 = time.time()
        try:
            if method == "decolla":
                r = self.decolla.infer(x, timeout=cap + 10)
            elif method == "auto":
                r = self.auto_client(bandwidth).infer(x, timeout=cap + 10)
            else:
                r = self.baselines.infer(x, method, bandwidth_mbit=bandwidth,
                                         devices=self.devices, timeout=cap, t1_floor=t1_floor)
        except Exception as exc:
            msg = str(exc)
            timeout = "timed out" in msg or "no answer within" in msg
            return {"ok": False, "timeout": timeout, "error": msg[:300],
                    "latency_s": time.time() - t0}, None
        err = float(np.abs(r.logits - want).max())
        delivery = input_delivery(r.trace)
        row = {"ok": True, "correct": bool(np.allclose(r.logits, want, rtol=1e-3, atol=1e-3)),
               "max_abs_err": err, "latency_e2e_s": r.latency, "input_delivery_s": delivery,
               "latency_s": r.latency - delivery,
               "bytes": int(r.trace.bytes_moved()),
               "waiting_s": metrics.waiting(r.trace, self.devices, delivery),
               "busy_s": metrics.busy_seconds([r.trace], self.devices),
               "retries": sum(1 for rec in r.trace.records if rec.attempt > 0)}
        for key in ("route", "split", "replans", "failed", "device", "stages"):
            if key in r.stats:
                row[key] = r.stats[key]
        return row, r.trace

    def run(self, method: str, bandwidth: float, repeats: int = 3, concurrency: int = 1,
            cap_s: float | None = None, seed: int = 0, t1_floor: float = 0.5) -> dict:
        cap = cap_s or self.args.cap
        rows, rounds = [], []
        for rep in range(repeats):
            t0 = time.time()
            with ThreadPoolExecutor(concurrency) as pool:
                futs = [pool.submit(self._one, method, seed + rep * concurrency + i, bandwidth,
                                    cap, t1_floor) for i in range(concurrency)]
                results = [f.result() for f in futs]
            wall = time.time() - t0
            traces = [t for _, t in results if t is not None]
            util = metrics.utilisation(traces, self.devices, wall)
            rounds.append({"wall_s": wall, "utilisation": util,
                           "norm_variance": metrics.normalized_variance(list(util.values()))})
            rows.extend(r for r, _ in results)
            if any(r.get("timeout") for r, _ in results):
                break          # a capped point: more repeats would only hit the cap again
        return {"method": method, "bandwidth": bandwidth, "concurrency": concurrency,
                "inferences": rows, "rounds": rounds,
                "capped": any(r.get("timeout") for r in rows)}

    def close(self) -> None:
        for c in (self.baselines, self.decolla, self.auto):
            try:
                if c is not None:
                    c.close()
            except Exception:
                pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fig6_agent")
    p.add_argument("--leader", required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--edge", default="edge")
    p.add_argument("--model", required=True)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("-k", type=int, default=6)
    p.add_argument("--allocator", default="average")
    p.add_argument("--cap", type=float, default=60.0)
    args = p.parse_args(argv)
    from decolla import log as dlog
    dlog.configure(level="warning", node="requester")
    try:
        agent = Agent(args)
    except Exception as exc:
        _out({"ready": False, "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
        return 1
    _out({"ready": True, "devices": agent.devices})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            name = cmd.pop("cmd")
            if name == "quit":
                _out({"bye": True})
                break
            try:
                _out({"ok": True, "result": getattr(agent, name)(**cmd)})
            except Exception as exc:
                _out({"ok": False, "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
