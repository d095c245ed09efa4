"""Chaos soak: a LocalCluster serves a steady stream of requests from several clients while
a fault is injected every few seconds at random, and every answer is checked (the
command line is bench.chaos.__main__; the same soak on the testbed, with link faults, is
bench.chaos.testbed).

Faults: kill -9 a device (restarted a moment later), SIGSTOP a device for 1-5 s, kill -9
the leader (restarted a moment later). The run is split in equal phases, one per plan
(auto, layer, single), each with its own clients. A request is

  correct   its logits equal decolla.forward's (relative error <= 1e-4)
  wrong     an answer with other logits
  failed    a clear error (InferenceError / ValueError with its reason), e.g. the
            requester's own "timed out after N s"
  lost      no answer at all: nothing within the request timeout + 15 s

Latency percentiles are given for requests that overlapped a fault (from its injection
until the cluster was whole again, plus 2 s) and for the others. Processes and memory
(RSS sum) are those of everything the run started (bench.procs), counted once the cluster
is whole, at the start and at the end. Every failed or lost request is listed with the
faults it overlapped: the target is that all of them overlap a leader restart.
"""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from bench import procs
from decolla import forward
from decolla.api import Client, InferenceError, LocalCluster
from decolla.loader import load_model

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"
PLANS = ("auto", "layer", "single")
FAULTS = ("kill-device", "stop-device", "kill-leader")
AFTER_FAULT_S = 2.0          # a request ending this long after a fault still counts as hit
SLOW_S = 2.0                 # an answer this slow keeps a summary of its trace


@dataclass
class Outcome:
    t0: float
    t1: float
    plan: str
    kind: str                # correct | wrong | failed | lost
    error: str = ""
    trace: str = ""          # a slow answer: where its time went


@dataclass
class Soak:
    """What one run saw."""
    outcomes: list = field(default_factory=list)
    faults: list = field(default_factory=list)       # [kind, target, start, healed]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)


class Images:
    """A few seeded images and their single-process logits."""

    def __init__(self, spec: str, n: int = 4):
        model = load_model(spec)
        self.images = [np.random.default_rng(s).standard_normal(model.input_shape)
                       .astype(np.float32) for s in range(n)]
        self.refs = [forward.forward(model, im) for im in self.images]

    def check(self, i: int, logits) -> bool:
        ref = self.refs[i]
        return float(np.abs(np.asarray(logits) - ref).max()) <= 1e-4 * float(np.abs(ref).max())


def _client_loop(client: Client, plan: str, images: Images, soak: Soak, stop: threading.Event,
                 timeout: float, rng: random.Random) -> None:
    while not stop.is_set():
        i = rng.randrange(len(images.images))
        t0 = time.monotonic()
        try:
            r = client.infer(images.images[i])      # waits the request timeout + 15 s
            kind, err = ("correct" if images.check(i, r.logits) else "wrong"), ""
            if time.monotonic() - t0 > SLOW_S:
                err = _where(r.trace)
        except InferenceError as exc:
            kind = "lost" if "no answer within" in str(exc) else "failed"
            err = str(exc)
        except Exception as exc:  # any other error is a failure with its reason
            kind, err = "failed", f"{type(exc).__name__}: {exc}"
        if kind == "correct":
            soak.add(Outcome(t0, time.monotonic(), plan, kind, trace=err[:300]))
        else:
            soak.add(Outcome(t0, time.monotonic(), plan, kind, err[:300]))


def _where(trace) -> str:
    """Where a slow request's time went: its wait before the requester started it, then
    each attempt that was not a first one winning (stage/chunk#attempt device reason
    status, and when it was sent, in s from the submission)."""
    s0 = trace.begin
    steps = [f"{r.stage}/{r.chunk}#{r.attempt} {r.device} {r.reason} {r.status} "
             f"@{r.sent - s0:.2f}" for r in trace.records if r.attempt or r.status != "won"]
    return (f"started @{trace.started - s0:.2f}s, done @{trace.finished - s0:.2f}s; "
            + "; ".join(steps[:8]))


def ready_pids(status: dict) -> dict:
    """Ready device -> its worker's pid, from a status()."""
    return {d["name"]: d["pid"] for d in status["devices"] if d["status"] == "ready"}


def healed(ready: dict, devices: int, replaced: dict) -> bool:
    """Every device ready, those of `replaced` (name -> worker pid before the fault) with a
    new worker: a leader restart is over only once the membership shows the new workers,
    not while a client still holds the old leader's last snapshot."""
    return len(ready) >= devices and all(ready.get(n) not in (None, pid)
                                         for n, pid in replaced.items())


def to_replace(kind: str, target: str, before: dict) -> dict:
    """The devices whose worker fault `kind` on `target` replaces (name -> pid before)."""
    if kind == "kill-leader":
        return dict(before)
    return {target: before[target]} if kind == "kill-device" and target in before else {}


def _whole(cluster: LocalCluster, devices: int, timeout: float = 60.0,
           replaced: dict | None = None) -> None:
    """Wait until the cluster's membership has every device ready (`healed`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if healed(ready_pids(cluster.status()), devices, replaced or {}):
                return
        except Exception:       # the leader is restarting
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the cluster did not become whole in {timeout:.0f} s")


def _inject(cluster: LocalCluster, kind: str, rng: random.Random, devices: int) -> str:
    """Inject one fault and undo it (restart, SIGCONT); returns its target."""
    if kind == "kill-leader":
        cluster.restart("leader")
        return "leader"
    name = f"dev{rng.randrange(devices) + 1}"
    if kind == "kill-device":
        cluster.kill(name, signal.SIGKILL)
        time.sleep(rng.uniform(0.5, 2.0))
        cluster.restart(name)
    else:
        cluster.kill(name, signal.SIGSTOP)
        time.sleep(rng.uniform(1.0, 5.0))
        cluster.kill(name, signal.SIGCONT)
    return name


def _snapshot(mark: str, nodes_only: bool = False) -> dict:
    """Processes the run started (only those of nodes if `nodes_only`) and their RSS sum."""
    pids = procs.tagged(mark)
    if nodes_only:
        pids = [p for name, ps in procs.by_node(pids).items() if name for p in ps]
    return {"processes": len(pids),
            "per_node": {k or "other": len(v) for k, v in sorted(procs.by_node(pids).items())},
            "rss_mb": round(procs.rss_bytes(pids) / 2**20, 1)}


def run(seconds: float, devices: int = 3, clients: int = 2, every: float = 4.0,
        plans=PLANS, faults=FAULTS, spec: str = SPEC, seed: int = 0,
        timeout: float = 30.0, progress: bool = True) -> dict:
    """One soak; returns its report (see `summarize`)."""
    from tqdm import tqdm
    rng = random.Random(seed)
    mark = procs.tag()
    images = Images(spec)
    soak = Soak()
    with LocalCluster(devices=devices, model=spec, heartbeat=0.5, plan=plans[0]) as cluster:
        _whole(cluster, devices)
        time.sleep(1.0)
        start = _snapshot(mark)
        t_start = time.monotonic()
        bar = tqdm(total=int(seconds), unit="s", disable=not progress, desc="chaos")
        for p, plan in enumerate(plans):
            phase_end = t_start + seconds * (p + 1) / len(plans)
            stop = threading.Event()
            group = [Client(cluster.leader, plan=plan, connect_timeout=60,
                            request_timeout=timeout) for _ in range(clients)]
            threads = [threading.Thread(target=_client_loop, daemon=True,
                                        args=(c, plan, images, soak, stop, timeout,
                                              random.Random(rng.random())))
                       for c in group]
            for t in threads:
                t.start()
            while time.monotonic() < phase_end:
                time.sleep(min(rng.uniform(0.5, 1.5) * every, max(0.0, phase_end -
                                                                    time.monotonic())))
                if time.monotonic() >= phase_end:
                    break
                kind = rng.choice(faults)
                before = ready_pids(cluster.status())
                t0 = time.monotonic()
                target = _inject(cluster, kind, rng, devices)
                _whole(cluster, devices, replaced=to_replace(kind, target, before))
                soak.faults.append([kind, target, t0, time.monotonic()])
                bar.set_postfix(plan=plan, faults=len(soak.faults), requests=len(soak.outcomes))
                bar.n = min(int(seconds), int(time.monotonic() - t_start))
                bar.refresh()
            stop.set()
            for t in threads:
                t.join(timeout + 30)
            for c in group:
                c.close()
        bar.n = int(seconds)
        bar.close()
        _whole(cluster, devices)
        time.sleep(3.0)              # workers replaced by the last fault have exited
        end = _snapshot(mark)
    return summarize(soak, start, end, seconds, devices, clients, plans, every, seed,
                     t_start, faults)


def _pct(values) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * 1e3
    return {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)} | \
        {"max": round(float(a.max()), 1), "n": len(values)}


def _overlaps(o: Outcome, f: list) -> bool:
    """`o` was in flight between fault `f`'s injection and AFTER_FAULT_S past its healing."""
    return o.t0 < f[3] + AFTER_FAULT_S and o.t1 > f[2]


def _latency(outcomes, faults) -> dict:
    answered = [o for o in outcomes if o.kind == "correct"]
    hit = [any(_overlaps(o, f) for f in faults) for o in answered]
    return {"without_faults": _pct([o.t1 - o.t0 for o, h in zip(answered, hit) if not h]),
            "during_faults": _pct([o.t1 - o.t0 for o, h in zip(answered, hit) if h])}


def _unanswered(soak: Soak, t_start: float) -> list:
    """Every failed or lost request: when (s from the start), its error, the faults it
    overlapped, and whether one of them was a leader restart."""
    out = []
    for o in soak.outcomes:
        if o.kind not in ("failed", "lost"):
            continue
        during = [f"{f[0]}@{f[2] - t_start:.1f}s" for f in soak.faults if _overlaps(o, f)]
        out.append({"kind": o.kind, "plan": o.plan, "t0_s": round(o.t0 - t_start, 2),
                    "t1_s": round(o.t1 - t_start, 2), "error": o.error, "faults": during,
                    "leader_restart": any(d.startswith("kill-leader") for d in during)})
    return out


def summarize(soak: Soak, start: dict, end: dict, seconds, devices, clients, plans, every,
              seed, t_start: float = 0.0, kinds=FAULTS) -> dict:
    """The report: counts per outcome and plan, latency with and without faults (each plan
    and all), faults, every unanswered request with the faults it overlapped, processes and
    memory at the start and the end."""
    outcomes = soak.outcomes
    counts = {k: sum(o.kind == k for o in outcomes) for k in ("correct", "wrong", "failed", "lost")}
    unanswered = _unanswered(soak, t_start)
    per_plan = {}
    for p in plans:
        mine = [o for o in outcomes if o.plan == p]
        per_plan[p] = {"sent": len(mine), **{k: sum(o.kind == k for o in mine) for k in counts},
                       "latency_ms": _latency(mine, soak.faults)}
    return {
        "settings": {"seconds": seconds, "devices": devices, "clients": clients,
                     "plans": list(plans), "fault_every_s": every, "seed": seed, "model": SPEC},
        "requests": len(outcomes), **counts,
        "per_plan": per_plan,
        "latency_ms": _latency(outcomes, soak.faults),
        "faults": {k: sum(f[0] == k for f in soak.faults) for k in kinds},
        "fault_log": [[f[0], f[1], round(f[2] - t_start, 2), round(f[3] - t_start, 2)]
                      for f in soak.faults],
        "heal_ms": _pct([f[3] - f[2] for f in soak.faults]),
        "unanswered": unanswered,
        "slow": [{"plan": o.plan, "t0_s": round(o.t0 - t_start, 2),
                  "latency_s": round(o.t1 - o.t0, 2), "trace": o.trace}
                 for o in sorted(outcomes, key=lambda o: o.t0 - o.t1)[:10]
                 if o.kind == "correct" and o.t1 - o.t0 > SLOW_S],
        "outside_leader_restart": sum(not u["leader_restart"] for u in unanswered),
        "errors": sorted({o.error for o in outcomes if o.error})[:20],
        "start": start, "end": end,
    }


def _latency_rows(name: str, lat: dict) -> list[str]:
    return [f"| {name} | {k.replace('_', ' ')} | " + " | ".join(
        str(v.get(c, "-")) for c in ("p50", "p95", "p99", "max", "n")) + " |"
        for k, v in lat.items()]


def markdown(rep: dict) -> str:
    s = rep["settings"]
    lines = [f"# Chaos soak: {s['seconds']:.0f} s, {s['devices']} devices, {s['clients']} "
             f"clients, plans {', '.join(s['plans'])}, a fault every ~{s['fault_every_s']} s",
             "", f"Model `{s['model']}`, seed {s['seed']}. Figures from a loaded 2-core VM: "
             "latency is as measured under that load (a correctness run, not a benchmark).", ""]
    if "testbed" in s:
        m = s["testbed"]["mechanisms"]
        lines += [f"On bench.testbed (each host its own network namespace): loss "
                  f"{s['testbed']['loss_pct']:.0f} % each way by {m['loss']}, link down by "
                  f"the device's bridge port down; links otherwise unshaped.", ""]
    lines += [
             "| plan | sent | correct | wrong | failed (clear error) | lost |",
             "|---|---|---|---|---|---|"]
    for p, c in list(rep["per_plan"].items()) + [("all", rep | {"sent": rep["requests"]})]:
        lines.append(f"| {p} | {c['sent']} | {c['correct']} | {c['wrong']} | {c['failed']} | "
                     f"{c['lost']} |")
    lines += ["", "| plan | latency (ms) | p50 | p95 | p99 | max | n |",
              "|---|---|---|---|---|---|---|"]
    for p, c in rep["per_plan"].items():
        lines += _latency_rows(p, c["latency_ms"])
    lines += _latency_rows("all", rep["latency_ms"])
    lines += ["", "Faults: " + ", ".join(f"{k} x{v}" for k, v in rep["faults"].items())
              + f"; cluster whole again after (ms): {rep['heal_ms']}", "",
              f"Failed or lost: {len(rep['unanswered'])}, of which outside a leader restart: "
              f"{rep['outside_leader_restart']}", ""]
    for u in rep["unanswered"][:30]:
        lines.append(f"- {u['kind']} ({u['plan']}) {u['t0_s']}-{u['t1_s']} s, during "
                     f"{', '.join(u['faults']) or 'no fault'}: `{u['error'][:120]}`")
    if rep.get("slow"):
        lines += ["", f"Slowest answers over {SLOW_S:.0f} s:", ""] + [
            f"- {o['plan']} at {o['t0_s']} s took {o['latency_s']} s: {o['trace']}"
            for o in rep["slow"]]
    lines += ["", "| | processes | RSS sum (MB) | per node |", "|---|---|---|---|"]
    for k in ("start", "end"):
        lines.append(f"| {k} | {rep[k]['processes']} | {rep[k]['rss_mb']} | "
                     f"{rep[k]['per_node']} |")
    return "\n".join(lines) + "\n"
