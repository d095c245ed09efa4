"""A worker's data-plane listener (a real actor process on loopback) against an attacker: a
pickle that would create a file, in the old framing and as a fake frame, runs nothing; a
peer with the wrong key fails the handshake; a replayed or tampered frame closes its
connection; the listener keeps serving; and a request whose frame is tampered with or
replayed on the way is still answered correctly (the lost chunk is recomputed)."""
import pickle
import socket
import struct
import threading
import time

import numpy as np
import pytest

from decolla import reference
from decolla.actors.worker import Worker
from decolla.loader import load_model
from decolla.runtime import dataplane, frames, session
from decolla.runtime.frames import FrameError
from decolla.runtime.messages import InferReply, InferRequest, InitWorker, LinkEcho, LinkProbe
from tests.inprocess import start_requester

SPEC = "mobilenet_v2:width=0.35,input_size=32,num_classes=10,seed=0"


class _Creates:
    """Unpickling this opens (so creates) `path`: it names only builtins.open, so any
    process that unpickles it runs it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil(path) -> bytes:
    return pickle.dumps(_Creates(str(path)))


@pytest.fixture
def worker_addr(tcp_asys):
    """The data-plane address of a real Worker (its own process)."""
    model = load_model(SPEC)
    worker = tcp_asys.createActor(Worker)
    ready = tcp_asys.ask(worker, InitWorker("w0", SPEC, model.digest(), 60.0), 30)
    assert ready.data_addr
    return tuple(ready.data_addr)


def _closed_by_peer(sock, timeout=10.0) -> bool:
    """Whether the peer closes `sock` within `timeout` (what it sends first is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _still_serves(addr) -> None:
    inbox = dataplane.Inbox()
    conn = dataplane.Connection.connect(inbox, addr)
    conn.send(LinkProbe(42, b"z" * 1000))
    t_end = time.monotonic() + 10
    got = []
    while time.monotonic() < t_end and not got:
        got = [o for _, o in inbox.drain() if isinstance(o, LinkEcho)]
        time.sleep(0.01)
    conn.close()
    assert got and got[0].seq == 42


def _client(addr, key=None):
    """A raw socket to `addr` past the handshake, and its session."""
    sock = socket.create_connection(addr, timeout=10)
    return sock, session.handshake(sock, session.DIALER, session.AUTH, key)


def test_the_pickle_payload_would_create_the_file(tmp_path):
    """The attack is real: unpickling it here creates the file (so the tests below can fail)."""
    path = tmp_path / "made-here"
    pickle.loads(_evil(path)).close()
    assert path.exists()


@pytest.mark.parametrize("framing", ["old length-prefixed pickle", "fake hello and frame",
                                     "frame with a valid tag"])
def test_a_pickle_sent_to_a_data_plane_listener_runs_nothing(worker_addr, tmp_path, framing):
    path = tmp_path / "pwned"
    payload = _evil(path)
    if framing == "frame with a valid tag":     # even a key holder cannot make us unpickle
        sock, sess = _client(worker_addr)
        for piece in sess.seal(1, payload, []):
            sock.sendall(piece)
    else:
        sock = socket.create_connection(worker_addr)
        if framing == "old length-prefixed pickle":
            sock.sendall(struct.pack("!Q", len(payload)) + payload)
        else:
            fake = (session.HELLO.pack(session.MAGIC, session.VERSION, 1, bytes(32)) + bytes(32)
                    + session.HEADER.pack(1, 0, 0, len(payload), 0) + payload + bytes(32))
            sock.sendall(fake)
    assert _closed_by_peer(sock)
    time.sleep(0.2)
    assert not path.exists()
    _still_serves(worker_addr)
    assert not path.exists()


def test_a_peer_with_the_wrong_key_fails_the_handshake(worker_addr):
    sock = socket.create_connection(worker_addr, timeout=10)
    with pytest.raises(FrameError, match="cluster key"):
        session.handshake(sock, session.DIALER, key=b"\x01" * 32)
    assert _closed_by_peer(sock)
    _still_serves(worker_addr)


@pytest.mark.parametrize("attack", ["replay", "tamper"])
def test_a_replayed_or_tampered_frame_closes_the_connection(worker_addr, attack):
    sock, sess = _client(worker_addr)
    frame = b"".join(bytes(p) for p in sess.seal(*frames.RUNTIME.encode(LinkProbe(1, b"p" * 3000))))
    if attack == "replay":
        sock.sendall(frame)
        assert frames.RUNTIME.decode(*sess.receive(sock)) == LinkEcho(1, "w0")
        sock.sendall(frame)                       # the same frame again
    else:
        bad = bytearray(frame)
        bad[len(bad) // 2] ^= 0x10                # a byte of the payload
        sock.sendall(bytes(bad))
    assert _closed_by_peer(sock)
    _still_serves(worker_addr)


class _Proxy:
    """Forwards TCP connections to a target; on the first one, past the handshake, tampers
    with the first frame the dialer sends ('tamper') or sends it twice ('replay')."""

    def __init__(self, attack: str):
        self.attack, self.target, self.attacked = attack, None, threading.Event()
        self.dropped = threading.Event()      # the target ended the attacked connection
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def to(self, target):
        self.target = tuple(target)
        return self.address

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        up = socket.create_connection(self.target)
        first = not self.attacked.is_set()
        self.attacked.set()
        threading.Thread(target=self._back, args=(up, client, first), daemon=True).start()
        try:
            if first:
                up.sendall(session.recv_exact(client, session.HELLO.size + session.MAC_BYTES))
                header = session.recv_exact(client, session.HEADER.size)
                _, nbuf, _, ncontrol, nbuffers = session.HEADER.unpack(header)
                frame = bytearray(header + session.recv_exact(
                    client, 4 * nbuf + ncontrol + nbuffers + session.MAC_BYTES))
                if self.attack == "tamper":
                    frame[len(frame) // 2] ^= 0x01
                up.sendall(bytes(frame) * (2 if self.attack == "replay" else 1))
        except (OSError, EOFError):
            pass
        _pipe(client, up)

    def _back(self, up, client, first):
        _pipe(up, client)
        if first:
            self.dropped.set()

    def close(self):
        self.sock.close()


def _pipe(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.mark.parametrize("attack", ["tamper", "replay"])
def test_a_request_survives_a_tampered_or_replayed_frame(tcp_asys, attack):
    """Worker w0's data plane is reached through a proxy that attacks the first frame: the
    worker drops that connection, the requester recomputes what was lost on it (a tampered
    frame's chunks always; a replayed one's results may have come back before the replay
    was read), and the answer is the reference output."""
    model = load_model(SPEC)
    img = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    proxy = _Proxy(attack)
    try:
        req = start_requester(tcp_asys, model, SPEC, [Worker, Worker], k=2, plan="fused",
                              data_addrs={"w0": proxy.to, "w1": lambda a: a})
        reply = tcp_asys.ask(req, InferRequest("r1", img), 60)
    finally:
        proxy.close()
    assert isinstance(reply, InferReply), reply
    assert proxy.attacked.is_set() and proxy.dropped.is_set()
    want = reference.forward(model, img)
    np.testing.assert_allclose(reply.logits, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    if attack == "tamper":
        lost = [r for r in reply.records if r.device == "w0" and r.status == "lost"]
        assert lost, [(r.device, r.stage, r.chunk, r.status) for r in reply.records]


def test_a_dialer_with_another_key_never_connects_and_falls_back(worker_addr):
    """The worker holds the key this process had when it forked; we dial with a new one:
    the handshake fails, the connection never counts as connected, and Peers tells the
    sender to use an actor message instead."""
    from decolla.runtime import keys
    old = keys.installed()
    keys.install(keys.generate())
    try:
        peers = dataplane.Peers(dataplane.Inbox())
        assert peers.send(worker_addr, LinkProbe(1))          # queued until the handshake
        conn = peers.conns[worker_addr]
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end and not conn.closed:
            time.sleep(0.01)
        assert conn.closed and not conn.connected.is_set()
        assert not peers.send(worker_addr, LinkProbe(2))      # unreachable: actor messages
    finally:
        keys.install(old)
    _still_serves(worker_addr)
