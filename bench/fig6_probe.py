"""Calibration probe for bench.fig6: times the whole-model forward and prints one JSON line.

    python -m bench.fig6_probe --model mobilenet_v2:seed=0 --repeats 5
    {"seconds": <wall of the repeats>, "cpu_seconds": <CPU time of the repeats>}
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fig6_probe")
    p.add_argument("--model", default="mobilenet_v2:seed=0")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    from decolla import emulation
    from decolla.forward import forward
    from decolla.loader import load_model
    model = load_model(args.model)
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    forward(model, x, threads=1)                      # warm-up, not timed
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.repeats):
        forward(model, x, threads=1)
        emulation.settle()          # under time dilation: done when its result would be sent
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
