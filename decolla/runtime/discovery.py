"""Finding the leader without typing its address: the leader announces itself by UDP
broadcast on its network, and a node started without --leader listens and joins.

An announcement is MAGIC, an HMAC-SHA256 tag, then a JSON body {leader: HOST:PORT, model,
digest, time, nonce}. The tag's key is `keys.subkey(cluster key, "discovery")` (32 zero
bytes without a cluster key: loopback only, as elsewhere), so a node with another key
ignores the announcement and says why. A body older (or newer) than `MAX_AGE_S`, or a
nonce seen before, is refused: a recorded announcement cannot send nodes elsewhere later.
The broadcast goes to the --host interface's broadcast address (127.255.255.255 on
loopback), and listeners bind that address, not every interface.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from decolla.runtime import keys
from decolla.runtime.session import NO_KEY

MAGIC = b"DECOLLA-HELLO1"
TAG_BYTES = 32
DEFAULT_PORT = 1901
PERIOD_S = 1.0
MAX_AGE_S = 30.0
_SIOCGIFADDR, _SIOCGIFBRDADDR = 0x8915, 0x8919


class Rejected(ValueError):
    """A datagram that is not a valid announcement for this cluster (the reason says why)."""


@dataclass(frozen=True)
class Announcement:
    leader: str          # HOST:PORT of the leader's actor system
    model: str
    digest: str
    time: float
    nonce: str


def _secret(key: bytes | None) -> bytes:
    return keys.subkey(key or keys.installed() or NO_KEY, "discovery")


def encode(ann: Announcement, key: bytes | None = None) -> bytes:
    body = json.dumps(ann.__dict__, sort_keys=True).encode()
    return MAGIC + hmac.new(_secret(key), body, hashlib.sha256).digest() + body


def announcement(leader: str, model: str, digest: str) -> Announcement:
    return Announcement(leader, model, digest, time.time(), os.urandom(12).hex())


class Verifier:
    """Checks datagrams: magic, tag, age, and nonces not seen before."""

    def __init__(self, key: bytes | None = None, max_age: float = MAX_AGE_S):
        self.secret, self.max_age = _secret(key), max_age
        self.seen: OrderedDict[str, None] = OrderedDict()

    def check(self, data: bytes, now: float | None = None) -> Announcement:
        if not data.startswith(MAGIC) or len(data) <= len(MAGIC) + TAG_BYTES:
            raise Rejected("not a DeColla announcement")
        tag, body = data[len(MAGIC):len(MAGIC) + TAG_BYTES], data[len(MAGIC) + TAG_BYTES:]
        if not hmac.compare_digest(tag, hmac.new(self.secret, body, hashlib.sha256).digest()):
            raise Rejected("bad tag: announced by a cluster with another key")
        try:
            ann = Announcement(**json.loads(body))
        except (ValueError, TypeError) as exc:
            raise Rejected(f"malformed announcement: {exc}") from None
        now = time.time() if now is None else now
        if abs(now - ann.time) > self.max_age:
            # no age in the text: find_leader logs each sender's reason once
            raise Rejected(f"stale announcement (clocks more than {self.max_age:.0f} s apart, "
                           "or a replay)")
        if ann.nonce in self.seen:
            raise Rejected("announcement seen before: a replay")
        self.seen[ann.nonce] = None
        while len(self.seen) > 4096:
            self.seen.popitem(last=False)
        return ann


def broadcast_address(host: str) -> str:
    """The broadcast address of the interface whose address is `host` (127.255.255.255 on
    loopback; 255.255.255.255 when no interface has that address)."""
    ip = socket.gethostbyname(host)
    if ipaddress.ip_address(ip).is_loopback:
        return "127.255.255.255"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
                if addr == ip:
                    return socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFBRDADDR, req)[20:24])
            except OSError:
                continue
    return "255.255.255.255"


class Announcer:
    """The leader's thread: one announcement every `period` seconds until `stop()`."""

    def __init__(self, host: str, leader: str, model: str, digest: str,
                 port: int = DEFAULT_PORT, period: float = PERIOD_S, log=None):
        self.target = (broadcast_address(host), port)
        self.leader, self.model, self.digest, self.period, self.log = \
            leader, model, digest, period, log
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.sock.bind((socket.gethostbyname(host), 0))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="discovery", daemon=True)

    def start(self) -> "Announcer":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.sendto(encode(announcement(self.leader, self.model, self.digest)),
                                 self.target)
            except OSError as exc:
                if self.log is not None:
                    self.log.warning("discovery announcement not sent", error=str(exc),
                                     to="%s:%d" % self.target)
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2 * self.period)
        self.sock.close()


def find_leader(host: str, port: int = DEFAULT_PORT, timeout: float = 60.0, log=None,
                stop=lambda: False) -> Announcement | None:
    """Wait up to `timeout` s for a valid announcement on `host`'s broadcast address; None
    on timeout or when `stop()` says so. Rejected datagrams are logged once per sender and
    reason."""
    verifier, said = Verifier(), set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # several nodes on one host
        s.bind((broadcast_address(host), port))
        s.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop():
            try:
                data, sender = s.recvfrom(4096)
            except socket.timeout:
                continue
            try:
                return verifier.check(data)
            except Rejected as exc:
                if log is not None and (sender[0], str(exc)) not in said:
                    said.add((sender[0], str(exc)))
                    log.warning("ignored a discovery announcement", sender=sender[0],
                                reason=str(exc))
    return None
