"""Per-node time of an imported network's forward on one thread: where the time goes.

    python -m bench.node_times [--model resnet18] [--size 224] [--repeats 10]

The zoo network (bench.zoo, seeded weights) exported to ONNX, loaded by decolla.loader
and run by decolla.forward; every graph node's call (`decolla.graph.ops.run`) is timed
inside whole-network passes. Prints the whole forward's median, then per node its median
time and, for convolutions, the kernel shape, the path (`conv_path`) and GFLOP/s; then
the total per op.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict

import numpy as np

from bench import zoo
from decolla.forward import Forward
from decolla.graph import ops as gops
from decolla.graph import segments
from decolla.loader import load_model


def describe(node, seconds: float) -> str:
    if node.op != "conv":
        return node.op
    kh, kw, cin, cout = node.arrays["weight"].shape
    return (f"conv {kh}x{kw}/{node.attrs['stride'][0]} {cin}->{cout} out {node.shape[0]}x"
            f"{node.shape[1]} {gops.conv_path(node)} act={node.attrs['act']} "
            f"{2 * node.macs / seconds / 1e9:.0f} GFLOP/s")


def node_times(model, image: np.ndarray, repeats: int) -> tuple[float, list, dict]:
    """(median forward seconds, [(median seconds, node)], {op: seconds})."""
    fwd = Forward(model)
    for _ in range(3):
        fwd(image, threads=1)
    whole = []
    for _ in range(repeats):
        t = time.perf_counter()
        fwd(image, threads=1)
        whole.append(time.perf_counter() - t)
    calls = defaultdict(list)
    run = gops.run

    def timed(node, *args):
        t = time.perf_counter()
        y = run(node, *args)
        calls[node.name].append((time.perf_counter() - t, node))
        return y
    segments.gops.run = timed
    try:
        for _ in range(repeats):
            fwd(image, threads=1)
    finally:
        segments.gops.run = run
    rows = [(float(np.median([c[0] for c in v])), v[0][1]) for v in calls.values()]
    per_op: dict[str, float] = defaultdict(float)
    for t, n in rows:
        per_op[n.op] += t
    return float(np.median(whole)), rows, dict(per_op)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", choices=zoo.MODELS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, f"{args.model}.onnx")
        zoo.export(args.model, path, args.size)
        model = load_model(path)
    image = np.random.default_rng(0).standard_normal((args.size, args.size, 3)).astype(np.float32)
    whole, rows, per_op = node_times(model, image, args.repeats)
    print(f"{args.model}: forward {whole * 1e3:.2f} ms (median of {args.repeats})")
    for t, n in rows:
        print(f"{t * 1e3:8.3f} ms  {n.name[-32:]:32}  {describe(n, t)}")
    print("per op (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in per_op.items()) +
          f"; nodes {sum(per_op.values()) * 1e3:.2f} of {whole * 1e3:.2f}")


if __name__ == "__main__":
    main()
