"""Messages exchanged by DeColla actors and with the embedding process.

Thespian formats `str(message)` for its own logging even when logging is off, so
every class here has a short, constant-time `__str__`/`__repr__` (no payload in it):
a 1 MiB payload inside a tuple costs ~15x more per hop than inside one of these.
As actor messages they are pickled by Thespian (behind its authenticated serializer); on
the data plane the DATA-path ones travel as binary frames (decolla.runtime.frames), so a
field added to one of those must be a value the frame codec carries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Message:
    """Base class: cheap repr built from a few scalar fields."""
    _show: tuple[str, ...] = ()

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={getattr(self, k, None)!r}" for k in self._show)
        return f"{type(self).__name__}({parts})"

    __str__ = __repr__


# ---------------------------------------------------------------- membership / registrar

@dataclass(repr=False)
class DeviceInfo(Message):
    """What the registrar knows about one device (sent inside Membership)."""
    name: str
    worker: Any = None            # ActorAddress of its Worker
    status: str = "starting"      # starting | ready | unresponsive | gone
    speed: float = 0.0            # MAC/s measured by the worker at start
    available: float = 1.0        # free CPU fraction from the last heartbeat
    queue: int = 0                # chunks waiting in the worker
    beats: int = 0                # heartbeats received so far
    pid: int = 0                  # worker process id (on its host)
    pgid: int = 0                 # process group of the device's actor system
    host: str = ""
    threads: int = 1
    data_addr: tuple = ()         # (ip, port) of its worker's data plane; () = actor messages only
    incarnation: str = ""         # unique per worker the registrar starts (a restart is a new one)
    _show = ("name", "status", "beats")

    @property
    def alive(self) -> bool:
        return self.status == "ready"


@dataclass(repr=False)
class Membership(Message):
    """Pushed by the registrar to subscribers whenever devices or their load change."""
    devices: list[DeviceInfo]
    digest: str
    model: str
    specs: list[dict]             # Model.layer_specs() of the leader's model
    input_shape: tuple
    refused: dict[str, str] = field(default_factory=dict)   # node name -> reason
    in_flight: dict[str, int] = field(default_factory=dict)  # requester node -> requests in flight
    _show = ("digest",)


@dataclass(repr=False)
class ConfigureRegistrar(Message):
    model_spec: str
    node: str
    heartbeat_s: float = 0.5
    unresponsive_s: float = 2.5
    local_caps: dict | None = None    # the leader's own capabilities when it also computes
    _show = ("model_spec", "node")


@dataclass(repr=False)
class Subscribe(Message):
    node: str = ""
    _show = ("node",)


@dataclass(repr=False)
class InFlight(Message):
    """A subscribed requester's count of requests in flight (for the others' `auto`)."""
    count: int
    _show = ("count",)


@dataclass(repr=False)
class Unsubscribe(Message):
    _show = ()


@dataclass(repr=False)
class StatusRequest(Message):
    _show = ()


@dataclass(repr=False)
class FindRegistrar(Message):
    """To a RegistrarFinder on the leader, which passes it on to the registrar: tell
    `reply_to` (the requester; None: the sender) which actor is the registrar now."""
    reply_to: Any = None
    _show = ()


@dataclass(repr=False)
class RegistrarAt(Message):
    """The RegistrarFinder's answer: the leader's current registrar."""
    registrar: Any
    _show = ()


# ---------------------------------------------------------------- worker

@dataclass(repr=False)
class InitWorker(Message):
    name: str
    model_spec: str
    digest: str
    heartbeat_s: float
    threads: int = 1
    _show = ("name", "model_spec")


@dataclass(repr=False)
class WorkerReady(Message):
    name: str
    speed: float
    pid: int
    pgid: int
    host: str
    threads: int
    data_addr: tuple = ()         # (ip, port) of the worker's data plane (decolla.runtime.dataplane)
    _show = ("name", "speed", "pid")


@dataclass(repr=False)
class WorkerRefused(Message):
    name: str
    reason: str
    _show = ("name", "reason")


@dataclass(repr=False)
class Heartbeat(Message):
    name: str
    seq: int
    available: float
    queue: int
    _show = ("name", "seq", "queue")


@dataclass(repr=False)
class ChunkJob:
    """One chunk inside StageWork: which chunk, which blobs it needs, which attempt."""
    chunk: Any                    # plan.Chunk
    blob_keys: tuple              # keys into StageWork.blobs, in chunk.needs order
    attempt: int = 0


@dataclass(repr=False)
class StageWork(Message):
    """Chunks of one stage for one device; blobs (wire-encoded slices) are shared."""
    request: str
    stage: Any                    # plan.Stage without its chunk list (kept small)
    jobs: list[ChunkJob]
    blobs: dict                   # key -> bytes from decolla.runtime.wire.encode
    wire_dtype: str = "float32"
    # strips of an exchange stage run together (their Chunk.swap needs): chunk index ->
    # (device, its data-plane address) for every strip of the stage; None: run alone
    swap: dict | None = None
    wait_s: float = 0.0           # how long a strip waits for a halo before it gives up
    compress: bool = True         # lz4 on results and halos (where the link is slow enough)
    _show = ("request",)

    def __repr__(self) -> str:
        return (f"StageWork(request={self.request!r}, stage={getattr(self.stage, 'index', None)}, "
                f"jobs={len(self.jobs)}, bytes={sum(len(b) for b in self.blobs.values())})")

    __str__ = __repr__


@dataclass(repr=False)
class Halo(Message):
    """Rows of layer `layer`'s input that strip `src` owns and strip `dst` needs (worker to
    worker, on the data plane)."""
    request: str
    stage: int
    src: int
    dst: int
    layer: int
    blob: bytes                   # decolla.runtime.wire.encode

    @property
    def key(self) -> tuple:
        return (self.request, self.stage, self.src, self.dst, self.layer)

    def __repr__(self) -> str:
        return f"Halo({self.key}, bytes={len(self.blob)})"

    __str__ = __repr__


@dataclass(repr=False)
class ChunkResult(Message):
    request: str
    stage: int
    chunk: int
    attempt: int
    device: str
    payload: bytes
    received: float               # worker clock: job arrived
    start: float                  # worker clock: compute started
    end: float                    # worker clock: compute ended
    halo_bytes: int = 0           # encoded halo rows this strip received from other devices
    halo_wait_s: float = 0.0      # time its device spent waiting for halos (all its strips)
    _show = ("request", "stage", "chunk", "attempt", "device")


@dataclass(repr=False)
class ChunkResults(Message):
    """Results a worker computed back to back for one requester, sent in one message."""
    results: list
    _show = ()

    def __repr__(self) -> str:
        return f"ChunkResults(n={len(self.results)})"

    __str__ = __repr__


@dataclass(repr=False)
class ChunkFailed(Message):
    request: str
    stage: int
    chunk: int
    attempt: int
    device: str
    error: str
    _show = ("request", "stage", "chunk", "device", "error")


@dataclass(repr=False)
class Cancel(Message):
    """Drop queued jobs of `request` (all stages, or the given (stage, chunk) keys)."""
    request: str
    keys: tuple = ()
    _show = ("request",)


@dataclass(repr=False)
class LinkProbe(Message):
    """A requester's link measurement: `payload` bytes out, a LinkEcho back at once."""
    seq: int
    payload: bytes = b""
    _show = ("seq",)


@dataclass(repr=False)
class LinkEcho(Message):
    seq: int
    device: str
    _show = ("seq", "device")


# ---------------------------------------------------------------- requester

@dataclass(repr=False)
class ConfigureRequester(Message):
    registrar: Any
    node: str
    k: int | None = None                  # chunks per stage; default 2 x live devices
    plan: str = "auto"                    # the paper's plan is "layer"
    allocator: str = "average"
    wire_dtype: str = "float32"
    compress: bool | str = "auto"         # lz4 on chunk traffic: True, False, or "auto" (slow links)
    deadline_slack: float = 4.0
    deadline_floor: float = 0.5
    request_timeout: float = 120.0
    min_chunk_macs: int = 0
    data_plane: bool = True               # chunk traffic on the workers' sockets when offered
    _show = ("node", "plan", "allocator", "k")


@dataclass(repr=False)
class Ready(Message):
    ok: bool = True
    detail: str = ""
    _show = ("ok", "detail")


@dataclass(repr=False)
class InferRequest(Message):
    request: str
    image: Any                    # numpy array (H, W, 3)
    top_k: int = 5
    events: bool = False          # also send ChunkEvent messages while the request runs
    _show = ("request",)


@dataclass(repr=False)
class ChunkEvent(Message):
    """Progress of one request, sent to its caller as it happens (when asked for)."""
    request: str
    kind: str                     # 'sent', 'won', 'reassigned', 'failed'
    stage: int
    chunk: int
    device: str
    reason: str = ""
    time: float = 0.0
    _show = ("request", "kind", "stage", "chunk", "device")

    def as_dict(self) -> dict:
        return {"request": self.request, "kind": self.kind, "stage": self.stage,
                "chunk": self.chunk, "device": self.device, "reason": self.reason,
                "time": self.time}


@dataclass(repr=False)
class ChunkEvents(Message):
    """A request's ChunkEvents in one message: one per chunk would queue the reply behind
    hundreds of actor messages (each its own round trip to the caller)."""
    request: str
    events: list                  # ChunkEvent, in order
    _show = ("request",)


@dataclass(repr=False)
class InferReply(Message):
    request: str
    logits: Any
    records: list                 # trace.ChunkRecord
    started: float
    finished: float
    stats: dict
    _show = ("request",)


@dataclass(repr=False)
class InferError(Message):
    request: str
    error: str
    kind: str = "runtime"         # 'input' for a bad image, 'runtime' otherwise
    _show = ("request", "kind", "error")
