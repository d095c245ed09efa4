"""The chaos soak on the emulated testbed (bench.testbed): every host in its own network
namespace, so the links can fail too.

    python -m bench.chaos --testbed --minutes 3        # root; results in bench/results/chaos_testbed.*

Beside bench.chaos's faults (kill -9 a device or the leader, SIGSTOP a device), two link
faults: `link-down` (the device's bridge port down for 1-5 s: no carrier) and `loss` (10 %
of the device's IP packets dropped each way for 3-8 s: `tc netem` where the kernel has it,
else the testbed's classic-BPF random drop, with `tbf` for any bandwidth cap). The leader
runs on host `edge`, the devices on `dev1`.., the clients in an agent process on host
`requester` (the root namespace has no interface on the testbed's network); the agent
reports what it saw and the cluster's membership through files this process reads.
Elsewhere (no root, no cgroups) `unavailable()` says why and the link faults are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time

from bench import procs
from bench.chaos import soak
from bench.testbed import Testbed, check_environment

LINK_FAULTS = ("link-down", "loss")
LOSS_PCT = 10.0
PREFIX = "dcx"


def unavailable() -> str | None:
    """None when the testbed can run here, else why not."""
    return check_environment()


# ------------------------------------------------------------------ agent (host `requester`)
def _write(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def agent(a) -> int:
    """Clients on host `requester`: one phase per plan as bench.chaos runs them; the ready
    devices (as a client following the leader sees them) go to `a.status` every 0.2 s,
    until the orchestrator writes `a.out`.done."""
    from decolla.api import Client
    images = soak.Images(a.model)
    seen = soak.Soak()
    watch = Client(a.leader, bind=a.bind, plan="single", connect_timeout=120)
    state = {"ready": {}, "t": time.monotonic()}
    done = threading.Event()

    def report():
        while not done.is_set():
            try:
                state["ready"] = soak.ready_pids(watch.status(2))
            except Exception:       # the leader is restarting
                state["ready"] = {}
            state["t"] = time.monotonic()
            _write(a.status, state)
            time.sleep(0.2)
    threading.Thread(target=report, daemon=True).start()
    while len(state["ready"]) < a.devices:
        time.sleep(0.2)
    state["t_start"] = t_start = time.monotonic()
    rng = random.Random(a.seed)
    plans = a.plans.split(",")
    for p, plan in enumerate(plans):
        stop = threading.Event()
        group = [Client(a.leader, bind=a.bind, plan=plan, connect_timeout=120,
                        request_timeout=a.timeout) for _ in range(a.clients)]
        threads = [threading.Thread(target=soak._client_loop, daemon=True,
                                    args=(c, plan, images, seen, stop, a.timeout,
                                          random.Random(rng.random()))) for c in group]
        for t in threads:
            t.start()
        time.sleep(max(0.0, t_start + a.seconds * (p + 1) / len(plans) - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(a.timeout + 30)
        for c in group:
            c.close()
    _write(a.out, [vars(o) for o in seen.outcomes])
    # the status goes on until the orchestrator, whose last fault may still be healing, is done
    deadline = time.monotonic() + 300
    while not os.path.exists(a.out + ".done") and time.monotonic() < deadline:
        time.sleep(0.2)
    done.set()
    watch.close()
    return 0


# ------------------------------------------------------------------ orchestrator (root)
class TestbedCluster:
    """A leader on host `edge` and `devices` devices on hosts dev1.., their logs in
    `log_dir`; the faults bench.chaos injects, and the link faults."""

    def __init__(self, tb: Testbed, devices: int, spec: str, log_dir: str):
        self.tb, self.spec, self.log_dir = tb, spec, log_dir
        self.devices = [f"dev{i + 1}" for i in range(devices)]
        for name in ["edge", *self.devices, "requester"]:
            tb.add_host(name, role={"edge": "edge", "requester": "requester"}.get(name, "device"))
        self.leader = f"{tb.address('edge')}:1900"
        self._spawn("edge")
        for d in self.devices:
            self._spawn(d)

    def _spawn(self, host: str) -> None:
        if host == "edge":
            self.tb.spawn_node("edge", "leader", model=self.spec, extra=["--heartbeat", "0.5"],
                               log=os.path.join(self.log_dir, "edge.log"))
        else:
            self.tb.spawn_node(host, "device", leader="edge", model=self.spec,
                               log=os.path.join(self.log_dir, f"{host}.log"))

    def _kill(self, host: str, timeout: float = 10.0) -> None:
        """kill -9 every process of `host` and wait until they are gone (its port free)."""
        self.tb.kill(host)
        deadline = time.monotonic() + timeout
        while self.tb.host(host).pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def inject(self, kind: str, rng: random.Random) -> str:
        """Inject one fault and undo it; returns its target."""
        tb = self.tb
        if kind == "kill-leader":
            self._kill("edge")
            self._spawn("edge")
            return "edge"
        dev = rng.choice(self.devices)
        if kind == "kill-device":
            self._kill(dev)
            time.sleep(rng.uniform(0.5, 2.0))
            self._spawn(dev)
        elif kind == "stop-device":
            tb.stop(dev)
            time.sleep(rng.uniform(1.0, 5.0))
            tb.cont(dev)
        elif kind == "link-down":
            tb.link_down(dev)
            time.sleep(rng.uniform(1.0, 5.0))
            tb.link_up(dev)
        elif kind == "loss":
            tb.set_loss(dev, LOSS_PCT)
            time.sleep(rng.uniform(3.0, 8.0))
            tb.set_loss(dev, 0.0)
        else:
            raise ValueError(f"unknown fault {kind!r}")
        return dev


def _status(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _whole(path: str, devices: int, after: float, agent, replaced: dict,
           timeout: float = 120.0) -> None:
    """Wait until the agent reports every device ready, seen after monotonic time `after`
    (those of `replaced` with a new worker: bench.chaos.soak.healed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _status(path)
        if st.get("t", 0) > after and soak.healed(st.get("ready", {}), devices, replaced):
            return
        if agent.poll() is not None:
            raise RuntimeError(f"the chaos agent exited with {agent.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"the cluster did not become whole in {timeout:.0f} s")


def run(seconds: float, devices: int = 3, clients: int = 2, every: float = 4.0,
        plans=soak.PLANS, faults=soak.FAULTS + LINK_FAULTS, spec: str = soak.SPEC,
        seed: int = 0, timeout: float = 30.0, log_dir: str | None = None) -> dict:
    """One soak on the testbed; returns bench.chaos's report, with what was emulated."""
    rng = random.Random(seed)
    mark = procs.tag()
    log_dir = log_dir or tempfile.mkdtemp(prefix="decolla-chaos-tb-")
    status, out = os.path.join(log_dir, "status.json"), os.path.join(log_dir, "outcomes.json")
    seen = soak.Soak()
    with Testbed(prefix=PREFIX) as tb:
        cluster = TestbedCluster(tb, devices, spec, log_dir)
        agent_proc = tb.host("requester").python(
            "bench.chaos.testbed", "agent", "--leader", cluster.leader,
            "--bind", tb.address("requester"), "--model", spec, "--plans", ",".join(plans),
            "--devices", str(devices), "--clients", str(clients), "--seconds", str(seconds),
            "--timeout", str(timeout), "--seed", str(seed), "--status", status, "--out", out,
            log=os.path.join(log_dir, "agent.log"))
        deadline = time.monotonic() + 180
        while "t_start" not in _status(status):
            if agent_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the chaos agent did not start (logs in {log_dir})")
            time.sleep(0.2)
        start = soak._snapshot(mark, nodes_only=True)
        t_start = _status(status)["t_start"]
        while True:
            time.sleep(rng.uniform(0.5, 1.5) * every)
            if time.monotonic() >= t_start + seconds:
                break
            kind = rng.choice(faults)
            before = _status(status).get("ready", {})
            t0 = time.monotonic()
            target = cluster.inject(kind, rng)
            _whole(status, devices, time.monotonic(), agent_proc,
                   soak.to_replace(kind, "" if kind == "kill-leader" else target, before))
            seen.faults.append([kind, target, t0, time.monotonic()])
        _write(out + ".done", True)
        agent_proc.wait(timeout + 120)
        time.sleep(3.0)              # workers replaced by the last fault have exited
        end = soak._snapshot(mark, nodes_only=True)
        emulated = tb.describe()
    with open(out) as fh:
        seen.outcomes = [soak.Outcome(**o) for o in json.load(fh)]
    rep = soak.summarize(seen, start, end, seconds, devices, clients, plans, every, seed,
                          t_start, faults)
    rep["settings"]["testbed"] = {"mechanisms": emulated["mechanisms"], "loss_pct": LOSS_PCT,
                                  "log_dir": log_dir}
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos.testbed agent")
    p.add_argument("role", choices=["agent"])
    for name, kind in (("leader", str), ("bind", str), ("model", str), ("plans", str),
                       ("devices", int), ("clients", int), ("seconds", float),
                       ("timeout", float), ("seed", int), ("status", str), ("out", str)):
        p.add_argument(f"--{name}", type=kind, required=True)
    return agent(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
