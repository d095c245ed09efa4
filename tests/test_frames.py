"""The data plane's frames (decolla.runtime.frames, decolla.runtime.session): every data-plane
message type round-trips with real plan contents, types come back as the code needs them
(tuples hashable, lists lists), anything outside the allowlist or malformed is a FrameError,
and a frame is read only after its handshake, tag and counter hold."""
import dataclasses
import pickle
import socket
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from decolla.baselines.messages import (PIPELINE_CHANNELS, PIPELINE_FRAMES, HopReport, RunSegment,
                                        SegmentDone)
from decolla.baselines.partition import Segment
from decolla.loader import load_model
from decolla.plans import build_plan
from decolla.runtime import channels, frames, keys, session, wire
from decolla.runtime.frames import FrameError
from decolla.runtime.messages import (Cancel, ChunkFailed, ChunkJob, ChunkResult, ChunkResults,
                                      Halo, LinkEcho, LinkProbe, StageWork)

SPEC = "mobilenet_v2:width=0.35,input_size=64,num_classes=10,seed=0"
PLANS = ("layer", "fused", "spatial", "exchange", "block")


_CACHE: dict = {}


def _plan(kind, k):
    if "model" not in _CACHE:
        _CACHE["model"] = load_model(SPEC)
    if (kind, k) not in _CACHE:
        m = _CACHE["model"]
        _CACHE[kind, k] = build_plan(m.layer_specs(), k, kind, m.input_shape)
    return _CACHE["model"], _CACHE[kind, k]


def _stage_work(kind, k, stage_i, swapped, dtype="float32"):
    """The StageWork a requester sends for all chunks of one stage of a real plan."""
    model, plan = _plan(kind, k)
    stage = plan.stages[stage_i % len(plan.stages)]
    swapped = swapped and stage.exchange
    x = np.random.default_rng(stage_i).standard_normal(model.input_shape).astype(np.float32)
    tensors = {"input": x}
    blobs, jobs = {}, []
    for c in stage.chunks:
        needs = c.run_as(swapped)[0]
        for n in needs:
            shape = n.shape(x.shape if n.tensor == "input" else (8, 8, 4))
            arr = tensors.get(n.tensor, np.ones(shape, np.float32))
            blobs[n.key] = wire.encode(n.select(arr), dtype)
        jobs.append(ChunkJob(c, tuple(n.key for n in needs), attempt=stage_i % 3))
    swap = ({c.index: (f"w{c.index}", ("127.0.0.1", 40000 + c.index)) for c in stage.chunks}
            if swapped else None)
    return StageWork(f"r{stage_i}", dataclasses.replace(stage, chunks=()), jobs, blobs, dtype,
                     swap, 1.5)


def _roundtrip(codec, msg):
    return codec.decode(*codec.encode(msg))


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(PLANS), k=st.integers(1, 4), stage_i=st.integers(0, 60),
       swapped=st.booleans(), dtype=st.sampled_from(["float32", "float16"]))
def test_stage_work_of_a_real_plan_comes_back_equal_and_hashable(kind, k, stage_i, swapped, dtype):
    msg = _stage_work(kind, k, stage_i, swapped, dtype)
    back = _roundtrip(frames.RUNTIME, msg)
    assert back == msg
    for job, orig in zip(back.jobs, msg.jobs):
        assert type(job.chunk.needs) is tuple and hash(job.chunk) == hash(orig.chunk)
        assert set(job.blob_keys) <= set(back.blobs)
        assert all(type(key) is tuple for key in job.blob_keys)
    assert type(back.jobs) is list and hash(back.stage) == hash(msg.stage)
    assert all(type(b) is bytes for b in back.blobs.values())
    if back.swap is not None:
        assert all(type(v) is tuple and type(v[1]) is tuple for v in back.swap.values())


@settings(max_examples=60, deadline=None)
@given(seq=st.integers(0, 2**40), payload=st.binary(max_size=3000), text=st.text(max_size=40),
       ints=st.lists(st.integers(0, 2**31), min_size=6, max_size=6),
       times=st.lists(st.floats(allow_nan=False), min_size=4, max_size=4))
def test_every_runtime_data_plane_message_round_trips(seq, payload, text, ints, times):
    a, b, c, d, e, f = ints
    results = [ChunkResult(text, a, b, c, "w0", payload, *times[:3], d, times[3]),
               ChunkResult("r", 0, 1, 0, text, payload[:10], 0.0, 1.0, 2.0)]
    msgs = [Cancel(text, ((a, b), (c, d))), Cancel(text), LinkProbe(seq, payload), LinkProbe(seq),
            Halo(text, a, b, c, d, payload), *results, ChunkResults(results),
            ChunkFailed(text, a, b, c, "w1", text), LinkEcho(seq, text)]
    for msg in msgs:
        assert _roundtrip(frames.RUNTIME, msg) == msg
    assert type(_roundtrip(frames.RUNTIME, ChunkResults(results)).results) is list


def test_every_data_plane_channel_has_a_frame_type():
    """A message whose channel takes the data plane can travel in a frame of its table's codec."""
    for table, codec in ((channels.CHANNELS, frames.RUNTIME), (PIPELINE_CHANNELS, PIPELINE_FRAMES)):
        data = {t for t, ch in table.items() if ch.path is channels.Path.DATA}
        assert data == set(codec.messages.values())


def test_baseline_messages_carry_routes_and_actor_addresses():
    from thespian.actors import ActorSystem
    from decolla.actors.system import free_port
    asys = ActorSystem("multiprocTCPBase", {"Admin Port": free_port()}, transientUnique=True)
    try:
        addr = asys.createActor("thespian.actors.Actor")
        report = HopReport(0, "d0", 1.0, 2.0, 3.0, 10, 20)
        run = RunSegment("r", 1, 0, [Segment("d0", 0, 3), Segment("d1", 3, 9)], [addr, addr],
                         addr, {"input": b"x" * 5000, "aux": b"y"}, "float16", [report],
                         [("127.0.0.1", 5), ()], ("127.0.0.1", 6))
        back = _roundtrip(PIPELINE_FRAMES, run)
        assert back == run and back.requester == addr and back.addresses[1] == addr
        assert hash(back.requester.addressDetails) == hash(addr.addressDetails)
        done = SegmentDone("r", 1, report, b"z" * 4000, "", [report])
        assert _roundtrip(PIPELINE_FRAMES, done) == done
    finally:
        asys.shutdown()


# ------------------------------------------------------------------ what the codec refuses

class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/decolla-evil", "w"))


def test_values_outside_the_allowlist_cannot_be_sent():
    with pytest.raises(FrameError):
        frames.RUNTIME.encode(("not", "a", "message"))
    with pytest.raises(FrameError):
        frames.RUNTIME.encode(LinkEcho(1, _Evil()))
    with pytest.raises(FrameError):
        frames.RUNTIME.encode(RunSegment("r", 0, 0, [], [], None, {}))   # not a runtime type


def test_numpy_scalars_travel_as_python_numbers():
    back = _roundtrip(frames.RUNTIME, Halo("r", np.int64(1), np.int32(2), 3, 4, b""))
    assert back.stage == 1 and type(back.stage) is int and type(back.src) is int


def _control(*values):
    return msgpack.packb(list(values), use_bin_type=True)


@pytest.mark.parametrize("tid, control, buffers", [
    (99, _control(1, "d"), []),                                   # unknown message type
    (16, _control(None, (), 0), []),                              # a nested type, not a message
    (8, _control(1), []),                                         # too few fields
    (8, _control(1, "d", 3), []),                                 # too many fields
    (8, b"\xc1", []),                                             # not msgpack
    (8, b"\x91", []),                                             # truncated
    (8, _control(1, "d")[:-1], []),                               # cut short
    (8, b"\x01", []),                                             # not a field list
    (3, _control(1, msgpack.ExtType(3, struct.pack("!I", 5))), []),  # no buffer 5
    (3, _control(1, msgpack.ExtType(9, b"")), []),  # unknown extension
    (3, _control(1, msgpack.ExtType(2, _control(999))), []),   # unknown nested id
    (3, _control(1, msgpack.ExtType(4, _control("h", 99999, ""))), []),
    (2, _control("r", {(): 1, msgpack.ExtType(1, _control(1)): 2}), []),  # list key
    (1, pickle.dumps(LinkEcho(1, "d")), []),                       # a pickle is not a frame
])
def test_malformed_control_is_a_frame_error(tid, control, buffers):
    with pytest.raises(FrameError):
        frames.RUNTIME.decode(tid, control, buffers)


@settings(max_examples=300, deadline=None)
@given(tid=st.integers(0, 30), control=st.binary(max_size=200),
       buffers=st.lists(st.binary(max_size=20), max_size=3))
def test_random_control_bytes_decode_or_raise_frame_error(tid, control, buffers):
    try:
        frames.RUNTIME.decode(tid, control, buffers)
    except FrameError:
        pass


def test_type_ids_are_unique():
    with pytest.raises(ValueError):
        frames.RUNTIME.extend({1: RunSegment})
    with pytest.raises(ValueError):
        frames.Codec({1: LinkEcho}, {2: LinkEcho})


# ------------------------------------------------------------------ sessions

def _handshake_pair(key_a=None, key_b=None, prot_a=None, prot_b=None):
    """(dialer session, listener session, dialer socket, listener socket) over a socketpair;
    a side whose handshake fails gives its exception instead of a session."""
    import threading
    a, b = socket.socketpair()
    out = {}

    def side(name, sock, role, key, prot):
        try:
            out[name] = session.handshake(sock, role, prot, key, timeout=5)
        except Exception as exc:
            out[name] = exc
            sock.close()
    t = threading.Thread(target=side, args=("b", b, session.LISTENER, key_b, prot_b))
    t.start()
    side("a", a, session.DIALER, key_a, prot_a)
    t.join()
    return out["a"], out["b"], a, b


def _send(sess, sock, msg, codec=frames.RUNTIME):
    for piece in sess.seal(*codec.encode(msg)):
        sock.sendall(piece)


def _recv(sess, sock, codec=frames.RUNTIME):
    return codec.decode(*sess.receive(sock))


@pytest.mark.parametrize("prot", [session.AUTH, session.ENCRYPT, session.PLAIN])
def test_frames_flow_both_ways_after_the_handshake(prot):
    key = bytes(range(32))
    sa, sb, a, b = _handshake_pair(key, key, prot, prot)
    assert sa.protection == sb.protection == prot
    msgs = [LinkProbe(i, bytes([i]) * (i * 700)) for i in range(5)]
    for m in msgs:
        _send(sa, a, m)
    assert [_recv(sb, b) for _ in msgs] == msgs
    _send(sb, b, LinkEcho(9, "x"))
    assert _recv(sa, a) == LinkEcho(9, "x")


def test_protection_is_the_strongest_asked_and_plain_needs_both():
    pairs = [((session.PLAIN, session.AUTH), session.AUTH), ((None, None), session.ENCRYPT),
             ((session.PLAIN, session.PLAIN), session.PLAIN),
             ((session.AUTH, session.ENCRYPT), session.ENCRYPT)]
    for (pa, pb), want in pairs:
        sa, sb, *_ = _handshake_pair(None, None, pa, pb)
        assert sa.protection == sb.protection == want


def test_a_peer_with_the_wrong_key_fails_the_handshake_on_both_sides():
    sa, sb, *_ = _handshake_pair(bytes(32), b"\x01" * 32)
    assert isinstance(sa, FrameError) and isinstance(sb, FrameError)
    assert "cluster key" in str(sa)


def test_no_key_means_the_all_zero_key():
    """Documented: without a key the data plane still frames and checks, with a public key."""
    old = keys.installed()
    keys.install(None)
    try:
        sa, sb, *_ = _handshake_pair(None, bytes(32))
    finally:
        keys.install(old)
    assert isinstance(sa, session.Session) and isinstance(sb, session.Session)


def _frame(sess, msg):
    return b"".join(bytes(p) for p in sess.seal(*frames.RUNTIME.encode(msg)))


@pytest.mark.parametrize("prot", [session.AUTH, session.ENCRYPT])
@pytest.mark.parametrize("attack", ["replay", "reorder", "tamper-header", "tamper-control",
                                    "tamper-buffer", "tamper-tag", "other-connection",
                                    "reflected", "truncated-then-eof"])
def test_a_frame_that_is_not_the_next_authentic_one_is_rejected(prot, attack):
    sa, sb, a, b = _handshake_pair(None, None, prot, prot)
    f0, f1 = _frame(sa, LinkProbe(0, b"p" * 2000)), _frame(sa, LinkProbe(1, b"q" * 2000))
    if attack in ("replay", "reorder"):
        a.sendall(f0 if attack == "replay" else f1)
        if attack == "replay":
            assert _recv(sb, b) == LinkProbe(0, b"p" * 2000)
            a.sendall(f0)
    elif attack.startswith("tamper"):
        at = {"header": 10, "control": session.HEADER.size + 6, "buffer": len(f0) // 2,
              "tag": len(f0) - 1}[attack.split("-")[1]]
        bad = bytearray(f0)
        bad[at] ^= 0x01
        a.sendall(bytes(bad))
    elif attack == "other-connection":
        sc, _, _, _ = _handshake_pair(None, None, prot, prot)
        a.sendall(_frame(sc, LinkProbe(0, b"p" * 2000)))
    elif attack == "reflected":       # our own frame sent back to us: the other direction's key
        b.sendall(f0)
        with pytest.raises(FrameError):
            _recv(sa, a)
        return
    else:
        a.sendall(f0[:-5])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError):
            _recv(sb, b)
        return
    with pytest.raises(FrameError):
        _recv(sb, b)


def test_an_absurd_length_is_refused_before_reading_it():
    sa, sb, a, b = _handshake_pair()
    a.sendall(session.HEADER.pack(8, 0, 0, 0, session.MAX_FRAME + 1))
    with pytest.raises(FrameError, match="bytes"):
        _recv(sb, b)


def test_a_hello_that_is_not_ours_fails_at_once():
    a, b = socket.socketpair()
    a.sendall(struct.pack("!Q", 40) + pickle.dumps(_Evil())[:30])
    with pytest.raises(FrameError, match="not a DeColla"):
        session.handshake(b, session.LISTENER, timeout=2)


def test_a_silent_peer_times_out():
    a, b = socket.socketpair()
    with pytest.raises(FrameError, match="timed out"):
        session.handshake(b, session.LISTENER, timeout=0.3)


def test_an_unknown_protection_in_a_hello_fails_the_handshake():
    a, b = socket.socketpair()
    a.sendall(session.HELLO.pack(session.MAGIC, session.VERSION, 9, bytes(32)))
    with pytest.raises(FrameError, match="protection"):
        session.handshake(b, session.LISTENER, timeout=2)
