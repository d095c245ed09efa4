"""Allocation-policy benchmark (paper Fig. 5): ``python -m bench.policy [--quick]``.

(a) average slowdown and (b) total reward vs training iteration for DRL-ES, DRL
(and ES), with Random / Average / Least (and EFT) as levels; (c) scheduling
runtime vs number of concurrent request tasks; (d) scheduling runtime vs the CPU
quota of the scheduling process (a real cgroup CPU limit when writable); a table
of held-out average slowdown for every allocator and the per-stage decision
latency. Writes PNGs, policy.json and policy.md into bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import structlog

from decolla.allocators import make_allocator

log = structlog.get_logger("bench.policy")

HEURISTICS = ("random", "average", "least", "proportional", "eft")
ALGOS = ("drl-es", "drl", "es")
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _policy_modules():
    try:
        from decolla.policy import scenarios, simulator, train
    except ImportError:  # running from a source tree that is not pip-installed
        from policy import scenarios, simulator, train
    return scenarios, simulator, train


def train_or_load(algo: str, iterations: int, seed: int, policies: str | None, workdir: str) -> tuple[str, dict]:
    """Path of a trained .npz and its curve: reuse policies/ALGO if present, else train."""
    _, _, train = _policy_modules()
    if policies and os.path.exists(os.path.join(policies, algo, "policy.npz")):
        d = os.path.join(policies, algo)
        with open(os.path.join(d, "curve.json")) as fh:
            return os.path.join(d, "policy.npz"), json.load(fh)
    out = os.path.join(workdir, algo)
    cfg = train.TrainConfig(algo=algo, iterations=iterations, seed=seed,
                            eval_every=max(1, iterations // 30), checkpoint_every=max(iterations, 1))
    train.train(cfg, out)
    with open(os.path.join(out, "curve.json")) as fh:
        return os.path.join(out, "policy.npz"), json.load(fh)


def evaluate_allocator(alloc, seeds, cfg) -> dict:
    """Average slowdown, total reward and request latency of an allocator on seeds."""
    _, simulator, _ = _policy_modules()
    sim = simulator.run_allocator(simulator.Simulator.from_seeds(seeds, cfg), alloc)
    sd = sim.average_slowdown()
    return {"avg_slowdown": float(sd.mean()), "avg_slowdown_median": float(np.median(sd)),
            "total_reward": float(sim.total_reward.mean()), "latency_s": float(sim.latency.mean()),
            "per_episode_slowdown": sd.tolist()}


def _stage_cases(seeds, cfg, limit=200):
    """(stage, chunks, devices) triples from held-out episodes, for timing decisions."""
    _, simulator, _ = _policy_modules()
    sim = simulator.Simulator.from_seeds(seeds, cfg)
    cases = []
    eft = make_allocator("eft")
    while not sim.done and len(cases) < limit:
        acts = np.zeros((sim.B, sim.K), dtype=int)
        for b in range(sim.B):
            devs = sim.device_states(b)
            st, ch = sim.stage_info(b), sim.chunk_costs(b)
            cases.append((st, ch, devs))
            idx = {d.name: i for i, d in enumerate(devs)}
            acts[b] = [idx[n] for n in eft.assign(st, ch, devs)]
        sim.step(acts)
    return cases[:limit]


def decision_latency(alloc, cases, repeats: int = 5) -> dict:
    """Median and p99 wall time of one assign() call (one stage)."""
    return decision_latencies({"a": alloc}, cases, repeats)["a"]


def decision_latencies(allocs: dict, cases, repeats: int = 5) -> dict:
    """decision_latency of several allocators, taking turns (one pass over the cases each,
    `repeats` rounds) so that all of them see the same drifting load of a shared machine."""
    ts = {name: [] for name in allocs}
    n_live = [sum(d.alive for d in devs) for _ in range(repeats) for _, _, devs in cases]
    for _ in range(repeats):
        for name, alloc in allocs.items():
            for st, ch, devs in cases:
                t = time.perf_counter()
                alloc.assign(st, ch, devs)
                ts[name].append(time.perf_counter() - t)
    return {name: _latency_stats(np.array(v) * 1e6, np.array(n_live)) for name, v in ts.items()}


def _latency_stats(a: np.ndarray, n_live: np.ndarray) -> dict:
    return {"median_us": float(np.median(a)), "p99_us": float(np.quantile(a, 0.99)),
            "mean_us": float(a.mean()), "n": len(a),
            "median_us_2plus_devices": float(np.median(a[n_live >= 2])) if (n_live >= 2).any() else None,
            "median_us_by_devices": {int(k): float(np.median(a[n_live == k])) for k in np.unique(n_live)}}


class _NumpyPath:
    """A learned allocator deciding through its numpy path (`assign_numpy`), as a timing baseline."""
    name = "learned-numpy"

    def __init__(self, alloc):
        self.assign = alloc.assign_numpy


def concurrent_tasks(alloc, cases, n_tasks, repeats: int = 20) -> dict:
    """Wall time to schedule one stage for each of n concurrent requests.

    Tasks share the devices: after each task the chosen devices' queued work grows
    by the chunk's compute time, so later tasks see the earlier ones.
    """
    out = {}
    for n in n_tasks:
        ts = []
        for r in range(repeats):
            st, ch, devs = cases[r % len(cases)]
            devs = list(devs)
            t = time.perf_counter()
            for _ in range(n):
                names = alloc.assign(st, ch, devs)
                extra = {}
                for c, name in zip(ch, names):
                    extra[name] = extra.get(name, 0.0) + c.macs
                devs = [replace(d, queue=d.queue + (d.name in extra),
                                busy_s=d.busy_s + extra.get(d.name, 0.0)
                                / max(d.speed * max(d.available, 1e-3), 1.0)) for d in devs]
            ts.append(time.perf_counter() - t)
        out[n] = {"median_ms": float(np.median(ts) * 1e3), "mean_ms": float(np.mean(ts) * 1e3)}
    return out


# ---- (d) CPU quota -------------------------------------------------------------------

CGROUP_V1 = "/sys/fs/cgroup/cpu"
CGROUP_V2 = "/sys/fs/cgroup"


def _make_cgroup(quota: float, period_us: int = 10_000):
    """Create a cgroup limited to `quota` cores; returns (dir, procs file) or None."""
    name = f"decolla-bench-policy-{os.getpid()}-{int(quota * 1000)}"
    try:
        if os.path.exists(os.path.join(CGROUP_V1, "cpu.cfs_quota_us")):
            d = os.path.join(CGROUP_V1, name)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "cpu.cfs_period_us"), "w") as fh:
                fh.write(str(period_us))
            with open(os.path.join(d, "cpu.cfs_quota_us"), "w") as fh:
                fh.write(str(max(int(quota * period_us), 1000)))
            return d, os.path.join(d, "tasks")
        if os.path.exists(os.path.join(CGROUP_V2, "cgroup.controllers")):
            d = os.path.join(CGROUP_V2, name)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "cpu.max"), "w") as fh:
                fh.write(f"{max(int(quota * period_us), 1000)} {period_us}")
            return d, os.path.join(d, "cgroup.procs")
    except OSError as e:
        log.warning("cgroup unavailable", error=str(e))
    return None


def _run_limited(quota: float, policy: str, seeds: list[int]) -> dict | None:
    cg = _make_cgroup(quota)
    if cg is None:
        return None
    d, procs = cg

    def enter():
        with open(procs, "w") as fh:
            fh.write(str(os.getpid()))

    try:
        res = subprocess.run([sys.executable, "-m", "bench.policy", "--child-latency", policy,
                              "--child-seeds", ",".join(map(str, seeds))],
                             capture_output=True, text=True, preexec_fn=enter, timeout=600,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if res.returncode != 0:
            log.warning("limited child failed", stderr=res.stderr[-2000:])
            return None
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        try:
            os.rmdir(d)
        except OSError:
            pass


def cpu_quota_sweep(policy: str, seeds, quotas) -> dict:
    """Decision latency of the learned allocator under each CPU quota (cores)."""
    out = {}
    for q in quotas:
        r = _run_limited(q, policy, seeds)
        if r is None:
            return {"skipped": "cgroup CPU controller not writable (needs root and a cgroup mount)"}
        out[str(q)] = r
    return out


def _child_latency(policy: str, seeds: list[int]) -> None:
    scenarios, _, _ = _policy_modules()
    cases = _stage_cases(seeds, scenarios.ScenarioConfig(), limit=100)
    alloc = make_allocator("learned", path=policy)
    decision_latency(alloc, cases[:10], repeats=1)  # warm-up
    print(json.dumps(decision_latency(alloc, cases, repeats=3)))


# ---- plots and report --------------------------------------------------------------------

def _plots(res: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    levels = res["curve_levels"]
    for key, ylabel, fname in (("avg_slowdown", "average slowdown", "policy_fig5a_slowdown.png"),
                               ("total_reward", "total reward", "policy_fig5b_reward.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for algo, curve in res["curves"].items():
            ax.plot(curve["iteration"], curve[key], label=algo.upper())
        for i, (name, v) in enumerate(levels.items()):
            ax.axhline(v[key], ls="--", color=f"C{i + 3}", label=name.capitalize())
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.set_title(f"Fig. 5{'a' if 'slow' in key else 'b'}: {ylabel} (validation scenarios)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        files.append(fname)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in res["concurrent_tasks"].items():
        ns = sorted(series, key=int)
        ax.plot([int(n) for n in ns], [series[n]["median_ms"] for n in ns], marker="o", label=name)
    ax.set_xlabel("concurrent request tasks")
    ax.set_ylabel("scheduling runtime (ms, median)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Fig. 5c: runtime vs concurrent tasks")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "policy_fig5c_tasks.png"), dpi=110)
    plt.close(fig)
    files.append("policy_fig5c_tasks.png")

    cq = res["cpu_quota"]
    if "skipped" not in cq:
        fig, ax = plt.subplots(figsize=(6, 4))
        qs = sorted(cq, key=float)
        ax.plot([float(q) * 100 for q in qs], [cq[q]["mean_us"] for q in qs], marker="o", label="mean")
        ax.plot([float(q) * 100 for q in qs], [cq[q]["median_us"] for q in qs], marker="s", label="median")
        ax.set_xlabel("CPU quota of the scheduling process (% of one core)")
        ax.set_ylabel("decision latency per stage (µs)")
        ax.legend()
        ax.set_title("Fig. 5d: runtime vs CPU quota (learned policy)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "policy_fig5d_cpu.png"), dpi=110)
        plt.close(fig)
        files.append("policy_fig5d_cpu.png")
    return files


def _markdown(res: dict) -> str:
    rows = sorted(res["heldout"].items(), key=lambda kv: kv[1]["avg_slowdown"])
    best_h = min((v["avg_slowdown"], k) for k, v in res["heldout"].items() if k in HEURISTICS)
    best_l = min((v["avg_slowdown"], k) for k, v in res["heldout"].items() if k not in HEURISTICS)
    lines = [f"Held-out scenarios: {res['n_heldout']} seeds never used in training "
             f"(mode: {res['mode']}, training iterations: {res['iterations']}).", "",
             "| allocator | avg slowdown (mean) | avg slowdown (median) | total reward | request latency (s) "
             "| decision median (µs) | median, ≥ 2 devices (µs) | decision p99 (µs) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in rows:
        lat = res["decision_latency"].get(name, {})
        lines.append(f"| {name} | {v['avg_slowdown']:.1f} | {v['avg_slowdown_median']:.1f} | "
                     f"{v['total_reward']:.0f} | {v['latency_s']:.2f} | {lat.get('median_us', float('nan')):.0f} "
                     f"| {lat.get('median_us_2plus_devices') or float('nan'):.0f} "
                     f"| {lat.get('p99_us', float('nan')):.0f} |")
    verdict = (f"The best heuristic ({best_h[1]}, {best_h[0]:.1f}) beats the best learned policy "
               f"({best_l[1]}, {best_l[0]:.1f})." if best_h[0] < best_l[0] else
               f"The best learned policy ({best_l[1]}, {best_l[0]:.1f}) beats the best heuristic "
               f"({best_h[1]}, {best_h[0]:.1f}).")
    lines += ["", verdict]
    ref, fast = res["decision_latency"].get("drl-es/reference"), res["decision_latency"].get("drl-es")
    if ref and fast:
        lines += ["", f"drl-es decision median {fast['median_us']:.0f} µs vs {ref['median_us']:.0f} µs for the "
                  f"straightforward implementation of the same policy in the same run "
                  f"({ref['median_us'] / fast['median_us']:.1f}× faster; same decisions)."]
    npy = res["decision_latency"].get("drl-es/numpy")
    if npy and fast:
        lines += ["", f"drl-es decision path: {fast.get('implementation', '?')}; the numpy fast path "
                  f"(`assign_numpy`) takes {npy['median_us']:.0f} µs median, p99 {npy['p99_us']:.0f} µs, in the "
                  f"same run ({npy['median_us'] / fast['median_us']:.1f}× the time of `assign`)."]
    if "decision_latency_load_average" in res:
        before, after = res["decision_latency_load_average"]
        lines += ["", f"Decision latency: wall time of one assign() call (one stage, K chunks) over 200 "
                  f"held-out stage states, measured {res.get('decision_latency_measured', '?')}; "
                  f"load average {before[0]:.2f} before, {after[0]:.2f} after (2-core shared machine)."]
    return "\n".join(lines) + "\n"


def scheduling_runtime(allocs: dict, drl_es_policy: str, heldout, cfg, quick: bool) -> dict:
    """Decision latency per stage (median, p99), Fig. 5c (concurrent tasks), Fig. 5d (CPU quota)."""
    cases = _stage_cases(heldout[:32], cfg, limit=200)
    load = os.getloadavg()
    for alloc in allocs.values():   # warm-up: first calls import and allocate
        decision_latency(alloc, cases[:20], repeats=1)
    # Baseline in the same run: the numpy path of the same policy.
    lat = decision_latencies({**allocs, "drl-es/numpy": _NumpyPath(allocs["drl-es"])}, cases, repeats=5)
    lat["drl-es"]["implementation"] = "compiled" if getattr(allocs["drl-es"], "compiled", False) else "numpy"
    tasks = (1, 2, 4, 8, 16, 32) if quick else (1, 2, 4, 8, 16, 32, 64, 128)
    conc = {name: concurrent_tasks(allocs[name], cases, tasks, repeats=10 if quick else 30)
            for name in ("drl-es", "eft", "least", "random")}
    quotas = (1.0, 0.5, 0.25, 0.1) if quick else (1.0, 0.75, 0.5, 0.3, 0.2, 0.1, 0.05)
    cpu = cpu_quota_sweep(drl_es_policy, heldout[:16], quotas)
    return {"decision_latency": lat, "concurrent_tasks": conc, "cpu_quota": cpu,
            "decision_latency_load_average": [load, os.getloadavg()],
            "decision_latency_measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Allocation-policy benchmark (paper Fig. 5)")
    ap.add_argument("--quick", action="store_true", help="short training and fewer scenarios (minutes)")
    ap.add_argument("--iterations", type=int, help="training iterations per algorithm")
    ap.add_argument("--policies", help="directory with ALGO/policy.npz + curve.json to reuse")
    ap.add_argument("--heldout", type=int, help="number of held-out scenarios")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--only", choices=("latency",),
                    help="latency: re-measure only the scheduling runtime (decision latency, Fig. 5c, 5d) "
                         "of the policies in OUT/policies and update OUT/policy.json and policy.md")
    ap.add_argument("--child-latency", help=argparse.SUPPRESS)
    ap.add_argument("--child-seeds", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_latency:
        _child_latency(a.child_latency, [int(s) for s in a.child_seeds.split(",")])
        return
    if a.only == "latency":
        _only_latency(a)
        return
    import torch
    torch.set_num_threads(1)
    scenarios, _, train = _policy_modules()
    iterations = a.iterations or (60 if a.quick else 1500)
    n_heldout = a.heldout or (48 if a.quick else 256)
    os.makedirs(a.out, exist_ok=True)
    workdir = os.path.join(a.out, "policies")
    cfg = scenarios.ScenarioConfig()

    policies, curves = {}, {}
    for algo in ALGOS:
        policies[algo], curves[algo] = train_or_load(algo, iterations, a.seed, a.policies, workdir)
        log.info("policy ready", algo=algo, path=policies[algo])

    allocs = {name: make_allocator(name) for name in HEURISTICS}
    allocs.update({algo: make_allocator("learned", path=p) for algo, p in policies.items()})
    n_val = len(curves["drl-es"]["iteration"]) and curves["drl-es"]["config"]["eval_episodes"]
    val_seeds = [train.VALIDATION_BASE + i for i in range(n_val)]
    levels = {n: evaluate_allocator(make_allocator(n), val_seeds, cfg) for n in ("random", "average", "least", "eft")}
    heldout = scenarios.heldout_seeds(n_heldout)
    table = {}
    for name, alloc in allocs.items():
        table[name] = evaluate_allocator(alloc if name != "random" else make_allocator("random", seed=a.seed),
                                         heldout, cfg)
        log.info("held-out", allocator=name, avg_slowdown=round(table[name]["avg_slowdown"], 1))
    sched = scheduling_runtime(allocs, policies["drl-es"], heldout, cfg, a.quick)

    iterations = curves["drl-es"].get("config", {}).get("iterations", iterations)   # reused policies: theirs
    res = {"mode": "quick" if a.quick else "full", "iterations": iterations, "n_heldout": n_heldout,
           "curves": {k: {kk: v[kk] for kk in ("iteration", "avg_slowdown", "total_reward", "latency_s", "wall_s")}
                      | {"train_seconds": v.get("train_seconds")} for k, v in curves.items()},
           "curve_levels": {k: {kk: v[kk] for kk in ("avg_slowdown", "total_reward")} for k, v in levels.items()},
           "heldout": {k: {kk: vv for kk, vv in v.items() if kk != "per_episode_slowdown"} for k, v in table.items()},
           **sched,
           "cpu_quota_note": "child process in a cgroup v1/v2 CPU quota (period 10 ms); quota in cores",
           "scenario_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}}
    _write(res, a.out)


def _only_latency(a) -> None:
    path = os.path.join(a.out, "policy.json")
    with open(path) as fh:
        res = json.load(fh)
    scenarios, _, _ = _policy_modules()
    pdir = a.policies or os.path.join(a.out, "policies")
    policies = {algo: os.path.join(pdir, algo, "policy.npz") for algo in ALGOS}
    allocs = {name: make_allocator(name) for name in HEURISTICS}
    allocs.update({algo: make_allocator("learned", path=p) for algo, p in policies.items()})
    quick = res.get("mode") == "quick" if not a.quick else True
    res.update(scheduling_runtime(allocs, policies["drl-es"], scenarios.heldout_seeds(res["n_heldout"]),
                                  scenarios.ScenarioConfig(), quick))
    _write(res, a.out)


def _write(res: dict, out: str) -> None:
    res["plots"] = _plots(res, out)
    with open(os.path.join(out, "policy.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    md = _markdown(res)
    with open(os.path.join(out, "policy.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
