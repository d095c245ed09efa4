"""The Requester actor in one process (Thespian simpleSystemBase, real Workers).

A worker that corrupts some results: the requester detects it, recomputes the
chunk elsewhere, never merges the damaged payload, and the logits stay exact.
"""
import numpy as np

from decolla import reference
from decolla.actors.worker import Worker
from decolla.runtime.messages import InferError, InferReply, InferRequest
from decolla.loader import load_model
from tests.inprocess import CorruptingWorker, start_requester

SPEC = "mobilenet_v2:width=0.35,input_size=32,num_classes=10,seed=0"


def start(asys, model, kinds):
    return start_requester(asys, model, SPEC, kinds, k=4, plan="layer")


def test_corrupted_results_are_recomputed_never_merged(asys):
    model = load_model(SPEC)
    img = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    req = start(asys, model, [CorruptingWorker, Worker])
    reply = asys.ask(req, InferRequest("r1", img), 60)
    assert isinstance(reply, InferReply)
    want = reference.forward(model, img)
    np.testing.assert_allclose(reply.logits, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    failed = [r for r in reply.records if r.status == "failed"]
    assert failed and all("corrupt" in r.reason for r in failed)
    for r in failed:   # every damaged chunk was recomputed and a retry won
        assert any(o.status == "won" and (o.stage, o.chunk) == (r.stage, r.chunk)
                   and o.attempt > r.attempt for o in reply.records)


def test_bad_request_gets_an_input_error(asys):
    model = load_model(SPEC)
    req = start(asys, model, [Worker])
    reply = asys.ask(req, InferRequest("bad", np.zeros((5, 5, 3), np.float32)), 10)
    assert isinstance(reply, InferError) and reply.kind == "input" and "shape" in reply.error
    img = np.ones(model.input_shape, np.float32)
    reply = asys.ask(req, InferRequest("good", img), 60)
    assert isinstance(reply, InferReply)
    np.testing.assert_allclose(reply.logits, reference.forward(model, img), rtol=1e-5,
                               atol=1e-6)


class SilentWorker(Worker):
    """Takes work and never answers; reports a speed at which its first chunk is due
    `DUE_S` after it is sent."""
    DUE_S = 1.5
    macs = 1.0

    def _calibrate(self):
        return self.macs / self.DUE_S

    def receiveMsg_StageWork(self, msg, sender):
        pass


def test_chunks_of_a_device_that_stops_being_usable_move_once_late(asys):
    """A device the registrar stops calling ready (missed heartbeats or check-ins: on a slow
    link they can wait behind our own chunks) gets no new work, and its chunks move once
    they are late by the supervisor's prediction: not at once, not only at the deadline."""
    import dataclasses
    import time

    from decolla.plans import build_plan
    model = load_model(SPEC)
    first = build_plan(model.layer_specs(), 4, "layer", model.input_shape).stages[0]
    SilentWorker.macs = max(c.cost.macs for c in first.chunks)
    img = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    out = []
    req = start_requester(asys, model, SPEC, [SilentWorker, Worker], k=4, plan="layer",
                          allocator="average",
                          deadline_floor=60.0, membership_out=out)
    (m,) = out
    unresponsive = dataclasses.replace(m, devices=[
        dataclasses.replace(d, status="unresponsive" if d.name == "w0" else d.status)
        for d in m.devices])
    t0 = time.monotonic()
    assert asys.ask(req, InferRequest("r1", img), 0.3) is None     # w0 holds some chunks
    asys.tell(req, unresponsive)
    reply = asys.listen(30)
    assert isinstance(reply, InferReply)
    want = reference.forward(model, img)
    np.testing.assert_allclose(reply.logits, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    held = [r for r in reply.records if r.device == "w0"]
    moved = [r for r in reply.records if r.reason == "device-lost"]
    assert held and all(r.status == "lost" for r in held)
    assert len(moved) == len(held) and all(r.device == "w1" for r in moved)
    # not moved when the device stopped being usable (0.3 s), but once late (1.5 s)
    assert min(r.sent for r in moved) - min(r.sent for r in held) >= 0.8 * SilentWorker.DUE_S
    assert time.monotonic() - t0 < 20


def test_live_events_come_in_batches_before_the_reply(asys):
    """Following a request costs a few messages, not one per event: the reply no longer
    waits behind hundreds of them."""
    import time

    from decolla.runtime.messages import ChunkEvents
    model = load_model(SPEC)
    img = np.random.default_rng(1).standard_normal(model.input_shape).astype(np.float32)
    req = start(asys, model, [Worker, Worker])
    t0 = time.monotonic()
    msg, batches = asys.ask(req, InferRequest("live", img, 5, True), 60), []
    while isinstance(msg, ChunkEvents):
        batches.append(msg)
        msg = asys.listen(60)
    elapsed = time.monotonic() - t0
    assert isinstance(msg, InferReply)
    events = [e for b in batches for e in b.events]
    assert len(events) > 2 * len(model.layers)       # one per chunk sent and won, at least
    assert len(batches) <= elapsed / 0.1 + 2
    assert sum(e.kind in ("sent", "reassigned") for e in events) == len(msg.records)
    assert [e.time for e in events] == sorted(e.time for e in events)
