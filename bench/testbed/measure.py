"""Measurements between and inside emulated hosts (used by the demo and the tests)."""

from __future__ import annotations

import json
import subprocess

from .core import Host

PORT = 5201


def _json_line(proc: subprocess.Popen, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no result from {proc.args}")
    return json.loads(lines[-1])


def throughput(src: Host, dst: Host, seconds: float = 1.5, port: int = PORT) -> dict:
    """TCP throughput src → dst measured at the receiver: {"mbit_per_s", "bytes", "seconds"}."""
    recv = dst.python("bench.testbed.netperf", "recv", "--bind", dst.address, "--port", str(port),
                      "--once", stdout=subprocess.PIPE)
    try:
        ready = recv.stdout.readline()
        if b"listening" not in ready:
            raise RuntimeError(f"receiver on {dst.name} did not start: {ready!r}")
        send = src.python("bench.testbed.netperf", "send", "--to", dst.address, "--port", str(port),
                          "--seconds", str(seconds), stdout=subprocess.PIPE)
        sent = _json_line(send, timeout=seconds * 20 + 10)
        if "error" in sent:
            raise RuntimeError(f"{src.name} -> {dst.name}: {sent['error']}")
        return _json_line(recv, timeout=10)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def can_connect(src: Host, dst: Host, port: int = PORT, timeout: float = 1.5) -> tuple[bool, str]:
    """Whether src can open a TCP connection to a listener on dst (and the error if not)."""
    recv = dst.python("bench.testbed.netperf", "recv", "--bind", dst.address, "--port", str(port),
                      "--once", stdout=subprocess.PIPE)
    try:
        recv.stdout.readline()
        send = src.python("bench.testbed.netperf", "send", "--to", dst.address, "--port", str(port),
                          "--seconds", "0.05", "--connect-timeout", str(timeout), stdout=subprocess.PIPE)
        result = _json_line(send, timeout=timeout + 10)
        return ("error" not in result, result.get("error", ""))
    finally:
        recv.kill()
        recv.wait()


def cpu_probe(host: Host, iters: int = 1_000_000, repeats: int = 1) -> dict:
    """A fixed CPU loop inside `host`: {"seconds": wall, "cpu_seconds": CPU time}, best of `repeats`."""
    proc = host.python("bench.testbed.cpuwork", "probe", "--iters", str(iters), "--repeats", str(repeats),
                       stdout=subprocess.PIPE)
    return _json_line(proc, timeout=600)
