"""Messages of the baseline flow (segment workers and the pipeline requester).

Same rule as decolla.runtime.messages: short `__repr__`, never the payload (Thespian formats
`str(message)` even with logging off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decolla.baselines.partition import Segment
from decolla.runtime import channels, frames
from decolla.runtime.channels import Channel, Path
from decolla.runtime.messages import Message


@dataclass(repr=False)
class InitSegmentWorker(Message):
    name: str
    model_spec: str
    profile_repeats: int = 2
    _show = ("name", "model_spec")


@dataclass(repr=False)
class Reprofile(Message):
    repeats: int = 2
    _show = ("repeats",)


@dataclass(repr=False)
class SegmentWorkerReady(Message):
    name: str
    profile: list            # seconds per layer on this host, as measured now
    data_addr: tuple = ()    # (ip, port) of its data plane (decolla.runtime.dataplane), () = none
    _show = ("name",)


@dataclass(repr=False)
class RunSegment(Message):
    """Compute route[hop] from `blobs` (tensor name -> wire bytes), then pass on."""
    request: str
    epoch: int               # route version: bumps at every re-plan
    hop: int
    route: list              # [Segment, ...]
    addresses: list          # SegmentWorker address per route entry
    requester: Any
    blobs: dict
    wire_dtype: str = "float32"
    history: list = field(default_factory=list)   # HopReport of this epoch's earlier hops
    data_addrs: list = field(default_factory=list)  # data plane per route entry, () = none
    requester_data: tuple = ()                      # the requester's data plane, () = none
    _show = ("request", "epoch", "hop")


@dataclass(frozen=True)
class HopReport:
    """Timing of one finished hop, forwarded with the data so the answer carries its history."""
    hop: int
    device: str
    received: float
    start: float
    end: float
    bytes_in: int
    bytes_out: int


@dataclass(repr=False)
class SegmentDone(Message):
    """A hop finished (sent by its worker to the requester) as `report` says; the last hop
    carries the logits and, in `history`, the reports of the epoch's earlier hops (which may
    arrive after it)."""
    request: str
    epoch: int
    report: HopReport
    logits: bytes | None = None
    error: str = ""
    history: list = field(default_factory=list)
    _show = ("request", "epoch", "report", "error")


@dataclass(repr=False)
class Resend(Message):
    """Pass the cached output of (request, epoch, hop) on to a new route."""
    request: str
    epoch: int
    hop: int
    new_epoch: int
    route: list
    addresses: list
    requester: Any
    data_addrs: list = field(default_factory=list)
    requester_data: tuple = ()
    _show = ("request", "epoch", "hop", "new_epoch")


@dataclass(repr=False)
class Forget(Message):
    request: str
    _show = ("request",)


@dataclass(repr=False)
class ConfigurePipeline(Message):
    registrar: Any
    node: str
    data_plane: bool = True  # segments and reports on data-plane connections when offered
    _show = ("node",)


@dataclass(repr=False)
class Prepare(Message):
    """Create (or re-profile) segment workers on `hosts`; answer Profiles."""
    hosts: list
    model_spec: str
    reprofile: bool = False
    timeout_s: float = 120.0
    fresh: bool = False      # replace existing workers (e.g. after their host rejoined)
    _show = ("hosts",)


@dataclass(repr=False)
class Profiles(Message):
    profiles: dict           # host -> seconds per layer
    missing: list = field(default_factory=list)
    _show = ("missing",)


@dataclass(repr=False)
class RunPipeline(Message):
    """One inference along `route`; re-plan over `survivors` when a hop misses its t1."""
    request: str
    image: Any
    route: list
    weights: list            # per-layer seconds used to re-plan (hierarchical cut)
    cut_bytes: list          # bytes crossing each cut 0..n
    bandwidth_bps: float
    t1_slack: float = 4.0
    t1_floor: float = 1.0
    replan: bool = True
    candidates: list = field(default_factory=list)   # devices a re-plan may use (ordered)
    timeout_s: float = 600.0
    _show = ("request",)


SEGMENT_WORKER, PIPELINE_REQUESTER = "segment-worker", "pipeline-requester"

# the runtime's channels and the baselines' own
PIPELINE_CHANNELS = channels.table(
    *channels.CHANNELS.values(),
    Channel(RunSegment, SEGMENT_WORKER, Path.DATA, tensors=("blobs",)),
    Channel(SegmentDone, PIPELINE_REQUESTER, Path.DATA, tensors=("logits",)),
    Channel(InitSegmentWorker, SEGMENT_WORKER),
    Channel(Reprofile, SEGMENT_WORKER),
    Channel(Resend, SEGMENT_WORKER),
    Channel(Forget, SEGMENT_WORKER),
    Channel(SegmentWorkerReady, PIPELINE_REQUESTER),
    Channel(ConfigurePipeline, PIPELINE_REQUESTER),
    Channel(Prepare, PIPELINE_REQUESTER),
    Channel(RunPipeline, PIPELINE_REQUESTER),
    Channel(Profiles, channels.CLIENT),
)

# the runtime's data-plane frames and the baselines' own (ids from 64 on)
PIPELINE_FRAMES = frames.RUNTIME.extend(messages={64: RunSegment, 65: SegmentDone},
                                        nested={80: Segment, 81: HopReport})
