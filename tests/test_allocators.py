"""Allocators: never a dead or missing device; heuristics do what they claim."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from decolla.allocators import (ALLOCATOR_NAMES, ChunkCost, DeviceState, EarliestFinishAllocator,
                                NoLiveDevice, ScalarPlan, StageInfo, make_allocator, place_chunk)
from decolla.learned import N_FEATURES, FEATURE_VERSION, LearnedAllocator

HEURISTICS = ("random", "average", "least", "proportional", "eft")


def random_policy(path, m_c=100, hidden=8, seed=0):
    """An exported policy file with random weights (numpy only, same format as training)."""
    rng = np.random.default_rng(seed)
    np.savez(path, m_c=np.int64(m_c), feature_version=np.int64(FEATURE_VERSION), hidden=np.int64(hidden),
             w0=rng.normal(0, 0.5, (N_FEATURES, hidden)), b0=rng.normal(0, 0.1, hidden),
             w1=rng.normal(0, 0.5, (hidden, hidden)), b1=rng.normal(0, 0.1, hidden),
             w2=rng.normal(0, 0.5, (hidden, 1)), b2=np.zeros(1))
    return str(path)


device = st.builds(
    DeviceState, name=st.just(""), speed=st.floats(1e6, 1e10), available=st.floats(0.0, 1.0),
    bandwidth=st.one_of(st.just(math.inf), st.floats(1e4, 1e9)), queue=st.integers(0, 5),
    alive=st.booleans(), latency=st.floats(0.0, 0.01), busy_s=st.floats(0.0, 1.0))
device_sets = st.lists(device, min_size=1, max_size=12).map(
    lambda ds: [DeviceState(**{**d.__dict__, "name": f"d{i}"}) for i, d in enumerate(ds)])
chunk = st.builds(ChunkCost, macs=st.integers(1, 10 ** 9), bytes_in=st.integers(0, 10 ** 7),
                  bytes_out=st.integers(0, 10 ** 6))
stage = st.builds(StageInfo, index=st.integers(0, 60), num_stages=st.just(61),
                  kind=st.sampled_from(["conv3x3", "dwconv3x3", "pwconv", "gap", "linear", "other"]),
                  uplink=st.one_of(st.just(math.inf), st.floats(1e5, 1e9)))


def latest_finish_policy(path):
    """A policy that scores a slot by its result time: the opposite of EFT (worst case for the
    fast path, whose guesses come from EFT)."""
    z = np.zeros((N_FEATURES, 1))
    z[0, 0] = 0.1                                   # log(done / t_ref)
    np.savez(path, m_c=np.int64(100), feature_version=np.int64(FEATURE_VERSION), hidden=np.int64(1),
             w0=z, b0=np.zeros(1), w1=np.ones((1, 1)), b1=np.zeros(1), w2=np.ones((1, 1)), b2=np.zeros(1))
    return str(path)


@pytest.fixture(scope="module")
def policy_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("pol")
    return (random_policy(d / "big.npz"), random_policy(d / "small.npz", m_c=2, seed=1),
            random_policy(d / "wide.npz", hidden=32, seed=2), latest_finish_policy(d / "anti.npz"))


@settings(max_examples=150, deadline=None)
@given(devs=device_sets, chunks=st.lists(chunk, min_size=1, max_size=8), stage=stage)
def test_allocators_only_name_live_devices(policy_paths, devs, chunks, stage):
    allocs = [make_allocator(n) for n in HEURISTICS]
    allocs += [LearnedAllocator(p) for p in policy_paths]
    live = {d.name for d in devs if d.alive}
    for alloc in allocs:
        if not live:
            with pytest.raises(NoLiveDevice):
                alloc.assign(stage, chunks, devs)
            continue
        names = alloc.assign(stage, chunks, devs)
        assert len(names) == len(chunks)
        assert set(names) <= live, alloc.name


@settings(max_examples=100, deadline=None)
@given(devs=device_sets, chunks=st.lists(chunk, min_size=1, max_size=8), stage=stage)
def test_learned_fast_path_matches_reference(policy_paths, devs, chunks, stage):
    if not any(d.alive for d in devs):
        return
    # Identical devices tie exactly; BLAS may then break the tie differently per row.
    keys = [(d.speed, d.available, d.bandwidth, d.latency, d.busy_s) for d in devs if d.alive]
    assume(len(set(keys)) == len(keys))
    for p in policy_paths:
        alloc = LearnedAllocator(p)
        assert alloc.assign(stage, chunks, devs) == alloc.assign_reference(stage, chunks, devs)


def test_anti_eft_policy_takes_the_latest_slot(policy_paths):
    devs = [DeviceState(f"d{i}", speed=1e9 * (i + 1), available=1.0, bandwidth=1e7) for i in range(3)]
    chunks = [ChunkCost(10 ** 8, 10 ** 5, 10 ** 4)] * 6
    alloc = LearnedAllocator(policy_paths[3])
    names = alloc.assign(StageInfo(0, 1, "pwconv"), chunks, devs)
    assert names == alloc.assign_reference(StageInfo(0, 1, "pwconv"), chunks, devs)
    assert names != make_allocator("eft").assign(StageInfo(0, 1, "pwconv"), chunks, devs)
    assert names[0] == "d0"                          # the slowest device finishes last


@settings(max_examples=100, deadline=None)
@given(devs=device_sets, chunks=st.lists(chunk, min_size=1, max_size=8), stage=stage,
       picks=st.lists(st.integers(0, 11), min_size=8, max_size=8), ovh=st.floats(0.0, 0.01))
def test_scalar_plan_equals_place_chunk(devs, chunks, stage, picks, ovh):
    # Same arithmetic in plain Python floats: results must be bit-identical.
    devs = [DeviceState(**{**d.__dict__, "overhead_s": ovh * (i % 2)}) for i, d in enumerate(devs)]
    rate = np.array([max(d.speed, 0.0) * max(d.available, 1e-3) for d in devs])
    bw, lat = np.array([d.bandwidth for d in devs]), np.array([d.latency for d in devs])
    ov = np.array([d.overhead_s for d in devs])
    link, comp, req = np.zeros(len(devs)), np.array([d.busy_s for d in devs]), 0.0
    plan = ScalarPlan(devs, stage.uplink)
    for c, i in zip(chunks, picks):
        i %= len(devs)
        send_end, comp_end, done = place_chunk(c.macs, c.bytes_in, c.bytes_out, rate, bw, lat, stage.uplink,
                                               link, comp, req, ov)
        assert plan.times(c.macs, c.bytes_in, c.bytes_out) == done.tolist()
        plan.commit(i)
        link[i], comp[i], req = send_end[i], comp_end[i], max(req, float(send_end[i]))
        assert (plan.link_free, plan.comp_free, plan.req_free) == (link.tolist(), comp.tolist(), req)


@settings(max_examples=100, deadline=None)
@given(devs=device_sets, chunks=st.lists(chunk, min_size=1, max_size=8), stage=stage)
def test_eft_fast_path_matches_numpy_path(devs, chunks, stage):
    live = [d for d in devs if d.alive]
    assume(live)
    assert (make_allocator("eft").assign(stage, chunks, devs)
            == EarliestFinishAllocator._assign_numpy(stage, chunks, live))


def test_learned_keeps_the_mc_devices_with_most_resource(policy_paths):
    devs = [DeviceState(f"d{i}", speed=1e9 * (i + 1), available=0.5, bandwidth=1e7) for i in range(6)]
    alloc = LearnedAllocator(policy_paths[1])  # M_c = 2
    assert {d.name for d in alloc.slots(devs)} == {"d4", "d5"}
    names = alloc.assign(StageInfo(0, 1, "pwconv"), [ChunkCost(10 ** 7, 10 ** 5, 10 ** 4)] * 6, devs)
    assert set(names) <= {"d4", "d5"}


def _devs():
    return [DeviceState("slow", speed=1e9, available=1.0, bandwidth=1e7),
            DeviceState("fast", speed=3e9, available=1.0, bandwidth=1e7),
            DeviceState("dead", speed=9e9, available=1.0, bandwidth=1e9, alive=False)]


def test_average_is_round_robin_over_live():
    names = make_allocator("average").assign(StageInfo(0, 1, "pwconv"), [ChunkCost(1, 1, 1)] * 4, _devs())
    assert names == ["slow", "fast", "slow", "fast"]


def test_least_puts_everything_on_most_available():
    devs = _devs()
    devs[1] = DeviceState("fast", speed=3e9, available=0.2, bandwidth=1e7)  # 0.6e9 < 1e9 free
    names = make_allocator("least").assign(StageInfo(0, 1, "pwconv"), [ChunkCost(1, 1, 1)] * 3, devs)
    assert names == ["slow"] * 3


def test_proportional_counts():
    names = make_allocator("proportional").assign(StageInfo(0, 1, "pwconv"), [ChunkCost(1, 1, 1)] * 4, _devs())
    assert sorted(names) == ["fast", "fast", "fast", "slow"]


def test_eft_prefers_local_device_for_transfer_heavy_chunks():
    devs = [DeviceState("remote", speed=4e9, available=1.0, bandwidth=1e6),
            DeviceState("local", speed=1e9, available=1.0, bandwidth=math.inf)]
    heavy = [ChunkCost(10 ** 6, 10 ** 7, 10 ** 5)] * 3   # 10 s to send, 1 ms to compute
    assert make_allocator("eft").assign(StageInfo(0, 1, "dwconv3x3"), heavy, devs) == ["local"] * 3
    light = [ChunkCost(10 ** 10, 10, 10)]                 # compute bound: the 4x faster remote wins
    assert make_allocator("eft").assign(StageInfo(0, 1, "pwconv"), light, devs) == ["remote"]


def test_random_is_seeded():
    st_, ch = StageInfo(0, 1, "pwconv"), [ChunkCost(1, 1, 1)] * 20
    a = make_allocator("random", seed=3).assign(st_, ch, _devs())
    b = make_allocator("random", seed=3).assign(st_, ch, _devs())
    assert a == b and set(a) == {"slow", "fast"}


def test_place_chunk_arithmetic():
    # 1 MB at 1 MB/s = 1 s, +0.1 s latency, device busy until 2 s, 1e9 MACs at 1e9 MAC/s,
    # result 0.5 MB back at 1 MB/s + 0.1 s.
    send_end, comp_end, done = place_chunk(1e9, 1e6, 5e5, np.array([1e9]), np.array([1e6]),
                                           np.array([0.1]), math.inf, np.zeros(1), np.array([2.0]), 0.0)
    assert send_end[0] == pytest.approx(1.0)
    assert comp_end[0] == pytest.approx(3.0)
    assert done[0] == pytest.approx(3.6)
    # a fixed per-chunk overhead lengthens the compute; zero overhead changes nothing
    _, comp2, done2 = place_chunk(1e9, 1e6, 5e5, np.array([1e9]), np.array([1e6]), np.array([0.1]), math.inf,
                                  np.zeros(1), np.array([2.0]), 0.0, np.array([0.25]))
    assert comp2[0] == pytest.approx(3.25) and done2[0] == pytest.approx(3.85)
    assert place_chunk(1e9, 1e6, 5e5, np.array([1e9]), np.array([1e6]), np.array([0.1]), math.inf,
                       np.zeros(1), np.array([2.0]), 0.0, 0.0)[2][0] == done[0]


def test_registry():
    assert set(ALLOCATOR_NAMES) == {"random", "average", "least", "proportional", "eft", "learned"}
    with pytest.raises(ValueError):
        make_allocator("nope")


def test_average_rotates_one_chunk_stages_over_devices():
    alloc = make_allocator("average")
    picks = [alloc.assign(StageInfo(0, 1, "pwconv"), [ChunkCost(1, 1, 1)], _devs())[0]
             for _ in range(6)]
    live = [d.name for d in _devs() if d.alive]
    assert set(picks) == set(live)
