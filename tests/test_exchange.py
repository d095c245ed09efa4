"""Exchange stages (decolla.plans.exchange, Swap): row strips that swap halo rows with each
other instead of recomputing them, in one process (`decolla.plans.run`) and the pieces a
worker uses (HaloBox, the data plane's routing)."""
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from decolla import reference
from decolla.runtime import dataplane
from decolla.plans import PlanError, build_plan
from decolla.plans.auto import Profile, swap_points
from decolla.plans.compute import chunk_inputs, merge
from decolla.plans.data import stage_bytes
from decolla.plans.exchange import HaloBox, HaloMissing, StripExchange, run_lockstep
from decolla.plans.run import run_plan
from decolla.plans.stages import clean_cuts, split_tail
from decolla.runtime.messages import Halo, LinkEcho
from decolla.loader import load_model


def rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@given(size=st.integers(96, 256), k=st.integers(2, 4), every=st.integers(1, 6),
       arch=st.sampled_from(["mobilenet_v2", "mobilenet_v1"]), dtype=st.sampled_from(
           [None, "float32", "float16"]))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_exchange_strips_reproduce_the_reference(size, k, every, arch, dtype):
    m = load_model(f"{arch}:width=0.25,input_size={size},num_classes=8,seed=3")
    img = np.random.default_rng(size).standard_normal(m.input_shape).astype(np.float32)
    want = reference.forward(m, img)
    plan = build_plan(m.layer_specs(), k, f"exchange:every={every}")
    stage = plan.stages[0]
    if not stage.exchange:        # some map shorter than k rows: plain strips
        assert min(s["out_shape"][0] for s in m.layer_specs() if s["kind"] != "gap"
                   and len(s["out_shape"]) == 3) < k
        return
    got, stats = run_plan(m, plan, img, dtype)
    assert rel(got, want) <= (1e-2 if dtype == "float16" else 1e-5)
    assert stats.halo > 0 or dtype is None
    alone, _ = run_plan(m, plan, img, dtype, swap=False)   # every strip as a retry
    assert rel(alone, want) <= (1e-2 if dtype == "float16" else 1e-5)


def test_exchange_strips_do_each_their_share_and_move_few_bytes():
    m = load_model("mobilenet_v2:seed=0")
    specs = m.layer_specs()
    total = sum(int(s["macs"]) for s in specs)
    stage = build_plan(specs, 3, "exchange").stages[0]
    swapped = [c.swap.cost.macs for c in stage.chunks]
    alone = [c.cost.macs for c in stage.chunks]
    assert sum(swapped) <= 1.15 * total < sum(alone)      # halos are swapped, not recomputed
    assert max(swapped) <= 0.4 * total
    assert stage_bytes(stage) * 2 // 4 < 1_000_000    # fp16, halos included
    fewer = build_plan(specs, 3, "exchange:every=6").stages[0]
    assert sum(len(c.swap.halo_in) for c in fewer.chunks) < \
        sum(len(c.swap.halo_in) for c in stage.chunks)
    assert max(c.swap.cost.macs for c in fewer.chunks) > max(swapped)


def test_auto_swaps_less_often_when_a_swap_costs_more():
    specs = load_model("mobilenet_v2:seed=0").layer_specs()

    def swaps(ms):
        prof = Profile.from_options({"bandwidth_mbit": 1000, "shared_link": 0,
                                             "halo_overhead_ms": ms}, 3)
        return swap_points(specs, 3, prof)
    cheap, dear = swaps(0.1), swaps(20)
    assert len(cheap) > len(dear)
    cuts = set(clean_cuts(split_tail(specs)[0]))
    assert set(cheap) <= cuts and set(dear) <= cuts
    plan = build_plan(specs, 3, "auto:bandwidth_mbit=1000,exchange=1,halo_overhead_ms=0.1")
    assert plan.stages[0].exchange
    assert not any(s.exchange for s in build_plan(       # off unless asked for
        specs, 3, "auto:bandwidth_mbit=1000,halo_overhead_ms=0.1").stages)


def test_lockstep_strips_of_one_device_need_no_network():
    m = load_model("mobilenet_v2:width=0.35,input_size=96,seed=0")
    img = np.random.default_rng(1).standard_normal(m.input_shape).astype(np.float32)
    plan = build_plan(m.layer_specs(), 3, "exchange")
    stage = plan.stages[0]
    layers = {l.name: l for l in m.layers}
    strips = {c.index: StripExchange(layers, stage, c, chunk_inputs(c, {"input": img}, True))
              for c in stage.chunks}
    box: dict = {}
    out = run_lockstep(strips, lambda i, to, j, rows: box.__setitem__((i, to, j), rows),
                                lambda i, to, j: box.pop((i, to, j)))
    assert not box                           # every halo sent was taken
    got = merge(stage, [out[c.index] for c in stage.chunks])
    assert rel(got, reference.forward(m, img)) <= 1e-5
    with pytest.raises(PlanError):
        StripExchange(layers, stage, stage.chunks[0], {})


def test_halo_box_waits_for_a_halo_and_gives_up_at_the_deadline():
    box = HaloBox()
    halo = Halo("r", 0, 1, 0, 3, b"rows")
    threading.Timer(0.05, box.put, (halo,)).start()
    assert box.take(halo.key, time.monotonic() + 5) == b"rows"
    t0 = time.monotonic()
    with pytest.raises(HaloMissing):
        box.take(halo.key, time.monotonic() + 0.1)
    assert time.monotonic() - t0 >= 0.09
    box.put(Halo("gone", 0, 1, 0, 3, b"x"))
    box.forget("gone")
    with pytest.raises(HaloMissing):
        box.take(("gone", 0, 1, 0, 3), time.monotonic())


def test_data_plane_routes_halos_past_the_actor():
    got = []
    inbox = dataplane.Inbox(route={Halo: lambda halo, conn: got.append(halo)})
    listener = dataplane.Listener(inbox, "127.0.0.1")
    peer = dataplane.Connection.connect(dataplane.Inbox(), listener.address)
    try:
        peer.send(Halo("r", 0, 0, 1, 2, b"abc"))
        peer.send(LinkEcho(1, "for the actor"))
        deadline = time.monotonic() + 5
        items = []
        while (not got or not items) and time.monotonic() < deadline:
            items += inbox.drain()
            time.sleep(0.01)
        assert [h.key for h in got] == [("r", 0, 0, 1, 2)]
        assert [obj for _, obj in items] == [LinkEcho(1, "for the actor")]
    finally:
        peer.close()
        listener.close()
