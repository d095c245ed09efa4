"""Does the stage simulator predict the real local cluster? ``python -m bench.calibrate_sim``.

1. Runs a LocalCluster (N device processes on this machine, loopback, no shaping)
   and records the per-chunk traces of a few inferences (after one warm-up).
2. From every other inference (calibration) builds a ``decolla-profile/1`` profile, from
   the trace components alone:
   - per device, seconds per MAC by layer kind and a fixed per-chunk overhead: a
     non-negative fit of worker compute time = a + s_kind * MACs, plus the worker
     time around the compute (input decode, result encode) per chunk;
   - the requester's uplink: it encodes and sends one message per device in turn,
     so the gap between consecutive sends of a stage / the bytes of the earlier one;
   - per device latency and effective bandwidth: a line through the message times
     of both directions against their bytes (send: job received - sent; return:
     last result back - its compute end).
   The simulator's model has no per-message cost on the requester, so the fixed
   per-chunk overhead term (``chunk_overhead_s``, added to the simulator for this)
   carries the runtime's codec and messaging cost per chunk.
3. A second profile refits the four message parameters (latency, bandwidth, uplink,
   per-chunk overhead; one value for all devices, compute kept) to the calibration
   stages' latencies directly (least squares on log latency).
4. For every stage of the other inferences (held out), predicts its latency with the
   simulator's timing model (`predict_stage_latency`) for the allocation the
   runtime used (chunk order = the runtime's send order; bytes = the encoded bytes
   the trace recorded, shared inputs once per message) and compares with the
   measured one (first send -> last result back); also whole inferences (stages +
   the calibration's median gap between stages).
5. A second cluster run with a fixed allocation (round robin) repeats each stage:
   the run-to-run spread of a stage is the noise floor of any prediction, and the
   profiles' error against each stage's median latency shows the model's own error.
Writes bench/results/calibration.json and the refitted profile as
bench/results/calibration_profile.json (and prints a summary).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import defaultdict

import numpy as np
import structlog

from decolla.cost import ChunkCost, StageInfo

log = structlog.get_logger("bench.calibrate_sim")
RESULTS = os.path.join(os.path.dirname(__file__), "results")
TOLERANCE = 0.2


def _sim():
    try:
        from decolla.policy import simulator
    except ImportError:  # source tree that is not pip-installed
        from policy import simulator
    return simulator


# ---- 1. traces from the real cluster -----------------------------------------------------

def collect(devices: int, model: str, plan: str, allocator: str, n: int) -> tuple[list[dict], dict]:
    """`n` inference traces from a fresh LocalCluster (after one warm-up inference)."""
    from decolla.api import LocalCluster
    out = []
    with LocalCluster(devices=devices, model=model, plan=plan, allocator=allocator) as c:
        image = np.random.default_rng(0).standard_normal(c.input_shape).astype(np.float32)
        c.infer(image)
        for _ in range(n):
            r = c.infer(image)
            out.append({"latency": r.latency, "started": r.trace.started, "finished": r.trace.finished,
                        "stats": r.stats, "records": r.trace.as_dicts()})
        status = c.status()
    return out, status


def stage_kinds(model: str, plan: str, k: int) -> list[str]:
    """Layer kind of every stage of the plan the requester built."""
    from decolla.loader import load_model
    from decolla.plans import build_plan
    m = load_model(model)
    return [s.kind for s in build_plan(m.layer_specs(), k, plan, m.input_shape).stages]


def stages_of(trace: dict, kinds: list[str]) -> list[dict]:
    """Per stage: measured latency and the messages (one per device) in send order.

    Stages where any chunk was retried or not won first time are left out.
    """
    by_stage = defaultdict(list)
    for r in trace["records"]:
        by_stage[r["stage"]].append(r)
    out = []
    for s in sorted(by_stage):
        recs = by_stage[s]
        if any(r["attempt"] > 0 or r["status"] != "won" for r in recs):
            continue
        msgs = defaultdict(list)
        for r in recs:
            msgs[(r["sent"], r["device"])].append(r)
        messages = [{"device": dev, "sent": sent, "records": sorted(rs, key=lambda r: r["chunk"])}
                    for (sent, dev), rs in sorted(msgs.items())]
        start = min(r["sent"] for r in recs)
        end = max(r["returned"] for r in recs)
        out.append({"stage": s, "kind": kinds[s], "start": start, "end": end, "measured_s": end - start,
                    "messages": messages})
    return out


# ---- 2. profile from trace components ------------------------------------------------------

def _fit_line(x, y, intercept: bool = True) -> tuple[float, float]:
    """Non-negative least squares y = a + b x (a = 0 without intercept)."""
    from scipy.optimize import nnls
    x, y = np.asarray(x, float), np.asarray(y, float)
    scale = max(float(np.abs(x).max()), 1e-30)
    A = np.stack([np.ones_like(x), x / scale], 1) if intercept else (x / scale)[:, None]
    coef, _ = nnls(A, y)
    return (float(coef[0]), float(coef[1]) / scale) if intercept else (0.0, float(coef[0]) / scale)


def component_profile(stages: list[dict]) -> tuple[dict, dict]:
    """decolla-profile/1 from calibration stages, plus the fit details."""
    per_dev = defaultdict(list)
    for st in stages:
        for m in st["messages"]:
            per_dev[m["device"]].append((st, m))
    # Uplink: the requester starts the next device's message when it is done with the last one.
    gaps, gap_bytes = [], []
    for st in stages:
        ms = st["messages"]
        for a, b in zip(ms, ms[1:]):
            gaps.append(b["sent"] - a["sent"])
            gap_bytes.append(sum(r["bytes_in"] for r in a["records"]))
    _, inv_up = _fit_line(gap_bytes, gaps, intercept=False) if gaps else (0.0, 0.0)
    uplink = 1.0 / inv_up if inv_up > 0 else math.inf
    devices, details = {}, {"uplink_Bps": uplink, "devices": {}}
    for dev, items in sorted(per_dev.items()):
        recs = [(st["kind"], r) for st, m in items for r in m["records"]]
        kinds = sorted({k for k, _ in recs})
        # compute = a + s_kind * macs (non-negative)
        from scipy.optimize import nnls
        A = np.zeros((len(recs), 1 + len(kinds)))
        y = np.array([r["end"] - r["start"] for _, r in recs])
        A[:, 0] = 1.0
        for i, (k, r) in enumerate(recs):
            A[i, 1 + kinds.index(k)] = r["macs"] / 1e6
        coef, _ = nnls(A, y)
        a_comp = float(coef[0])
        spm = {k: max(float(coef[1 + i]) / 1e6, 1e-13) for i, k in enumerate(kinds)}
        spm["default"] = float(np.median(list(spm.values())))
        # worker time around the compute, per chunk: input decode, result encode, scheduling
        around = [((m["records"][-1]["end"] - m["records"][0]["received"])
                   - sum(r["end"] - r["start"] for r in m["records"])) / len(m["records"])
                  for _, m in items]
        overhead = a_comp + max(float(np.median(around)), 0.0)
        # latency and bandwidth: one line through both directions' message times against their
        # bytes (send: first job received - sent; return: last result back - its compute end)
        xs = [sum(r["bytes_in"] for r in m["records"]) for _, m in items]
        ys = [m["records"][0]["received"] - m["sent"] for _, m in items]
        xs += [m["records"][-1]["bytes_out"] for _, m in items]
        ys += [m["records"][-1]["returned"] - m["records"][-1]["end"] for _, m in items]
        lat, inv_bw = _fit_line(xs, ys)
        bw = 1.0 / inv_bw if inv_bw > 0 else 1e12
        devices[dev] = {"sec_per_mac": spm, "bandwidth": bw, "latency_s": lat, "available": 1.0,
                        "chunk_overhead_s": overhead}
        details["devices"][dev] = {"compute_intercept_s": a_comp, "around_compute_s": float(np.median(around)),
                                   "n_chunks": len(recs), "n_messages": len(items)}
    prof = {"format": _sim().PROFILE_FORMAT, "uplink": None if math.isinf(uplink) else uplink,
            "devices": devices}
    return prof, details


def refit_profile(base: dict, stages: list[dict]) -> dict:
    """Refit latency, bandwidth, uplink and per-chunk overhead (shared by all devices) to
    the calibration stages' latencies (least squares on log latency); compute is kept."""
    from scipy.optimize import minimize
    devs = list(base["devices"])
    meas = np.log([st["measured_s"] for st in stages])
    x0 = np.log([np.median([base["devices"][d]["latency_s"] for d in devs]) + 1e-5,
                 np.median([base["devices"][d]["bandwidth"] for d in devs]),
                 base["uplink"] or 1e10,
                 np.median([base["devices"][d]["chunk_overhead_s"] for d in devs]) + 1e-5])

    def make(x):
        lat, bw, up, ovh = np.exp(x)
        p = {"format": base["format"], "uplink": float(up), "devices": {}}
        for d in devs:
            p["devices"][d] = dict(base["devices"][d], latency_s=float(lat), bandwidth=float(bw),
                                   chunk_overhead_s=float(ovh))
        return p

    def loss(x):
        p = make(x)
        pred = np.log([max(predict(p, st), 1e-9) for st in stages])
        return float(np.mean((pred - meas) ** 2))

    res = minimize(loss, x0, method="Nelder-Mead", options={"maxiter": 400, "xatol": 1e-3, "fatol": 1e-6})
    return make(res.x)


# ---- 3. prediction ---------------------------------------------------------------------------

def predict(profile: dict, st: dict) -> float:
    """Simulator's latency for a measured stage, with the runtime's allocation and send order."""
    sim = _sim()
    devs = sim.profile_devices(profile, st["kind"])
    chunks, names = [], []
    for m in st["messages"]:
        for r in m["records"]:
            chunks.append(ChunkCost(int(r["macs"]), int(r["bytes_in"]), int(r["bytes_out"])))
            names.append(m["device"])
    up = profile.get("uplink")
    info = StageInfo(st["stage"], st["stage"] + 1, st["kind"], math.inf if up is None else float(up))
    return sim.predict_stage_latency(devs, info, chunks, names)


def compare(profile: dict, traces: list[dict], kinds: list[str], gap_s: float) -> dict:
    """Per-stage and whole-inference prediction errors on the given traces."""
    rows, infer = [], []
    for tr in traces:
        sts = stages_of(tr, kinds)
        pred = [predict(profile, st) for st in sts]
        for st, p in zip(sts, pred):
            rows.append({"stage": st["stage"], "kind": st["kind"], "measured_s": st["measured_s"],
                         "predicted_s": p, "rel_error": (p - st["measured_s"]) / st["measured_s"],
                         "chunks_per_device": [len(m["records"]) for m in st["messages"]]})
        measured = tr["finished"] - tr["started"]
        complete = len(sts) == len(kinds)
        total = sum(pred) + gap_s * len(kinds)
        infer.append({"measured_s": measured, "predicted_s": total if complete else None,
                      "rel_error": (total - measured) / measured if complete else None,
                      "stages_sum_measured_s": sum(st["measured_s"] for st in sts),
                      "stages_sum_predicted_s": sum(pred)})
    err = np.array([r["rel_error"] for r in rows])
    by_kind = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(abs(r["rel_error"]))
    inf_err = [i["rel_error"] for i in infer if i["rel_error"] is not None]
    return {"n_stages": len(rows), "median_abs_rel_error": float(np.median(np.abs(err))),
            "p90_abs_rel_error": float(np.quantile(np.abs(err), 0.9)),
            "median_rel_error": float(np.median(err)),
            "within_20pct": float((np.abs(err) <= TOLERANCE).mean()),
            "median_abs_rel_error_by_kind": {k: float(np.median(v)) for k, v in sorted(by_kind.items())},
            "inference_rel_error": inf_err,
            "inference_median_abs_rel_error": float(np.median(np.abs(inf_err))) if inf_err else None,
            "inferences": infer, "stages": rows}


def repeatability(traces: list[dict], kinds: list[str], profiles: dict) -> dict:
    """Run-to-run spread of the same stage under the same allocation, |x / median - 1| (a
    floor for any predictor's per-stage error: no model predicts the noise), and each
    profile's error against those per-stage medians (the model's error without the noise)."""
    groups = defaultdict(list)
    for tr in traces:
        for st in stages_of(tr, kinds):
            alloc = tuple((m["device"], tuple(r["chunk"] for r in m["records"])) for m in st["messages"])
            groups[(st["stage"], alloc)].append(st)
    groups = {k: v for k, v in groups.items() if len(v) >= 3}
    if not groups:
        return {"skipped": "no stage repeated with the same allocation"}
    dev = np.array([abs(st["measured_s"] / np.median([x["measured_s"] for x in v]) - 1.0)
                    for v in groups.values() for st in v])
    out = {"n_stages": len(dev), "n_groups": len(groups), "median_abs_rel_deviation": float(np.median(dev)),
           "within_20pct": float((dev <= TOLERANCE).mean()), "vs_stage_median": {}}
    for name, prof in profiles.items():
        err = np.array([predict(prof, v[0]) / np.median([x["measured_s"] for x in v]) - 1.0
                        for v in groups.values()])
        out["vs_stage_median"][name] = {"median_abs_rel_error": float(np.median(np.abs(err))),
                                        "median_rel_error": float(np.median(err)),
                                        "within_20pct": float((np.abs(err) <= TOLERANCE).mean())}
    return out


def _gaps(traces, kinds) -> float:
    """Median requester time between a stage's last result and the next stage's first send."""
    g = []
    for tr in traces:
        sts = stages_of(tr, kinds)
        g += [b["start"] - a["end"] for a, b in zip(sts, sts[1:]) if b["stage"] == a["stage"] + 1]
    return float(np.median(g)) if g else 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Simulator vs real LocalCluster stage latency")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--model", default="mobilenet_v2:seed=0")
    ap.add_argument("--plan", default="layer")
    ap.add_argument("--allocator", default="random", help="runtime allocator (random: varied allocations)")
    ap.add_argument("--inferences", type=int, default=10, help="alternately calibration and held out")
    ap.add_argument("--floor-inferences", type=int, default=6,
                    help="inferences of a second cluster with a fixed allocation (average) for the noise floor; 0: skip")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args(argv)
    load_before = os.getloadavg()
    t0 = time.time()
    traces, status = collect(a.devices, a.model, a.plan, a.allocator, a.inferences)
    kinds = stage_kinds(a.model, a.plan, traces[0]["stats"]["k"])
    # Alternate calibration and held-out inferences, so a change in the machine's load
    # during the run hits both halves alike.
    cal, test = traces[0::2], traces[1::2]
    half = len(cal)
    cal_stages = [st for tr in cal for st in stages_of(tr, kinds)]
    comp, details = component_profile(cal_stages)
    fitted = refit_profile(comp, cal_stages)
    gap = _gaps(cal, kinds)
    floor = {"skipped": "--floor-inferences 0"}
    if a.floor_inferences:
        ftraces, _ = collect(a.devices, a.model, a.plan, "average", a.floor_inferences)
        floor = repeatability(ftraces, kinds, {"components": comp, "fitted": fitted})
    res = {"setup": {"devices": a.devices, "model": a.model, "plan": a.plan, "allocator": a.allocator,
                     "k": traces[0]["stats"]["k"], "stages": len(kinds), "calibration_inferences": half,
                     "heldout_inferences": len(test), "emulation": "none: loopback, no shaping; the devices, "
                     "requester and leader share this machine's CPUs",
                     "load_average_before": load_before, "load_average_after": os.getloadavg(),
                     "wall_s": time.time() - t0, "cluster_speed_gmacs": [d["speed_gmacs"] for d in status["devices"]]},
           "tolerance": TOLERANCE, "inter_stage_gap_s": gap, "repeatability": floor,
           "profiles": {"components": comp, "fitted": fitted}, "component_fit": details,
           "calibration": {"components": _summary(compare(comp, cal, kinds, gap)),
                           "fitted": _summary(compare(fitted, cal, kinds, gap))},
           "heldout": {"components": compare(comp, test, kinds, gap), "fitted": compare(fitted, test, kinds, gap)}}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "calibration.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.join(a.out, "calibration_profile.json"), "w") as fh:
        json.dump(fitted, fh, indent=1)   # loadable by Simulator.from_profile / load_profile
    for name in ("components", "fitted"):
        h = res["heldout"][name]
        print(f"{name:10s} held-out stages: median |err| {h['median_abs_rel_error']:.1%}, "
              f"within 20%: {h['within_20pct']:.0%} of {h['n_stages']}, median err {h['median_rel_error']:+.1%}; "
              f"inference |err| median {h['inference_median_abs_rel_error'] or float('nan'):.1%}")
    print("run-to-run spread of a stage with a fixed allocation:", floor)
    print("load average", load_before, "->", os.getloadavg())


def _summary(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("stages", "inferences")}


if __name__ == "__main__":
    main()
