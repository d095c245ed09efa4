"""Imported networks on one device: DeColla's forward against onnxruntime on the same ONNX file.

    python -m bench.models [--size 224] [--repeats 15] [--models resnet18,...]

Per model of bench.zoo (seeded random weights, exported with torch.onnx): the ONNX file
loaded by decolla.loader (BatchNorm folded, graph cut into segments) and run by
decolla.forward on one thread, and the same file in an onnxruntime CPU session with one
intra-op and one inter-op thread and all graph optimisations. Both on the same image,
interleaved (ours, onnxruntime, ours, ...) after warm-up runs; the medians and their
ratio (ours / onnxruntime; the target is at most 1.3x) are reported, with the answers'
agreement (max |diff| / max |logit|). Also the `auto` planner's predicted speed-up on 3
devices at 100 Mbit/s over one device (the cost model's prediction, not a measurement;
the measured testbed speed-up is bench.models_testbed's, whose table models.md includes
when its results are in the output directory).
Writes bench/results/models.json and bench/results/models.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import models_testbed, zoo
from bench.plans_testbed import predicted
from decolla.forward import Forward
from decolla.loader import load_model

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _session(path: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _predicted_speedup(model) -> float:
    """The auto planner's predicted speed-up on 3 devices at 100 Mbit/s over the whole
    network on one device with the image sent there (as `decolla plan --explain` prints)."""
    told = "auto:bandwidth_mbit=100"
    return predicted(model, "single", told)["seconds"] / predicted(model, "auto", told)["seconds"]


def bench_model(name: str, size: int, repeats: int, workdir: str) -> dict:
    path = os.path.join(workdir, f"{name}.onnx")
    zoo.export(name, path, size)
    model = load_model(path)
    fwd = Forward(model)
    sess = _session(path)
    image = np.random.default_rng(0).standard_normal((size, size, 3)).astype(np.float32)
    feed = {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None])}
    ours_out, ort_out = fwd(image, threads=1), sess.run(None, feed)[0][0]
    for _ in range(2):
        fwd(image, threads=1)
        sess.run(None, feed)
    ours, theirs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        fwd(image, threads=1)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        sess.run(None, feed)
        theirs.append(time.perf_counter() - t)
    o, r = float(np.median(ours)), float(np.median(theirs))
    kinds = [l.kind for l in model.layers]
    return {"model": name, "size": size, "macs": model.macs, "layers": len(kinds),
            "graph_segments": sum(k.startswith("graph") for k in kinds),
            "ours_ms": o * 1e3, "onnxruntime_ms": r * 1e3, "ratio": o / r,
            "rel_diff": float(np.abs(ours_out - ort_out).max() / np.abs(ort_out).max()),
            "auto_predicted_speedup_3dev": _predicted_speedup(model)}


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# Imported networks, one thread: DeColla vs onnxruntime ({meta['size']} px)", "",
             f"Host {meta['host']}, onnxruntime {meta['onnxruntime']}, {meta['repeats']} "
             f"interleaved runs each, medians; one run of `python -m bench.models`.", "",
             "| model | GMAC | layers (graph segments) | ours ms | onnxruntime ms | ratio | "
             "max rel diff | auto predicted speed-up (3 dev, 100 Mbit/s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['macs'] / 1e9:.2f} | {r['layers']} "
                     f"({r['graph_segments']}) | {r['ours_ms']:.1f} | {r['onnxruntime_ms']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['rel_diff']:.1e} | "
                     f"{r['auto_predicted_speedup_3dev']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--models", default=",".join(zoo.MODELS))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    import onnxruntime
    meta = {"size": args.size, "repeats": args.repeats, "host": platform.node(),
            "onnxruntime": onnxruntime.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            rows.append(bench_model(name, args.size, args.repeats, work))
            r = rows[-1]
            print(f"{name:20} ours {r['ours_ms']:7.1f} ms  onnxruntime {r['onnxruntime_ms']:7.1f} ms"
                  f"  ratio {r['ratio']:.2f}x  diff {r['rel_diff']:.1e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "models.json"), "w") as fh:
        json.dump({"meta": meta, "models": rows}, fh, indent=1)
    text = report(rows, meta) + "".join(line + "\n" for line in
                                        models_testbed.section(Path(args.out)))
    with open(os.path.join(args.out, "models.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
