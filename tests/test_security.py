"""A cluster lets no one in: real node processes on loopback, attacked from outside.

Every listening port of a LocalCluster's processes gets pickles whose unpickling would
create a file, in both framings the cluster ever spoke (Thespian's b"<len>>" + pickle, the
old data plane's "!Q" length + pickle) and with a tag made with the all-zero key; nodes
and clients with the wrong key try to join; nodes are asked to listen beyond loopback.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from thespian.system.transport.streamBuffer import ReceiveBuffer

from decolla.actors import system
from decolla.forward import forward
from decolla.loader import load_model
from decolla.runtime import keys, thespian_auth

SPEC = "mobilenet_v2:width=0.25,input_size=64,seed=0"
integration = pytest.mark.integration


class CreatesFile:
    """Unpickling this opens `path` for writing: a stand-in for running any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def thespian_frame(body: bytes) -> bytes:
    return b"%d>" % len(body) + body


def dataplane_frame(body: bytes) -> bytes:
    return struct.pack("!Q", len(body)) + body


def attacks(tmp_path) -> dict[str, bytes]:
    """One frame per way in, each creating its own file if it ever got unpickled."""
    evil = {name: tmp_path / f"pwned-{name}" for name in ("thespian", "zero-key", "dataplane")}
    return {
        "thespian": thespian_frame(pickle.dumps(CreatesFile(evil["thespian"]))),
        "zero-key": thespian_frame(thespian_auth.AuthSerializer(None).dumps(
            CreatesFile(evil["zero-key"]))),
        "dataplane": dataplane_frame(pickle.dumps(CreatesFile(evil["dataplane"]))),
    }


def pwned(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob("pwned-*"))


# ------------------------------------------------------------------ listening sockets
def _addr(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            table[int(pid)] = (int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def family(roots, groups=()) -> set[int]:
    """`roots`, the members of process `groups`, and every process below them (Thespian
    detaches its admins from the process that starts them, but not from its group)."""
    table = processes()
    found = set(roots) | {p for p, (_, g) in table.items() if g in set(groups)}
    todo = list(found)
    while todo:
        p = todo.pop()
        kids = [c for c, (pp, _) in table.items() if pp == p and c not in found]
        found.update(kids)
        todo.extend(kids)
    return found


def cluster_pids(cluster) -> set[int]:
    """Every process of a LocalCluster: its nodes' actor systems and this test's client."""
    nodes = cluster.nodes.values()
    return family([os.getpid()] + [n.proc.pid for n in nodes],
                  [n.admin_pgid for n in nodes if n.admin_pgid])


def listening(pids) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket (v4 and v6) listening in one of `pids`."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:           # 0A: LISTEN
                    host, port = f[1].split(":")
                    found.add((_addr(host), int(port, 16)))
    return found


def send_raw(addr: tuple[str, int], frame: bytes) -> None:
    """Connect, send `frame`, read whatever comes back for a moment, close."""
    try:
        with socket.create_connection(addr, timeout=2) as s:
            s.sendall(frame)
            s.settimeout(0.3)
            try:
                s.recv(4096)
            except OSError:
                pass
    except OSError:
        pass


def run(cmd, env_key: str | None = None, timeout: float = 90, **kw):
    env = {k: v for k, v in os.environ.items() if k != keys.KEY_ENV}
    if env_key:
        env[keys.KEY_ENV] = env_key
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def node_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "decolla.node", "--model", SPEC, *args]


# ------------------------------------------------------------------ the frames themselves
def test_the_crafted_thespian_frame_runs_code_in_plain_thespian_but_not_through_the_key(tmp_path):
    frame = attacks(tmp_path)["thespian"]
    plain = ReceiveBuffer(pickle.loads)              # what Thespian does without the key
    plain.addMore(frame)
    plain.completed()
    assert pwned(tmp_path) == ["pwned-thespian"]
    os.unlink(tmp_path / "pwned-thespian")
    for name in ("thespian", "zero-key"):
        buf = ReceiveBuffer(thespian_auth.AuthSerializer(keys.generate()).loads)
        buf.addMore(attacks(tmp_path)[name])
        assert buf.completed()[0] == "ACK+DATAERR"  # Thespian answers a data error and closes
    assert pwned(tmp_path) == []


def test_a_keyed_serializer_reads_its_own_frames_and_thespian_acks():
    key = keys.generate()
    ser = thespian_auth.AuthSerializer(key)
    assert ser.loads(ser.dumps({"x": [1, 2]})) == {"x": [1, 2]}
    assert ser.loads(pickle.dumps("ACK")) == "ACK"
    other = thespian_auth.AuthSerializer(keys.generate())
    assert other.loads(ser.dumps({"x": 1})) == "ACK+DATAERR"
    assert thespian_auth.AuthSerializer(None).loads(ser.dumps(1)) == "ACK+DATAERR"
    tampered = bytearray(ser.dumps(12345))
    tampered[-3] ^= 1
    assert ser.loads(bytes(tampered)) == "ACK+DATAERR"


# ------------------------------------------------------------------ a live cluster
@pytest.fixture(scope="module")
def cluster():
    from decolla.api import LocalCluster
    c = LocalCluster(devices=2, model=SPEC, deadline_floor=0.5)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def wrong_key(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keys") / "wrong.key")
    keys.write_key(path)
    return path


def _image(seed=0):
    model = load_model(SPEC)
    return model, np.random.default_rng(seed).standard_normal(model.input_shape).astype(np.float32)


def _answers_correctly(cluster, seed=0):
    model, img = _image(seed)
    r = cluster.infer(img)
    want = forward(model, img)
    assert np.abs(r.logits - want).max() <= 1e-4 * np.abs(want).max()


@integration
def test_no_socket_of_the_cluster_listens_beyond_loopback(cluster):
    socks = listening(cluster_pids(cluster))
    admin_ports = {n.port for n in cluster.nodes.values()}
    assert admin_ports <= {port for _, port in socks}
    assert len(socks) >= 2 * len(cluster.nodes)
    assert {host for host, _ in socks} == {"127.0.0.1"}, sorted(socks)
    planes = [d["data_plane"] for d in cluster.status()["devices"]]
    assert planes and all(p.startswith("127.0.0.1:") for p in planes)
    assert {int(p.rsplit(":", 1)[1]) for p in planes} <= {port for _, port in socks}


@integration
def test_pickles_sent_to_every_port_run_nothing_and_the_cluster_still_answers(cluster, tmp_path):
    _answers_correctly(cluster)
    socks = listening(cluster_pids(cluster))
    assert len(socks) >= 2 * len(cluster.nodes)
    for frame in attacks(tmp_path).values():
        for addr in socks:
            send_raw(addr, frame)
    time.sleep(1.0)
    assert pwned(tmp_path) == []
    assert all(n.alive() for n in cluster.nodes.values())
    _answers_correctly(cluster, seed=1)
    assert len(cluster.ready_devices()) == 2
    leader_log = cluster.nodes["leader"].log_text()
    assert "dropped an unauthenticated actor frame" in leader_log
    assert '"peer": "127.0.0.1:' in leader_log


@integration
def test_a_node_with_the_wrong_key_cannot_join_and_says_why(cluster, wrong_key):
    t0 = time.monotonic()
    out = run(node_cmd("--role", "device", "--leader", cluster.leader, "--name", "stranger",
                       "--host", "127.0.0.1", "--key-file", wrong_key, "--join-timeout", "8"))
    assert out.returncode == 5, out.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert "cannot join the cluster" in out.stderr and "same cluster key" in out.stderr
    assert "stranger" not in [d["name"] for d in cluster.status()["devices"]]
    _answers_correctly(cluster, seed=2)


@integration
def test_a_client_with_the_wrong_key_is_refused_clearly(cluster, wrong_key):
    code = ("import sys\nfrom decolla.api import Client, ClusterError\n"
            f"try:\n    Client({cluster.leader!r}, key_file={wrong_key!r}, connect_timeout=8)\n"
            "except ClusterError as exc:\n    print('refused:', exc)\n    sys.exit(7)\n")
    t0 = time.monotonic()
    out = run([sys.executable, "-c", code])
    assert out.returncode == 7, out.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert "same cluster key" in out.stdout
    # the right key from the environment gets in
    ok = run([sys.executable, "-m", "decolla", "status", "--leader", cluster.leader, "--json"],
             env_key=cluster.key_path)
    assert ok.returncode == 0, ok.stderr


def test_a_bad_key_file_is_a_clear_error_not_a_traceback(tmp_path):
    loose = tmp_path / "loose.key"
    keys.write_key(str(loose))
    os.chmod(loose, 0o644)
    for path, words in ((loose, "readable by others"), (tmp_path / "none.key", "does not exist")):
        node = run(node_cmd("--role", "leader", "--port", "0", "--key-file", str(path)))
        assert node.returncode == 2 and words in node.stderr and "Traceback" not in node.stderr
        cli = run([sys.executable, "-m", "decolla", "status", "--leader", "127.0.0.1:1",
                   "--key-file", str(path)])
        assert cli.returncode == 2 and words in cli.stderr and "Traceback" not in cli.stderr


def test_keygen_writes_a_private_key_and_keeps_an_existing_one(tmp_path):
    path = tmp_path / "cluster.key"
    made = run([sys.executable, "-m", "decolla", "keygen", str(path)])
    assert made.returncode == 0 and os.stat(path).st_mode & 0o777 == 0o600
    key = keys.read_key(str(path))
    again = run([sys.executable, "-m", "decolla", "keygen", str(path)])
    assert again.returncode == 2 and "--force" in again.stderr
    assert keys.read_key(str(path)) == key
    forced = run([sys.executable, "-m", "decolla", "keygen", str(path), "--force"])
    assert forced.returncode == 0 and keys.read_key(str(path)) != key


def test_a_wildcard_host_is_refused_it_cannot_be_advertised():
    out = run(node_cmd("--role", "leader", "--host", "0.0.0.0"))
    assert out.returncode == 2 and "one interface" in out.stderr


def _lan_address() -> str:
    ip = system.route_ip("192.0.2.1")             # TEST-NET: only the route is looked up
    if system.is_loopback(ip):
        pytest.skip("this machine has no address beyond loopback")
    return ip


@integration
def test_beyond_loopback_a_node_needs_a_key_or_insecure(tmp_path):
    ip = _lan_address()
    port = str(system.free_port(ip))
    refused = run(node_cmd("--role", "leader", "--host", ip, "--port", port), timeout=30)
    assert refused.returncode == 2
    assert f"refusing to listen on {ip} without a cluster key" in refused.stderr
    log_path = tmp_path / "insecure.log"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(node_cmd("--role", "leader", "--host", ip, "--port", port,
                                         "--insecure", "--log-json"),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={k: v for k, v in os.environ.items() if k != keys.KEY_ENV})
    started = {}
    try:
        deadline = time.monotonic() + 60
        while not started:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
            started = next((json.loads(line) for line in log_path.read_text().splitlines()
                            if '"node started"' in line), {})
        assert "INSECURE" in log_path.read_text()
        socks = listening(family([proc.pid], [started["admin_pgid"]]))
        assert (ip, int(port)) in socks and {h for h, _ in socks} == {ip}, sorted(socks)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if started.get("admin_pgid"):
            try:
                os.killpg(started["admin_pgid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
