"""Discovery: the leader's signed announcement, checked; and on loopback, real node
processes started without --leader find it and join, while one with another key ignores
it and says so."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from decolla.runtime import discovery, keys
from decolla.runtime.discovery import Rejected, Verifier

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"
KEY, OTHER = bytes(range(32)), bytes(32 - i for i in range(32))


def _datagram(key=KEY, **kw):
    ann = discovery.announcement("127.0.0.1:1900", SPEC, "d" * 64)
    return discovery.encode(discovery.Announcement(**{**ann.__dict__, **kw}), key)


def test_an_announcement_under_the_cluster_key_is_accepted_once():
    v = Verifier(KEY)
    data = _datagram()
    assert v.check(data).leader == "127.0.0.1:1900"
    with pytest.raises(Rejected, match="replay"):
        v.check(data)


@pytest.mark.parametrize("data,why", [
    (_datagram(key=OTHER), "another key"),
    (_datagram(time=time.time() - 120), "stale"),
    (b"DECOLLA-HELLO1" + bytes(40), "another key"),
    (b"hello", "not a DeColla"),
])
def test_other_announcements_are_refused(data, why):
    with pytest.raises(Rejected, match=why):
        Verifier(KEY).check(data)


def test_a_tampered_body_is_refused():
    data = bytearray(_datagram())
    data[-5] ^= 1
    with pytest.raises(Rejected, match="another key"):
        Verifier(KEY).check(bytes(data))


def test_loopback_broadcast_address():
    assert discovery.broadcast_address("127.0.0.1") == "127.255.255.255"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Nodes:
    def __init__(self, tmp_path, udp: int):
        self.tmp, self.udp, self.procs = tmp_path, udp, []

    def start(self, name: str, role: str, key: bytes, *extra: str) -> tuple:
        from decolla.actors.system import free_port
        path = self.tmp / f"{name}.key"
        if not path.exists():
            keys.write_key(str(path), key)
        log = self.tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "decolla.node", "--role", role, "--name", name,
               "--host", "127.0.0.1", "--port", str(free_port("127.0.0.1")), "--model", SPEC,
               "--log-json", "--key-file", str(path), "--discovery-port", str(self.udp),
               "--join-timeout", "20", *extra]
        with open(log, "wb") as fh:
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        return p, log

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _wait_for(log, text: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if text in line:
                return json.loads(line)
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log.name}:\n{log.read_text()[-2000:]}")


@pytest.mark.integration
def test_devices_without_leader_find_it_and_one_with_another_key_does_not(tmp_path):
    from decolla.api import Client
    nodes = _Nodes(tmp_path, _free_udp_port())
    try:
        _, leader_log = nodes.start("leader", "leader", KEY)
        leader = _wait_for(leader_log, '"node started"')
        for name in ("dev1", "dev2"):
            nodes.start(name, "device", KEY)
        stranger, stranger_log = nodes.start("stranger", "device", OTHER)
        for name in ("dev1", "dev2"):
            found = _wait_for(tmp_path / f"{name}.log", '"leader discovered"')
            assert found["leader"] == f"127.0.0.1:{leader['port']}"
        ignored = _wait_for(stranger_log, '"ignored a discovery announcement"')
        assert "another key" in ignored["reason"]
        keys.install(KEY)
        with Client(f"127.0.0.1:{leader['port']}", bind="127.0.0.1", min_devices=2,
                    connect_timeout=60) as client:
            assert sorted(d["name"] for d in client.status()["devices"]) == ["dev1", "dev2"]
        stranger.wait(40)
        assert stranger.returncode == 5
        assert '"leader discovered"' not in stranger_log.read_text()
    finally:
        nodes.close()
