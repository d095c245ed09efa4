"""Kernel benchmark: DeColla's Cython kernels against torch on one thread.

    python -m bench.kernels [--repeats N] [--arch mobilenet_v2] [--width 1.0] [--size 224]
                            [--avx2-baselines auto|on|off]

Per layer type (sum over the network's layers of that type) and for the whole
network; torch runs the same folded weights (no BN), channels-last, traced and
`torch.jit.freeze`d, with torch.set_num_threads(1). torch is also timed after
`torch.jit.optimize_for_inference` (oneDNN). Per layer the baseline is the faster of
the frozen layer and the optimized layer minus its layout conversions (estimated as
to_mkldnn of the input + half a round trip of the output), i.e. an estimate of the
layer's time inside torch's optimized network; for the network both torch variants
are reported and the faster one gives the ratio. Times are medians over
interleaved repeats. Writes bench/results/kernels.json and bench/results/kernels.md.

onnxruntime (the optional `bench` extra: onnx, onnxruntime) runs the same torch network
exported to ONNX (torch.onnx.export, TorchScript exporter), CPU provider, one intra-op
and one inter-op thread, all graph optimisations: timed in the same interleaved loop
for the whole network, and per layer type from onnxruntime's own profiler (per-node
kernel times, mapped back to our layers by node name; onnxruntime fuses the bias,
ReLU6 and residual add into its convolutions and adds layout reorders of its own,
counted apart). Without onnxruntime installed those columns are left out.

Ours is decolla.forward, inverted-residual blocks fused where decolla.fusion says. Each
such block is also timed through kernels.fused (the block by tiles of output rows) against
its layers one at a time, with a check that both give the same bits.

--avx2-baselines (auto: when ours is the v3 build on a CPU with AVX-512) re-runs the whole
benchmark in a child process with AVX-512 hidden from CPUID (bench.avx2_shim), so that
onnxruntime, torch and the sgemm run their AVX2 kernels as on an AVX2-only host.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

from decolla import forward as fwd
from decolla import fusion, ops, reference
from decolla import model as M
from decolla.kernels import ISA, SUPPORTED

from bench import avx2_shim

NOMINAL_PEAK = 93e9  # FLOP/s per core, DESIGN.md §5 (AVX2: 2 FMA x 8 lanes x 2 x ~2.9 GHz)
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _interleaved(fa, fb, repeats: int) -> tuple[float, float]:
    """Wall-time medians (ms) of two functions timed alternately, so load drifts hit both."""
    (wa, _), (wb, _) = _interleaved_many([fa, fb], repeats)
    return wa, wb


def _interleaved_many(fns, repeats: int) -> list[tuple[float, float]]:
    """(wall ms, CPU ms) medians of several functions timed round-robin. CPU time
    (this process only) is less disturbed by other processes on a shared machine."""
    for _ in range(3):
        for f in fns:
            f()
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            c = time.process_time()
            t = time.perf_counter()
            f()
            wall[i].append(time.perf_counter() - t)
            cpu[i].append(time.process_time() - c)
    return [(float(np.median(w) * 1e3), float(np.median(c) * 1e3)) for w, c in zip(wall, cpu)]


# --------------------------------------------------------------------------- torch side

def torch_layer(layer):
    """A torch module computing one folded decolla layer (NCHW semantics)."""
    import torch
    from torch import nn
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    k = layer.kind
    if k == "conv3x3":
        m = nn.Conv2d(layer.in_shape[2], layer.out_shape[2], 3, layer.stride, 1)
        m.weight.data = t(layer.weight.transpose(3, 2, 0, 1))
    elif k == "dwconv3x3":
        c = layer.in_shape[2]
        m = nn.Conv2d(c, c, 3, layer.stride, 1, groups=c)
        m.weight.data = t(layer.weight.transpose(2, 0, 1)[:, None])
    elif k == "pwconv":
        m = nn.Conv2d(layer.in_shape[2], layer.out_shape[2], 1)
        m.weight.data = t(layer.weight.T[:, :, None, None])
    elif k == "linear":
        m = nn.Linear(layer.in_shape[0], layer.out_shape[0])
        m.weight.data = t(layer.weight.T)
    else:
        return _GAP()
    m.bias.data = t(layer.bias)
    return nn.Sequential(m, nn.ReLU6()) if layer.relu6 else m


def _GAP():
    from torch import nn

    class GAP(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))
    return GAP()


def torch_model(model: M.Model):
    """The whole decolla model as a torch module (residual adds included)."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = nn.ModuleList(torch_layer(l) for l in model.layers)
            self.names = [l.name for l in model.layers]
            self.res = [l.residual for l in model.layers]

        def forward(self, x):
            saved = {"input": x}
            for mod, name, res in zip(self.mods, self.names, self.res):
                y = mod(x)
                if res is not None:
                    y = y + saved[res]
                saved[name] = x = y
            return x
    return Net().eval()


def _freeze(module, example):
    import torch
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example)
        return torch.jit.freeze(traced)


def _optimized(module, example):
    import torch
    with torch.no_grad():
        return torch.jit.optimize_for_inference(_freeze(module, example))


def _nchw(x: np.ndarray):
    import torch
    t = torch.from_numpy(x)
    if x.ndim == 3:
        return t.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    return t[None]


# --------------------------------------------------------------------------- onnxruntime side

def _ort_session(onnx_path: str, profile_prefix: str | None = None):
    """An onnxruntime CPU session on one thread (profiling into profile_prefix if given)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])


def export_onnx(net, image: np.ndarray, path: str) -> None:
    """The torch network (folded weights) as ONNX, input 'image' (1, 3, H, W) NCHW."""
    import warnings

    import torch
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter is deprecated
        torch.onnx.export(net, (x,), path, input_names=["image"], output_names=["logits"],
                          opset_version=17, dynamo=False)


_ORT_LAYER = re.compile(r"/mods\.(\d+)/")


def ort_node_times(onnx_path: str, feed: dict, repeats: int, workdir: str) -> dict[str, float]:
    """Mean kernel time (ms) of each onnxruntime node over `repeats` profiled runs (after
    3 unprofiled-equivalent warm-up runs, which are dropped)."""
    sess = _ort_session(onnx_path, os.path.join(workdir, "ort_profile"))
    warm = 3
    for _ in range(warm + repeats):
        sess.run(None, feed)
    with open(sess.end_profiling()) as fh:
        events = json.load(fh)
    runs: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            runs[e["name"][:-len("_kernel_time")]].append(e["dur"] * 1e-3)
    return {name: float(np.mean(d[warm:] if len(d) > warm else d)) for name, d in runs.items()}


def ort_per_layer(node_ms: dict[str, float], n_layers: int) -> tuple[list[float], float]:
    """onnxruntime's node times summed per decolla layer (nodes are named after the torch
    module, /mods.<i>/...), and the time of nodes of no layer (layout reorders)."""
    per = [0.0] * n_layers
    other = 0.0
    for name, ms in node_ms.items():
        m = _ORT_LAYER.search(name)
        if m and int(m.group(1)) < n_layers:
            per[int(m.group(1))] += ms
        else:
            other += ms
    return per, other


def _onnxruntime_version():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


# --------------------------------------------------------------------------- measurements

def _layer_group(layer) -> str:
    if layer.kind == "dwconv3x3":
        return f"dwconv3x3 s{layer.stride}"
    if layer.kind == "pwconv":
        return "pwconv (residual)" if layer.residual else "pwconv"
    return layer.kind


def fused_blocks(model: M.Model, tensors: dict, repeats: int) -> list[dict]:
    """Each block `decolla.fusion` fuses (as decolla.forward does; none in the baseline
    build) through kernels.fused against its layers one at a time through the same build's
    kernels (interleaved medians, ms); the outputs must be equal."""
    rows = []
    for i, blk in sorted(fusion.find(model.layers, "input").items()):
        layers = model.layers[i:i + len(blk.names)]
        x = np.ascontiguousarray(tensors[model.layers[i - 1].name if i else "input"], np.float32)
        outs = [np.empty(l.out_shape, np.float32) for l in layers]
        got = np.empty(blk.out_shape, np.float32)

        def one():
            blk(x, got)

        def separate():
            src = x
            for layer, out in zip(layers, outs):
                # a fused block's only residual is its input
                fwd._run(layer, layer.weight, layer.bias, src, x if layer.residual else None,
                         out, 1)
                src = out

        one()
        separate()
        (t_one, _), (t_three, _) = _interleaved_many([one, separate], repeats)
        rows.append({"block": layers[0].name.split(".")[0], "in_shape": list(x.shape),
                     "out_shape": list(blk.out_shape), "expand": len(layers) == 3,
                     "stride": blk.stride, "residual": blk.residual,
                     "fused_ms": t_one, "separate_ms": t_three,
                     "equal": bool(np.array_equal(got, outs[-1]))})
    return rows


def in_network_times(f: fwd.Forward, image: np.ndarray, repeats: int) -> list[float]:
    """Median wall time (ms) of each layer of f's plan, run in order as in f(image)."""
    f(image)
    times = [[] for _ in f._plan]
    for _ in range(repeats):
        for i, (layer, w, b, src, res, out) in enumerate(f._plan):
            t = time.perf_counter()
            fwd._run(layer, w, b, src, res, out, 1)
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t) * 1e3) for t in times]


def measure_peak_sgemm() -> float:
    """FLOP/s (per CPU second) of a large single-thread sgemm through the BLAS the
    kernels use."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 64, 1024)).astype(np.float32)
    w = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = np.zeros(1024, np.float32)
    out = np.empty((16, 64, 1024), np.float32)
    [(_, cpu_ms)] = _interleaved_many(
        [lambda: ops._gemm.pwconv(a, w, b, out, 0, 0, False, None, 0, 0, 1)], 7)
    return 2 * 16 * 64 * 1024 * 1024 / (cpu_ms * 1e-3)


def run(arch: str, width: float, size: int, repeats: int) -> dict:
    import torch
    torch.set_num_threads(1)
    ops.set_threads(1)
    model = M.build(arch, width, size)
    image = np.random.default_rng(1).standard_normal(model.input_shape).astype(np.float32)
    _, tensors = reference.forward(model, image, keep=True)
    per_type: dict[str, dict] = defaultdict(lambda: {"ours_ms": 0.0, "torch_ms": 0.0,
                                                     "ours_cpu_ms": 0.0, "torch_cpu_ms": 0.0,
                                                     "macs": 0, "layers": 0})
    rows = []
    prev = "input"
    try:
        from tqdm import tqdm
        it = tqdm(model.layers, desc="layers", leave=False, mininterval=2)
    except ImportError:  # pragma: no cover
        it = model.layers
    for layer in it:
        x = tensors[prev]
        res = tensors[layer.residual] if layer.residual else None
        out = np.empty(layer.out_shape, np.float32)
        ours = lambda: fwd._run(layer, layer.weight, layer.bias, x, res, out, 1)  # noqa: E731
        tx = _nchw(x)
        tres = _nchw(res) if res is not None else None
        with torch.no_grad():
            frozen = _freeze(torch_layer(layer), tx)
            opt = _optimized(torch_layer(layer), tx)
            if tres is None:
                fz, op = (lambda: frozen(tx)), (lambda: opt(tx))
            else:
                fz, op = (lambda: frozen(tx) + tres), (lambda: opt(tx) + tres)
            (t_ours, c_ours), (t_fz, c_fz), (t_op, c_op) = _interleaved_many([ours, fz, op],
                                                                             repeats)
            # A one-layer optimized module converts its input to oneDNN's layout and its
            # output back; inside a whole optimized network it would not: subtract that.
            # (The network input is converted inside torch's network too: keep that one.)
            y = opt(tx)
            t_in = c_in = t_out = c_out = 0.0
            if y.dim() == 4:  # gap / linear: torch runs them on dense tensors anyway
                (t_in, c_in), (t_out, c_out) = _interleaved_many(
                    [lambda: tx.to_mkldnn(), lambda: y.to_mkldnn().to_dense()], repeats)
                if prev == "input":
                    t_in = c_in = 0.0
        t_var = {"frozen": t_fz, "mkldnn": t_op,
                 "mkldnn_minus_layout": max(1e-6, t_op - t_in - t_out / 2)}
        t_torch = min(t_var["frozen"], t_var["mkldnn_minus_layout"])
        c_torch = min(c_fz, max(1e-6, c_op - c_in - c_out / 2))
        g = per_type[_layer_group(layer)]
        g["ours_ms"] += t_ours
        g["torch_ms"] += t_torch
        g["ours_cpu_ms"] += c_ours
        g["torch_cpu_ms"] += c_torch
        g["macs"] += layer.macs
        g["layers"] += 1
        rows.append({"layer": layer.name, "kind": layer.kind, "stride": layer.stride,
                     "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape),
                     "macs": layer.macs, "ours_ms": t_ours, "torch_ms": t_torch,
                     "torch_variants_ms": t_var, "ours_cpu_ms": c_ours, "torch_cpu_ms": c_torch})
        prev = layer.name
    # whole network
    f = fwd.Forward(model)
    net = torch_model(model)
    tx = _nchw(image)
    frozen = _freeze(net, tx)
    ort_version = _onnxruntime_version()
    ort_net = None
    with tempfile.TemporaryDirectory() as tmp:
        fns = [lambda: f(image)]
        if ort_version is not None:
            onnx_path = os.path.join(tmp, "model.onnx")
            export_onnx(net, image, onnx_path)
            feed = {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None])}
            sess = _ort_session(onnx_path)
            fns.append(lambda: sess.run(None, feed))
        with torch.no_grad():
            opt = _optimized(net, tx)
            timed = _interleaved_many(fns + [lambda: frozen(tx), lambda: opt(tx)], repeats)
            (t_ours, c_ours), (t_frozen, c_frozen), (t_opt, c_opt) = timed[:1] + timed[-2:]
            err = float(np.abs(f(image) - frozen(tx).numpy()[0]).max())
        if ort_version is not None:
            (t_ort, c_ort) = timed[1]
            ort_err = float(np.abs(f(image) - sess.run(None, feed)[0][0]).max())
            node_ms = ort_node_times(onnx_path, feed, repeats, tmp)
            per_layer, other = ort_per_layer(node_ms, len(model.layers))
            for layer, row, ms in zip(model.layers, rows, per_layer):
                row["onnxruntime_ms"] = ms
                g = per_type[_layer_group(layer)]
                g["onnxruntime_ms"] = g.get("onnxruntime_ms", 0.0) + ms
            ort_net = {"ms": t_ort, "cpu_ms": c_ort, "ratio": t_ours / t_ort,
                       "cpu_ratio": c_ours / c_ort, "max_abs_diff_logits": ort_err,
                       "profiled_nodes_ms": sum(node_ms.values()),
                       "profiled_other_ms": other,
                       "gflops": 2 * model.macs / (t_ort * 1e-3) / 1e9}
    # each layer timed inside whole-network passes (inputs as the previous layer left
    # them in cache): the counterpart of onnxruntime's profiler times
    for layer, row, ms in zip(model.layers, rows, in_network_times(f, image, repeats)):
        row["ours_in_network_ms"] = ms
        g = per_type[_layer_group(layer)]
        g["ours_in_network_ms"] = g.get("ours_in_network_ms", 0.0) + ms
    blocks = fused_blocks(model, tensors, repeats)
    peak_measured = measure_peak_sgemm()
    for g in per_type.values():
        g["ratio"] = g["ours_ms"] / g["torch_ms"]
        g["cpu_ratio"] = g["ours_cpu_ms"] / g["torch_cpu_ms"]
        g["ours_gflops"] = 2 * g["macs"] / (g["ours_ms"] * 1e-3) / 1e9
        g["torch_gflops"] = 2 * g["macs"] / (g["torch_ms"] * 1e-3) / 1e9
        if g.get("onnxruntime_ms"):
            g["ratio_vs_onnxruntime"] = g["ours_ms"] / g["onnxruntime_ms"]
            g["in_network_ratio_vs_onnxruntime"] = g["ours_in_network_ms"] / g["onnxruntime_ms"]
            g["onnxruntime_gflops"] = 2 * g["macs"] / (g["onnxruntime_ms"] * 1e-3) / 1e9
    flops = 2 * model.macs
    return {
        "model": {"arch": arch, "width": width, "input_size": size, "macs": model.macs},
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "kernel_isa": ISA, "threads": 1, "torch": torch.__version__,
                    "onnxruntime": ort_version,
                    "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
                    "hidden": avx2_shim.LABEL if avx2_shim.active() else None,
                    "blas": _blas_info()},
        "repeats": repeats,
        "network": {"ours_ms": t_ours, "torch_frozen_ms": t_frozen,
                    "torch_optimize_for_inference_ms": t_opt,
                    "ratio_vs_frozen": t_ours / t_frozen,
                    "ratio_vs_best_torch": t_ours / min(t_frozen, t_opt),
                    "cpu_ms": {"ours": c_ours, "torch_frozen": c_frozen,
                               "torch_optimize_for_inference": c_opt},
                    "cpu_ratio_vs_best_torch": c_ours / min(c_frozen, c_opt),
                    "max_abs_diff_logits": err,
                    "ours_gflops": flops / (t_ours * 1e-3) / 1e9,
                    "torch_gflops": flops / (min(t_frozen, t_opt) * 1e-3) / 1e9,
                    "onnxruntime": ort_net},
        "peak": {"nominal_gflops": NOMINAL_PEAK / 1e9,
                 "measured_sgemm_gflops": peak_measured / 1e9,
                 "ours_fraction_of_nominal": flops / (t_ours * 1e-3) / NOMINAL_PEAK,
                 "ours_cpu_fraction_of_nominal": flops / (c_ours * 1e-3) / NOMINAL_PEAK},
        "per_type": dict(per_type),
        "fused_blocks": blocks,
        "layers": rows,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _blas_info() -> list:
    from threadpoolctl import threadpool_info
    return [{k: d.get(k) for k in ("filepath", "version", "architecture", "num_threads")}
            for d in threadpool_info() if d.get("user_api") == "blas"]


def markdown(r: dict) -> str:
    n = r["network"]
    o = n.get("onnxruntime")
    ort_cols = o is not None
    lines = [f"# Kernel benchmark: {r['model']['arch']} width {r['model']['width']} "
             f"{r['model']['input_size']}² ({r['model']['macs'] / 1e6:.1f} M MACs)", "",
             f"1 thread, kernel ISA `{r['machine']['kernel_isa']}`, torch {r['machine']['torch']}"
             f" (BN folded, channels-last, traced + frozen)"
             + (f", onnxruntime {r['machine']['onnxruntime']} (the same weights exported to "
                "ONNX, CPU provider, 1 thread, all graph optimisations)" if ort_cols else
                ", onnxruntime not installed (`pip install -e .[bench]`)")
             + f", medians of {r['repeats']} "
             f"interleaved repeats. CPU: {r['machine']['processor']}. "
             f"OPENBLAS_CORETYPE={r['machine']['OPENBLAS_CORETYPE']}."
             + (f" **{r['machine']['hidden']}** (bench/cpuid_mask.c preloaded): onnxruntime, "
                "torch and the sgemm run their AVX2 kernels, as on an AVX2-only host."
                if r["machine"].get("hidden") else ""), "",
             "| layer type | layers | MMACs | ours ms | torch ms | ratio | CPU-time ratio | "
             "ours GFLOP/s | torch GFLOP/s |"
             + (" onnxruntime ms | ours / onnxruntime | ours in network ms | "
                "in network / onnxruntime |" if ort_cols else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
             + (" ---: | ---: | ---: | ---: |" if ort_cols else "")]
    for name, g in sorted(r["per_type"].items()):
        row = (f"| {name} | {g['layers']} | {g['macs'] / 1e6:.1f} | {g['ours_ms']:.3f} | "
               f"{g['torch_ms']:.3f} | {g['ratio']:.2f} | {g['cpu_ratio']:.2f} | "
               f"{g['ours_gflops']:.1f} | "
               f"{g['torch_gflops']:.1f} |")
        if ort_cols:
            row += (f" {g['onnxruntime_ms']:.3f} | {g['ratio_vs_onnxruntime']:.2f} |"
                    f" {g['ours_in_network_ms']:.3f} |"
                    f" {g['in_network_ratio_vs_onnxruntime']:.2f} |"
                    if g.get("onnxruntime_ms") else " – | – | – | – |")
        lines.append(row)
    if ort_cols:
        lines += ["", f"onnxruntime per layer type: mean kernel time of its nodes from its "
                  f"profiler, i.e. inside whole-network runs (bias, ReLU6 and residual add fused "
                  f"into its convolutions); its nodes sum to {o['profiled_nodes_ms']:.2f} ms, of "
                  f"which {o['profiled_other_ms']:.3f} ms in nodes of no layer (layout reorders). "
                  f"'ours ms' times each layer alone, interleaved with torch (colder caches); "
                  f"'ours in network' times each layer inside whole-network passes, the "
                  f"like-for-like comparison with onnxruntime's profiler."]
    c = n["cpu_ms"]
    lines += ["", "| whole network | wall ms | CPU ms | GFLOP/s (wall) |",
              "| --- | ---: | ---: | ---: |",
              f"| DeColla Forward | {n['ours_ms']:.2f} | {c['ours']:.2f} | {n['ours_gflops']:.1f} |",
              f"| torch jit.freeze | {n['torch_frozen_ms']:.2f} | {c['torch_frozen']:.2f} | |",
              f"| torch optimize_for_inference | {n['torch_optimize_for_inference_ms']:.2f} | "
              f"{c['torch_optimize_for_inference']:.2f} | |"]
    if ort_cols:
        lines.append(f"| onnxruntime | {o['ms']:.2f} | {o['cpu_ms']:.2f} | {o['gflops']:.1f} |")
    lines += ["", f"Ratio ours / torch frozen: **{n['ratio_vs_frozen']:.2f}**; "
              f"ours / best torch: **{n['ratio_vs_best_torch']:.2f}** (wall time; in CPU time "
              f"of this process {n['cpu_ratio_vs_best_torch']:.2f})"
              + (f"; ours / onnxruntime: **{o['ratio']:.2f}** (CPU time {o['cpu_ratio']:.2f})"
                 if ort_cols else "")
              + f". Max |logit difference|: {n['max_abs_diff_logits']:.2e} vs torch"
              + (f", {o['max_abs_diff_logits']:.2e} vs onnxruntime" if ort_cols else "")
              + ".", "",
              f"Peak: nominal {r['peak']['nominal_gflops']:.0f} GFLOP/s/core (DESIGN.md §5, not "
              f"measured); a large single-thread sgemm reaches "
              f"{r['peak']['measured_sgemm_gflops']:.1f} GFLOP/s per CPU second; the whole network "
              f"runs at "
              f"{100 * r['peak']['ours_fraction_of_nominal']:.0f} % of nominal peak in wall time, "
              f"{100 * r['peak']['ours_cpu_fraction_of_nominal']:.0f} % in CPU time.", ""]
    fb = r.get("fused_blocks") or []
    if fb:
        big = [b for b in fb if b["fused_ms"] < b["separate_ms"]]
        lines += ["| inverted-residual block | input | stride | fused ms | three layers ms | "
                  "speed-up | same bits |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {b['block']} | {'×'.join(map(str, b['in_shape']))} | {b['stride']} | "
                  f"{b['fused_ms']:.3f} | {b['separate_ms']:.3f} | "
                  f"{b['separate_ms'] / b['fused_ms']:.2f} | {'yes' if b['equal'] else 'NO'} |"
                  for b in fb]
        lines += ["", f"kernels.fused (one block by tiles of output rows, as decolla.forward "
                  f"runs it): all blocks {sum(b['fused_ms'] for b in fb):.2f} ms fused "
                  f"vs {sum(b['separate_ms'] for b in fb):.2f} ms as three layers; "
                  f"{len(big)} of {len(fb)} blocks faster fused.", ""]
    return "\n".join(lines)


def wants_avx2_baselines(mode: str) -> bool:
    """Whether to re-run under bench.avx2_shim: `on`, or `auto` when ours is the v3 build
    on a CPU that has AVX-512 (the baselines would use it) and the shim works here."""
    if avx2_shim.active() or mode == "off":
        return False
    return mode == "on" or (ISA == "v3" and "v4" in SUPPORTED
                            and avx2_shim.unavailable() is None)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="mobilenet_v2", choices=sorted(M.ARCHS))
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--avx2-baselines", choices=("auto", "on", "off"), default="auto",
                   help="hide AVX-512 from the baselines (a child process under "
                        "bench/cpuid_mask.c); auto: when ours is the v3 build")
    a = p.parse_args(argv)
    if wants_avx2_baselines(a.avx2_baselines):
        try:
            env = avx2_shim.env()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            p.error(str(e))
        env["DECOLLA_KERNELS"] = ISA
        print(f"bench.kernels: re-running with {avx2_shim.LABEL}", file=sys.stderr)
        sys.exit(subprocess.run([sys.executable, "-m", "bench.kernels", *argv],
                                env=env).returncode)
    r = run(a.arch, a.width, a.size, a.repeats)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernels.json"), "w") as fh:
        json.dump(r, fh, indent=1)
    md = markdown(r)
    with open(os.path.join(a.out, "kernels.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
