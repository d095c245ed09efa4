"""Faults that heal, with real node processes on loopback: a restarted device is used again
at once, a restarted leader leaves no orphan worker and its clients carry on."""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from bench import procs
from bench.procs import by_node, tagged
from decolla import forward
from decolla.loader import load_model

pytestmark = pytest.mark.integration

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"
HEARTBEAT_S = 0.5
_model = load_model(SPEC)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(_model.input_shape).astype(np.float32)


_refs = {s: forward.forward(_model, image(s)) for s in (1, 2, 3)}


class Sender:
    """Sends inferences back to back from a thread; records (start, end, result | error)."""

    def __init__(self, client):
        self.client, self.done, self.stop = client, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        i = 0
        while not self.stop.is_set():
            seed = 1 + i % 3
            t0 = time.monotonic()
            try:
                out = self.client.infer(image(seed), timeout=60)
                assert np.abs(out.logits - _refs[seed]).max() <= 1e-4 * np.abs(_refs[seed]).max()
            except Exception as exc:  # recorded, asserted on by the test
                out = exc
            self.done.append((t0, time.monotonic(), out))
            i += 1

    def finish(self) -> list:
        self.stop.set()
        self.thread.join(90)
        assert not self.thread.is_alive(), "an inference hung"
        return self.done


def _status(cluster, name):
    return {d["name"]: d for d in cluster.status()["devices"]}.get(name, {})


def test_a_restarted_device_gets_work_within_two_heartbeats(make_cluster):
    c = make_cluster(devices=3, model=SPEC, deadline_floor=0.5, heartbeat=HEARTBEAT_S)
    sender = Sender(c.client)
    try:
        while len(sender.done) < 3:
            time.sleep(0.05)
        c.kill("dev3", signal.SIGKILL)
        deadline = time.monotonic() + 15
        while _status(c, "dev3").get("status") != "gone":    # the client has given up on it
            assert time.monotonic() < deadline, "the killed device never left"
            time.sleep(0.1)
        c.restart("dev3")
        while _status(c, "dev3").get("status") != "ready":
            assert time.monotonic() < deadline + 30, "the restarted device never got ready"
            time.sleep(0.05)
        ready_at = time.monotonic()
        while not any(t0 > ready_at and not isinstance(out, Exception)
                      and "dev3" in out.devices_used for t0, _, out in sender.done):
            assert time.monotonic() < ready_at + 15, "the restarted device got no work"
            time.sleep(0.05)
    finally:
        done = sender.finish()
    assert not [out for *_, out in done if isinstance(out, Exception)]
    first = min(t0 for t0, _, out in done if t0 > ready_at and "dev3" in out.devices_used)
    assert first - ready_at <= 2 * HEARTBEAT_S, f"used again only after {first - ready_at:.2f} s"


def test_a_refused_device_says_why_in_its_own_log_and_waits(make_cluster):
    c = make_cluster(devices=1, model=SPEC, heartbeat=HEARTBEAT_S)
    node = c.add_device("intruder", model=SPEC.replace("seed=0", "seed=7"), wait=False)
    deadline = time.monotonic() + 20
    while "refused by the leader" not in node.log_text():
        assert time.monotonic() < deadline, node.log_text()[-2000:]
        time.sleep(0.2)
    line = next(line for line in node.log_text().splitlines() if "refused by the leader" in line)
    assert "digest" in line and "waiting" in line
    assert node.alive()


def _workers(mark) -> dict[str, int]:
    return {name: len(pids) for name, pids in by_node(tagged(mark)).items() if name}


def _settle(c, mark, want: dict, old: dict, timeout=30.0) -> dict:
    """Wait until the client sees every device ready with a worker other than in `old`
    (name -> pid) and each device runs `want` processes; the devices' new pids."""
    deadline = time.monotonic() + timeout
    while True:
        st = {d["name"]: d for d in c.status()["devices"]}
        now = _workers(mark)
        if all(st.get(n, {}).get("status") == "ready" and st[n]["pid"] != old[n] for n in old) \
                and all(now.get(n) == k for n, k in want.items()):
            return {n: st[n]["pid"] for n in old}
        assert time.monotonic() < deadline, f"status {st}, processes {now}, wanted {want}"
        time.sleep(0.2)


def test_leader_restarts_leave_one_worker_per_device_and_clients_carry_on(make_cluster):
    mark = procs.tag()
    c = make_cluster(devices=3, model=SPEC, deadline_floor=0.5, heartbeat=HEARTBEAT_S)
    before = _workers(mark)
    sender = Sender(c.client)
    try:
        for restart in range(3):
            while len(sender.done) < 2 * (restart + 1):
                time.sleep(0.05)
            pids = {d["name"]: d["pid"] for d in c.status()["devices"]}
            c.restart("leader")
            want = {n: k for n, k in before.items() if n.startswith("dev")}
            _settle(c, mark, want, pids)
            for n, pid in pids.items():
                assert pid not in tagged(mark), f"{n}'s old worker {pid} still runs"
        n = len(sender.done)
        while len(sender.done) < n + 3:            # and the client still serves
            time.sleep(0.05)
    finally:
        done = sender.finish()
    errors = [out for *_, out in done if isinstance(out, Exception)]
    print(f"{len(done)} requests, {len(errors)} failed: {errors}; longest "
          f"{max(t1 - t0 for t0, t1, _ in done):.1f} s")
    # requests in flight at a restart wait for the new workers (Context.looking): answered
    assert not errors, errors
    assert max(t1 - t0 for t0, t1, _ in done) < 20, "a request waited for its timeout"
    assert _workers(mark) == before
