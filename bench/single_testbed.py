"""Where the time around `single`'s forward goes on the testbed, by thread of the device.

    sudo .venv/bin/python -m bench.single_testbed [--bandwidth 1000] [--requests 40]
        [--emulation dilation|quota] [--dilation F] [--name NAME]

The testbed of bench.plans_testbed (3 emulated devices, tc tbf links, an edge host running
the leader, an unshaped requester host running bench.plans_testbed's agent) runs only
`single` (the whole MobileNetV2-224 as one chunk on one device, fp16 on the wire)
`--requests` times after a warm-up. Per request: the chunk's timeline (sent, received,
compute start and end, returned, from the trace) as intervals; per device thread: host CPU
time and context switches read from /proc/<pid>/task/<tid>/schedstat before and after,
per request (one device serves each). `--dilation F` fixes the dilation factor instead of
calibrating it, so runs of two trees compare at the same f (A/B).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.plans_cluster import EMULATIONS, ask, plans_cluster

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
TICK = os.sysconf("SC_CLK_TCK")
# timeline columns of bench.plans_testbed._timeline: sent, received, start, end, returned
SENT, RECEIVED, START, END, RETURNED = 4, 5, 6, 7, 8


def threads(pid: int) -> dict:
    """(pid, tid) -> (CPU s, context switches, voluntary switches, user s, system s) of
    process `pid`'s threads (user and system from clock ticks: coarse)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                ns, _, switches = (int(v) for v in fh.read().split()[:3])
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                vol = next(int(line.split()[1]) for line in fh
                           if line.startswith("voluntary_ctxt_switches"))
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                stat = fh.read()
            f = stat[stat.rindex(")") + 2:].split()
            out[(pid, tid)] = (ns / 1e9, switches, vol, int(f[11]) / TICK, int(f[12]) / TICK)
        except (OSError, StopIteration):
            pass
    return out


def snapshot(tb) -> dict:
    """Every device process's threads (bench.testbed hosts dev1..dev3)."""
    out = {}
    for i in (1, 2, 3):
        for pid in tb.host(f"dev{i}").pids():
            out.update(threads(pid))
    return out


class Poller:
    """Samples every device thread every PERIOD_S and keeps each one's last values, so a
    thread that ends before the run does (a connection's reader, closed with its Client)
    is still counted."""

    PERIOD_S = 0.01

    def __init__(self, tb):
        self.tb, self.last, self.born = tb, {}, set()
        self.before = snapshot(tb)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = snapshot(self.tb)
            self.born |= now.keys() - self.before.keys()
            self.last.update(now)
            time.sleep(self.PERIOD_S)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.last.update(snapshot(self.tb))
        return self.last


def per_thread(before: dict, after: dict, born: set, n: int) -> list[dict]:
    """Busy device threads, per request: ms of host CPU, switches, voluntary switches
    (`born`: the thread started during the run, e.g. a connection's reader and writer)."""
    rows = []
    for key, (cpu, sw, vol, user, system) in after.items():
        c0, s0, v0, u0, y0 = before.get(key, (0.0, 0, 0, 0.0, 0.0))
        rows.append({"pid": key[0], "tid": key[1], "cpu_ms": (cpu - c0) / n * 1e3,
                     "switches": (sw - s0) / n, "voluntary": (vol - v0) / n,
                     "user_ms": (user - u0) / n * 1e3, "system_ms": (system - y0) / n * 1e3,
                     "born": key in born})
    rows.sort(key=lambda r: -r["cpu_ms"])
    return [r for r in rows if r["cpu_ms"] >= 0.005]


def intervals(rows: list) -> dict:
    """Medians (ms) of the intervals of `single`'s one chunk."""
    done = [(r, t) for r in rows for t in r["timeline"][:1]
            if all(v is not None for v in t[SENT:RETURNED + 1])]
    tl = [t for _, t in done]
    med = lambda f: float(np.median([f(t) for t in tl]))  # noqa: E731
    lat = float(np.median([r["latency_s"] * 1e3 for r in rows]))
    return {"latency": lat,
            "to sent": med(lambda t: t[SENT]),
            "sent -> received": med(lambda t: t[RECEIVED] - t[SENT]),
            "received -> start": med(lambda t: t[START] - t[RECEIVED]),
            "forward": med(lambda t: t[END] - t[START]),
            "end -> returned": med(lambda t: t[RETURNED] - t[END]),
            "returned -> done": float(np.median([r["latency_s"] * 1e3 - t[RETURNED]
                                                 for r, t in done])),
            "requests with one attempt that completed": len(done),
            "requests": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.single_testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2:seed=0")
    p.add_argument("--bandwidth", type=float, default=1000.0)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("-k", type=float, default=8.0, help="device slowdown vs one host core")
    p.add_argument("--emulation", choices=EMULATIONS, default="dilation")
    p.add_argument("--dilation", type=float, default=None,
                   help="fixed DECOLLA_DILATE factor (dilation only; default: calibrate for k)")
    p.add_argument("--name", default="single_testbed")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from bench.testbed import check_environment
    reason = check_environment()
    if reason:
        print(f"bench.single_testbed needs the testbed: {reason}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    doc = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "tree": str(Path(__file__).resolve().parents[1]), "bandwidth_mbit": args.bandwidth,
           "requests": args.requests}
    with plans_cluster("dcst", args.model, args.k, args.bandwidth, "bench.plans_testbed", [],
                       emulation=args.emulation, dilation=args.dilation) as pc:
        doc["emulation_line"] = pc.describe_emulation()
        cap = 30.0
        ask(pc.agent, 300, cmd="run", plan="single", repeats=3, cap_s=cap, warmup=3)
        # one warm-up in the counted run: its Client's connections (and reader threads)
        # live only for the run; it is counted, and its handshake, over n + 1 requests
        poller = Poller(pc.tb)
        rep = ask(pc.agent, cap * args.requests + 120, cmd="run", plan="single",
                  repeats=args.requests, cap_s=cap, warmup=1)
        time.sleep(0.2)
        after = poller.stop()
    if not rep.get("ok"):
        print(f"failed: {rep.get('error')}", file=sys.stderr)
        return 1
    rows = rep["result"]
    doc["intervals_ms"] = intervals(rows)
    doc["threads"] = per_thread(poller.before, after, poller.born, args.requests + 1)[:12]
    doc["device_cpu_ms_per_request"] = sum(r["cpu_ms"] for r in doc["threads"])
    doc["rows"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
    print(doc["emulation_line"])
    print("intervals (median ms): " + ", ".join(f"{k} {v:.2f}"
                                                 for k, v in doc["intervals_ms"].items()))
    print("device threads per request (ms host CPU, switches, voluntary):")
    for r in doc["threads"]:
        print(f"  pid {r['pid']} tid {r['tid']}: {r['cpu_ms']:.3f} ms, "
              f"{r['switches']:.1f} switches, {r['voluntary']:.1f} voluntary, "
              f"user {r['user_ms']:.2f} system {r['system_ms']:.2f}"
              + (" (started in the run)" if r["born"] else ""))
    print(f"all devices: {doc['device_cpu_ms_per_request']:.3f} ms host CPU per request")
    print(f"top-1 ok {sum(r['top1_ok'] for r in rows)}/{len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
