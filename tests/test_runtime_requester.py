"""Requester state machine in one process (Thespian simpleSystemBase, real Workers).

A worker that corrupts some results: the requester detects it, recomputes the
chunk elsewhere, never merges the damaged payload, and the logits stay exact.
"""
import numpy as np
import pytest
from thespian.actors import Actor, ActorSystem

from decolla import reference
from decolla.actors.requester import Requester
from decolla.actors.worker import Worker
from decolla.messages import (ChunkResult, ChunkResults, ConfigureRequester, DeviceInfo, InferError,
                              InferReply, InferRequest, InitWorker, Membership, Subscribe,
                              WorkerReady)
from decolla.model import load_model

SPEC = "mobilenet_v2:width=0.35,input_size=32,num_classes=10,seed=0"


class CorruptingWorker(Worker):
    """Flips a payload byte of every first attempt at chunk 0 of every stage."""

    def send(self, target, msg):
        results = msg.results if isinstance(msg, ChunkResults) else [msg]
        for r in results:
            if isinstance(r, ChunkResult) and r.chunk == 0 and r.attempt == 0:
                blob = bytearray(r.payload)
                blob[len(blob) // 2] ^= 0x5A
                r.payload = bytes(blob)
        super().send(target, msg)


class FakeRegistrar(Actor):
    """Answers Subscribe with a fixed membership."""

    def receiveMessage(self, msg, sender):
        if isinstance(msg, Membership):
            self.membership = msg
            self.send(sender, "ok")
        elif isinstance(msg, Subscribe):
            self.send(sender, self.membership)


@pytest.fixture
def asys():
    system = ActorSystem("simpleSystemBase", {"decolla.compute": True}, transientUnique=True)
    try:
        yield system
    finally:
        system.shutdown()


def start(asys, model, kinds):
    devices = []
    for i, kind in enumerate(kinds):
        name = f"w{i}"
        addr = asys.createActor(kind)
        ready = asys.ask(addr, InitWorker(name, SPEC, model.digest(), 60.0), 30)
        assert isinstance(ready, WorkerReady)
        devices.append(DeviceInfo(name, addr, "ready", speed=ready.speed))
    reg = asys.createActor(FakeRegistrar)
    assert asys.ask(reg, Membership(devices, model.digest(), SPEC, model.layer_specs(),
                                    tuple(model.input_shape)), 10) == "ok"
    req = asys.createActor(Requester)
    assert asys.ask(req, ConfigureRequester(reg, "test", k=4), 10).ok
    return req


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
