"""Allocators: never a dead or missing device; heuristics do what they claim."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from decolla.allocators import ALLOCATOR_NAMES, LearnedAllocator, NoLiveDevice, make_allocator
from decolla.allocators.learned import N_FEATURES, FEATURE_VERSION
from decolla.cost import ChunkCost, DeviceState, Placement, StageInfo
from tests.policy_reference import reference_assign

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
        assert alloc.assign(stage, chunks, devs) == reference_assign(alloc, stage, chunks, devs)


def test_anti_eft_policy_takes_the_latest_slot(policy_paths):
    devs = [DeviceState(f"d{i}", speed=1e9 * (i + 1), available=1.0, bandwidth=1e7) for i in range(3)]
    chunks = [ChunkCost(10 ** 8, 10 ** 5, 10 ** 4)] * 6
    alloc = LearnedAllocator(policy_paths[3])
    names = alloc.assign(StageInfo(0, 1, "pwconv"), chunks, devs)
    assert names == reference_assign(alloc, StageInfo(0, 1, "pwconv"), chunks, devs)
    assert names != make_allocator("eft").assign(StageInfo(0, 1, "pwconv"), chunks, devs)
    assert names[0] == "d0"                          # the slowest device finishes last


def scalar_times(devs, uplink, link, comp, req, c):
    """Send end, compute end and result time of chunk c on each device, in plain floats
    (an independent statement of the Placement arithmetic)."""
    out = []
    for i, d in enumerate(devs):
        local = math.isinf(d.bandwidth)
        shared = math.isfinite(uplink) and not local
        s = max(link[i], req if shared else 0.0) + c.bytes_in / (math.inf if local else min(d.bandwidth, uplink))
        e = max(s + d.latency, comp[i]) + (c.macs / max(d.rate, 1e-30) + d.overhead_s)
        out.append((s, e, e + d.latency + (0.0 if local else c.bytes_out / d.bandwidth)))
    return out


@settings(max_examples=100, deadline=None)
@given(devs=device_sets, chunks=st.lists(chunk, min_size=1, max_size=8), stage=stage,
       picks=st.lists(st.integers(0, 11), min_size=8, max_size=8), ovh=st.floats(0.0, 0.01))
def test_placement_arithmetic_is_exact(devs, chunks, stage, picks, ovh):
    # The same arithmetic in plain Python floats: results must be bit-identical, for one
    # device set and for a batch of two.
    devs = [DeviceState(**{**d.__dict__, "overhead_s": ovh * (i % 2)}) for i, d in enumerate(devs)]
    link, comp, req = [0.0] * len(devs), [max(d.busy_s, 0.0) for d in devs], 0.0
    plan = Placement.of(devs, stage.uplink)
    arr = lambda f: np.array([[f(d) for d in devs]] * 2, dtype=float)
    batch = Placement(arr(lambda d: d.rate), arr(lambda d: d.bandwidth), arr(lambda d: d.latency),
                      arr(lambda d: d.busy_s), np.full((2, 1), stage.uplink), arr(lambda d: d.overhead_s))
    for c, i in zip(chunks, picks):
        i %= len(devs)
        rows = scalar_times(devs, stage.uplink, link, comp, req, c)
        assert plan.times(c.macs, c.bytes_in, c.bytes_out).tolist() == [r[2] for r in rows]
        assert batch.place(np.array([i, i]), c.macs, c.bytes_in, c.bytes_out).tolist() == [rows[i][2]] * 2
        plan.commit(i)
        link[i], comp[i], req = rows[i][0], rows[i][1], max(req, rows[i][0])
        assert (plan.link_free.tolist(), plan.comp_free.tolist(), float(plan.req_free[0])) == (link, comp, req)
        assert batch.link_free.tolist() == [link] * 2 and batch.comp_free.tolist() == [comp] * 2


@settings(max_examples=100, deadline=None)
@given(devs=device_sets, chunks=st.lists(chunk, min_size=1, max_size=8), stage=stage)
def test_eft_takes_the_earliest_result_for_each_chunk(devs, chunks, stage):
    live = [d for d in devs if d.alive]
    assume(len(live) > 1)
    link, comp, req, want = [0.0] * len(live), [max(d.busy_s, 0.0) for d in live], 0.0, []
    for c in chunks:
        rows = scalar_times(live, stage.uplink, link, comp, req, c)
        done = [r[2] for r in rows]
        i = done.index(min(done))
        link[i], comp[i], req = rows[i][0], rows[i][1], max(req, rows[i][0])
        want.append(live[i].name)
    assert make_allocator("eft").assign(stage, chunks, devs) == want


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


def test_placement_arithmetic():
    # 1 MB at 1 MB/s = 1 s, +0.1 s latency, device busy until 2 s, 1e9 MACs at 1e9 MAC/s,
    # result 0.5 MB back at 1 MB/s + 0.1 s.
    plan = Placement([1e9], [1e6], [0.1], [2.0])
    assert plan.times(1e9, 1e6, 5e5)[0] == pytest.approx(3.6)
    plan.commit(0)
    assert plan.link_free[0] == pytest.approx(1.0) and plan.comp_free[0] == pytest.approx(3.0)
    # a fixed per-chunk overhead lengthens the compute; zero overhead changes nothing
    slow = Placement([1e9], [1e6], [0.1], [2.0], overhead=[0.25])
    assert slow.place(0, 1e9, 1e6, 5e5) == pytest.approx(3.85)
    assert slow.comp_free[0] == pytest.approx(3.25)
    assert Placement([1e9], [1e6], [0.1], [2.0], overhead=0.0).place(0, 1e9, 1e6, 5e5) == \
        Placement([1e9], [1e6], [0.1], [2.0]).place(0, 1e9, 1e6, 5e5)


def test_registry():
    assert set(ALLOCATOR_NAMES) == {"random", "average", "least", "proportional", "eft", "learned"}
    with pytest.raises(ValueError):
        make_allocator("nope")


def test_learned_works_out_of_the_box_and_takes_a_path(policy_paths, tmp_path):
    from decolla.allocators.learned import default_policy_path
    shipped = make_allocator("learned")
    assert shipped.m_c == 100 and "decolla" in default_policy_path()
    devs = [DeviceState(f"d{i}", speed=1e9 * (i + 1), available=1.0, bandwidth=1e8) for i in range(3)]
    chunks = [ChunkCost(10 ** 8, 10 ** 5, 10 ** 4)] * 6
    stage = StageInfo(3, 10, "pwconv", uplink=1e8)
    assert set(shipped.assign(stage, chunks, devs)) <= {"d0", "d1", "d2"}
    own = make_allocator(f"learned:path={policy_paths[1]}")
    assert own.m_c == 2 and own.assign(stage, chunks, devs) == LearnedAllocator(policy_paths[1]).assign(
        stage, chunks, devs)
    assert make_allocator("random:seed=3").assign(stage, chunks, devs) == \
        make_allocator("random", seed=3).assign(stage, chunks, devs)
    (tmp_path / "notes.txt").write_text("not a policy")
    np.savez(tmp_path / "other.npz", w0=np.zeros(3))
    for spec, match in [("learned:size=3", "size"), ("learned:path", "KEY=VALUE"),
                        (f"learned:path={tmp_path / 'notes.txt'}", "not a policy .npz"),
                        (f"learned:path={tmp_path / 'other.npz'}", "not a policy written"),
                        ("eft:path=x", "path")]:
        with pytest.raises(ValueError, match=match):
            make_allocator(spec)


def test_average_rotates_one_chunk_stages_over_devices():
    alloc = make_allocator("average")
    picks = [alloc.assign(StageInfo(0, 1, "pwconv"), [ChunkCost(1, 1, 1)], _devs())[0]
             for _ in range(6)]
    live = [d.name for d in _devs() if d.alive]
    assert set(picks) == set(live)
