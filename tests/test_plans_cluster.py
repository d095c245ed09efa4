"""Issue-6 plans on a real loopback cluster (leader + 3 device processes): spatial strips,
partial-sum blocks and auto, with fp32/fp16/int8 on the wire, and a straggling device's
spatial chunks recomputed elsewhere."""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from decolla import reference
from decolla.loader import load_model

pytestmark = pytest.mark.integration

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"
BOUNDS = {"float32": 1e-5, "float16": 1e-2, "int8": 0.25}     # as tests/test_plans.py
_model = load_model(SPEC)


def image(seed):
    return np.random.default_rng(seed).standard_normal(_model.input_shape).astype(np.float32)


def rel(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def cluster():
    from decolla.api import LocalCluster
    c = LocalCluster(devices=3, model=SPEC, deadline_floor=0.5)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("plan,dtype", [("spatial", "int8"), ("block", "float32"),
                                        ("auto:bandwidth_mbit=1000", "float16")])
def test_plan_and_encoding_on_a_real_cluster(cluster, plan, dtype):
    from decolla.api import Client
    with Client(cluster.leader, plan=plan, wire_dtype=dtype, k=3, min_devices=3) as client:
        r = client.infer(image(1))
    want = reference.forward(_model, image(1))
    assert rel(r.logits, want) <= BOUNDS[dtype]
    assert r.stats["plan"] == plan and r.stats["wire_dtype"] == dtype
    assert r.trace.bytes_moved() > 0


def test_local_plan_moves_no_bytes(cluster):
    from decolla.api import Client
    with Client(cluster.leader, plan="auto:bandwidth_mbit=1,local=1", min_devices=3) as client:
        r = client.infer(image(3))
    assert rel(r.logits, reference.forward(_model, image(3))) <= 1e-5
    assert r.trace.bytes_moved() == 0
    assert all(d.startswith("local:") for d in r.devices_used)


def _infer_with_dev2_stopped(cluster, plan: str, seed: int):
    """One inference with `plan` while dev2 is SIGSTOPped (after a warm one); waits until
    dev2 serves again before returning the result."""
    from decolla.api import Client
    with Client(cluster.leader, plan=plan, k=3, min_devices=3, deadline_floor=0.5) as client:
        client.infer(image(seed))                   # warm: every device has answered once
        cluster.kill("dev2", signal.SIGSTOP)
        try:
            r = client.infer(image(seed), timeout=60)
        finally:
            cluster.kill("dev2", signal.SIGCONT)
    deadline = time.monotonic() + 30
    while "dev2" not in cluster.ready_devices():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return r


def test_straggler_spatial_chunks_are_recomputed_elsewhere(cluster):
    r = _infer_with_dev2_stopped(cluster, "spatial", 2)
    assert rel(r.logits, reference.forward(_model, image(2))) <= 1e-5
    stuck = [rec for rec in r.trace.records if rec.device == "dev2"
             and rec.status in ("lost", "cancelled", "late")]
    assert stuck, "no chunk was sent to the stopped device"
    for rec in stuck:
        assert any(o.status == "won" and o.device != "dev2" and (o.stage, o.chunk) ==
                   (rec.stage, rec.chunk) for o in r.trace.records)


@pytest.mark.parametrize("whole_above,expect_whole", [(None, True), (0, False)])
def test_auto_sends_whole_requests_while_devices_are_busy(cluster, whole_above, expect_whole):
    from concurrent.futures import ThreadPoolExecutor

    from decolla.api import Client
    plan = "auto:bandwidth_mbit=1000" + ("" if whole_above is None else f",whole_above={whole_above}")
    with Client(cluster.leader, plan=plan, k=3, min_devices=3) as client:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda s: client.infer(image(s), timeout=60), range(16)))
    for seed, r in enumerate(results):
        assert rel(r.logits, reference.forward(_model, image(seed))) <= 1e-5
    plans = [r.stats["plan"] for r in results]
    assert ("single" in plans) == expect_whole, plans
    assert plan in plans            # the first requests found idle devices and were split


def test_auto_plans_for_the_links_it_measured(cluster):
    """Without a stated bandwidth the requester measures the device links first and plans
    for them (loopback: far above the 100 Mb/s default); a stated one is used as given."""
    from decolla.api import Client
    with Client(cluster.leader, plan="auto", k=3, min_devices=3) as client:
        measured = client.infer(image(0), timeout=60)
    with Client(cluster.leader, plan="auto:bandwidth_mbit=20", k=3, min_devices=3) as client:
        stated = client.infer(image(1), timeout=60)
    assert measured.stats["bandwidth_mbit"] > 200, measured.stats
    assert stated.stats["bandwidth_mbit"] == 20
    for seed, r in enumerate((measured, stated)):
        assert rel(r.logits, reference.forward(_model, image(seed))) <= 1e-5


def test_auto_counts_other_clients_requests_in_flight(cluster):
    """whole_above counts every requester's requests (pushed by the registrar): a request
    that finds another client busy runs whole; once that client is idle it is split."""
    import threading

    from decolla.api import Client
    stop = threading.Event()
    with Client(cluster.leader, plan="layer", k=3, min_devices=3) as busy, \
            Client(cluster.leader, plan="auto:bandwidth_mbit=1000", k=3, min_devices=3) as client:

        def keep_busy(seed):
            while not stop.is_set():
                busy.infer(image(seed), timeout=60)
        threads = [threading.Thread(target=keep_busy, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.5)             # > 2 heartbeat periods: the registrar has pushed the count
            under_load = client.infer(image(5), timeout=60)
        finally:
            stop.set()
            for t in threads:
                t.join()
        time.sleep(1.5)
        idle = client.infer(image(6), timeout=60)
    assert under_load.stats["plan"] == "single", under_load.stats
    assert idle.stats["plan"] != "single", idle.stats
    for seed, r in ((5, under_load), (6, idle)):
        assert rel(r.logits, reference.forward(_model, image(seed))) <= 1e-5


def test_exchange_strips_swap_halos_between_devices(cluster):
    from decolla.api import Client
    with Client(cluster.leader, plan="exchange", wire_dtype="float16", k=3,
                min_devices=3) as client:
        r = client.infer(image(4))
    assert rel(r.logits, reference.forward(_model, image(4))) <= BOUNDS["float16"]
    won = [rec for rec in r.trace.records if rec.status == "won"]
    assert len(won) == 3 and all(rec.reason == "first+swap" for rec in won)
    assert len({rec.device for rec in won}) == 3
    assert all(rec.halo_bytes > 0 for rec in won)         # rows came from the other devices


def test_exchange_strips_of_a_stopped_device_are_recomputed_alone(cluster):
    """A stopped device holds up its neighbours' halos: every strip waiting on it fails at
    its deadline and is computed alone (recomputing its halos) on a device that answers."""
    r = _infer_with_dev2_stopped(cluster, "exchange", 5)
    assert rel(r.logits, reference.forward(_model, image(5))) <= 1e-5
    won = [rec for rec in r.trace.records if rec.status == "won"]
    assert all(rec.device != "dev2" for rec in won)
    assert any(rec.reason != "first+swap" for rec in won)     # some strip ran alone


def test_client_takes_another_port_when_its_free_one_was_taken(cluster, monkeypatch):
    """A port free a moment ago can be taken before the actor system's admin binds it
    (once in CI); the client then starts on another free port."""
    import socket

    from decolla import api
    from decolla.actors import system
    held = socket.create_server(("127.0.0.1", 0))
    ports = iter([held.getsockname()[1]])
    real = system.free_port
    monkeypatch.setattr(system, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
    try:
        with api.Client(cluster.leader, plan="single", k=1, min_devices=3) as client:
            r = client.infer(image(2), timeout=60)
        assert rel(r.logits, reference.forward(_model, image(2))) <= 1e-5
    finally:
        held.close()
