"""A Requester with real Workers in one process (Thespian simpleSystemBase) for tests:
a worker that damages results, a registrar with a fixed membership, and the set-up."""
from __future__ import annotations

from thespian.actors import Actor

from decolla.actors.requester import Requester
from decolla.actors.worker import Worker
from decolla.runtime.messages import (ChunkResult, ChunkResults, ConfigureRequester, DeviceInfo,
                              InitWorker, Membership, Subscribe, WorkerReady)


class CorruptingWorker(Worker):
    """Flips a payload byte of every first attempt at chunk 0 of every stage."""

    def send(self, target, msg):
        for r in (msg.results if isinstance(msg, ChunkResults) else [msg]):
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


def start_requester(asys, model, spec: str, worker_kinds, node: str = "test",
                    data_addrs: dict | None = None, ready_addrs: bool = False,
                    membership_out: list | None = None, **config):
    """Workers of `worker_kinds` (w0, w1, ...) holding `model`, a FakeRegistrar listing them
    (with the data-plane addresses `data_addrs` by worker name, each an address or a function
    of the one the worker announced, or with the announced ones if `ready_addrs`), and a
    Requester configured with `config` (ConfigureRequester fields); its address. The
    Membership goes into `membership_out`."""
    devices = []
    for i, kind in enumerate(worker_kinds):
        addr = asys.createActor(kind)
        ready = asys.ask(addr, InitWorker(f"w{i}", spec, model.digest(), 60.0), 30)
        assert isinstance(ready, WorkerReady)
        data_addr = ready.data_addr if ready_addrs else (data_addrs or {}).get(f"w{i}", ())
        if callable(data_addr):
            data_addr = data_addr(ready.data_addr)
        devices.append(DeviceInfo(f"w{i}", addr, "ready", speed=ready.speed, data_addr=data_addr))
    reg = asys.createActor(FakeRegistrar)
    membership = Membership(devices, model.digest(), spec, model.layer_specs(),
                            tuple(model.input_shape))
    if membership_out is not None:
        membership_out.append(membership)
    assert asys.ask(reg, membership, 10) == "ok"
    req = asys.createActor(Requester)
    assert asys.ask(req, ConfigureRequester(reg, node, **config), 10).ok
    return req
