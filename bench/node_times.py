"""Per-node time of an imported network's forward on one thread: where the time goes, and
where it goes against onnxruntime.

    python -m bench.node_times [--model resnet18] [--size 224] [--repeats 10] [--ort [--depth 2]]

The zoo network (bench.zoo, seeded weights) exported to ONNX, loaded by decolla.loader
and run by decolla.forward; inside whole-network passes every step of the segments'
compiled programs (one node, or the nodes fused into it: its output node is named) and
every other layer is timed. Prints the whole forward's median, then per step its median
time and, for convolutions, the kernel shape, the path (`conv_path`) and GFLOP/s; then
the total per op. `--ort` adds onnxruntime's own profile of the same file (one thread,
all optimisations; its fused nodes keep an ONNX node's or tensor's name) and compares
both per group of nodes named alike (the first `--depth` parts of the torch module path:
a block or a fire module), largest gap first.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict

import numpy as np

from bench import zoo
from bench.kernels import ort_node_times
from decolla import forward as fw
from decolla.graph import ops as gops
from decolla.loader import load_model


def describe(node, seconds: float) -> str:
    if node is None or node.op != "conv":
        return "layer" if node is None else node.op
    kh, kw, cin, cout = node.arrays["weight"].shape
    return (f"conv {kh}x{kw}/{node.attrs['stride'][0]} {cin}->{cout} out {node.shape[0]}x"
            f"{node.shape[1]} {gops.conv_path(node)} act={node.attrs['act']} "
            f"{2 * node.macs / seconds / 1e9:.0f} GFLOP/s")


def _timed(fn, name: str, calls: dict):
    def run(*args):
        t = time.perf_counter()
        fn(*args)
        calls[name].append(time.perf_counter() - t)
    return run


def node_times(model, image: np.ndarray, repeats: int) -> tuple[float, dict]:
    """(median forward seconds, {step's node or layer name: median seconds})."""
    fwd = fw.Forward(model)
    for _ in range(3):
        fwd(image, threads=1)
    whole = []
    for _ in range(repeats):
        t = time.perf_counter()
        fwd(image, threads=1)
        whole.append(time.perf_counter() - t)
    calls: dict[str, list] = defaultdict(list)
    run = fw._run
    for plan in fwd._plans.values():         # each segment's program: its steps timed
        for layer, w, *_ in plan:
            for prog in (w.values() if isinstance(w, dict) else ()):
                prog.steps = [_timed(s, n, calls) for s, n in zip(prog.steps, prog.step_nodes)]

    def timed_run(layer, *args):
        if isinstance(getattr(layer, "nodes", None), list):
            return run(layer, *args)
        name = layer.names[0] if isinstance(layer, fw.fusion.Block) else layer.name
        _timed(run, name, calls)(layer, *args)
    fw._run = timed_run
    try:
        for _ in range(repeats):
            fwd(image, threads=1)
    finally:
        fw._run = run
    return float(np.median(whole)), {k: float(np.median(v)) for k, v in calls.items()}


def group(name: str, depth: int) -> str:
    """The first `depth` parts of a node's torch module path ('/features/features.3/...')."""
    parts = [p for p in name.split("/") if p]
    return "/".join(parts[:depth]) if len(parts) > depth else "(other)"


def ort_names(path: str, theirs: dict, ours: dict) -> dict:
    """onnxruntime's node times keyed by the ONNX node ours folded it into: its fused
    nodes are named after an ONNX node or an output tensor (`<tensor>_nchwc`), which is
    traced back through the nodes' first inputs (an activation to its conv) to a name of
    `ours`; reorders of its NCHWc layout keep their own name."""
    import onnx
    g = onnx.load(path, load_external_data=False).graph
    made_by = {o: n.name for n in g.node for o in n.output}
    first_in = {n.name: n.input[0] for n in g.node if n.input}
    out: dict[str, float] = defaultdict(float)
    for name, t in theirs.items():
        key = name.removesuffix("_nchwc")
        key = made_by.get(key, key)
        while key not in ours and key in first_in:
            key = made_by.get(first_in[key], "")
        out[key if key in ours else name] += t
    return out


def compare(ours: dict, theirs: dict, depth: int) -> list[tuple[str, float, float]]:
    """[(group, our seconds, onnxruntime's seconds)] sorted by our excess, largest first."""
    tot: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
    for side, times in enumerate((ours, theirs)):
        for name, t in times.items():
            tot[group(name, depth)][side] += t
    return sorted(((g, a, b) for g, (a, b) in tot.items()), key=lambda r: r[2] - r[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", choices=zoo.MODELS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ort", action="store_true", help="compare with onnxruntime's profile")
    p.add_argument("--depth", type=int, default=2, help="module path parts per --ort group")
    args = p.parse_args(argv)
    image = np.random.default_rng(0).standard_normal((args.size, args.size, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, f"{args.model}.onnx")
        zoo.export(args.model, path, args.size)
        model = load_model(path)
        theirs = {}
        if args.ort:
            feed = {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None])}
            theirs = {k: v * 1e-3 for k, v in
                      ort_node_times(path, feed, args.repeats, work).items()}
        nodes = {n.name: n for layer in model.layers for n in getattr(layer, "nodes", ())}
        whole, ours = node_times(model, image, args.repeats)
        if theirs:
            theirs = ort_names(path, theirs, {l.name for l in model.layers} | set(nodes))
    print(f"{args.model}: forward {whole * 1e3:.2f} ms (median of {args.repeats})")
    per_op: dict[str, float] = defaultdict(float)
    for name, t in ours.items():
        n = nodes.get(name)
        per_op[n.op if n else "layer"] += t
        print(f"{t * 1e3:8.3f} ms  {name[-32:]:32}  {describe(n, t)}")
    print("per op (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in per_op.items()) +
          f"; steps {sum(per_op.values()) * 1e3:.2f} of {whole * 1e3:.2f}")
    if theirs:
        print(f"\nper group (ms): ours, onnxruntime (its profile, mean of {args.repeats}), "
              f"ours - onnxruntime; totals {sum(ours.values()) * 1e3:.2f}, "
              f"{sum(theirs.values()) * 1e3:.2f}")
        for g, a, b in compare(ours, theirs, args.depth):
            print(f"{a * 1e3:8.3f} {b * 1e3:8.3f} {(a - b) * 1e3:+8.3f}  {g}")


if __name__ == "__main__":
    main()
