"""Baselines: pure route/split logic, metrics from traces, and real runs on a loopback cluster."""
from __future__ import annotations

import signal

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from decolla.baselines import metrics
from decolla.baselines import partition as part
from decolla.loader import load_model
from decolla.reference import forward as reference
from decolla.runtime.trace import ChunkRecord, Trace

SPEC = "mobilenet_v2:seed=0,width=0.35,input_size=96"


@pytest.fixture(scope="module")
def model():
    return load_model(SPEC)


@pytest.fixture(scope="module")
def image(model):
    return np.random.default_rng(7).standard_normal(model.input_shape).astype(np.float32)


# ----------------------------------------------------------------------------- pure logic

@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=60), st.integers(1, 8))
def test_split_balanced_covers_contiguously(weights, n):
    n = min(n, len(weights))
    groups = part.split_balanced(weights, n)
    assert len(groups) == n
    assert groups[0][0] == 0 and groups[-1][1] == len(weights)
    assert all(a < b for a, b in groups)
    assert all(groups[i][1] == groups[i + 1][0] for i in range(n - 1))


def test_split_balanced_balances_equal_costs():
    assert part.split_balanced([1.0] * 12, 3) == [(0, 4), (4, 8), (8, 12)]
    # one heavy layer gets a group of its own
    assert part.split_balanced([1, 1, 10, 1, 1], 3)[1] == (2, 3)


def test_split_balanced_rejects_impossible():
    with pytest.raises(part.RouteError):
        part.split_balanced([1.0, 2.0], 3)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 1), min_size=n, max_size=n),
    st.lists(st.floats(0, 1), min_size=n, max_size=n),
    st.lists(st.integers(0, 10**6), min_size=n + 1, max_size=n + 1),
    st.floats(1e5, 1e9))))
def test_neurosurgeon_matches_brute_force(args):
    dev, edge, cuts, bw = args
    choice = part.neurosurgeon_split(dev, edge, cuts, bw)
    cost = [sum(dev[:p]) + 8 * cuts[p] / bw + sum(edge[p:]) for p in range(len(dev) + 1)]
    assert choice.predicted_s == pytest.approx(min(cost), rel=1e-9, abs=1e-12)
    assert cost[choice.p] == pytest.approx(min(cost), rel=1e-9, abs=1e-12)


def test_neurosurgeon_follows_bandwidth(model):
    specs = model.layer_specs()
    n = len(specs)
    cuts = [part.cut_bytes(specs, c) for c in range(n + 1)]
    device = [l.macs / 2e8 for l in model.layers]      # a slow device
    edge = [l.macs / 2e9 for l in model.layers]        # a 10x faster edge
    slow = part.neurosurgeon_split(device, edge, cuts, 1e5)     # 0.1 Mb/s: stay on the device
    fast = part.neurosurgeon_split(device, edge, cuts, 1e10)    # 10 Gb/s: offload everything
    # at 0.1 Mb/s transfer dominates: the cut goes where the fewest bytes cross (a narrow
    # projection, fewer bytes than the logits the device would otherwise send back)
    assert cuts[slow.p] == min(cuts) and slow.p > 0
    assert fast.p == 0
    mid = [part.neurosurgeon_split(device, edge, cuts, bw).p for bw in (1e6, 1e7, 1e8, 1e9)]
    assert mid == sorted(mid, reverse=True)               # more bandwidth, earlier split


def test_crossing_carries_residual_sources(model):
    specs = model.layer_specs()
    names = [s["name"] for s in specs]
    for cut in range(len(specs)):
        cross = part.crossing(specs, cut)
        assert cross[-1] == ("input" if cut == 0 else names[cut - 1])
        for s in specs[cut:]:
            r = s.get("residual")
            if r and (r == "input" or names.index(r) < cut):
                assert r in cross


def test_partition_route_drops_empty_parts():
    assert part.partition_route("d", "e", 0, 5) == [part.Segment("e", 0, 5)]
    assert part.partition_route("d", "e", 5, 5) == [part.Segment("d", 0, 5)]
    assert part.partition_route("d", "e", 2, 5) == [part.Segment("d", 0, 2), part.Segment("e", 2, 5)]


def test_hierarchical_route_from_a_layer():
    route = part.hierarchical_route(["a", "b"], [1.0] * 10, start=4)
    assert route == [part.Segment("a", 4, 7), part.Segment("b", 7, 10)]


def test_hierarchical_route_prefers_narrow_cuts_near_balance():
    w = [1.0] * 12
    sizes = [100] * 13
    sizes[5] = 1                                     # a narrow cut one layer before balance
    route = part.hierarchical_route(["a", "b", "c"], w, cut_sizes=sizes)
    assert [s.end for s in route] == [5, 8, 12]
    far = [100] * 13
    far[1] = 1                                       # too far from balance: ignored
    assert [s.end for s in part.hierarchical_route(["a", "b", "c"], w, cut_sizes=far)] == [4, 8, 12]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 5), min_size=3, max_size=40),
       st.lists(st.integers(0, 1000), min_size=41, max_size=41), st.integers(1, 4))
@example([1.0, 4.0, 0.5, 2.0, 2.0], [0, 0, 1] + [0] * 38, 3)   # first cut moved past the second
def test_hierarchical_route_with_cut_sizes_stays_contiguous(w, sizes, n):
    n = min(n, len(w))
    route = part.hierarchical_route([f"d{i}" for i in range(n)], w, cut_sizes=sizes[:len(w) + 1])
    assert len(route) == n and route[0].start == 0 and route[-1].end == len(w)
    assert all(a.end == b.start and a.start < a.end for a, b in zip(route, route[1:]))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 53), min_size=0, max_size=4, unique=True))
def test_run_segment_chain_equals_reference(model, image, cuts):
    want = reference(model, image)
    bounds = [0, *sorted(cuts), len(model.layers)]
    tensors = {"input": image}
    for a, b in zip(bounds, bounds[1:]):
        tensors = part.run_segment(model.layers, tensors, a, b)
    np.testing.assert_allclose(tensors[model.layers[-1].name], want, rtol=1e-4, atol=1e-4)


def test_plan_route_methods(model):
    from decolla.baselines.client import plan_route
    specs = model.layer_specs()
    prof = {d: [l.macs / 1e8 for l in model.layers] for d in ("d1", "d2", "d3")}
    prof["edge"] = [l.macs / 1e10 for l in model.layers]
    r, _ = plan_route("mobile", specs, prof, ["d1", "d2", "d3"], "edge", 20, device="d2")
    assert r == [part.Segment("d2", 0, len(specs))]
    r, info = plan_route("partition", specs, prof, ["d1"], "edge", 1e4)
    assert r[0].device == "edge" and info["split"] == 0
    r, _ = plan_route("hierarchical", specs, prof, ["d1", "d2", "d3"], "edge", 20)
    assert [s.device for s in r] == ["d1", "d2", "d3"]


# ----------------------------------------------------------------------------- metrics

def _rec(dev, start, end):
    return ChunkRecord("r", 0, 0, 0, dev, "", 0, start, 0, start=start, end=end, status="won")


def test_busy_and_waiting_from_trace():
    t = Trace("r", 0.0, 10.0, [_rec("a", 0, 2), _rec("a", 1, 3), _rec("b", 5, 6)])
    assert metrics.busy_seconds([t], ["a", "b", "c"]) == {"a": 3.0, "b": 1.0, "c": 0.0}
    assert metrics.waiting(t, ["a", "b", "c"]) == {"a": 7.0, "b": 9.0}


def test_normalized_variance_bounds():
    assert metrics.normalized_variance([0.5, 0.5, 0.5]) == 0.0
    assert metrics.normalized_variance([0.9, 0.0, 0.0]) == pytest.approx(1.0)
    assert 0 < metrics.normalized_variance([0.6, 0.3, 0.2]) < 1


# ----------------------------------------------------------------------------- requester ordering

def _pipeline_requester():
    """A PipelineRequester driven directly: what it sends is captured, timers ignored."""
    from decolla.baselines.actors import PipelineRequester
    req, sent = PipelineRequester(), []
    req.send = lambda addr, msg: sent.append((addr, msg))
    req.wakeupAfter = lambda *a, **k: None
    req._myRef = type("Ref", (), {"address": "addr-requester"})()
    req.workers = {d: f"addr-{d}" for d in ("dev1", "dev2", "dev3")}
    return req, sent


def _done(hop, dev, logits=None, history=()):
    from decolla.baselines.messages import HopReport, SegmentDone
    return SegmentDone("r1", 0, HopReport(hop, dev, 1.0 + hop, 1.1 + hop, 1.9 + hop, 10, 20),
                       logits=logits, history=list(history))


def _run_pipeline(req):
    from decolla.baselines.messages import RunPipeline
    route = [part.Segment("dev1", 0, 3), part.Segment("dev2", 3, 6), part.Segment("dev3", 6, 9)]
    req.receiveMsg_RunPipeline(RunPipeline("r1", np.zeros((4, 4, 3), np.float32), route,
                                           [0.01] * 9, [1000] * 10, 1e8), "client")


def test_answer_before_earlier_reports_still_gives_a_complete_trace():
    from decolla.runtime import wire
    from decolla.baselines.messages import HopReport
    from decolla.runtime.messages import InferReply
    req, sent = _pipeline_requester()
    _run_pipeline(req)
    history = [HopReport(0, "dev1", 1.0, 1.1, 1.9, 10, 20), HopReport(1, "dev2", 2.0, 2.1, 2.9, 10, 20)]
    req.receiveMsg_SegmentDone(_done(2, "dev3", wire.encode(np.ones(5, np.float32)), history), "w")
    (reply,) = [m for to, m in sent if isinstance(m, InferReply) and to == "client"]
    assert [(r.chunk, r.device, r.status) for r in sorted(reply.records, key=lambda r: r.chunk)] \
        == [(0, "dev1", "won"), (1, "dev2", "won"), (2, "dev3", "won")]
    assert reply.stats["route"] == [("dev1", 0, 3), ("dev2", 3, 6), ("dev3", 6, 9)]


def test_a_later_hop_report_first_advances_past_the_earlier_hop():
    req, _ = _pipeline_requester()
    _run_pipeline(req)
    req.receiveMsg_SegmentDone(_done(1, "dev2"), "w")      # overtakes hop 0's report
    pipe = req.pipes["r1"]
    assert pipe.hop == 2 and pipe.current.device == "dev3"
    req.receiveMsg_SegmentDone(_done(0, "dev1"), "w")
    assert pipe.hop == 2 and {r.device: r.status for r in pipe.records} \
        == {"dev1": "won", "dev2": "won", "dev3": "pending"}


# ----------------------------------------------------------------------------- loopback runs

@pytest.fixture(scope="module")
def cluster():
    from decolla.api import LocalCluster
    from decolla.baselines.client import BaselineClient
    with LocalCluster(devices=3, model=SPEC) as c:
        with BaselineClient(c.leader, edge="leader") as bc:
            bc.prepare()
            yield c, bc


@pytest.mark.integration
@pytest.mark.parametrize("method", ["mobile", "partition", "hierarchical"])
def test_every_baseline_returns_the_reference(cluster, model, image, method):
    _, bc = cluster
    want = reference(model, image)
    for bw in (1, 1000):
        r = bc.infer(image, method, bandwidth_mbit=bw)
        np.testing.assert_allclose(r.logits, want, rtol=1e-4, atol=1e-4)
        route = r.stats["route"]
        assert route[0][1] == 0 and route[-1][2] == len(model.layers)
        used = {rec.device for rec in r.trace.records if rec.status == "won"}
        assert used == {seg[0] for seg in route}
        assert all(rec.start <= rec.end for rec in r.trace.records if rec.status == "won")
    if method == "hierarchical":
        assert len(route) == 3
    if method == "partition":   # Neurosurgeon moves the split with bandwidth
        slow = bc.infer(image, method, bandwidth_mbit=0.001).stats["split"]
        assert slow > len(model.layers) // 2


@pytest.mark.integration
def test_hierarchical_replans_around_a_stopped_device(cluster, model, image):
    c, bc = cluster
    want = reference(model, image)
    c.kill("dev2", signal.SIGSTOP)
    try:
        r = bc.infer(image, "hierarchical", bandwidth_mbit=1000, t1_floor=0.5, timeout=60)
    finally:
        c.kill("dev2", signal.SIGCONT)
    np.testing.assert_allclose(r.logits, want, rtol=1e-4, atol=1e-4)
    assert r.stats["replans"] >= 1 and "dev2" in r.stats["failed"]
    assert all(seg[0] != "dev2" for seg in r.stats["route"])
    assert any(rec.status == "lost" and rec.device == "dev2" for rec in r.trace.records)
    assert r.latency >= 0.5                      # it waited t1 before re-planning


@pytest.mark.integration
def test_hierarchical_over_actor_messages_only(cluster, model, image):
    """The baselines' transport option: with data_plane=False every segment and report
    travels as an actor message, and the answer is the same."""
    from decolla.baselines.client import BaselineClient
    c, _ = cluster
    with BaselineClient(c.leader, edge="leader", data_plane=False) as bc:
        bc.prepare()
        r = bc.infer(image, "hierarchical", bandwidth_mbit=1000)
    np.testing.assert_allclose(r.logits, reference(model, image), rtol=1e-4, atol=1e-4)
    assert len(r.stats["route"]) == 3


def test_profile_times_each_layer_inside_whole_passes_and_averages(model, monkeypatch):
    """With a fake clock: every layer's time is its mean over the passes run (no layer is
    timed on its own, where a CPU quota would let a short one run as a full-speed burst)."""
    clock = [0.0]
    calls = []
    monkeypatch.setattr(part.time, "perf_counter", lambda: clock[0])
    weights = {l.name: 0.001 * (i + 1) for i, l in enumerate(model.layers)}

    def fake_layer(layer, x, res):
        calls.append(layer.name)
        passes_done = calls.count(layer.name) - 1
        clock[0] += weights[layer.name] * (1 + passes_done)     # each pass slower than the last
        return np.zeros(layer.out_shape, np.float32)

    prof = part.profile_layers(list(model.layers), repeats=3, min_total_s=0.0,
                               run_layer=fake_layer)
    assert len(calls) == 3 * len(model.layers)
    np.testing.assert_allclose(prof, [weights[l.name] * 2 for l in model.layers])
