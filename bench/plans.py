"""Plans benchmark (issue 6): bytes per plan x wire encoding, accuracy of fp16/int8 on the
wire, and the cost model's predicted latency against one device.

    python -m bench.plans [--accuracy-n 200] [--skip-accuracy] [--quick]

All in one process, no cluster: `decolla.plans.run` runs a plan exactly as the cluster does
(every chunk's input slices and result go through the wire codec: fp32/fp16/int8 + lz4),
so bytes and logits are the ones a cluster would see. Bytes count one copy of every input
slice per chunk (each chunk on its own device) in both directions.
Accuracy: top-1 agreement with the unsplit fp32 forward and the max relative logit error
(max |logit - ref| / max |ref| per input, max over inputs), on
  - the shipped trained digits MobileNetV2 (decolla/data) over its 360 held-out images
    (also its accuracy against the true labels), every plan;
  - the seeded MobileNetV2-224 (no trained ImageNet weights are available offline) over
    N fixed seeded-noise inputs.
Predicted latencies come from the `decolla.plans.auto` cost model (Pi-class core profile,
3 devices, per-message overhead), not from a measurement.
Writes bench/results/plans.json and plans.md, and plans_predicted.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from tqdm import tqdm

from decolla.plans import build_plan
from decolla.plans.auto import Profile, stage_seconds
from decolla.plans.data import stage_bytes
from decolla.plans.run import run_plan

RESULTS = os.path.join(os.path.dirname(__file__), "results")
DTYPES = ("float32", "float16", "int8")
FIXED = ("layer", "fused", "block-gather", "block", "spatial")
BANDWIDTHS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _auto(bw, dtype="float16", devices=3):
    return f"auto:bandwidth_mbit={bw},devices={devices},wire_dtype={dtype}"


def bytes_table(spec: str, devices: int, bandwidths=(1, 10, 100, 1000)) -> list[dict]:
    """Per plan x encoding: stages, chunks, uncompressed and lz4-encoded bytes of one inference."""
    from decolla.loader import load_model
    m = load_model(spec)
    specs = m.layer_specs()
    img = np.random.default_rng(0).standard_normal(m.input_shape).astype(np.float32)
    rows = []
    names = list(FIXED) + [f"auto@{bw}" for bw in bandwidths]
    for name in tqdm(names, desc=f"bytes {spec}"):
        for dtype in DTYPES:
            kind = _auto(name.split("@")[1], dtype, devices) if name.startswith("auto") else name
            plan = build_plan(specs, devices, kind)
            _, stats = run_plan(m, plan, img, dtype)
            item = {"float32": 4, "float16": 2, "int8": 1}[dtype]
            prof = Profile(devices=devices, wire_dtype=dtype,
                                   bandwidth_mbit=float(name.split("@")[1]) if "@" in name else 100.0)
            pred = sum(stage_seconds(s, {x["name"]: x for x in specs}, prof)
                       for s in plan.stages)
            rows.append({"model": spec, "plan": name, "wire": dtype, "stages": len(plan.stages),
                         "chunks": plan.num_chunks, "bytes_uncompressed": plan.bytes_moved(item),
                         "bytes_lz4": stats.total, "predicted_ms": pred * 1e3,
                         "predicted_at_mbit": prof.bandwidth_mbit})
    return rows


def _agreement(model, images, plans: dict, dtypes, labels=None) -> list[dict]:
    from decolla import forward
    refs = np.stack([forward.forward(model, x) for x in images])
    ref_top = refs.argmax(1)
    out = []
    for name, plan in plans.items():
        for dtype in dtypes:
            errs, tops = [], []
            cache: dict = {}
            for x, ref in zip(tqdm(images, desc=f"{name} {dtype}", leave=False), refs):
                got, _ = run_plan(model, plan, x, dtype, cache=cache)
                errs.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
                tops.append(int(got.argmax()))
            tops = np.asarray(tops)
            row = {"plan": name, "wire": dtype, "n": len(images),
                   "top1_agreement": float((tops == ref_top).mean()),
                   "max_rel_logit_err": float(max(errs)), "median_rel_logit_err":
                   float(np.median(errs))}
            if labels is not None:
                row["accuracy"] = float((tops == labels).mean())
                row["accuracy_fp32_unsplit"] = float((ref_top == labels).mean())
            out.append(row)
    return out


def accuracy(n: int, devices: int, quick: bool) -> dict:
    """fp16/int8 on the wire against the unsplit fp32 forward (see the module docstring)."""
    from decolla.gateway.catalog import digits_model_path
    from decolla.gateway.train_digits import load_split
    from decolla.loader import load_model
    res = {}
    digits = load_model(digits_model_path())
    _, x_te, _, y_te = load_split(int(digits.meta.get("split_seed", 0)))
    if quick:
        x_te, y_te = x_te[:60], y_te[:60]
    specs = digits.layer_specs()
    plans = {k: build_plan(specs, devices, k) for k in FIXED}
    plans["auto@100"] = build_plan(specs, devices, _auto(100))
    res["digits"] = {"model": "decolla/data/digits_mobilenet_v2.npz (trained, 10 classes, 32 px)",
                     "rows": _agreement(digits, list(x_te), plans, DTYPES, np.asarray(y_te))}
    spec = "mobilenet_v2:seed=0"
    m = load_model(spec)
    rng = np.random.default_rng(12345)
    images = [rng.standard_normal(m.input_shape).astype(np.float32) for _ in range(n)]
    specs = m.layer_specs()
    plans = {k: build_plan(specs, devices, k) for k in ("block", "spatial")}
    plans["auto@100"] = build_plan(specs, devices, _auto(100))
    res["mobilenet_v2_224"] = {"model": f"{spec} (seeded random weights)",
                               "rows": _agreement(m, images, plans, ("float16", "int8"))}
    return res


def predicted(spec: str, devices: int) -> list[dict]:
    """Cost-model latency per plan and bandwidth (fp16 wire), and one device alone."""
    from decolla.loader import load_model
    specs = load_model(spec).layer_specs()
    by = {s["name"]: s for s in specs}
    fixed = {k: build_plan(specs, devices, k) for k in ("layer", "block", "spatial")}
    rows = []
    for bw in BANDWIDTHS:
        prof = Profile(devices=devices, bandwidth_mbit=bw, wire_dtype="float16")
        auto = build_plan(specs, devices, _auto(bw, "float16", devices))
        row = {"bandwidth_mbit": bw, "one_device_ms": auto.notes["one_device_s"] * 1e3,
               "auto_bytes": auto.bytes_moved(2), "auto_stages": len(auto.stages)}
        for name, plan in list(fixed.items()) + [("auto", auto)]:
            row[f"{name}_ms"] = 1e3 * sum(stage_seconds(s, by, prof) for s in plan.stages)
        row["auto_speedup"] = row["one_device_ms"] / row["auto_ms"]
        local = build_plan(specs, devices, _auto(bw, "float16", devices) + ",local=1")
        row["auto_local_ms"] = 1e3 * local.notes["predicted_s"]
        row["auto_local_bytes"] = sum(stage_bytes(s) for s in local.stages
                                      if not s.local) // 2
        row["auto_local_speedup"] = row["one_device_ms"] / row["auto_local_ms"]
        links = build_plan(specs, devices, _auto(bw, "float16", devices) + ",shared_link=0")
        row["auto_device_links_ms"] = 1e3 * links.notes["predicted_s"]
        row["auto_device_links_speedup"] = row["one_device_ms"] / row["auto_device_links_ms"]
        rows.append(row)
    return rows


def plot(pred: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    bw = [r["bandwidth_mbit"] for r in pred]
    for key, label in [("one_device_ms", "one device"), ("layer_ms", "layer"),
                       ("block_ms", "block"), ("spatial_ms", "spatial"), ("auto_ms", "auto"),
                       ("auto_local_ms", "auto, local stages")]:
        ax.plot(bw, [r[key] for r in pred], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth (Mb/s)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title("MobileNetV2-224, 3 Pi-class devices, fp16 wire (cost model)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(res: dict) -> str:
    lines = ["# Plans benchmark (issue 6)", "",
             f"Machine: {res['machine']}; load average at the end {res['loadavg_end']}. "
             "Bytes and accuracy are exact (no timing); predicted times are the cost model's.", ""]
    for spec, rows in res["bytes"].items():
        lines += [f"## Bytes per inference: {spec}, {res['devices']} devices", "",
                  "| plan | wire | stages | chunks | MB uncompressed | MB lz4 (encoded) | predicted ms (at Mb/s) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['plan']} | {r['wire']} | {r['stages']} | {r['chunks']} | "
                         f"{r['bytes_uncompressed'] / 1e6:.3f} | {r['bytes_lz4'] / 1e6:.3f} | "
                         f"{r['predicted_ms']:.0f} ({r['predicted_at_mbit']:g}) |")
        lines.append("")
    if res.get("accuracy"):
        for key, acc in res["accuracy"].items():
            lines += [f"## Accuracy of the wire encodings: {acc['model']}", "",
                      "| plan | wire | n | top-1 agreement with fp32 | max rel logit err | "
                      "median rel logit err | accuracy (labels) |", "|---|---|---|---|---|---|---|"]
            for r in acc["rows"]:
                a = f"{r['accuracy']:.4f} (fp32 {r['accuracy_fp32_unsplit']:.4f})" \
                    if "accuracy" in r else "-"
                lines.append(f"| {r['plan']} | {r['wire']} | {r['n']} | {r['top1_agreement']:.4f} "
                             f"| {r['max_rel_logit_err']:.2e} | {r['median_rel_logit_err']:.2e} | {a} |")
            lines.append("")
    lines += ["## Predicted latency (cost model, fp16 wire), MobileNetV2-224", "",
              "| Mb/s | one device ms | layer ms | block ms | spatial ms | auto ms | auto stages | auto MB | auto speed-up | auto+local ms | auto+local MB | auto+local speed-up | auto, per-device links: ms | speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["predicted"]:
        lines.append(f"| {r['bandwidth_mbit']} | {r['one_device_ms']:.0f} | {r['layer_ms']:.0f} | "
                     f"{r['block_ms']:.0f} | {r['spatial_ms']:.0f} | {r['auto_ms']:.0f} | "
                     f"{r['auto_stages']} | {r['auto_bytes'] / 1e6:.3f} | {r['auto_speedup']:.2f}x | "
                     f"{r['auto_local_ms']:.0f} | {r['auto_local_bytes'] / 1e6:.3f} | "
                     f"{r['auto_local_speedup']:.2f}x | {r['auto_device_links_ms']:.0f} | "
                     f"{r['auto_device_links_speedup']:.2f}x |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--accuracy-n", type=int, default=200)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer inputs, V2 only (smoke run)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    t0 = time.time()
    models = ["mobilenet_v2:seed=0"] + ([] if args.quick else ["mobilenet_v1:seed=0"])
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
           "devices": args.devices, "loadavg_start": [round(x, 2) for x in os.getloadavg()],
           "bytes": {spec: bytes_table(spec, args.devices) for spec in models},
           "predicted": predicted("mobilenet_v2:seed=0", args.devices)}
    old = os.path.join(args.out, "plans.json")
    if not args.skip_accuracy:
        res["accuracy"] = accuracy(20 if args.quick else args.accuracy_n, args.devices, args.quick)
    elif os.path.exists(old):        # keep the last measured accuracy, say from when
        with open(old) as fh:
            prev = json.load(fh)
        if prev.get("accuracy"):
            res["accuracy"] = prev["accuracy"]
            res["accuracy_from_run_ended"] = prev.get("ended", "an earlier run")
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res["seconds"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plans.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.join(args.out, "plans.md"), "w") as fh:
        fh.write(markdown(res))
    plot(res["predicted"], os.path.join(args.out, "plans_predicted.png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
