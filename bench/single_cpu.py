"""Where a device's host CPU goes per `single` request, by thread, on loopback.

    python -m bench.single_cpu [--requests 450] [--py-spy OUT.txt]

A LocalCluster of 3 devices runs `single` (fp16 on the wire, data plane) `--requests`
times; each request is served by one device. Per device process and thread the CPU time
is read from /proc/<pid>/task/<tid>/schedstat (ns) before and after, and reported per
request a device served, beside the compute the workers traced (wall time inside
`compute_chunk`): the compute thread's excess over it is its wake-up, encode and send; the
reader thread's whole share is receive, authenticate, decode and queueing. `--py-spy`
also samples one worker (raw collapsed stacks, native frames) for attribution; its stops
distort that run's CPU numbers, so take them from a run without it.
"""
from __future__ import annotations

import argparse
import os
import sys
import subprocess
import time

import numpy as np

from bench import procs

DEVICES = 3
TICK = os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[str, tuple[float, int]]:
    """Thread id -> (CPU seconds, context switches: wake-ups and preemptions, minor page
    faults)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                ns, _, switches = (int(v) for v in fh.read().split()[:3])
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                stat = fh.read()
            f = stat[stat.rindex(")") + 2:].split()
            out[tid] = (ns / 1e9, switches, int(f[7]), int(f[12]) / TICK)
        except OSError:
            pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=450)
    ap.add_argument("--py-spy", default="")
    args = ap.parse_args(argv)
    from decolla import log
    from decolla.api import LocalCluster
    from decolla.loader import load_model
    log.configure(level="warning")
    mark = procs.tag()
    model = load_model("mobilenet_v2:seed=0")
    image = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    n = args.requests
    with LocalCluster(devices=DEVICES, model="mobilenet_v2:seed=0", plan="single",
                      wire_dtype="float16", data_plane=True) as c:
        pids = [p for name, ps in procs.by_node(procs.tagged(mark)).items()
                if name.startswith("dev") for p in ps]
        warm = {p: sum(v[0] for v in _threads(p).values()) for p in pids}
        for _ in range(5):
            c.infer(image)
        spy = None
        if args.py_spy:       # a worker: the process that computed during the warm-up
            busy = max(pids, key=lambda p: sum(v[0] for v in _threads(p).values()) - warm[p])
            spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"),
                                    "record", "-p", str(busy), "-r", "500", "-f", "raw",
                                    "-o", args.py_spy, "--threads", "-n"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.5)
        before = {p: _threads(p) for p in pids}
        compute, lat = 0.0, []
        for _ in range(n):
            r = c.infer(image)
            lat.append(r.latency)
            compute += sum(x.end - x.start for x in r.trace.records
                           if x.end > x.start and x.device.startswith("dev"))
        after = {p: _threads(p) for p in pids}
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
    per = DEVICES / n * 1e3          # ms per request a device served
    rows = []
    for p in pids:
        d = sorted((tuple(a - b for a, b in zip(after[p][t], before[p].get(t, (0.0, 0, 0, 0.0))))
                    for t in after[p]), reverse=True)
        if d and d[0][0] * per > 1.0:                   # a worker process
            rows.append((d[0][0] * per, d[1][0] * per, sum(x[0] for x in d[2:]) * per,
                         d[0][1] * DEVICES / n, d[1][1] * DEVICES / n,
                         d[0][2] * DEVICES / n, d[1][2] * DEVICES / n,
                         d[0][3] * per, d[1][3] * per))
    comp = compute / n * 1e3
    total = np.mean([sum(r[:3]) for r in rows])
    print(f"per served request (ms of host CPU), mean over {len(rows)} workers:")
    print(f"  compute thread {np.mean([r[0] for r in rows]):.3f} (traced compute {comp:.3f}), "
          f"{np.mean([r[3] for r in rows]):.1f} switches, {np.mean([r[5] for r in rows]):.0f} page faults, "
          f"{np.mean([r[7] for r in rows]):.2f} in the kernel")
    print(f"  reader thread  {np.mean([r[1] for r in rows]):.3f}, "
          f"{np.mean([r[4] for r in rows]):.1f} switches, {np.mean([r[6] for r in rows]):.0f} page faults, "
          f"{np.mean([r[8] for r in rows]):.2f} in the kernel")
    print(f"  other threads  {np.mean([r[2] for r in rows]):.3f}")
    print(f"  beyond compute {total - comp:.3f}; latency median {np.median(lat) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
