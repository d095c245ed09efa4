"""Requester state machine in one process (Thespian simpleSystemBase, real Workers).

A worker that corrupts some results: the requester detects it, recomputes the
chunk elsewhere, never merges the damaged payload, and the logits stay exact.
"""
import numpy as np

from decolla import reference
from decolla.actors.worker import Worker
from decolla.messages import InferError, InferReply, InferRequest
from decolla.model import load_model
from tests.inprocess import CorruptingWorker, start_requester

SPEC = "mobilenet_v2:width=0.35,input_size=32,num_classes=10,seed=0"


def start(asys, model, kinds):
    return start_requester(asys, model, SPEC, kinds, k=4)


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
    """Takes work and never answers; reports itself so slow that its chunks are not due
    for hours (so only a deadline or a membership change can move them)."""

    def _calibrate(self):
        return 1.0

    def receiveMsg_StageWork(self, msg, sender):
        pass


def test_unresponsive_device_keeps_chunks_not_yet_due_gone_device_loses_them(asys):
    """Missed heartbeats alone (a slow link busy with our chunks looks the same) do not
    move chunks the supervisor does not expect back yet; a device that is gone does."""
    import dataclasses
    model = load_model(SPEC)
    img = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    out = []
    req = start_requester(asys, model, SPEC, [SilentWorker, Worker], k=4, allocator="average",
                          membership_out=out)
    (m,) = out

    def with_status(status):
        devices = [dataclasses.replace(d, status=status if d.name == "w0" else d.status)
                   for d in m.devices]
        return dataclasses.replace(m, devices=devices)
    assert asys.ask(req, InferRequest("r1", img), 0.5) is None     # w0 holds some chunks
    asys.tell(req, with_status("unresponsive"))
    assert asys.listen(1.0) is None                                 # ... and keeps them
    asys.tell(req, with_status("gone"))
    reply = asys.listen(30)
    assert isinstance(reply, InferReply)
    np.testing.assert_allclose(reply.logits, reference.forward(model, img), rtol=1e-5,
                               atol=1e-6 * np.abs(reference.forward(model, img)).max())
    moved = [r for r in reply.records if r.device == "w0"]
    assert moved and all(r.status == "lost" for r in moved)
    reasons = {r.reason for r in reply.records if r.attempt > 0}
    assert reasons == {"device-lost"}, reasons
