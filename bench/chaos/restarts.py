"""Processes and memory across leader restarts: a LocalCluster serves one client while its
leader is killed (-9) and restarted N times; after each restart, once every device is
ready again and the replaced workers have had time to exit, the processes of each node
and the RSS of each device's worker are read (bench.procs, /proc). A new leader's worker
stops the old one (actors/worker.py: _take_over), so both should stay flat."""
from __future__ import annotations

import random
import threading
import time

from bench import procs
from bench.chaos import soak
from decolla.api import Client, LocalCluster

SETTLE_S = 3.0          # replaced workers exit within this (SIGTERM, Thespian's shutdown)
RSS_GROWTH = 1.25       # "flat": no worker's RSS above this times its device's first one


def _row(i: int, cluster: LocalCluster, mark: str) -> dict:
    devices = {d["name"]: d["pid"] for d in cluster.status()["devices"]}
    nodes = {k: v for k, v in procs.by_node(procs.tagged(mark)).items() if k}
    return {"restart": i, "processes": sum(len(v) for v in nodes.values()),
            "per_node": {k: len(v) for k, v in sorted(nodes.items())},
            "worker_pid": dict(sorted(devices.items())),
            "worker_rss_mb": {k: round(procs.rss_bytes([pid]) / 2**20, 1)
                              for k, pid in sorted(devices.items())}}


def run(n: int, devices: int = 3, spec: str = soak.SPEC, seed: int = 0) -> dict:
    """`n` leader restarts under load; one row per restart (0 = before the first)."""
    mark = procs.tag()
    images = soak.Images(spec)
    seen, stop = soak.Soak(), threading.Event()
    with LocalCluster(devices=devices, model=spec, heartbeat=0.5, plan="single") as cluster:
        soak._whole(cluster, devices)
        client = Client(cluster.leader, plan="auto", connect_timeout=60, request_timeout=30)
        loop = threading.Thread(target=soak._client_loop, daemon=True,
                                args=(client, "auto", images, seen, stop, 30.0,
                                      random.Random(seed)))
        loop.start()
        rows = []
        for i in range(n + 1):
            if i:
                t0 = time.monotonic()
                cluster.restart("leader")
                soak._whole(cluster, devices)
                seen.faults.append(["kill-leader", "leader", t0, time.monotonic()])
            time.sleep(SETTLE_S)
            rows.append(_row(i, cluster, mark))
        stop.set()
        loop.join(60)
        client.close()
    first = rows[0]
    flat = all(r["per_node"] == first["per_node"] and all(
        r["worker_rss_mb"][d] <= RSS_GROWTH * first["worker_rss_mb"][d] for d in first["worker_rss_mb"])
        for r in rows)
    return {"restarts": n, "devices": devices, "model": spec, "rows": rows, "flat": flat,
            "requests": {k: sum(o.kind == k for o in seen.outcomes)
                         for k in ("correct", "wrong", "failed", "lost")},
            "pids_distinct": all(len({r["worker_pid"][d] for r in rows}) == len(rows)
                                 for d in first["worker_pid"])}


def markdown(rep: dict) -> str:
    names = list(rep["rows"][0]["worker_rss_mb"])
    lines = [f"# {rep['restarts']} leader restarts, {rep['devices']} devices, model "
             f"`{rep['model']}`", "", "| after restart | processes | per node | " +
             " | ".join(f"{d} worker pid / RSS (MB)" for d in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in rep["rows"]:
        lines.append(f"| {r['restart']} | {r['processes']} | {r['per_node']} | " + " | ".join(
            f"{r['worker_pid'][d]} / {r['worker_rss_mb'][d]}" for d in names) + " |")
    lines += ["", f"Flat (same processes per node, no worker above {RSS_GROWTH}x its first "
              f"RSS): {rep['flat']}; a new worker each restart: {rep['pids_distinct']}; "
              f"requests meanwhile: {rep['requests']}"]
    return "\n".join(lines) + "\n"
