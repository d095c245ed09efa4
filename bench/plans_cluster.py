"""The testbed cluster the plan benchmarks share: 3 calibrated Pi-class devices, an edge
host running the leader, and an unshaped, unthrottled requester host running the
benchmark's own agent (one JSON command per stdin line, one JSON reply per stdout line).

Two emulations of a Pi-class CPU (EMULATIONS): "quota", a CFS quota per device host
(full speed for a slice of each period, then stopped), and "dilation", time dilation in
the device processes (decolla.emulation: continuously f× slower). Either is calibrated
so the whole-model forward runs k× slower than on one host core."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROBE_REPEATS = 4
EMULATIONS = ("dilation", "quota")


def device_gmacs(model: str, forward_s: float) -> float:
    """The planner's `gmacs` making its one-device prediction equal the calibrated device's
    measured whole-model time."""
    from decolla.plans import build_plan
    from decolla.cost import KIND_SPEED
    from decolla.plans.auto import Profile, stage_seconds
    from decolla.loader import load_model
    specs = load_model(model).layer_specs()
    one = build_plan(specs, 1, "single")
    pred = stage_seconds(one.stages[0], {s["name"]: s for s in specs}, Profile(local=True))
    return KIND_SPEED["pwconv"].core / 1e9 * pred / forward_s


def ask(proc, timeout: float, **cmd) -> dict:
    """Send one command to the agent and return its JSON reply."""
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    return reply(proc, timeout)


def reply(proc, timeout: float) -> dict:
    """The agent's next JSON reply (log lines before it are skipped)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent exited ({proc.poll()})")
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("agent timed out")


@dataclass
class PlansCluster:
    tb: object                 # bench.testbed.Testbed
    calibration: object        # its Calibration
    forward_s: float           # the calibrated device's whole-model forward, s
    gmacs: float               # device_gmacs() of that forward
    agent: subprocess.Popen
    hello: dict                # the agent's first line
    emulation: str = "quota"   # one of EMULATIONS

    def describe_emulation(self) -> str:
        """One line saying how the devices were slowed, for result files."""
        return describe_emulation(self.tb, self.calibration, self.forward_s)


def calibrate_devices(tb, model: str, k: float, emulation: str,
                      repeats: int = PROBE_REPEATS) -> tuple:
    """Calibrate testbed `tb`'s device slowdown by `emulation` (one of EMULATIONS) so
    `model`'s whole forward runs `k`x slower than on one host core; returns the
    Calibration and the calibrated device's seconds per forward."""
    if emulation not in EMULATIONS:
        raise ValueError(f"emulation must be one of {EMULATIONS}, got {emulation!r}")
    probe = [sys.executable, "-m", "bench.fig6_probe", "--model", model, "--repeats", str(repeats)]
    cal = tb.calibrate(probe, k=k, mode=emulation)
    forward_s = cal.device_seconds / repeats
    print(f"device {emulation}: quota {cal.quota} cores, dilation {cal.dilation} "
          f"({cal.achieved_slowdown:.2f}x slower, {forward_s:.3f} s per forward)", flush=True)
    return cal, forward_s


def fixed_dilation(f: float, k: float):
    """A Calibration standing for dilation by `f`, set rather than measured."""
    from bench.testbed.calibrate import Calibration
    return Calibration(quota=None, k=k, host_cpu_seconds=0.0, device_seconds=0.0,
                       achieved_slowdown=float("nan"), rounds=0, probe="fixed",
                       mode="dilation", dilation=f)


def describe_emulation(tb, cal, forward_s: float) -> str:
    """One line saying how `tb`'s devices were slowed (calibration `cal`), for result files."""
    if cal.probe == "fixed":
        return f"dilation: time dilation f={cal.dilation:.3f} (DECOLLA_DILATE), set, not calibrated"
    how = (f"CFS quota {cal.quota:.3f} cores per {tb.hosts['dev1'].cgroup.period_us / 1e3:g}"
           f" ms period" if cal.mode == "quota" else
           f"time dilation f={cal.dilation:.3f} (DECOLLA_DILATE)")
    return (f"{cal.mode}: {how}; whole model {cal.achieved_slowdown:.2f}x slower than one host "
            f"core (target {cal.k:g}x), {forward_s * 1e3:.0f} ms per forward")


@contextmanager
def plans_cluster(prefix: str, model: str, k: float, bandwidth_mbit: float, agent_module: str,
                  agent_args: list[str], emulation: str = "quota", dilation: float | None = None):
    """Bring the cluster up (devices slowed by `emulation`, one of EMULATIONS, or by the
    fixed dilation factor `dilation` without calibrating: runs of two trees compare at one f), start
    `python -m agent_module --agent --leader ... --bind ... --model model *agent_args` on
    the requester host, yield a PlansCluster; on exit ask the agent to quit and take
    everything down."""
    if emulation not in EMULATIONS:
        raise ValueError(f"emulation must be one of {EMULATIONS}, got {emulation!r}")
    from bench.testbed import Testbed
    logs = Path("/tmp") / f"{prefix}-{os.getpid()}"
    logs.mkdir(exist_ok=True)
    with Testbed(prefix=prefix) as tb:
        if dilation is None:
            cal, forward_s = calibrate_devices(tb, model, k, emulation)
        else:
            cal, forward_s = fixed_dilation(dilation, k), 0.0
        for i in (1, 2, 3):
            tb.add_host(f"dev{i}", bandwidth_mbit=bandwidth_mbit, cpu_quota=cal.quota,
                        cpu_dilation=cal.dilation)
        # rounded down: rounding up could exceed the budget left by the devices
        edge = math.floor(min(0.3, tb.cpu_budget - 3 * (cal.quota or 0)) * 1000) / 1000
        tb.add_host("edge", role="edge", cpu_quota=edge)
        req = tb.add_host("requester", role="requester")
        tb.spawn_node("edge", "leader", model=model, log=logs / "edge.log")
        time.sleep(1.0)
        for i in (1, 2, 3):
            tb.spawn_node(f"dev{i}", "device", leader="edge", model=model, log=logs / f"dev{i}.log")
        proc = req.spawn([sys.executable, "-m", agent_module, "--agent", "--leader",
                          f"{tb.address('edge')}:1900", "--bind", req.address, "--model", model,
                          *agent_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=open(logs / "agent.log", "ab"), text=True, bufsize=1)
        try:
            hello = json.loads(proc.stdout.readline())
            if not hello.get("ready"):
                raise RuntimeError(f"agent did not start: {hello}")
            gmacs = device_gmacs(model, forward_s) if forward_s else float("nan")
            yield PlansCluster(tb, cal, forward_s, gmacs, proc, hello,
                               emulation)
        finally:
            try:
                proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
