"""Command line: python -m bench.testbed up|down|cleanup|status|demo  (needs root).

  up       bring up N devices (+ requester + edge) and leave them running; prints describe() JSON
  down     tear down runs left up by `up` (all runs of --prefix, or --run)
  cleanup  remove every leftover with --prefix (namespaces, cgroups, processes), e.g. after a crash
  status   list what exists for --prefix
  demo     3 devices + requester + edge: measure shaping, quotas, load and faults, then tear down
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import structlog

from .core import Testbed, TestbedError, check_environment
from .cpuwork import spin
from .janitor import cleanup, is_empty, leftovers


def _up(args) -> int:
    tb = Testbed(prefix=args.prefix, persist=True)
    tb.start()
    try:
        quota = args.cpu_quota
        if quota is None and args.k:
            quota = tb.calibrate(functools.partial(spin, 600_000), k=args.k).quota
        for i in range(1, args.devices + 1):
            tb.add_host(f"dev{i}", bandwidth_mbit=args.bandwidth, cpu_quota=quota,
                        background_load=args.background_load)
        if not args.no_requester:
            tb.add_host("requester", role="requester")
        if not args.no_edge:
            tb.add_host("edge", role="edge")
        path = tb.write_state()
    except BaseException:
        cleanup(tb.prefix, tb.run)
        raise
    print(json.dumps(tb.describe(), indent=2))
    print(f"# up: run {tb.run}; state in {path}; enter a host with: ip netns exec {tb.tag}dev1 bash",
          file=sys.stderr)
    return 0


def _remove(args) -> int:
    found = cleanup(args.prefix, args.run)
    print(json.dumps(found, indent=2))
    left = leftovers(args.prefix, args.run)
    if not is_empty(left):
        print(f"could not remove: {left}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand."""
    ap = argparse.ArgumentParser(prog="python -m bench.testbed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default="dcl", help="unique name prefix of namespaces/cgroups (default dcl)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--devices", type=int, default=3)
    up.add_argument("--bandwidth", type=float, default=None, help="Mbit/s per device (default unshaped)")
    up.add_argument("--cpu-quota", type=float, default=None, help="cores per device (overrides --k)")
    up.add_argument("--k", type=float, default=8.0, help="calibrate devices k× slower than a host core; 0 = off")
    up.add_argument("--background-load", type=float, default=0.0, help="device CPU usage, 0..1")
    up.add_argument("--no-requester", action="store_true")
    up.add_argument("--no-edge", action="store_true")
    for name in ("down", "cleanup", "status"):
        p = sub.add_parser(name)
        p.add_argument("--run", default=None, help="only this run id")
    demo = sub.add_parser("demo")
    demo.add_argument("--k", type=float, default=8.0)
    demo.add_argument("--bandwidth", type=float, default=20.0)
    demo.add_argument("--background-load", type=float, default=0.3)
    demo.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)

    reason = check_environment()
    if reason:
        print(f"bench.testbed: cannot run: {reason}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "up":
            return _up(args)
        if args.cmd in ("down", "cleanup"):
            return _remove(args)
        if args.cmd == "status":
            print(json.dumps(leftovers(args.prefix, args.run), indent=2))
            return 0
        from .demo import run_demo

        run_demo(prefix=args.prefix, k=args.k, bandwidth_mbit=args.bandwidth, load=args.background_load,
                 out=args.out)
        return 0
    except TestbedError as exc:
        print(f"bench.testbed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.testbed: interrupted; the testbed was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # stdout carries JSON and the demo table; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    sys.exit(main())
