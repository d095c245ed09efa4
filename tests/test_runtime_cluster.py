"""Real node processes on loopback: correctness, concurrency, refusal, faults.

Every cluster is a leader + N `python -m decolla.node` device processes and a
client actor system; fixtures close them (members before leader) even on failure.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from decolla import reference
from decolla.runtime.messages import InferError, InferRequest
from decolla.loader import load_model

pytestmark = pytest.mark.integration

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"
_model = load_model(SPEC)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(_model.input_shape).astype(np.float32)


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


_refs: dict[int, np.ndarray] = {}


def ref(seed: int) -> np.ndarray:
    if seed not in _refs:
        _refs[seed] = reference.forward(_model, image(seed))
    return _refs[seed]


@pytest.fixture(scope="module")
def cluster():
    from decolla.api import LocalCluster
    c = LocalCluster(devices=3, model=SPEC, deadline_floor=0.5, plan="layer")
    try:
        yield c
    finally:
        c.close()


class Loop:
    """Runs inferences back to back in a thread; records (start, end, seed, result|error)."""

    def __init__(self, cluster, seeds=(1, 2, 3)):
        self.cluster, self.seeds = cluster, seeds
        self.done: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        i = 0
        while not self.stop.is_set():
            seed = self.seeds[i % len(self.seeds)]
            t0 = time.monotonic()
            try:
                out = self.cluster.infer(image(seed), timeout=60)
            except Exception as exc:  # recorded, asserted on by the test
                out = exc
            self.done.append((t0, time.monotonic(), seed, out))
            i += 1

    def wait_count(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.done) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.done) >= n, f"only {len(self.done)} of {n} inferences finished"

    def finish(self):
        self.stop.set()
        self.thread.join(90)
        assert not self.thread.is_alive(), "an inference hung"
        for _, _, seed, out in self.done:
            assert not isinstance(out, Exception), repr(out)
            assert rel_err(out.logits, ref(seed)) <= 1e-5
        return self.done


def test_logits_equal_single_process_reference(cluster, tmp_path):
    r = cluster.infer(image(1))
    assert rel_err(r.logits, ref(1)) <= 1e-5
    assert r.top_k[0][0] == int(np.argmax(ref(1)))
    assert r.devices_used == ["dev1", "dev2", "dev3"]
    assert r.stats["k"] == 6 and r.retries == 0
    won = [rec for rec in r.trace.records if rec.status == "won"]
    assert len(won) == sum(min(6, l.out_shape[-1]) for l in _model.layers)
    for rec in won:
        assert rec.sent <= rec.returned and rec.start <= rec.end and rec.bytes_out > 0
    sent: dict = {}       # a shared input is counted once per message (stage, device)
    for rec in won:
        sent[(rec.stage, rec.device)] = sent.get((rec.stage, rec.device), 0) + rec.bytes_in
    assert all(v > 0 for v in sent.values())
    path = tmp_path / "trace.json"
    r.save_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"dev1", "dev2", "dev3", "requester"} <= names
    assert sum(1 for e in events if e.get("ph") == "X" and e.get("pid") == 1) > len(won)


def test_live_events_follow_the_trace(cluster):
    events = []
    r = cluster.infer(image(5), on_event=events.append)
    assert rel_err(r.logits, ref(5)) <= 1e-5
    won = {(e["stage"], e["chunk"], e["device"]) for e in events if e["kind"] == "won"}
    traced = {(c.stage, c.chunk, c.device) for c in r.trace.records if c.status == "won"}
    assert won == traced and won
    sent = [e for e in events if e["kind"] in ("sent", "reassigned")]
    assert len(sent) == len(r.trace.records)
    assert all(e["request"] == r.request for e in events)


def test_twenty_concurrent_requests_all_correct(cluster):
    seeds = list(range(20))
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda s: cluster.infer(image(s), timeout=120), seeds))
    assert len({r.request for r in results}) == 20
    for s, r in zip(seeds, results):
        assert rel_err(r.logits, ref(s)) <= 1e-5, f"request for seed {s}"


def test_bad_images_rejected_while_cluster_keeps_serving(cluster):
    good = image(1)
    with pytest.raises(ValueError, match="shape"):
        cluster.infer(good[:50])
    nan = good.copy()
    nan[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        cluster.infer(nan)
    with pytest.raises(TypeError, match="dtype"):
        cluster.infer(good.astype(np.complex64))
    # the requester actor validates too (for callers that skip the client's check)
    client = cluster.client
    with client._asys.private() as ctx:
        reply = ctx.ask(client._requester, InferRequest("raw-bad", nan), 20)
    assert isinstance(reply, InferError) and reply.kind == "input"
    assert "non-finite" in reply.error
    r = cluster.infer(good)
    assert rel_err(r.logits, ref(1)) <= 1e-5


def test_node_with_other_model_digest_is_refused(cluster):
    cluster.add_device("intruder", model=SPEC.replace("seed=0", "seed=7"), wait=False)
    try:
        deadline = time.monotonic() + 30
        while "intruder" not in cluster.status()["refused"] and time.monotonic() < deadline:
            time.sleep(0.2)
        st = cluster.status()
        assert "digest" in st["refused"].get("intruder", "")
        assert "intruder" not in [d["name"] for d in st["devices"]]
        assert "node refused" in cluster.nodes["leader"].log_text()
        r = cluster.infer(image(2))
        assert "intruder" not in r.devices_used
        assert rel_err(r.logits, ref(2)) <= 1e-5
    finally:
        cluster.stop_node("intruder")


@pytest.mark.parametrize("allocator,plan", [("random", "fused"), ("least", "layer"),
                                            ("proportional", "fused"), ("eft", "layer")])
def test_other_clients_allocators_and_plans(cluster, allocator, plan):
    from decolla.api import Client
    with Client(cluster.leader, allocator=allocator, plan=plan, k=4, min_devices=3) as client:
        r = client.infer(image(4))
    assert rel_err(r.logits, ref(4)) <= 1e-5
    assert r.stats["allocator"] == allocator and r.stats["plan"] == plan


def test_devices_offer_a_data_plane_and_actor_messages_still_work(cluster):
    from decolla.api import Client
    assert all(d["data_plane"].rsplit(":", 1)[-1].isdigit() for d in cluster.status()["devices"])
    with Client(cluster.leader, plan="fused", k=3, data_plane=False, min_devices=3) as client:
        r = client.infer(image(6))
    assert rel_err(r.logits, ref(6)) <= 1e-5 and len(r.devices_used) == 3


def test_device_data_port_is_fixed_or_off_on_request(cluster):
    from decolla.actors.system import free_port
    port = free_port()
    cluster.add_device("fixed", extra=["--data-port", str(port)])
    cluster.add_device("actors-only", extra=["--data-port", "-1"])
    try:
        planes = {d["name"]: d["data_plane"] for d in cluster.status()["devices"]}
        assert planes["fixed"].endswith(f":{port}") and planes["actors-only"] == ""
    finally:
        cluster.stop_node("fixed")
        cluster.stop_node("actors-only")


def test_fp16_wire_is_close_and_moves_fewer_bytes(cluster):
    from decolla.api import Client
    with Client(cluster.leader, wire_dtype="float16", plan="layer", min_devices=3) as client:
        r16 = client.infer(image(5))
    r32 = cluster.infer(image(5))
    assert rel_err(r16.logits, ref(5)) <= 2e-2
    assert r16.top_k[0][0] == r32.top_k[0][0]
    assert r16.trace.bytes_moved() < 0.75 * r32.trace.bytes_moved()


def test_cli_status_and_infer_against_running_cluster(cluster, tmp_path):
    import subprocess
    import sys
    np.save(tmp_path / "img.npy", image(2))
    run = dict(capture_output=True, text=True, timeout=120)
    key = ["--key-file", cluster.key_path]       # the table below finds it in DECOLLA_KEY_FILE
    st = subprocess.run([sys.executable, "-m", "decolla", "status", "--leader", cluster.leader,
                         "--json", *key], **run)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["digest"] == _model.digest()
    assert {d["name"] for d in status["devices"] if d["status"] == "ready"} >= {"dev1", "dev3"}
    table = subprocess.run([sys.executable, "-m", "decolla", "status", "--leader", cluster.leader],
                           env=dict(os.environ, DECOLLA_KEY_FILE=cluster.key_path), **run)
    plane = next(d["data_plane"] for d in status["devices"] if d["name"] == "dev1")
    assert table.returncode == 0 and "data plane" in table.stdout and plane in table.stdout
    trace = tmp_path / "t.json"
    inf = subprocess.run([sys.executable, "-m", "decolla", "infer", "--leader", cluster.leader,
                          "--image", str(tmp_path / "img.npy"), "--json", "--trace", str(trace),
                          *key], **run)
    assert inf.returncode == 0, inf.stderr
    out = json.loads(inf.stdout)
    assert out["top"][0][0] == int(np.argmax(ref(2)))
    assert json.loads(trace.read_text())["traceEvents"]
    bad = subprocess.run([sys.executable, "-m", "decolla", "status", "--leader", "nonsense"], **run)
    assert bad.returncode != 0 and "HOST:PORT" in bad.stderr


def _wait_ready(cluster, name, timeout=30):
    deadline = time.monotonic() + timeout
    while name not in cluster.ready_devices():
        assert time.monotonic() < deadline, f"{name} did not come back"
        time.sleep(0.2)


def _wait_used(cluster, name, seed, timeout=30):
    """Infer (checking every result) until `name` computes part of one."""
    deadline = time.monotonic() + timeout
    while True:
        r = cluster.infer(image(seed))
        assert rel_err(r.logits, ref(seed)) <= 1e-5
        if name in r.devices_used:
            return
        assert time.monotonic() < deadline, f"{name} was not used again"
        time.sleep(0.3)


def test_sigstop_straggler_chunks_reassigned_and_device_used_again(cluster):
    _wait_ready(cluster, "dev2")
    loop = Loop(cluster)
    try:
        loop.wait_count(1)
        stopped_at = time.monotonic()
        cluster.kill("dev2", signal.SIGSTOP)
        time.sleep(3.0)
        n = len(loop.done)
        loop.wait_count(n + 1, timeout=30)       # still serving while dev2 is stopped
    finally:
        cluster.kill("dev2", signal.SIGCONT)
    done = loop.finish()
    during = [out for t0, t1, _, out in done if t1 > stopped_at]
    moved = [rec for r in during for rec in r.trace.records
             if rec.device == "dev2" and rec.status in ("lost", "late", "cancelled")]
    assert moved, "no chunk of the stopped device was reassigned"
    retried = [rec for r in during for rec in r.trace.reassigned() if rec.device != "dev2"]
    assert any(rec.reason in ("deadline", "device-lost", "retry") for rec in retried)
    # after SIGCONT the device comes back and gets work again
    _wait_ready(cluster, "dev2")
    _wait_used(cluster, "dev2", seed=3)


def test_device_dropped_by_the_convention_and_back_keeps_its_worker(cluster):
    """A device whose actor system misses its convention check-ins (stopped 5 s here; on a
    slow link they wait behind chunk traffic) and comes back keeps its worker: no restart,
    no new calibration, and it serves again."""
    _wait_ready(cluster, "dev3")
    pid = {d["name"]: d["pid"] for d in cluster.client.status()["devices"]}["dev3"]
    cluster.kill("dev3", signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 15
        while {d["name"]: d["status"] for d in cluster.client.status()["devices"]}["dev3"] != "gone":
            assert time.monotonic() < deadline, "the convention never dropped the stopped device"
            time.sleep(0.2)
    finally:
        cluster.kill("dev3", signal.SIGCONT)
    _wait_ready(cluster, "dev3")
    after = {d["name"]: d for d in cluster.client.status()["devices"]}["dev3"]
    assert after["pid"] == pid, "the worker was restarted"
    _wait_used(cluster, "dev3", seed=4)


def test_kill9_device_mid_inference(make_cluster):
    c = make_cluster(devices=3, model=SPEC, deadline_floor=0.5, plan="layer")
    loop = Loop(c)
    loop.wait_count(1)
    time.sleep(0.3)                             # mid-way through the next request
    killed_at = time.monotonic()
    c.kill("dev3", signal.SIGKILL)
    n = len(loop.done)
    loop.wait_count(n + 3, timeout=60)
    done = loop.finish()
    hit = [out for t0, t1, _, out in done if t0 < killed_at < t1]
    assert hit, "no inference was in flight at the kill"
    # The kill can land while dev3 has nothing in flight (between stages, or after its part
    # of the last stage); then the next attempt sent to it is the one lost.
    lost_in = [out for _, t1, _, out in done if t1 > killed_at and any(
        rec.device == "dev3" and rec.status == "lost" for rec in out.trace.records)]
    assert lost_in, "no attempt on dev3 was lost after the kill"
    r = lost_in[0]
    lost = [rec for rec in r.trace.records if rec.device == "dev3" and rec.status == "lost"]
    again = [rec for rec in r.trace.reassigned() if rec.device != "dev3"]
    assert lost and again, "the reassignment is not visible in the trace"
    assert {(rec.stage, rec.chunk) for rec in lost} <= {(rec.stage, rec.chunk) for rec in again}
    events = json.dumps(r.trace.to_chrome())
    assert "reassign" in events
    assert max(t1 - t0 for t0, t1, _, _ in done) < 30
    later = [out for t0, _, _, out in done if t0 > killed_at + 5]
    for out in later:
        assert "dev3" not in out.devices_used
    # the vanished node leaves the membership within seconds (heartbeats, then convention)
    while True:
        st = {d["name"]: d["status"] for d in c.status()["devices"]}
        if st.get("dev3") == "gone":
            break
        assert time.monotonic() - killed_at < 12, f"dev3 still {st.get('dev3')}"
        time.sleep(0.2)


@pytest.mark.slow
def test_mobilenet_v2_224_matches_reference(make_cluster):
    spec = "mobilenet_v2:seed=0"
    model = load_model(spec)
    img = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    want = reference.forward(model, img)
    c = make_cluster(devices=3, model=spec, plan="layer")
    r = c.infer(img, timeout=180)
    assert rel_err(r.logits, want) <= 1e-5
    assert r.logits.shape == (1000,) and r.devices_used == ["dev1", "dev2", "dev3"]
