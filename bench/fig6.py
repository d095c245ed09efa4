"""Paper Fig. 6 on the testbed: DeColla (layer plan, and the `auto` plan at the sweep's
bandwidth) vs mobile-only, partition-offloading, hierarchical and onnxruntime on one device.

    sudo .venv/bin/python -m bench.fig6 --quick                 # ≈ 10 min, reduced model/points
    sudo .venv/bin/python -m bench.fig6 --model mobilenet_v1    # full sweeps, repeats 10 (hours)
    sudo .venv/bin/python -m bench.fig6 --quick --spec mobilenet_v2:seed=0 --only a --emulation dilation

3 emulated devices (network namespace + tc tbf + a slow CPU calibrated so the whole model
runs k≈8× slower than on one host core, a Raspberry-Pi-4-class device; `--emulation`: a
cgroup CPU quota, or time dilation, continuously slow, as in bench.plans_testbed) + an
edge server host (leader/registrar, computes only for partition-offloading) + a requester
host (unshaped, unthrottled: the paper's smartphone) running bench.fig6_agent. Method
`onnxruntime`: the same weights exported to ONNX, run by onnxruntime on one thread inside
dev1 under the same emulation and background load (bench.ort_device); the image is on the
device already, so its latency is compute only (with and without the delivery alike).
Sweeps: (a) latency vs bandwidth at 30 % CPU usage, (b) latency vs CPU usage at 20 Mb/s,
(c) normalized utilisation variance vs bandwidth (from (a)'s runs), (d) the same vs
concurrent requests at 20 Mb/s, (e) latency and waiting latency as one collaborator's CPU
usage rises, (f) latency when 1 or 2 collaborators disconnect mid-inference.
Writes bench/results/fig6[_quick]_<model>.json, .md and fig6*_<model>_{a..f}.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import structlog
from tqdm import tqdm

from bench import ort_device
from bench.plans_cluster import EMULATIONS, calibrate_devices, describe_emulation
from bench.testbed import Testbed, check_environment
from decolla.baselines import metrics

log = structlog.get_logger("fig6")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ORT = "onnxruntime"
METHODS = ("mobile", "partition", "hierarchical", "decolla", "auto", ORT)
LOAD_SWEEPS = "be"     # sweeps that change a device's background load while it runs

FULL = {
    "spec": "{arch}:seed=0",
    "bandwidths": [1, 2, 5, 10, 20, 50, 100, 1000],
    "loads": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    "concurrency": list(range(1, 11)),
    "one_load": [0.1, 0.3, 0.5, 0.7, 0.9],
    "faults": [0, 1, 2],
    "repeats": 10, "round_repeats": 3, "cap_s": 300.0,
}
QUICK = {
    "spec": "{arch}:seed=0,width=0.35,input_size=96",
    "bandwidths": [1, 5, 20, 100, 1000],
    "loads": [0.1, 0.5, 0.9],
    "concurrency": [1, 3, 6],
    "one_load": [0.1, 0.5, 0.9],
    "faults": [0, 1, 2],
    "repeats": 3, "round_repeats": 2, "cap_s": 45.0,
}


def sweeps_of(only: str) -> str:
    """The sweeps `--only` asks for, of "abdef" ((c) comes with (a); "" = all)."""
    return "".join(s for s in "abdef" if only in ("", s) or s in only)


class AgentError(RuntimeError):
    """The requester agent failed or did not answer."""


class Agent:
    """The bench.fig6_agent process inside the requester host, driven over stdin/stdout."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    self.lines.put(json.loads(line))
                except json.JSONDecodeError:
                    pass
        self.lines.put(None)

    def reply(self, timeout: float) -> dict:
        try:
            doc = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AgentError(f"agent silent for {timeout:.0f} s") from None
        if doc is None:
            raise AgentError(f"agent exited with {self.proc.wait()}")
        return doc

    def __call__(self, cmd: str, reply_timeout: float = 900.0, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        doc = self.reply(reply_timeout)
        if not doc.get("ok"):
            raise AgentError(f"{cmd} failed: {doc.get('error')}\n{doc.get('trace', '')}")
        return doc["result"]

    def quit(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()


def summarize(point: dict) -> dict:
    """Medians of one measured point (latency over successful inferences, etc.)."""
    rows = point["inferences"]
    ok = [r for r in rows if r.get("ok")]
    lat = [r["latency_s"] for r in ok]
    e2e = [r.get("latency_e2e_s", r["latency_s"]) for r in ok]
    waits = [float(np.mean(list(r["waiting_s"].values()))) for r in ok if r.get("waiting_s")]
    nv = [r["norm_variance"] for r in point["rounds"]]
    return {"n": len(rows), "ok": len(ok), "timeouts": sum(1 for r in rows if r.get("timeout")),
            "errors": sum(1 for r in rows if not r.get("ok") and not r.get("timeout")),
            "correct": all(r.get("correct") for r in ok) if ok else None,
            "latency_median_s": statistics.median(lat) if lat else None,
            "latency_min_s": min(lat) if lat else None,
            "latency_max_s": max(lat) if lat else None,
            "latency_e2e_median_s": statistics.median(e2e) if e2e else None,
            "waiting_median_s": statistics.median(waits) if waits else None,
            "norm_variance_median": statistics.median(nv) if nv else None,
            "bytes_median": statistics.median([r["bytes"] for r in ok]) if ok else None,
            "capped": point.get("capped", False)}


def ort_point(ort, repeats: int, timeout_s: float, bandwidth: float, rel_err: float) -> dict:
    """`repeats` runs of the onnxruntime agent `ort` on dev1, as a point like the
    requester agent's (one inference per round; the export's logits were checked against
    decolla.forward: `rel_err`)."""
    rep = ort_device.run(ort, repeats, timeout_s)
    if not rep.get("ok"):
        raise RuntimeError(f"onnxruntime on dev1 failed: {rep.get('error')}")
    devices = [f"dev{i}" for i in (1, 2, 3)]
    rows, rounds = [], []
    for r in rep["result"]:
        lat = r["latency_s"]
        rows.append({"ok": True, "correct": True, "rel_err": rel_err, "latency_e2e_s": lat,
                     "input_delivery_s": 0.0, "latency_s": lat, "cpu_s": r["cpu_s"],
                     "bytes": 0, "device": "dev1", "retries": 0, "busy_s": {"dev1": lat},
                     "waiting_s": {}})
        util = {d: float(d == "dev1") for d in devices}
        rounds.append({"wall_s": lat, "utilisation": util,
                       "norm_variance": metrics.normalized_variance(list(util.values()))})
    return {"method": ORT, "bandwidth": bandwidth, "concurrency": 1, "inferences": rows,
            "rounds": rounds, "capped": False}


class Fig6:
    """Brings the testbed up, runs the sweeps, writes results."""

    def __init__(self, arch: str, quick: bool, k: float, out: Path, only: str,
                 spec: str | None = None, cap_s: float | None = None,
                 methods: tuple = METHODS, name: str | None = None, emulation: str = "quota"):
        self.arch, self.quick, self.k, self.only = arch, quick, k, only
        self.emulation = emulation
        self.methods = tuple(m for m in METHODS if m in methods)
        self.cfg = dict(QUICK if quick else FULL)
        if cap_s:
            self.cfg["cap_s"] = cap_s
        self.spec = spec or self.cfg["spec"].format(arch=arch)
        tag = f"fig6{'_quick' if quick else ''}_{arch}"
        if spec:
            tag = f"fig6{'_quick' if quick else ''}_" + re.sub(r"[^a-z0-9.]+", "_", spec).strip("_")
        tag = name or (tag if emulation == "quota" else f"{tag}_{emulation}")
        self.json_path, self.md_path = out / f"{tag}.json", out / f"{tag}.md"
        self.png_prefix = out / tag
        self.doc: dict = {"figure": "paper Fig. 6", "mode": "quick" if quick else "full",
                          "model": self.spec, "config": self.cfg, "sweeps": {},
                          "methods": list(self.methods), "emulation": emulation,
                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.state = {"bw": None, "loads": {}}
        self.ort = None

    def sweeps(self) -> str:
        """The sweeps to run ((c) comes with (a))."""
        return sweeps_of(self.only)

    # ------------------------------------------------------------ set-up
    def up(self, tb: Testbed) -> None:
        self.tb = tb
        logs = Path("/tmp") / f"fig6-{tb.run}"
        logs.mkdir(exist_ok=True)
        self.logs = logs
        if ORT in self.methods:       # before the cluster starts: torch's import is heavy
            self.doc["onnx_rel_err"] = ort_device.export(self.spec, str(logs / "model.onnx"))
        reps = 4 if "input_size" not in self.spec else 30
        cal, forward_s = calibrate_devices(tb, self.spec, self.k, self.emulation, reps)
        for i in (1, 2, 3):
            tb.add_host(f"dev{i}", bandwidth_mbit=20, cpu_quota=cal.quota,
                        cpu_dilation=cal.dilation, background_load=0.3)
            self.state["loads"][f"dev{i}"] = 0.3
        self.state["bw"] = 20
        self.doc["emulation_line"] = (
            describe_emulation(tb, cal, forward_s) + "; background load 30 % of each device's "
            + ("CPU (dilation / 0.7)" if cal.mode == "dilation" else "quota (a busy loop)"))
        # rounded down: rounding up could exceed the budget left by the devices
        edge_quota = math.floor(min(1.0, tb.cpu_budget - 3 * (cal.quota or 0)) * 1000) / 1000
        tb.add_host("edge", role="edge", cpu_quota=edge_quota)
        req = tb.add_host("requester", role="requester")
        tb.spawn_node("edge", "leader", model=self.spec, log=logs / "edge.log")
        time.sleep(1.0)
        for i in (1, 2, 3):
            tb.spawn_node(f"dev{i}", "device", leader="edge", model=self.spec,
                          log=logs / f"dev{i}.log")
        leader = f"{tb.address('edge')}:1900"
        proc = req.spawn([sys.executable, "-m", "bench.fig6_agent", "--leader", leader,
                          "--bind", req.address, "--model", self.spec,
                          "--cap", str(self.cfg["cap_s"])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=open(logs / "agent.log", "ab"), text=True, bufsize=1)
        self.agent = Agent(proc)
        hello = self.agent.reply(timeout=240)
        if not hello.get("ready"):
            raise AgentError(f"agent did not start: {hello}")
        prof = self.agent("prepare", reprofile=False)
        print(f"hosts ready; whole-model profile (s): {prof['profile_s']}  logs: {logs}",
              flush=True)
        self.doc["calibration"] = cal.as_dict()
        self.doc["edge_quota_cores"] = edge_quota
        self.doc["status"] = self.agent("status")
        if ORT in self.methods:
            self.ort = ort_device.start(tb.host("dev1"), str(logs / "model.onnx"),
                                        logs / "ort.log")

    def set_net(self, bw: float) -> None:
        if self.state["bw"] != bw:
            for i in (1, 2, 3):
                self.tb.set_bandwidth(f"dev{i}", bw)
            self.state["bw"] = bw

    def set_loads(self, loads: dict) -> None:
        changed = False
        for dev, load in loads.items():
            if self.state["loads"].get(dev) != load:
                self.tb.set_background_load(dev, load)
                self.state["loads"][dev] = load
                changed = True
        if changed:   # Neurosurgeon and the hierarchical cut use profiles taken now
            self.agent("prepare", reprofile=True)

    def measure(self, method: str, repeats: int, concurrency: int = 1, **kw) -> dict:
        if method == ORT:
            point = ort_point(self.ort, repeats, self.cfg["cap_s"] * (repeats + 2) + 60,
                              self.state["bw"], self.doc["onnx_rel_err"])
            point["summary"] = summarize(point)
            return point
        point = self.agent("run", method=method, bandwidth=self.state["bw"], repeats=repeats,
                           concurrency=concurrency, cap_s=self.cfg["cap_s"],
                           reply_timeout=self.cfg["cap_s"] * repeats * concurrency + 300, **kw)
        point["summary"] = summarize(point)
        return point

    def record(self, sweep: str, x, method: str, point: dict, bar=None) -> None:
        self.doc["sweeps"].setdefault(sweep, []).append({"x": x, "method": method, **point})
        s = point["summary"]
        lat = "capped" if s["latency_median_s"] is None else f"{s['latency_median_s'] * 1e3:.0f} ms"
        msg = f"({sweep}) x={x} {method}: {lat} ok {s['ok']}/{s['n']}"
        (bar.write if bar else print)(msg)
        self.save()

    def save(self) -> None:
        self.doc["emulated"] = self.tb.describe()
        self.json_path.write_text(json.dumps(self.doc, indent=1, default=str))

    # ------------------------------------------------------------ sweeps
    def run(self) -> None:
        c = self.cfg
        all_loads = {f"dev{i}": 0.3 for i in (1, 2, 3)}
        sweeps = self.sweeps()
        if "a" in sweeps:                      # (a) and (c): latency / variance vs bandwidth
            self.set_loads(all_loads)
            todo = [(bw, m) for bw in c["bandwidths"] for m in self.methods]
            with tqdm(todo, desc="(a,c) bandwidth", file=sys.stderr) as bar:
                skip = set()
                for bw, m in sorted(todo, key=lambda t: -t[0]):   # fast points first
                    if m in skip:                # a lower bandwidth than a capped one: capped too
                        self.record("a", bw, m, {"inferences": [], "rounds": [], "capped": True,
                                                 "summary": {**summarize({"inferences": [],
                                                             "rounds": []}), "capped": True,
                                                             "skipped": True}}, bar)
                        bar.update()
                        continue
                    self.set_net(bw)
                    point = self.measure(m, c["repeats"])
                    self.record("a", bw, m, point, bar)
                    if point["capped"]:
                        skip.add(m)
                    bar.update()
        if "b" in sweeps:                      # (b) latency vs CPU usage at 20 Mb/s
            self.set_net(20)
            todo = [(ld, m) for ld in c["loads"] for m in self.methods]
            with tqdm(todo, desc="(b) cpu usage", file=sys.stderr) as bar:
                for ld, m in todo:
                    self.set_loads({f"dev{i}": ld for i in (1, 2, 3)})
                    self.record("b", ld, m, self.measure(m, c["repeats"]), bar)
                    bar.update()
        if "d" in sweeps:                      # (d) variance vs concurrent requests
            self.set_net(20)
            self.set_loads(all_loads)
            # onnxruntime runs one device's requests one by one: no concurrency to vary
            todo = [(n, m) for n in c["concurrency"] for m in self.methods if m != ORT]
            with tqdm(todo, desc="(d) concurrency", file=sys.stderr) as bar:
                for n, m in todo:
                    self.record("d", n, m, self.measure(m, c["round_repeats"], n), bar)
                    bar.update()
        if "e" in sweeps:                      # (e) one collaborator's CPU usage rises
            self.set_net(20)
            todo = [(ld, m) for ld in c["one_load"]
                    for m in ("hierarchical", "decolla", "auto") if m in self.methods]
            with tqdm(todo, desc="(e) one device loaded", file=sys.stderr) as bar:
                for ld, m in todo:
                    self.set_loads({**all_loads, "dev2": ld})
                    self.record("e", ld, m, self.measure(m, c["repeats"]), bar)
                    bar.update()
        if "f" in sweeps:                      # (f) disconnections mid-inference
            self.set_net(20)
            self.set_loads(all_loads)
            self.faults(c)

    def faults(self, c: dict) -> None:
        rng = np.random.default_rng(6)
        todo = [(n, m) for n in c["faults"]
                for m in ("hierarchical", "decolla", "auto") if m in self.methods]
        base: dict = {}
        with tqdm(todo, desc="(f) disconnections", file=sys.stderr) as bar:
            for n, m in todo:
                if n == 0:
                    point = self.measure(m, c["repeats"])
                    base[m] = point["summary"]["latency_median_s"] or 1.0
                    self.record("f", 0, m, point, bar)
                    bar.update()
                    continue
                rows, rounds, events = [], [], []
                for rep in range(c["repeats"]):
                    victims = sorted(rng.choice(["dev1", "dev2", "dev3"], n, replace=False))
                    at = 0.3 * base.get(m, 1.0)
                    timers = [self.tb.schedule(at, "link_down", v) for v in victims]
                    p = self.agent("run", method=m, bandwidth=self.state["bw"], repeats=1,
                                   cap_s=c["cap_s"], seed=100 + rep,
                                   reply_timeout=c["cap_s"] + 300)
                    for t in timers:
                        t.join()
                    for v in victims:
                        self.tb.link_up(v)
                    for r in p["inferences"]:
                        r["disconnected"] = [str(v) for v in victims]
                        r["disconnect_at_s"] = at
                    rows += p["inferences"]
                    rounds += p["rounds"]
                    events.append({"victims": [str(v) for v in victims], "at_s": at})
                    self.agent("wait", n=3, timeout=120, reply_timeout=200)
                    # the hosts rejoined: fresh segment workers, as the registrar restarts
                    # the runtime's Workers of a device that rejoins
                    self.reprepare()
                point = {"inferences": rows, "rounds": rounds, "faults": events,
                         "capped": any(r.get("timeout") for r in rows)}
                point["summary"] = summarize(point)
                self.record("f", n, m, point, bar)
                bar.update()

    def reprepare(self, attempts: int = 3) -> None:
        """Fresh segment workers after a rejoin; retried, as the first create right after a
        link comes back can go to the device's stale admin address."""
        for i in range(attempts):
            try:
                self.agent("prepare", reprofile=False, fresh=True, reply_timeout=200)
                return
            except AgentError as exc:
                if i == attempts - 1:
                    raise
                log.warning("prepare after rejoin failed; retrying", error=str(exc)[:200])
                time.sleep(5.0)

    def finish(self) -> None:
        self.doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()
        from bench.fig6_report import plot, table
        pngs = plot(self.doc, self.png_prefix)
        self.md_path.write_text(table(self.doc))
        print(f"wrote {self.json_path}, {self.md_path}, {len(pngs)} plots", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fig6", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced model, points and repeats (≤ 20 min)")
    p.add_argument("--model", default="mobilenet_v2", choices=("mobilenet_v2", "mobilenet_v1"))
    p.add_argument("-k", type=float, default=8.0, help="device slowdown vs one host core")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="subset of methods, e.g. 'mobile,hierarchical,auto'")
    p.add_argument("--only", default="", help="subset of sweeps, e.g. 'af' ((c) comes with (a))")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--spec", default=None,
                   help="explicit model spec (e.g. full-size 'mobilenet_v2:seed=0' with --quick points)")
    p.add_argument("--cap", type=float, default=None, help="per-request time cap, s")
    p.add_argument("--emulation", choices=EMULATIONS, default="quota",
                   help="how devices are slowed: a CFS quota (every earlier Fig. 6 run) or time "
                        "dilation (continuous; sweeps (a), (c), (d), (f) only, as a dilated "
                        "device's background load is fixed when its processes start)")
    p.add_argument("--name", default=None,
                   help="result file stem (default fig6[_quick]_<model or spec>); give one for "
                        "partial runs (--only/--methods) so they do not replace a full run's files")
    args = p.parse_args(argv)
    methods = tuple(args.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"bench.fig6: unknown methods {unknown}; choose from {','.join(METHODS)}",
              file=sys.stderr)
        return 2
    if args.emulation == "dilation" and set(sweeps_of(args.only)) & set(LOAD_SWEEPS):
        print("bench.fig6: sweeps (b) and (e) change the devices' background load, which the "
              "dilation emulation fixes at start-up; use --emulation quota or --only a,d,f",
              file=sys.stderr)
        return 2
    reason = check_environment()
    if reason:
        print(f"bench.fig6 needs the testbed: {reason}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    fig = Fig6(args.model, args.quick, args.k, args.out, args.only, args.spec, args.cap,
               methods, args.name, args.emulation)
    t0 = time.monotonic()
    with Testbed(prefix="dcf6") as tb:
        fig.up(tb)
        try:
            fig.run()
        finally:
            fig.doc["wall_s"] = time.monotonic() - t0
            fig.agent.quit()
            if fig.ort is not None:
                fig.ort.stdin.close()
                fig.ort.wait(timeout=30)
            fig.finish()
    print(f"done in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
