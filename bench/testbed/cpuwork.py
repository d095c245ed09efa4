"""CPU work run inside emulated hosts: a background load and a CPU-bound probe loop.

    python -m bench.testbed.cpuwork burn         # inside a cgroup whose quota sets the load
    python -m bench.testbed.cpuwork probe --iters 2000000   # {"seconds": wall, "cpu_seconds": ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def spin(iters: int) -> int:
    """A fixed CPU-bound loop (pure Python, single thread); returns a checksum."""
    acc = 0
    for i in range(iters):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def probe(iters: int) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds) `spin(iters)` takes in this process."""
    t0, c0 = time.perf_counter(), time.process_time()
    spin(iters)
    return time.perf_counter() - t0, time.process_time() - c0


def burn() -> None:
    """Spin forever: the background load; its cgroup's quota sets how much CPU it takes."""
    while True:
        spin(100_000)


def main(argv: list[str] | None = None) -> int:
    """Command line: `burn` or `probe`."""
    ap = argparse.ArgumentParser(prog="python -m bench.testbed.cpuwork")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("burn", help="background CPU load (limit it with a cgroup quota)")
    pr = sub.add_parser("probe", help="time a fixed CPU loop")
    pr.add_argument("--iters", type=int, default=2_000_000)
    pr.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd == "burn":
        burn()
    else:
        runs = [probe(args.iters) for _ in range(args.repeats)]
        print(json.dumps({"seconds": min(w for w, _ in runs), "cpu_seconds": min(c for _, c in runs),
                          "iters": args.iters}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
