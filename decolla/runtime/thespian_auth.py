"""Thespian's TCP frames, authenticated: no pickle from the network is read unchecked.

Thespian's TCPTransport pickles every message it sends (frame: b"<length>>" + body) and
unpickles every frame it receives, with the serializer kept in its module global
`serializer`. `install()` replaces that global with an AuthSerializer: the body becomes
an HMAC-SHA256 tag (keyed by the cluster key's "thespian" subkey) followed by the pickle,
and a received body is unpickled only after its tag checks out. It must run in every
process of an actor system before that system's admin starts; decolla.actors.system.
start_system does it, and the admin and actor processes Thespian forks inherit it.

A rejected frame never reaches pickle.loads. `loads` answers it with Thespian's own
"ACK+DATAERR" control value instead of raising: on a receiving socket the transport then
sends the data-error ack and closes the connection, and on a socket waiting for an ack the
send ends as a bad packet; both are paths Thespian already handles without stalling the
admin. The peer is logged when the socket is known.

Tags do not carry counters: a frame captured on the network can be replayed. Messages are
authenticated, not encrypted.
"""
from __future__ import annotations

import hashlib
import hmac
import pickle
import time

from thespian.system.transport import TCPTransport as tcp
from thespian.system.transport.streamBuffer import (ReceiveBuffer, ackDataErrMsg,
                                                    ackDataErrPacket, ackMsg, ackPacket)

from decolla.log import get_logger
from decolla.runtime import keys

PURPOSE = "thespian"
TAG_BYTES = hashlib.sha256().digest_size
NO_KEY = bytes(keys.KEY_BYTES)       # the key of a cluster without one: loopback only
LOG_EVERY_S = 5.0                    # one line per peer host per period: a flood cannot flood the log


def _body(frame: bytes) -> bytes:
    return frame[frame.index(b">") + 1:]


# Thespian's acks are fixed frames pickled at import, the same in every process: they are
# recognised by their exact bytes (never unpickled) and need no tag.
CONTROL = {_body(ackMsg): ackPacket, _body(ackDataErrMsg): ackDataErrPacket}
ACK_MAX = max(map(len, CONTROL)) + 1


class AuthSerializer:
    """dumps: tag + pickle; loads: check the tag, then unpickle (the `pickle` module's API)."""

    def __init__(self, key: bytes | None):
        self._key = keys.subkey(key or NO_KEY, PURPOSE)
        self._logged: dict[str, float] = {}

    def _tag(self, body) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def dumps(self, obj) -> bytes:
        body = pickle.dumps(obj)
        return self._tag(body) + body

    def loads(self, frame: bytes, peer: str = "unknown"):
        """The object in `frame`, or Thespian's data-error ack value for a frame without a
        valid tag (never unpickled)."""
        if len(frame) < ACK_MAX and frame in CONTROL:      # short: no hashing a large frame
            return CONTROL[frame]
        tag, body = frame[:TAG_BYTES], memoryview(frame)[TAG_BYTES:]
        if len(frame) <= TAG_BYTES or not hmac.compare_digest(tag, self._tag(body)):
            self._log_drop(peer, len(frame))
            return ackDataErrPacket
        return pickle.loads(body)

    def _log_drop(self, peer: str, size: int) -> None:
        now, host = time.monotonic(), peer.rsplit(":", 1)[0]   # each connection has its own port
        if now - self._logged.get(host, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[host] = now
            # a logger made now: one bound at import would keep the set-up of that moment
            get_logger("thespian_auth").warning(
                "dropped an unauthenticated actor frame (wrong or no cluster key)",
                peer=peer, bytes=size)


def _peer(sock) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, TypeError, ValueError):
        return "unknown"


_plain_incoming_init = tcp.TCPIncoming_Common.__init__


def _incoming_init(self, rmtAddr, baseSock, rcvBuf=None):
    """TCPIncoming_Common.__init__ whose receive buffer knows the peer it logs drops with."""
    if rcvBuf is None and isinstance(tcp.serializer, AuthSerializer):
        peer = _peer(baseSock)
        rcvBuf = ReceiveBuffer(lambda frame: tcp.serializer.loads(frame, peer))
    _plain_incoming_init(self, rmtAddr, baseSock, rcvBuf)


def install(key: bytes | None = None) -> AuthSerializer:
    """Make Thespian's TCP transport in this process (and the processes it forks) speak with
    `key`, by default the process's installed cluster key (none: the all-zero key)."""
    serializer = AuthSerializer(key if key is not None else keys.installed())
    tcp.serializer = serializer
    tcp.TCPIncoming_Common.__init__ = _incoming_init
    return serializer
