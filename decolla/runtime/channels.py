"""The runtime's channels: for each message type, who receives it, the path it travels,
the thread that takes it and where its tensors are.

One table instead of routes written into each actor: a sender asks it whether a message
may take the data plane (`WatchesInbox.send_data`), a receiver's inbox asks it which
messages to take on the connection's reader thread (`WatchesInbox.open_inbox`).

Path:  DATA   on the receiver's data-plane connection when it offers one
              (decolla.runtime.dataplane), else as an actor message: the chunk traffic,
              where Thespian's cost per message shows;
       ACTOR  always an actor message: set-up, membership, heartbeats, the client's requests
              (rare; Thespian delivers them across restarts and joins).
Taken: READER the connection's reader thread, past the actor's queue: work for the compute
              thread, halos a computing strip waits for, cancellations of queued work, link
              probes answered at once;
       ACTOR  the actor's own thread (a data-plane message through the inbox's pipe).
Codec: on the data plane a message is an authenticated binary frame (decolla.runtime.frames:
       msgpack control fields of a closed set of types under fixed ids, tensors as raw
       buffers; decolla.runtime.session: handshake, counter, tag), never a pickle; every
       DATA row's type needs an id in the codec of its table (frames.RUNTIME, or the
       baselines' PIPELINE_FRAMES). As an actor message it is a Thespian envelope (a pickle
       behind decolla.runtime.thespian_auth's tag). The tensors in it are decolla.runtime.wire
       bytes, in the fields `tensors` names.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from decolla.runtime.messages import (Cancel, ChunkEvent, ChunkEvents, ChunkFailed, ChunkResult,
                                      ChunkResults, ConfigureRegistrar, ConfigureRequester, Halo,
                                      Heartbeat, InferError, InferReply, InferRequest, InFlight,
                                      InitWorker, LinkEcho, LinkProbe, Membership, Ready, StageWork,
                                      StatusRequest, Subscribe, Unsubscribe, WorkerReady,
                                      WorkerRefused, FindRegistrar, RegistrarAt)


class Path(enum.Enum):
    DATA = "data plane, else actor message"
    ACTOR = "actor message"


class Taken(enum.Enum):
    READER = "connection's reader thread"
    ACTOR = "actor's thread"


# receivers
WORKER, REQUESTER, REGISTRAR, CLIENT = "worker", "requester", "registrar", "client"


@dataclass(frozen=True)
class Channel:
    message: type
    receiver: str
    path: Path = Path.ACTOR
    taken: Taken = Taken.ACTOR
    tensors: tuple[str, ...] = ()      # fields holding wire-encoded tensors


def table(*channels: Channel) -> dict[type, Channel]:
    """Channels by message type (one channel per type)."""
    out = {c.message: c for c in channels}
    if len(out) != len(channels):
        raise ValueError("a message type has two channels")
    return out


def received_by(channels: dict[type, Channel], receiver: str, taken: Taken) -> list[type]:
    """The data-plane message types `receiver` takes on the `taken` thread."""
    return [t for t, c in channels.items()
            if c.receiver == receiver and c.path is Path.DATA and c.taken is taken]


_DATA, _READER = Path.DATA, Taken.READER

CHANNELS = table(
    # chunk traffic: requester -> worker
    Channel(StageWork, WORKER, _DATA, _READER, ("blobs",)),
    Channel(Cancel, WORKER, _DATA, _READER),
    Channel(LinkProbe, WORKER, _DATA, _READER),
    # worker -> worker, only on the data plane (a strip without it fails and runs alone)
    Channel(Halo, WORKER, _DATA, _READER, ("blob",)),
    # worker -> requester
    Channel(ChunkResult, REQUESTER, _DATA, tensors=("payload",)),
    Channel(ChunkResults, REQUESTER, _DATA),
    Channel(ChunkFailed, REQUESTER, _DATA),
    Channel(LinkEcho, REQUESTER, _DATA),
    # set-up and membership
    Channel(ConfigureRegistrar, REGISTRAR),
    Channel(InitWorker, WORKER),
    Channel(WorkerReady, REGISTRAR),
    Channel(WorkerRefused, REGISTRAR),
    Channel(Heartbeat, REGISTRAR),
    Channel(Subscribe, REGISTRAR),
    Channel(Unsubscribe, REGISTRAR),
    Channel(InFlight, REGISTRAR),
    Channel(StatusRequest, REGISTRAR),
    Channel(Membership, REQUESTER),
    Channel(FindRegistrar, REGISTRAR),      # via a RegistrarFinder made on the leader
    Channel(RegistrarAt, REQUESTER),
    # the client's side
    Channel(ConfigureRequester, REQUESTER),
    Channel(Ready, CLIENT),
    Channel(InferRequest, REQUESTER),
    Channel(ChunkEvent, CLIENT),
    Channel(ChunkEvents, CLIENT),
    Channel(InferReply, CLIENT),
    Channel(InferError, CLIENT),
)
