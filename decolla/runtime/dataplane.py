"""A lean TCP channel for chunk traffic (work out, results back) beside the actor system.

Why: receiving one Thespian message and sending one back costs an actor ≈ 1 ms of host
CPU (envelopes, acks, a fresh selector per loop turn); on this channel it costs about a
third of that (`python -m bench.transport`), and on a Pi-class core the difference is
several ms per chunk.

One reader and one writer thread per connection do the blocking socket work (a frame that
fits the socket buffer is sent by the caller's thread); what a reader decodes goes into an
`Inbox`, whose pipe the owning actor watches through Thespian's `ThespianWatch`, so a
message is handled on the actor's own thread unless its channel (decolla.runtime.channels)
says the reader takes it. A connection that breaks stops and
leaves a `Closed` notice in the inbox: what was in flight on it is lost, like a message to
a dead device, and its owner sends it again (or its deadlines do).

Nothing from a socket is unpickled. A connection starts with a handshake in which both
sides prove they hold the cluster key; then every frame is binary (decolla.runtime.frames:
msgpack control fields of an allowlist of types, raw tensor buffers), counted and
authenticated (decolla.runtime.session) before anything parses it. A frame that fails is
logged with its peer and ends its connection (the `Closed` notice above); the node keeps
serving.
"""
from __future__ import annotations

import collections
import os
import socket
import threading
import time

from thespian.actors import ThespianWatch

from decolla import emulation
from decolla.log import get_logger
from decolla.runtime import channels, frames, session
from decolla.runtime.frames import FrameError

log = get_logger("dataplane")
CONNECT_TIMEOUT_S = 3.0
RETRY_UNREACHABLE_S = 30.0   # an address that refused us is tried again after this long
PORT_ENV = "DECOLLA_DATA_PORT"   # a worker's listening port: 0 any free one, < 0 no data plane
REARM, REARM_S = "dataplane-rearm", 0.001


class Inbox:
    """Objects from any connection, with a file descriptor that is readable while some wait.
    Objects of a type in `route` go to its function instead, as `fn(obj, connection)` on the
    reader's thread (for an owner that waits for them inside a handler, or that handles
    them without its actor's message loop)."""

    def __init__(self, route: dict | None = None):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._items: collections.deque = collections.deque()
        self.route = route or {}

    def fileno(self) -> int:
        return self._r

    def put(self, item) -> None:
        to = self.route.get(type(item[1]))
        if to is not None:
            to(item[1], item[0])
            return
        self._items.append(item)
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:      # the pipe is full: the owner has wake-ups pending anyway
            pass
        except OSError:              # closed: its owner is gone
            pass

    def drain(self) -> list:
        """Everything received so far, oldest first (empties the inbox)."""
        try:
            while os.read(self._r, 65536):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._items:
            out.append(self._items.popleft())
        return out

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class Closed:
    """Put in the inbox, as (connection, Closed()), once when a connection ends."""


class Connection:
    """One TCP connection carrying data-plane messages both ways; received ones go to
    `inbox` as (connection, object), then (connection, Closed()) when it ends. `send` never
    blocks the caller; what is sent before the handshake is over waits for it. `codec`:
    the message types allowed on it; `protection`: what we ask the peer for
    (decolla.runtime.session; default from DECOLLA_ENCRYPT)."""

    def __init__(self, inbox: Inbox, sock: socket.socket | None = None,
                 address: tuple | None = None, codec: frames.Codec = frames.RUNTIME,
                 protection: str | None = None):
        self.inbox, self.sock, self.address = inbox, sock, address
        self.codec, self.protection = codec, protection
        self.session: session.Session | None = None
        self.connected = threading.Event()        # set once the handshake succeeded
        self.closed = False
        self._ended = False
        # Frames to send, in order: encoded messages not yet sealed (a counter is taken
        # when a frame goes out), or the unsent pieces of a sealed one.
        self._pending: collections.deque = collections.deque()
        self._cv = threading.Condition()
        threading.Thread(target=self._write, daemon=True, name="dataplane-tx").start()

    @classmethod
    def connect(cls, inbox: Inbox, address: tuple, codec: frames.Codec = frames.RUNTIME,
                protection: str | None = None) -> "Connection":
        """A connection to `address` (host, port), established in the background."""
        return cls(inbox, address=tuple(address), codec=codec, protection=protection)

    def send(self, obj) -> None:
        encoded = self.codec.encode(obj)         # FrameError for a type the codec lacks
        emulation.settle()       # an emulated slow device sends when it would have the frame
        with self._cv:
            if self.closed:
                raise ConnectionError(f"data connection {self.address} is closed")
            if self._pending or not self.connected.is_set():
                self._pending.append(encoded)
                self._cv.notify()
                return
            # Most frames fit the socket buffer: send them from this thread. Waking the
            # writer instead costs a thread hand-off, which under a CPU quota can wait
            # for the next quota period.
            pieces = self.session.seal(*encoded)
            try:
                sent = self.sock.sendmsg(pieces, (), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0                       # the writer notices the broken socket
            rest = _unsent(pieces, sent)
            if rest:
                self._pending.append(rest)
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---------------------------------------------------------------- threads
    def _write(self) -> None:
        try:
            dialer = self.sock is None
            if dialer:
                sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)
                sock.settimeout(None)
                self.sock = sock
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.session = session.handshake(
                self.sock, session.DIALER if dialer else session.LISTENER, self.protection)
            self.connected.set()
            threading.Thread(target=self._read, daemon=True, name="dataplane-rx").start()
            while True:
                with self._cv:
                    while not self._pending and not self.closed:
                        self._cv.wait()
                    if self.closed:
                        return
                    if isinstance(self._pending[0], tuple):    # sealed in sending order
                        self._pending[0] = self.session.seal(*self._pending[0])
                    head = self._pending[0]
                # Sent outside the lock; it stays queued until done, so `send` keeps order.
                for piece in head:
                    self.sock.sendall(piece)
                with self._cv:
                    self._pending.popleft()
        except (FrameError, EOFError) as exc:
            if not self.closed:
                log.warning("data-plane handshake failed", peer=self.address, error=str(exc))
        except OSError as exc:
            if not self.closed:
                log.info("data connection ended", peer=self.address, error=str(exc))
        finally:
            self._finish()

    def _read(self) -> None:
        try:
            while True:
                tid, control, buffers = self.session.receive(self.sock)
                self.inbox.put((self, self.codec.decode(tid, control, buffers)))
        except EOFError:
            pass
        except FrameError as exc:      # unauthenticated, replayed or malformed: not parsed further
            if not self.closed:
                log.warning("data frame rejected; connection closed", peer=self.address,
                            error=str(exc))
        except Exception as exc:       # a broken peer: drop the connection
            if not self.closed:
                log.warning("data connection dropped", peer=self.address, error=repr(exc))
        finally:
            self._finish()

    def _finish(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify()
            ended, self._ended = self._ended, True
        if not ended:
            self.inbox.put((self, Closed()))
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass


def _unsent(pieces: list, sent: int) -> list:
    """What of `pieces` is left after the first `sent` bytes went out."""
    rest = []
    for p in pieces:
        if sent >= len(p):
            sent -= len(p)
        else:
            rest.append(memoryview(p)[sent:])
            sent = 0
    return rest


class Listener:
    """Accepts connections on (host, any free port); each becomes a Connection into `inbox`
    (with `codec` and `protection`, as Connection's)."""

    def __init__(self, inbox: Inbox, host: str, port: int = 0, codec: frames.Codec = frames.RUNTIME,
                 protection: str | None = None):
        self.inbox, self.codec, self.protection = inbox, codec, protection
        self.sock = socket.create_server((host, port))
        self.address = (host, self.sock.getsockname()[1])
        self.connections: list[Connection] = []
        threading.Thread(target=self._accept, daemon=True, name="dataplane-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.sock.accept()
            except OSError:
                return
            self.connections = [c for c in self.connections if not c.closed]
            self.connections.append(Connection(self.inbox, sock=sock, address=peer,
                                               codec=self.codec, protection=self.protection))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self.connections:
            c.close()


class Peers:
    """Outgoing connections by data-plane address, made on first use and remade after a
    break. `send` returns False when `addr` is empty or could not be reached: the caller
    then sends an actor message instead."""

    def __init__(self, inbox: Inbox, codec: frames.Codec = frames.RUNTIME):
        self.inbox, self.codec = inbox, codec
        self.conns: dict[tuple, Connection] = {}
        self.retry_at: dict[tuple, float] = {}    # address that refused us -> when to try again

    def send(self, addr, msg) -> bool:
        if not addr:
            return False
        addr = tuple(addr)
        if self.retry_at.get(addr, 0.0) > time.monotonic():
            return False
        conn = self.conns.get(addr)
        if conn is not None and conn.closed:
            if not conn.connected.is_set():
                log.warning("data plane unreachable; using actor messages", address=addr)
                self.retry_at[addr] = time.monotonic() + RETRY_UNREACHABLE_S
                del self.conns[addr]
                return False
            conn = None      # it broke: what was on it is recovered by its owner's deadlines
        if conn is None:
            conn = self.conns[addr] = Connection.connect(self.inbox, addr, self.codec)
        try:
            conn.send(msg)
            return True
        except ConnectionError:
            return False
        except FrameError as exc:      # a value the codec cannot carry: the actor message can
            log.warning("not sendable on the data plane", type=type(msg).__name__, error=str(exc))
            return False

    def forget(self, keep) -> None:
        """Close the connections to addresses not in `keep`."""
        for addr in [a for a in self.conns if a not in keep]:
            self.conns.pop(addr).close()

    def close(self) -> None:
        self.forget(())


def env_port() -> int:
    """This node's data-plane port setting (`decolla.node --data-port`; 0 = any free port)."""
    return int(os.environ.get(PORT_ENV, "0") or 0)


def open_listener(actor_address, inbox: Inbox, port: int = 0,
                  codec: frames.Codec = frames.RUNTIME) -> Listener | None:
    """A Listener into `inbox` on the IP of a Thespian TCP actor address; None when that
    address has no IP (an in-process actor system), `port` < 0, or the port is taken."""
    ip = own_ip(actor_address)
    if not ip or port < 0:
        return None
    try:
        return Listener(inbox, ip, port, codec)
    except OSError as exc:
        log.warning("no data plane; using actor messages", address=(ip, port), error=str(exc))
        return None


def own_ip(address) -> str:
    """The IP address a Thespian TCP actor address points at ('' when it has none)."""
    try:
        return str(address.addressDetails.connectArgs[0][0])
    except (AttributeError, IndexError, TypeError):
        return ""


class _Send:
    """In an inbox as (address, _Send(msg)): an actor message for the actor's thread to send."""

    def __init__(self, msg):
        self.msg = msg


class WatchesInbox:
    """Mixin for actors on the data plane. `listen` accepts connections, `dial` lets the
    actor open them, `send_data` sends on one (made on first use) or falls back to an
    actor message, as the message's channel allows. While the actor has an `Inbox`, every
    message handled keeps its pipe watched. A data-plane message that `CHANNELS` gives to
    this actor's `RECEIVER` goes to `takeMsg_<Type>(obj, connection)` on the reader's
    thread or to `receiveMsg_<Type>(obj, connection)` on the actor's, as its channel says;
    a connection's end to `receiveMsg_Closed(Closed(), connection)` if the actor has it."""

    inbox: Inbox | None = None
    listener: Listener | None = None
    peers: Peers | None = None
    CHANNELS: dict = channels.CHANNELS
    FRAMES: frames.Codec = frames.RUNTIME     # the types its data-plane frames may carry
    RECEIVER: str = ""

    def open_inbox(self) -> Inbox:
        """The actor's inbox (made on first use)."""
        if self.inbox is None:
            taken = channels.received_by(self.CHANNELS, self.RECEIVER, channels.Taken.READER)
            self.inbox = Inbox(route={t: getattr(self, "takeMsg_" + t.__name__) for t in taken})
        return self.inbox

    def inbox_watched(self) -> bool:
        """Whether the actor system watches the inbox's pipe: Thespian's TCP bases do; the
        in-process simpleSystemBase does not (an owner there drains it on wake-ups)."""
        return bool(own_ip(self.myAddress))

    def listen(self, port: int = 0) -> tuple:
        """Accept data-plane connections and open them (once); our (ip, port), or () when we
        cannot listen (then we do not dial either)."""
        if self.listener is None:
            self.listener = open_listener(self.myAddress, self.open_inbox(), port, self.FRAMES)
            if self.listener is None:
                return ()
            self.dial()
        return self.listener.address

    def dial(self) -> None:
        """Be able to open data-plane connections to others' listeners."""
        if self.peers is None:
            self.peers = Peers(self.open_inbox(), self.FRAMES)

    def send_data(self, data_addr, actor_addr, msg) -> None:
        """Send `msg` on the data plane to `data_addr` if its channel takes the data plane, we
        dial, and `data_addr` is given and reachable; else as an actor message to `actor_addr`."""
        data = self.CHANNELS[type(msg)].path is channels.Path.DATA
        if not data or self.peers is None or not self.peers.send(data_addr, msg):
            self.send(actor_addr, msg)

    def send_from_thread(self, actor_addr, msg) -> None:
        """Send actor message `msg` from a thread other than the actor's: the inbox hands it
        to the actor's thread (Thespian's send is not thread-safe)."""
        self.open_inbox().put((actor_addr, _Send(msg)))

    def close_data_plane(self) -> None:
        if self.peers is not None:
            self.peers.close()
        if self.listener is not None:
            self.listener.close()

    def receiveMessage(self, msg, sender):
        try:
            super().receiveMessage(msg, sender)
        except Exception:
            # Thespian clears the watch after a failed handler; a wake-up re-arms it at once
            # instead of whenever the next message happens to come.
            if self.inbox is not None:
                self.wakeupAfter(REARM_S, payload=REARM)
            raise
        if self.inbox is not None:
            return ThespianWatch([self.inbox.fileno()])
        return None

    def receiveMsg_WatchMessage(self, msg, sender):
        self.drain_inbox()

    def drain_inbox(self) -> None:
        """Handle what the inbox holds, on the actor's thread."""
        if self.inbox is None:
            return
        for conn, obj in self.inbox.drain():
            if isinstance(obj, _Send):
                self.send(conn, obj.msg)
            elif isinstance(obj, Closed):
                handler = getattr(self, "receiveMsg_Closed", None)
                if handler is not None:
                    handler(obj, conn)
            elif self._receives(type(obj)):
                getattr(self, "receiveMsg_" + type(obj).__name__)(obj, conn)
            else:
                log.warning("unexpected object on the data plane", type=type(obj).__name__)

    def _receives(self, kind: type) -> bool:
        channel = self.CHANNELS.get(kind)
        return channel is not None and channel.receiver == self.RECEIVER
