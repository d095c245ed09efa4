"""Policy simulator, profiles, export/load and a short training run."""
import heapq
import json
import math

import numpy as np
import pytest

from decolla.allocators import make_allocator
from decolla.cost import ChunkCost, StageInfo

try:
    from decolla.policy import scenarios, simulator
except ImportError:  # source tree not pip-installed
    from policy import scenarios, simulator

Simulator = simulator.Simulator


def test_simulator_is_deterministic_per_seed():
    seeds = scenarios.heldout_seeds(6)
    a = simulator.run_allocator(Simulator.from_seeds(seeds), make_allocator("eft"))
    b = simulator.run_allocator(Simulator.from_seeds(seeds), make_allocator("eft"))
    assert np.array_equal(a.total_reward, b.total_reward)
    assert np.array_equal(a.latency, b.latency)
    # An episode does not depend on the other episodes of its batch.
    alone = simulator.run_allocator(Simulator.from_seeds(seeds[2:3]), make_allocator("eft"))
    assert alone.total_reward[0] == a.total_reward[2]
    other = simulator.run_allocator(Simulator.from_seeds(scenarios.heldout_seeds(6, offset=6)),
                                    make_allocator("eft"))
    assert not np.array_equal(other.total_reward, a.total_reward)


def _tiny_scenario(uplink=math.inf):
    k = len(scenarios.KINDS)
    return scenarios.Scenario(
        speed=np.array([[1e9] * k, [2e9] * k]), avail_mean=np.array([1.0, 0.5]), avail0=np.array([1.0, 0.5]),
        load_vol=np.zeros(2), load_tau=np.ones(2), report_period=np.ones(2),
        bandwidth=np.array([math.inf, 1e6]), latency=np.array([0.0, 0.01]), busy0=np.array([0.0, 0.5]),
        foreign_rate=np.zeros(2), alive=np.ones(2, bool), uplink=uplink,
        kinds=np.array([2]), macs=np.array([[1e9, 2e9]]), bytes_in=np.array([[1e6, 1e6]]),
        bytes_out=np.array([[1e5, 2e5]]), seed=7, fail_prob=0.0, names=["local", "remote"])


def test_reward_and_slowdown_arithmetic():
    sim = Simulator([_tiny_scenario()])
    res = sim.step(np.array([[0, 1]]))
    # chunk 0 on the local device: 1e9 MACs at 1e9 MAC/s, no transfers -> P = 1 s.
    # chunk 1 remote: send 1 s + 10 ms, device busy until 0.5 s, compute 2e9 at 2e9*0.5 -> 2 s,
    # back 10 ms + 0.2 s -> P = 3.22 s.  T_j = MACs / fastest full speed (2e9).
    P = np.array([1.0, 3.22])
    T = np.array([1e9, 2e9]) / 2e9
    assert res.slowdown[0] == pytest.approx(P / T)
    assert res.reward[0] == pytest.approx(-(P / T).sum())
    assert res.latency[0] == pytest.approx(3.22)
    assert sim.average_slowdown()[0] == pytest.approx((P / T).mean())
    assert sim.total_reward[0] == pytest.approx(res.reward[0])


def test_shared_uplink_serialises_sends():
    sc = _tiny_scenario(uplink=1e6)
    sc.bandwidth = np.array([1e6, 1e6])
    sc.latency = np.zeros(2)
    sc.busy0 = np.zeros(2)
    shared = Simulator([sc]).step(np.array([[0, 1]]))
    sc.uplink = math.inf
    parallel = Simulator([sc]).step(np.array([[0, 1]]))
    # Each input takes 1 s; through a shared uplink the second send waits for the first.
    # chunk 1: compute 2e9 MACs at 2e9*0.5 MAC/s = 2 s, result 0.2 s back.
    assert parallel.latency[0] == pytest.approx(1.0 + 2.0 + 0.2)
    assert shared.latency[0] == pytest.approx(2.0 + 2.0 + 0.2)
    # The requester's own device (infinite bandwidth) never waits for the uplink.
    sc.bandwidth = np.array([math.inf, 1e6])
    sc.uplink = 1e6
    res = Simulator([sc]).step(np.array([[1, 0]]))
    # chunk 1 on it: 2e9 MACs at 1e9 MAC/s = 2 s from the start (3 s if it waited), T = 1 s.
    assert res.slowdown[0, 1] == pytest.approx(2.0)


def test_simulator_rejects_dead_devices():
    sim = Simulator([_tiny_scenario()])
    sim.alive[0, 1] = False
    with pytest.raises(ValueError):
        sim.step(np.array([[0, 1]]))


def _reference_stage(devs, chunks, names, uplink=math.inf):
    """Independent event-driven computation of a stage's latency (sends in chunk order)."""
    by = {d.name: d for d in devs}
    link, comp, req, events = {}, {d.name: d.busy_s for d in devs}, 0.0, []
    for j, (c, n) in enumerate(zip(chunks, names)):
        d = by[n]
        rate = min(d.bandwidth, uplink)
        start = max(link.get(n, 0.0), req if math.isfinite(uplink) else 0.0)
        end = start + (0.0 if math.isinf(rate) else c.bytes_in / rate)
        link[n] = end
        req = end
        heapq.heappush(events, (end + d.latency, j, n, c))
    done = 0.0
    while events:
        arrive, _, n, c = heapq.heappop(events)
        d = by[n]
        comp[n] = max(arrive, comp[n]) + c.macs / (d.speed * d.available)
        back = 0.0 if math.isinf(d.bandwidth) else c.bytes_out / d.bandwidth
        done = max(done, comp[n] + d.latency + back)
    return done


def _profile(scale=1.0):
    return {"format": simulator.PROFILE_FORMAT, "uplink": None, "devices": {
        "pi-a": {"sec_per_mac": {"default": 1e-9 * scale, "dwconv3x3": 3e-9 * scale},
                 "bandwidth": None, "latency_s": 0.0},
        "pi-b": {"sec_per_mac": {"default": 0.8e-9 * scale, "dwconv3x3": 2.5e-9 * scale},
                 "bandwidth": 2.5e6 / scale, "latency_s": 0.002},
        "pi-c": {"sec_per_mac": {"default": 1.5e-9 * scale}, "bandwidth": 1.25e6 / scale, "latency_s": 0.001,
                 "available": 0.5}}}


def _synthetic_traces(noise, seed=0):
    """Stages of MobileNetV2 run on the profiled devices, 'measured' by the reference model + noise."""
    rng = np.random.default_rng(seed)
    prof, traces = _profile(), []
    for spec in scenarios.model_layers("v2", 0.5, 128):
        macs, bi, bo = scenarios.stage_chunks(spec, 6)
        chunks = [ChunkCost(int(m), int(i), int(o)) for m, i, o in zip(macs, bi, bo)]
        devs = simulator.profile_devices(prof, spec["kind"])
        names = [devs[j % 3].name for j in rng.permutation(6)]
        t = _reference_stage(devs, chunks, names) * (1 + rng.uniform(-noise, noise))
        traces.append({"kind": spec["kind"], "chunks": [[c.macs, c.bytes_in, c.bytes_out] for c in chunks],
                       "devices": names, "measured_s": t})
    return traces


def test_predicted_stage_latency_matches_reference_model():
    rep = simulator.validate_profile(_profile(), _synthetic_traces(noise=0.0))
    assert rep["median_abs_rel_error"] < 1e-9 and rep["within_tolerance"] == 1.0


def test_validate_profile_flags_a_miscalibrated_profile(tmp_path):
    traces = _synthetic_traces(noise=0.1, seed=1)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile()))
    good = simulator.validate_profile(str(path), traces)
    assert good["within_tolerance"] == 1.0
    bad = simulator.validate_profile(_profile(scale=2.0), traces)   # devices and links claimed 2x slower
    assert bad["within_tolerance"] < 0.5


def test_from_profile_runs_a_whole_model():
    sim = Simulator.from_profile(_profile(), ("v1", 0.5, 128), k=6)
    simulator.run_allocator(sim, make_allocator("eft"))
    assert sim.done and sim.S == len(scenarios.model_layers("v1", 0.5, 128))
    assert np.isfinite(sim.latency).all() and (sim.average_slowdown() >= 1.0).all()


def test_load_profile_rejects_garbage():
    with pytest.raises(ValueError):
        simulator.load_profile({"format": "other", "devices": {}})


def test_eft_beats_random_on_heldout():
    seeds = scenarios.heldout_seeds(24)
    r = simulator.run_allocator(Simulator.from_seeds(seeds), make_allocator("random")).average_slowdown()
    e = simulator.run_allocator(Simulator.from_seeds(seeds), make_allocator("eft")).average_slowdown()
    assert e.mean() < r.mean()


# ---- torch / evotorch parts ---------------------------------------------------------------

def test_export_load_same_decisions_in_torch_and_numpy(tmp_path):
    torch = pytest.importorskip("torch")
    try:
        from decolla.policy import net, rollout
    except ImportError:
        from policy import net, rollout
    from decolla.allocators import LearnedAllocator
    seeds = scenarios.heldout_seeds(16)
    cfg = scenarios.ScenarioConfig()
    for seed in (0, 1):
        theta = net.init_params(16, seed) * 3  # larger weights: sharper, more varied decisions
        path = tmp_path / f"p{seed}.npz"
        net.export_npz(theta, 16, 100, path)
        loaded, hidden, m_c = net.load_npz(path)
        assert torch.equal(loaded, theta.float()) and (hidden, m_c) == (16, 100)
        with torch.no_grad():
            t = rollout.play(theta[None], 16, seeds, cfg, m_c)
        n = simulator.run_allocator(Simulator.from_seeds(seeds, cfg), LearnedAllocator(path))
        assert np.array_equal(t.avg_slowdown, n.average_slowdown())
        assert np.array_equal(t.latency, n.latency)


@pytest.mark.slow
def test_short_drl_es_training_beats_random(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("evotorch")
    try:
        from decolla.policy import train
    except ImportError:
        from policy import train
    from decolla.allocators import LearnedAllocator
    cfg = train.TrainConfig(algo="drl-es", iterations=10, lr=0.02, episodes=3, repeats=2,
                            eval_every=1000, eval_episodes=4, checkpoint_every=1000, seed=3,
                            scenario=scenarios.ScenarioConfig(stages=8))
    _, curve = train.train(cfg, str(tmp_path), progress=False)
    assert len(curve["iteration"]) == 2 and (tmp_path / "policy.npz").exists()
    seeds = scenarios.heldout_seeds(24)
    learned = simulator.run_allocator(Simulator.from_seeds(seeds), LearnedAllocator(tmp_path / "policy.npz"))
    rand = simulator.run_allocator(Simulator.from_seeds(seeds), make_allocator("random", seed=0))
    assert learned.average_slowdown().mean() < rand.average_slowdown().mean()


def test_profile_chunk_overhead_enters_the_timing_model():
    prof = {"format": simulator.PROFILE_FORMAT, "uplink": None, "devices": {
        "a": {"sec_per_mac": {"default": 1e-9}, "bandwidth": None, "latency_s": 0.0, "chunk_overhead_s": 0.01}}}
    devs = simulator.profile_devices(prof, "pwconv")
    chunks = [ChunkCost(10 ** 7, 1000, 1000)] * 3
    # one local device: three chunks back to back, 10 ms of compute + 10 ms overhead each
    assert simulator.predict_stage_latency(devs, StageInfo(0, 1, "pwconv"), chunks, ["a"] * 3) == \
        pytest.approx(0.06)
    sim = Simulator.from_profile(prof, ("v1", 0.5, 128), k=3)
    plain = Simulator.from_profile({**prof, "devices": {"a": {**prof["devices"]["a"], "chunk_overhead_s": 0.0}}},
                                   ("v1", 0.5, 128), k=3)
    a = simulator.run_allocator(sim, make_allocator("eft")).latency[0]
    b = simulator.run_allocator(plain, make_allocator("eft")).latency[0]
    assert a == pytest.approx(b + 0.01 * 3 * sim.S)
