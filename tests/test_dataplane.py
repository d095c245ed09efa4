"""The data plane (decolla.runtime.dataplane): authenticated binary frames over TCP, in
order, broken peers dropped, and a requester that cannot reach a worker's data plane falls
back to actor messages and still returns the reference output."""
import socket
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from thespian.actors import ActorTypeDispatcher

from decolla import reference
from decolla.runtime import channels, dataplane
from decolla.actors.worker import Worker
from decolla.runtime.messages import InferReply, InferRequest, LinkEcho, LinkProbe
from decolla.loader import load_model
from tests.inprocess import start_requester


def _wait(pred, timeout=10.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _collect(inbox, n, timeout=20.0):
    """The first `n` (connection, object) pairs from `inbox`, connection-ended notices aside."""
    got = []

    def more():
        got.extend(i for i in inbox.drain() if not isinstance(i[1], dataplane.Closed))
        return len(got) >= n
    assert _wait(more, timeout), f"{len(got)}/{n}"
    return got


def _ended(sock) -> bool:
    """Whether the peer closed `sock` (what it sent before, e.g. its hello, is skipped)."""
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True


def _dead_address():
    """An address nothing listens on (a port just freed)."""
    s = socket.create_server(("127.0.0.1", 0))
    addr = s.getsockname()
    s.close()
    return addr


@pytest.fixture
def pair():
    """(client connection, its inbox, server inbox, listener) on loopback."""
    server_inbox, client_inbox = dataplane.Inbox(), dataplane.Inbox()
    listener = dataplane.Listener(server_inbox, "127.0.0.1")
    conn = dataplane.Connection.connect(client_inbox, listener.address)
    assert conn.connected.wait(5)
    yield conn, client_inbox, server_inbox, listener
    conn.close()
    listener.close()
    for i in (server_inbox, client_inbox):
        i.close()


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 3_000_000), min_size=1, max_size=12))
def test_objects_arrive_whole_and_in_order_both_ways(sizes):
    server_inbox, client_inbox = dataplane.Inbox(), dataplane.Inbox()
    listener = dataplane.Listener(server_inbox, "127.0.0.1")
    conn = dataplane.Connection.connect(client_inbox, listener.address)
    try:
        # sent before the connection is up, and big ones that cannot go out at once
        msgs = [LinkProbe(i, np.full(n, i % 251, np.uint8).tobytes()) for i, n in enumerate(sizes)]
        for m in msgs:
            conn.send(m)
        got = _collect(server_inbox, len(msgs))
        assert [obj for _, obj in got] == msgs
        back = got[0][0]                       # the server side's connection object
        for m in msgs:
            back.send(LinkEcho(m.seq, "d"))
        assert [obj for c, obj in _collect(client_inbox, len(msgs))] == [
            LinkEcho(m.seq, "d") for m in msgs]
    finally:
        conn.close()
        listener.close()


def test_garbage_on_the_wire_drops_that_connection_only(pair):
    conn, _, server_inbox, listener = pair
    raw = socket.create_connection(listener.address)
    raw.sendall(struct.pack("!Q", 5) + b"\x00junk" * 10)          # not a hello
    raw2 = socket.create_connection(listener.address)
    raw2.sendall(struct.pack("!Q", 1 << 62))                      # absurd length, then silence
    assert _wait(lambda: _ended(raw)) and _wait(lambda: _ended(raw2), timeout=15)
    conn.send(LinkProbe(1))
    got = []
    assert _wait(lambda: got.extend(server_inbox.drain()) or len(got) >= 3)
    ended = [c for c, obj in got if isinstance(obj, dataplane.Closed)]
    assert [obj for _, obj in got if not isinstance(obj, dataplane.Closed)] == [LinkProbe(1)]
    assert len(set(map(id, ended))) == 2 and conn not in ended   # one notice per dropped one


def test_a_closed_connection_refuses_to_send(pair):
    conn, *_ = pair
    conn.close()
    with pytest.raises(ConnectionError):
        conn.send(LinkProbe(1))


def test_unreachable_address_closes_without_connecting():
    conn = dataplane.Connection.connect(dataplane.Inbox(), _dead_address())
    assert _wait(lambda: conn.closed)
    assert not conn.connected.is_set()


@pytest.mark.parametrize("where", ["unreachable", "reachable"])
def test_requester_reaches_its_only_device_whatever_its_data_plane_does(tcp_asys, where):
    """`unreachable`: the listed data plane refuses connections, so the requester falls back
    to actor messages. `reachable`: the worker's own."""
    spec = "mobilenet_v2:width=0.35,input_size=32,num_classes=10,seed=0"
    model = load_model(spec)
    img = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    addrs = {"w0": _dead_address()} if where == "unreachable" else None
    req = start_requester(tcp_asys, model, spec, [Worker], k=2, plan="fused",
                          data_addrs=addrs, ready_addrs=addrs is None)
    reply = tcp_asys.ask(req, InferRequest("r1", img), 60)
    assert isinstance(reply, InferReply)
    want = reference.forward(model, img)
    np.testing.assert_allclose(reply.logits, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    if where == "reachable":
        assert not [r for r in reply.records if r.status != "won"]
    # unreachable: the first attempt is lost on the dead plane, or (if the refusal beat the
    # send) goes straight out as an actor message; either way the answer is right


def test_transport_benchmark_measures_both_transports():
    from bench import transport
    res = transport.run(round_trips=5)
    planes = [f"data plane, {p}" for p in transport.protections()]
    assert "data plane, plain" in planes and "data plane, auth" in planes
    assert {(r["payload_bytes"], r["transport"]) for r in res["rows"]} == {
        (s, t) for s in transport.SIZES for t in ("actor messages", *planes)}
    assert all(r["wall_ms"] > 0 and r["echo_cpu_ms"] >= 0 for r in res["rows"])
    assert "| payload |" in transport.table(res)


class _FlakyEcho(dataplane.WatchesInbox, ActorTypeDispatcher):
    """Echoes link probes on the data plane; the actor message "boom" makes its handler raise."""

    CHANNELS = channels.table(channels.Channel(LinkProbe, "echo", channels.Path.DATA))
    RECEIVER = "echo"

    def receiveMsg_str(self, msg, sender):
        if msg == "boom":
            raise ValueError("boom")
        self.send(sender, self.listen())

    def receiveMsg_LinkProbe(self, msg, conn):
        conn.send(msg)


def test_a_failing_handler_does_not_leave_the_data_plane_unwatched(tcp_asys):
    actor = tcp_asys.createActor(_FlakyEcho)
    inbox = dataplane.Inbox()
    conn = dataplane.Connection.connect(inbox, tcp_asys.ask(actor, "listen", 10))
    conn.send(LinkProbe(1, b"before"))
    assert [o for _, o in _collect(inbox, 1)] == [LinkProbe(1, b"before")]
    tcp_asys.ask(actor, "boom", 5)          # Thespian answers with a PoisonMessage
    conn.send(LinkProbe(2, b"after"))       # nothing else will come to wake the actor
    assert [o for _, o in _collect(inbox, 1, timeout=5)] == [LinkProbe(2, b"after")]
    conn.close()


def test_worker_answers_while_a_data_plane_strip_waits_for_its_halo(tcp_asys):
    """Data-plane work runs on the worker's compute thread: while a strip waits for a halo
    that never comes, a link probe is echoed at once and the actor answers messages; at the
    strip's deadline it fails (the requester then recomputes it alone elsewhere)."""
    import dataclasses
    from decolla.plans import build_plan
    from decolla.runtime import wire
    from decolla.runtime.messages import (ChunkFailed, ChunkJob, InitWorker, LinkEcho, LinkProbe,
                                  StageWork, WorkerReady)
    spec = "mobilenet_v2:width=0.35,input_size=64,num_classes=10,seed=0"
    model = load_model(spec)
    worker = tcp_asys.createActor(Worker)
    ready = tcp_asys.ask(worker, InitWorker("w0", spec, model.digest(), 60.0), 30)
    assert isinstance(ready, WorkerReady) and ready.data_addr
    plan = build_plan(model.layer_specs(), 2, "exchange", model.input_shape)
    stage = plan.stages[0]
    chunk = stage.chunks[0]
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    needs = chunk.run_as(True)[0]
    blobs = {n.key: wire.encode(n.select(x)) for n in needs}
    inbox = dataplane.Inbox()
    conn = dataplane.Connection.connect(inbox, ready.data_addr)
    silent = dataplane.Listener(dataplane.Inbox(), "127.0.0.1")   # takes halos, sends none
    swap = {0: ("w0", ready.data_addr), 1: ("silent", silent.address)}
    t0 = time.monotonic()
    conn.send(StageWork("r1", dataclasses.replace(stage, chunks=()),
                        [ChunkJob(chunk, tuple(n.key for n in needs))], blobs, "float32",
                        swap, 3.0))
    time.sleep(0.3)                          # the strip is waiting for strip 1's halo now
    conn.send(LinkProbe(7))
    echo = _collect(inbox, 1, timeout=2.5)[0][1]
    assert isinstance(echo, LinkEcho) and echo.seq == 7
    assert time.monotonic() - t0 < 2.5       # before the strip's deadline
    echo = tcp_asys.ask(worker, LinkProbe(8), 2.0)     # the actor is free too
    assert isinstance(echo, LinkEcho) and echo.seq == 8
    failed = _collect(inbox, 1, timeout=10)[0][1]
    assert isinstance(failed, ChunkFailed) and failed.chunk == 0
    assert time.monotonic() - t0 >= 2.9
    conn.close()
    silent.close()
