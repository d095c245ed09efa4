"""Device-speed calibration: the CPU quota that makes a probe run k× slower than on one host core.

Default k = 8: a Raspberry Pi 4 core is about 1/8 of a modern x86 core (published Pi 4
MobileNetV2 figures ≈ 93 ms on one thread). The quota is first set to 1/k core, then
corrected by the measured slowdown until it is within `tolerance` of k. The host baseline is
the probe's CPU time (≈ its time on a free core), so busy neighbours do not stretch it; the
throttled run is timed by wall clock, as a device would experience it. The result always
states the slowdown it achieved.

`calibrate_dilation` does the same for time dilation (decolla.emulation): the probe runs
unthrottled with DECOLLA_DILATE=f, f starting at k and corrected by the measured slowdown
(sleep jitter and cold caches after each sleep make it differ a little from f).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from decolla import emulation

from . import cgroup


@dataclass(frozen=True)
class Calibration:
    """Result: `quota` cores make `probe` take `achieved_slowdown` × its host CPU time (target `k`)."""

    quota: float | None          # CFS quota in cores (quota mode), else None
    k: float
    host_cpu_seconds: float
    device_seconds: float
    achieved_slowdown: float
    rounds: int
    probe: str
    mode: str = "quota"           # "quota" or "dilation"
    dilation: float | None = None  # DECOLLA_DILATE factor (dilation mode)

    def as_dict(self) -> dict:
        """Plain dict for result files."""
        return asdict(self)


def _time_callable(fn: Callable[[], object], group: cgroup.CpuCgroup) -> tuple[float, float]:
    """Run `fn` in a forked child inside `group`; return its (wall, CPU) seconds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            group.add_self()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            os.write(w, struct.pack("dd", time.perf_counter() - t0, time.process_time() - c0))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if len(data) != 16 or os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("calibration probe failed in its child process")
    return struct.unpack("dd", data)


def _time_command(cmd: Sequence[str], group: cgroup.CpuCgroup,
                  env: dict | None = None) -> tuple[float, float]:
    """Run `cmd` inside `group`; return (wall, CPU) seconds.

    A command may report its own timing (without start-up) as a JSON line
    {"seconds": wall, "cpu_seconds": cpu}; otherwise the whole process is measured.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=group.add_self, env=env)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait(): we want this child's rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"calibration command {' '.join(cmd)} exited with {proc.returncode}")
    for line in reversed(out.strip().splitlines()):
        try:
            doc = json.loads(line)
            return float(doc["seconds"]), float(doc.get("cpu_seconds", doc["seconds"]))
        except (ValueError, KeyError, TypeError):
            continue
    return wall, usage.ru_utime + usage.ru_stime


def measure(probe: Callable[[], object] | Sequence[str], group: cgroup.CpuCgroup,
            env: dict | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds `probe` (a callable or a command) takes inside `group`; `env`:
    the command's environment (commands only)."""
    if callable(probe):
        return _time_callable(probe, group)
    return _time_command(probe, group, env)


def _probe_name(probe) -> str:
    return probe.__name__ if callable(probe) and hasattr(probe, "__name__") else (
        repr(probe) if callable(probe) else " ".join(probe))


def _one_cpu() -> frozenset | None:
    """The CPU throttled hosts run on (Testbed._place packs them from the last CPU)."""
    return frozenset({max(os.sched_getaffinity(0))}) if cgroup.placement() != "none" else None


def calibrate_quota(root: cgroup.CgroupRoot, parent: str, probe: Callable[[], object] | Sequence[str],
                    k: float = 8.0, tolerance: float = 0.1, max_rounds: int = 4) -> Calibration:
    """Find the quota (cores) under which `probe` runs `k`× slower (wall) than its CPU time on a host core.

    Uses scratch cgroups `<parent>/calib-host` and `<parent>/calib-dev` (removed afterwards).
    Each time is the best of two runs; the returned quota is the best of the rounds tried
    (check `achieved_slowdown`).
    """
    if k < 1:
        raise ValueError("k must be ≥ 1 (a device is not faster than the host)")
    host = cgroup.CpuCgroup(root, f"{parent}/calib-host").create()
    # on one CPU, as the testbed runs throttled hosts (Testbed._place)
    dev = cgroup.CpuCgroup(root, f"{parent}/calib-dev", _one_cpu()).create()
    try:
        host.set_quota(None)
        # CPU time, not wall time: on a shared machine a neighbour would otherwise stretch the
        # baseline and make the device look too fast. min of two: the cache-warm run.
        t_host = min(measure(probe, host)[1] for _ in range(2))
        quota, best, rounds = 1.0 / k, None, 0
        for rounds in range(1, max_rounds + 1):
            dev.set_quota(quota)
            t_dev = min(measure(probe, dev)[0] for _ in range(2))
            achieved = t_dev / t_host
            if best is None or abs(achieved / k - 1.0) < abs(best[2] / k - 1.0):
                best = (quota, t_dev, achieved)
            if abs(achieved / k - 1.0) <= tolerance:
                break
            quota = min(1.0, max(0.01, quota * achieved / k))
        return Calibration(quota=round(best[0], 5), k=k, host_cpu_seconds=t_host, device_seconds=best[1],
                           achieved_slowdown=best[2], rounds=rounds, probe=_probe_name(probe))
    finally:
        host.remove()
        dev.remove()


def calibrate_dilation(root: cgroup.CgroupRoot, parent: str, probe: Sequence[str], k: float = 8.0,
                       tolerance: float = 0.03, max_rounds: int = 3) -> Calibration:
    """Find the DECOLLA_DILATE factor under which the command `probe` runs `k`× slower (wall)
    than its CPU time on a host core (scratch cgroups as calibrate_quota's, no quota)."""
    if k < 1:
        raise ValueError("k must be ≥ 1 (a device is not faster than the host)")
    if callable(probe):
        raise TypeError("dilation is set in a new process's environment: give a command")
    host = cgroup.CpuCgroup(root, f"{parent}/calib-host").create()
    dev = cgroup.CpuCgroup(root, f"{parent}/calib-dev", _one_cpu()).create()
    try:
        host.set_quota(None)
        dev.set_quota(None)
        plain = {k_: v for k_, v in os.environ.items() if k_ != emulation.ENV}
        t_host = min(measure(probe, host, plain)[1] for _ in range(2))
        f, best, rounds = k, None, 0
        for rounds in range(1, max_rounds + 1):
            t_dev = min(measure(probe, dev, {**plain, emulation.ENV: f"{f:.4f}"})[0]
                        for _ in range(2))
            achieved = t_dev / t_host
            if best is None or abs(achieved / k - 1.0) < abs(best[2] / k - 1.0):
                best = (f, t_dev, achieved)
            if abs(achieved / k - 1.0) <= tolerance:
                break
            f = max(1.0, f * k / achieved)
        return Calibration(quota=None, k=k, host_cpu_seconds=t_host, device_seconds=best[1],
                           achieved_slowdown=best[2], rounds=rounds, probe=_probe_name(probe),
                           mode="dilation", dilation=round(best[0], 4))
    finally:
        host.remove()
        dev.remove()
