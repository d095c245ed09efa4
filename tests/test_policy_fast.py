"""The compiled decision loop (decolla.kernels.policy) takes the numpy path's decisions."""
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from decolla.allocators import LearnedAllocator, learned
from decolla.allocators.learned import FEATURE_VERSION, N_FEATURES
from decolla.cost import ChunkCost, DeviceState, StageInfo
from tests.policy_reference import reference_assign, reference_margins

pytestmark = pytest.mark.skipif(learned._KERNEL is None, reason="decolla.kernels.policy is not built")

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "bench" / "results" / "policies").glob("*/policy.npz"))
# A decision whose best and second-best slot scores differ by less than this may flip
# between the two paths (different summation order and tanh, ~1e-16 relative each).
CLEAR_MARGIN = 1e-9

device = st.builds(
    DeviceState, name=st.just(""), speed=st.floats(1e6, 1e10), available=st.floats(-0.1, 1.2),
    bandwidth=st.one_of(st.just(math.inf), st.floats(1e4, 1e9)), queue=st.integers(0, 5),
    alive=st.booleans(), latency=st.floats(0.0, 0.01), busy_s=st.floats(-0.1, 1.0))
device_sets = st.lists(device, min_size=1, max_size=12).filter(lambda ds: any(d.alive for d in ds)).map(
    lambda ds: [DeviceState(**{**d.__dict__, "name": f"d{i}"}) for i, d in enumerate(ds)])
chunk = st.builds(ChunkCost, macs=st.integers(1, 10 ** 9), bytes_in=st.integers(0, 10 ** 7),
                  bytes_out=st.integers(0, 10 ** 6))
stage = st.builds(StageInfo, index=st.integers(0, 60), num_stages=st.integers(1, 61),
                  kind=st.sampled_from(["conv3x3", "dwconv3x3", "pwconv", "gap", "linear", "fused", "other"]),
                  uplink=st.one_of(st.just(math.inf), st.floats(1e5, 1e9)))


def random_policy(path, m_c, hidden, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    np.savez(path, m_c=np.int64(m_c), feature_version=np.int64(FEATURE_VERSION), hidden=np.int64(hidden),
             w0=rng.normal(0, scale, (N_FEATURES, hidden)), b0=rng.normal(0, 0.1, hidden),
             w1=rng.normal(0, scale, (hidden, hidden)), b1=rng.normal(0, 0.1, hidden),
             w2=rng.normal(0, scale, (hidden, 1)), b2=rng.normal(0, 0.1, 1))
    return str(path)


@pytest.fixture(scope="module")
def random_policies(tmp_path_factory):
    d = tmp_path_factory.mktemp("polfast")
    return [LearnedAllocator(random_policy(d / f"p{i}.npz", m_c, hidden, seed=i, scale=scale))
            for i, (m_c, hidden, scale) in enumerate([(100, 32, 0.5), (100, 8, 1.0), (3, 16, 0.5),
                                                      (100, 32, 3.0)])]


def check_agreement(alloc, stage, chunks, devs) -> bool:
    """True when the compiled path equals the reference; a difference is only allowed
    at a chunk whose reference margin is a near-tie (with the same placement before it)."""
    fast = alloc.assign_compiled(stage, chunks, devs)
    ref, margins = reference_margins(alloc, stage, chunks, devs)
    if fast == ref:
        return True
    first = next(j for j, (a, b) in enumerate(zip(fast, ref)) if a != b)
    assert margins[first] < CLEAR_MARGIN, (first, margins[first], fast, ref)
    return False


@settings(max_examples=200, deadline=None)
@given(devs=device_sets, chunks=st.lists(chunk, min_size=0, max_size=10), stage=stage)
def test_compiled_matches_numpy_on_random_states(random_policies, devs, chunks, stage):
    live = {d.name for d in devs if d.alive}
    for alloc in random_policies:
        fast = alloc.assign_compiled(stage, chunks, devs)
        assert len(fast) == len(chunks) and set(fast) <= live
        if fast != alloc.assign_numpy(stage, chunks, devs) or fast != reference_assign(alloc, stage, chunks, devs):
            check_agreement(alloc, stage, chunks, devs)    # raises unless it is a near-tie


@pytest.mark.skipif(not COMMITTED, reason="no committed policies")
def test_compiled_matches_numpy_on_heldout_scenarios():
    pytest.importorskip("torch", reason="the held-out scenarios come from decolla.policy (train extra)")
    bench_policy = pytest.importorskip("bench.policy")
    scenarios, _, _ = bench_policy._policy_modules()
    cases = bench_policy._stage_cases(scenarios.heldout_seeds(64)[:24], scenarios.ScenarioConfig(), limit=250)
    assert sum(len({d.name for d in devs if d.alive}) >= 2 for _, _, devs in cases) > 100
    for path in COMMITTED:
        alloc = LearnedAllocator(path)
        same = sum(alloc.assign_compiled(*c) == alloc.assign_numpy(*c) for c in cases)
        flips = [c for c in cases if alloc.assign_compiled(*c) != reference_assign(alloc, *c)]
        for c in flips:                     # only near-ties may flip
            assert not check_agreement(alloc, *c)
        assert same >= 0.999 * len(cases) and len(cases) - len(flips) >= 0.999 * len(cases), path


def test_assign_uses_the_compiled_path_and_numpy_fallback(random_policies, tmp_path):
    path = random_policy(tmp_path / "p.npz", 100, 8, seed=7)
    assert LearnedAllocator(path).compiled
    numpy_only = LearnedAllocator(path, compiled=False)
    devs = [DeviceState(f"d{i}", speed=1e9 * (i + 1), available=0.5 + 0.1 * i, bandwidth=1e7) for i in range(4)]
    chunks = [ChunkCost(10 ** 8, 10 ** 5, 10 ** 4)] * 6
    st_ = StageInfo(3, 10, "pwconv", uplink=2e7)
    calls = []
    numpy_only.assign_compiled = lambda *a: calls.append(a)      # must not be reached
    assert numpy_only.assign(st_, chunks, devs) == LearnedAllocator(path).assign(st_, chunks, devs)
    assert not calls


def test_kernel_tanh_matches_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 3, 20000), rng.uniform(-0.7, 0.7, 20000),
                        [0.0, -0.0, 1e-300, -1e-300, 5e-9, 0.625, -0.625, np.nextafter(0.625, 0),
                         19.0, 20.0, -20.0, 40.0, 710.0, -1e308, np.inf, -np.inf]])
    out = np.empty_like(x)
    learned._KERNEL.tanh(x, out)
    ref = np.tanh(x)
    assert np.all(np.abs(out - ref) <= 4.5e-16 * np.abs(ref))
    nan = np.empty(1)
    learned._KERNEL.tanh(np.array([np.nan]), nan)
    assert np.isnan(nan[0])


def test_kernel_rejects_bad_shapes(random_policies):
    alloc = random_policies[0]
    k = learned._KERNEL
    dev, ch, sv = np.ones((3, 9)), np.ones((2, 3)), np.zeros(N_FEATURES - 11)
    out, scratch = np.empty(2, np.int64), np.empty(k.scratch_size(3, 32))
    k.decide(dev, ch, sv, 1.0, 0.5, *alloc._k_w, out, scratch)
    with pytest.raises(ValueError):
        k.decide(np.ones((3, 8)), ch, sv, 1.0, 0.5, *alloc._k_w, out, scratch)
    with pytest.raises(ValueError):
        k.decide(dev, ch, sv, 1.0, 0.5, *alloc._k_w, out, np.empty(10))
    with pytest.raises(ValueError):
        k.decide(dev, ch, np.zeros(3), 1.0, 0.5, *alloc._k_w, out, scratch)


def test_missing_kernel_falls_back_to_numpy(monkeypatch, tmp_path):
    path = random_policy(tmp_path / "p.npz", 100, 8, seed=3)
    monkeypatch.setattr(learned, "_KERNEL", None)
    assert not LearnedAllocator(path).compiled
    with pytest.raises(ImportError):
        LearnedAllocator(path, compiled=True)
