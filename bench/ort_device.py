"""onnxruntime on one emulated device: the "best single device" bar of the testbed benches.

The same weights as DeColla's model, run by onnxruntime on one thread: a model spec is
exported to ONNX (bench.kernels' torch network, TorchScript exporter; needs torch and
onnx: the `bench` and `train` extras), an imported model's own `.onnx` file is used as it
is (copied). `export` writes the file and checks its logits against decolla.forward.
`--agent` runs inside a device host of the testbed, under the same emulation as the
devices: the host's CPU quota, or time dilation (DECOLLA_DILATE: each `run` call is
followed by a sleep of (f − 1) × the CPU time it took, decolla.emulation).
It answers one JSON command per stdin line:

    {"cmd": "run", "repeats": 4}  ->  {"ok": true, "result": [{"latency_s":..., "cpu_s":...}]}

The image is on the device already (a user running one device has it there): latency is
onnxruntime's `run` alone, from NCHW float32 input to logits.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from bench.plans_cluster import ask
from decolla import emulation


def export(model_spec: str, path: str) -> float:
    """Write `model_spec`'s network as ONNX to `path` (an `.onnx` spec: that file, copied);
    returns the relative error of onnxruntime's logits on it against decolla.forward on a
    seeded image (a bad export is an error)."""
    from bench.kernels import _ort_session
    from decolla.forward import forward
    from decolla.loader import load_model
    model = load_model(model_spec)
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    if is_onnx(model_spec):
        if not (os.path.exists(path) and os.path.samefile(model_spec, path)):
            shutil.copyfile(model_spec, path)
    else:
        from bench.kernels import export_onnx, torch_model
        export_onnx(torch_model(model), x, path)
    sess = _ort_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: _nchw(x)})[0].reshape(-1)
    ref = forward(model, x).reshape(-1)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    if not err < 1e-3:
        raise RuntimeError(f"onnxruntime's answer on the ONNX file of {model_spec} differs "
                           f"from decolla.forward (relative error {err:.2e})")
    return err


def host_seconds(path: str, repeats: int = 15) -> float:
    """Median seconds of onnxruntime's `run` on `path` in this process (a host core, no
    emulation), after two warm-up runs."""
    sess, feed = _session_and_feed(path)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def _session_and_feed(path: str):
    """A one-thread onnxruntime session on `path` and a seeded input for it."""
    from bench.kernels import _ort_session
    sess = _ort_session(path)
    inp = sess.get_inputs()[0]
    return sess, {inp.name: np.random.default_rng(1).standard_normal(feed_shape(inp.shape))
                  .astype(np.float32)}


def is_onnx(model_spec: str) -> bool:
    """Whether a model spec names an ONNX file (load_model's rule: by its extension)."""
    return str(model_spec).endswith(".onnx")


def feed_shape(shape) -> tuple[int, ...]:
    """An ONNX input's shape with symbolic or unknown dimensions (a batch axis) as 1."""
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def agent(args) -> int:
    """The device side: one onnxruntime session, timed `run` calls on request."""
    sess, feed = _session_and_feed(args.onnx)
    run = emulation.wrap(sess.run)       # dilated like a kernel call when DECOLLA_DILATE is set
    for _ in range(2):
        run(None, feed)                  # warm-up
    d = emulation.current()
    print(json.dumps({"ready": True, "dilation": d.factor if d else None}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        rows = []
        for _ in range(int(cmd["repeats"])):
            t0, c0 = time.perf_counter(), time.process_time()
            run(None, feed)
            rows.append({"latency_s": time.perf_counter() - t0,
                         "cpu_s": time.process_time() - c0})
        print(json.dumps({"ok": True, "result": rows}), flush=True)
    return 0


def start(host, onnx_path: str, log_path) -> subprocess.Popen:
    """Start the agent inside testbed host `host` (its quota or dilation applies); returns
    the process once it is ready."""
    proc = host.spawn([sys.executable, "-m", "bench.ort_device", "--agent", "--onnx", onnx_path],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=open(log_path, "ab"), text=True, bufsize=1,
                      env={"OMP_NUM_THREADS": "1"})
    hello = json.loads(proc.stdout.readline() or "{}")
    if not hello.get("ready"):
        raise RuntimeError(f"onnxruntime agent did not start (see {log_path})")
    return proc


def run(proc: subprocess.Popen, repeats: int, timeout: float) -> dict:
    """Ask the agent `proc` for `repeats` timed runs: its reply, {"ok": true, "result":
    [{"latency_s", "cpu_s"}, ...]} or {"ok": false, "error": ...}."""
    return ask(proc, timeout, cmd="run", repeats=int(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ort_device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent", action="store_true", help="serve timed runs on stdin/stdout")
    p.add_argument("--onnx", required=True, help="the ONNX file (written with --export)")
    p.add_argument("--export", metavar="MODEL", help="write MODEL's network to --onnx first")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.export:
        print(json.dumps({"rel_err": export(args.export, args.onnx)}))
    return agent(args) if args.agent else 0


if __name__ == "__main__":
    raise SystemExit(main())
