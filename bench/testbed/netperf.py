"""A tiny iperf-like TCP throughput tool (sender and receiver) for testbed measurements.

    python -m bench.testbed.netperf recv --bind 10.77.0.11 --port 5201 [--once]
    python -m bench.testbed.netperf send --to 10.77.0.11 --port 5201 --seconds 2

The receiver prints one JSON line per connection: bytes, seconds (first to last byte) and
mbit_per_s. The sender prints bytes sent, or {"error": ...} when it cannot connect.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

CHUNK = 64 * 1024


def receive_one(conn: socket.socket) -> dict:
    """Read until EOF; return bytes and the rate from the first to the last byte."""
    total, first, last = 0, None, None
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        total += len(data)
    seconds = (last - first) if first is not None else 0.0
    mbit = total * 8 / seconds / 1e6 if seconds > 0 else 0.0
    return {"bytes": total, "seconds": seconds, "mbit_per_s": mbit}


def serve(bind: str, port: int, once: bool) -> None:
    """Accept connections and report each one's throughput on stdout."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(8)
    print(json.dumps({"listening": [bind, port]}), flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            print(json.dumps(receive_one(conn)), flush=True)
        if once:
            return


def send(to: str, port: int, seconds: float, connect_timeout: float) -> dict:
    """Send zeros to `to:port` for `seconds`; return what was sent or the connect error."""
    payload = bytes(CHUNK)
    try:
        sock = socket.create_connection((to, port), timeout=connect_timeout)
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    sock.settimeout(max(10.0, seconds * 5))
    total, end = 0, time.perf_counter() + seconds
    with sock:
        while time.perf_counter() < end:
            total += sock.send(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the receiver's close, so all data has arrived when we return
    return {"bytes": total, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Command line: `recv` or `send`."""
    ap = argparse.ArgumentParser(prog="python -m bench.testbed.netperf")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rv = sub.add_parser("recv")
    rv.add_argument("--bind", default="0.0.0.0")
    rv.add_argument("--port", type=int, default=5201)
    rv.add_argument("--once", action="store_true")
    sd = sub.add_parser("send")
    sd.add_argument("--to", required=True)
    sd.add_argument("--port", type=int, default=5201)
    sd.add_argument("--seconds", type=float, default=2.0)
    sd.add_argument("--connect-timeout", type=float, default=3.0)
    args = ap.parse_args(argv)
    if args.cmd == "recv":
        serve(args.bind, args.port, args.once)
        return 0
    result = send(args.to, args.port, args.seconds, args.connect_timeout)
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
