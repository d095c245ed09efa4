"""Crash reaper: `python -m bench.testbed.reaper --prefix P --run R`, started by every Testbed.

It blocks on stdin, a pipe whose write end only the testbed's process holds. EOF without
`done` means that process died (even by SIGKILL) without closing: then it removes the run.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .janitor import cleanup


def reap(prefix: str, run: str) -> None:
    """Block until stdin closes; clean up the run unless `done` was received first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal Ctrl-C is the parent's to handle
    data = sys.stdin.buffer.read()
    if b"done" not in data:
        cleanup(prefix, run)


def main(argv: list[str] | None = None) -> int:
    """Command line: --prefix and --run of the testbed to watch."""
    ap = argparse.ArgumentParser(prog="python -m bench.testbed.reaper")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--run", required=True)
    args = ap.parse_args(argv)
    reap(args.prefix, args.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
