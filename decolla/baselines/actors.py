"""Actor flow of the baselines: segment workers on hosts, a pipeline requester in the client.

A `SegmentWorker` (one per host, placed by the node-name capability, so it also runs on an
edge server that computes no DeColla chunks) computes a contiguous run of layers with the
same kernels as the runtime, then sends its output straight to the next host of the route
(the "routing table" travels with the work) and a small progress note to the requester.
It keeps its last output per request so a re-plan can resume from it. Segments and notes
travel on data-plane connections (decolla.runtime.dataplane) where the receiver offers one, like
DeColla's chunks, so the comparison is between the methods, not their transports.

The `PipelineRequester` starts a route and watches it: every hop has a response time t1
(from the profiled segment time and the link); when the hop in progress misses it, the
device is declared lost and the remaining layers are re-planned over the survivors,
resuming from the last hop that finished (or from the image).
"""
from __future__ import annotations

import time

import numpy as np
from thespian.actors import ActorExitRequest, ActorTypeDispatcher, PoisonMessage, WakeupMessage

from decolla.actors import system
from decolla.actors.preload import get_model
from decolla.baselines import partition as part
from decolla.baselines.messages import (PIPELINE_CHANNELS, PIPELINE_FRAMES, PIPELINE_REQUESTER,
                                        SEGMENT_WORKER, ConfigurePipeline, Forget, HopReport,
                                        InitSegmentWorker, Prepare, Profiles, Reprofile, Resend,
                                        RunPipeline, RunSegment, SegmentDone, SegmentWorkerReady)
from decolla.log import get_logger
from decolla.runtime import dataplane, wire
from decolla.runtime.messages import (InferError, InferReply, Membership, Ready, Subscribe,
                                      Unsubscribe)
from decolla.runtime.trace import ChunkRecord

log = get_logger("baselines")
TICK_S = 0.05
CACHE_REQUESTS = 16
MAX_REPLANS = 6


def encode_tensors(tensors: dict, dtype: str = "float32") -> dict:
    return {k: wire.encode(v, dtype) for k, v in tensors.items()}


def decode_tensors(blobs: dict) -> dict:
    return {k: wire.decode(v) for k, v in blobs.items()}


class SegmentWorker(dataplane.WatchesInbox, ActorTypeDispatcher):
    """Computes route segments on one host and forwards their output."""

    CHANNELS, RECEIVER, FRAMES = PIPELINE_CHANNELS, SEGMENT_WORKER, PIPELINE_FRAMES

    @staticmethod
    def actorSystemCapabilityCheck(capabilities, requirements):
        return capabilities.get(system.CAP_NODE) == requirements.get(system.CAP_NODE)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.name = None
        self.cache: dict = {}          # (request, epoch, hop) -> output blobs

    def receiveMsg_InitSegmentWorker(self, msg: InitSegmentWorker, sender):
        self.name = msg.name
        self.model = get_model(msg.model_spec)
        self.layers = list(self.model.layers)
        # any free port: a fixed --data-port belongs to the node's DeColla worker
        addr = self.listen(min(0, dataplane.env_port()))
        profile = part.profile_layers(self.layers, msg.profile_repeats)
        self.send(sender, SegmentWorkerReady(msg.name, profile, addr))

    def receiveMsg_Reprofile(self, msg: Reprofile, sender):
        profile = part.profile_layers(self.layers, msg.repeats)
        self.send(sender, SegmentWorkerReady(self.name, profile,
                                             self.listener.address if self.listener else ()))

    def receiveMsg_RunSegment(self, msg: RunSegment, sender):
        received = time.time()
        seg = msg.route[msg.hop]
        last = msg.hop == len(msg.route) - 1
        try:
            tensors = decode_tensors(msg.blobs)
            start = time.time()
            out = part.run_segment(self.layers, tensors, seg.start, seg.end)
            end = time.time()
            blobs = encode_tensors(out, msg.wire_dtype)
        except Exception as exc:   # report, do not crash the actor
            log.warning("segment failed", request=msg.request, hop=msg.hop, error=repr(exc))
            failed = HopReport(msg.hop, self.name, received, received, time.time(), 0, 0)
            self.send_data(msg.requester_data, msg.requester,
                           SegmentDone(msg.request, msg.epoch, failed, error=repr(exc)))
            return
        report = HopReport(msg.hop, self.name, received, start, end,
                           sum(len(b) for b in msg.blobs.values()),
                           sum(len(b) for b in blobs.values()))
        done = SegmentDone(msg.request, msg.epoch, report)
        if last:
            done.logits = blobs[self.layers[seg.end - 1].name]
            done.history = list(msg.history)
            self.send_data(msg.requester_data, msg.requester, done)
            return
        self._keep((msg.request, msg.epoch, msg.hop), blobs)
        self.send_data(msg.requester_data, msg.requester, done)
        nxt = msg.hop + 1
        self.send_data(msg.data_addrs[nxt] if nxt < len(msg.data_addrs) else (), msg.addresses[nxt],
                       RunSegment(msg.request, msg.epoch, nxt, msg.route, msg.addresses,
                                  msg.requester, blobs, msg.wire_dtype,
                                  list(msg.history) + [report], msg.data_addrs, msg.requester_data))

    def _keep(self, key, blobs) -> None:
        self.cache[key] = blobs
        while len(self.cache) > CACHE_REQUESTS:
            self.cache.pop(next(iter(self.cache)))

    def receiveMsg_Resend(self, msg: Resend, sender):
        blobs = self.cache.get((msg.request, msg.epoch, msg.hop))
        if blobs is None:
            self.send_data(msg.requester_data, msg.requester,
                           SegmentDone(msg.request, msg.new_epoch,
                                       HopReport(-1, self.name, 0, 0, 0, 0, 0),
                                       error="nothing cached to resend"))
            return
        self.send_data(msg.data_addrs[0] if msg.data_addrs else (), msg.addresses[0],
                       RunSegment(msg.request, msg.new_epoch, 0, msg.route, msg.addresses,
                                  msg.requester, blobs, data_addrs=msg.data_addrs,
                                  requester_data=msg.requester_data))

    def receiveMsg_Forget(self, msg: Forget, sender):
        for key in [k for k in self.cache if k[0] == msg.request]:
            del self.cache[key]

    def receiveMsg_ActorExitRequest(self, msg, sender):
        self.close_data_plane()

    def receiveUnrecognizedMessage(self, msg, sender):
        pass


class _Pipe:
    """State of one pipelined inference at the requester."""

    def __init__(self, msg: RunPipeline, reply_to):
        self.msg, self.reply_to = msg, reply_to
        self.epoch, self.hop = 0, 0
        self.addresses: list = []
        self.source = None             # (epoch, hop, address, device) holding the current hop's input
        self.failed: set[str] = set()
        self.records: list[ChunkRecord] = []
        self.routes: dict[int, list[part.Segment]] = {}   # epoch -> route
        self.deadline = 0.0
        self.used: list = []
        self.replans = 0
        self.started = time.time()
        self.timeout_at = time.monotonic() + msg.timeout_s

    @property
    def route(self) -> list[part.Segment]:
        """The route of the current epoch."""
        return self.routes[self.epoch]

    @property
    def current(self) -> ChunkRecord | None:
        """The trace record of the hop in progress."""
        return next((r for r in self.records if (r.attempt, r.chunk) == (self.epoch, self.hop)),
                    None)


def segment_t1(seg: part.Segment, weights, cut_bytes, bandwidth_bps: float, slack: float,
               floor: float) -> float:
    """Response time t1 of a hop: slack × (profiled compute + input transfer), at least `floor`."""
    predicted = float(sum(weights[seg.start:seg.end])) + 8.0 * cut_bytes[seg.start] / bandwidth_bps
    return max(floor, slack * predicted)


class PipelineRequester(dataplane.WatchesInbox, ActorTypeDispatcher):
    """Runs baseline inferences along routes of segment workers (lives in the client)."""

    CHANNELS, RECEIVER, FRAMES = PIPELINE_CHANNELS, PIPELINE_REQUESTER, PIPELINE_FRAMES

    actorSystemCapabilityCheck = staticmethod(system.on_named_node)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.cfg = None
        self.membership: Membership | None = None
        self.workers: dict = {}          # host -> SegmentWorker address
        self.data_addrs: dict = {}       # host -> its SegmentWorker's data plane
        self.own_data: tuple = ()        # ours, for the workers' reports
        self.profiles: dict = {}
        self.prepare = None              # (reply_to, waiting set, deadline)
        self.pipes: dict[str, _Pipe] = {}
        self.ticking = False
        self.waiting_ready: list = []

    def receiveMsg_ConfigurePipeline(self, msg: ConfigurePipeline, sender):
        self.cfg = msg
        if msg.data_plane:
            self.own_data = self.listen(0)
        self.waiting_ready.append(sender)
        self.send(msg.registrar, Subscribe(msg.node))

    def receiveMsg_Membership(self, msg: Membership, sender):
        self.membership = msg
        for addr in self.waiting_ready:
            self.send(addr, Ready(True))
        self.waiting_ready.clear()

    # ------------------------------------------------------------ workers
    def receiveMsg_Prepare(self, msg: Prepare, sender):
        waiting = set()
        for host in msg.hosts:
            if msg.fresh and host in self.workers:
                self.send(self.workers.pop(host), ActorExitRequest())
                self.data_addrs.pop(host, None)
                self.profiles.pop(host, None)
            if host not in self.workers:
                self.workers[host] = self.createActor(
                    SegmentWorker, targetActorRequirements={system.CAP_NODE: host})
                self.send(self.workers[host], InitSegmentWorker(host, msg.model_spec))
                waiting.add(host)
            elif msg.reprofile or host not in self.profiles:
                self.send(self.workers[host], Reprofile())
                waiting.add(host)
        self.prepare = (sender, waiting, time.monotonic() + msg.timeout_s, list(msg.hosts))
        self._prepared()
        self._ensure_tick()

    def receiveMsg_SegmentWorkerReady(self, msg: SegmentWorkerReady, sender):
        self.profiles[msg.name] = msg.profile
        if self.own_data and msg.data_addr:
            self.data_addrs[msg.name] = tuple(msg.data_addr)
        else:
            self.data_addrs.pop(msg.name, None)
        if self.prepare is not None:
            self.prepare[1].discard(msg.name)
            self._prepared()

    def _prepared(self, force: bool = False) -> None:
        reply_to, waiting, _, hosts = self.prepare
        if waiting and not force:
            return
        self.prepare = None
        self.send(reply_to, Profiles({h: self.profiles[h] for h in hosts if h in self.profiles},
                                     sorted(waiting)))

    # ------------------------------------------------------------ inference
    def receiveMsg_RunPipeline(self, msg: RunPipeline, sender):
        missing = [s.device for s in msg.route if s.device not in self.workers]
        if missing or not msg.route:
            self.send(sender, InferError(msg.request, f"no segment worker on {missing} "
                                                      "(call prepare first)"))
            return
        pipe = _Pipe(msg, sender)
        self.pipes[msg.request] = pipe
        self._dispatch(pipe, msg.route, None)
        self._ensure_tick()

    def _dispatch(self, pipe: _Pipe, route, source) -> None:
        """Start `route` (a new epoch unless it is the first) from `source` or the image."""
        if pipe.addresses:
            pipe.epoch += 1
        pipe.routes[pipe.epoch], pipe.hop = list(route), 0
        pipe.addresses = [self.workers[s.device] for s in route]
        pipe.used.extend(pipe.addresses)
        data = [self.data_addrs.get(s.device, ()) for s in route]
        if source is None:
            blobs = {"input": wire.encode(np.asarray(pipe.msg.image, np.float32))}
            self.send_data(data[0], pipe.addresses[0],
                           RunSegment(pipe.msg.request, pipe.epoch, 0, pipe.route,
                                      pipe.addresses, self.myAddress, blobs, data_addrs=data,
                                      requester_data=self.own_data))
        else:
            epoch, hop, addr, _ = source
            self.send(addr, Resend(pipe.msg.request, epoch, hop, pipe.epoch, pipe.route,
                                   pipe.addresses, self.myAddress, data, self.own_data))
        self._begin_hop(pipe)

    def _begin_hop(self, pipe: _Pipe) -> None:
        m, seg = pipe.msg, pipe.route[pipe.hop]
        t1 = segment_t1(seg, m.weights, m.cut_bytes, m.bandwidth_bps, m.t1_slack, m.t1_floor)
        pipe.deadline = time.monotonic() + t1
        self._record(pipe, pipe.epoch, pipe.hop, t1)

    def _record(self, pipe: _Pipe, epoch: int, hop: int, t1: float = 0.0) -> ChunkRecord:
        """The trace record of hop `hop` of route `epoch`, made now if there is none yet."""
        for rec in pipe.records:
            if rec.attempt == epoch and rec.chunk == hop:
                return rec
        seg, now = pipe.routes[epoch][hop], time.time()
        # stage = first layer of the segment, chunk = hop, attempt = route epoch
        rec = ChunkRecord(pipe.msg.request, seg.start, hop, epoch, seg.device,
                          f"{seg.start}:{seg.end}", 0, now, 0, deadline=now + t1,
                          reason="first" if epoch == 0 else "replan")
        pipe.records.append(rec)
        return rec

    def _settle(self, pipe: _Pipe, epoch: int, report) -> None:
        """Fill the record of a finished hop from its HopReport."""
        rec = self._record(pipe, epoch, report.hop)
        rec.returned = time.time()
        rec.received, rec.start, rec.end = report.received, report.start, report.end
        rec.bytes_in, rec.bytes_out = report.bytes_in, report.bytes_out
        rec.status = "late-won" if rec.status == "lost" else "won"

    def receiveMsg_SegmentDone(self, msg: SegmentDone, sender):
        pipe = self.pipes.get(msg.request)
        if pipe is None:
            return
        hop, device = msg.report.hop, msg.report.device
        if msg.error:
            if msg.epoch == pipe.epoch:
                if 0 <= hop < len(pipe.route):
                    self._record(pipe, msg.epoch, hop).status = "failed"
                self._fail(pipe, f"{device}: {msg.error}")
            return
        if msg.epoch not in pipe.routes:
            return
        # Reports travel apart from the data, so they can arrive in any order; the answer
        # carries the reports of its route's earlier hops, which makes the trace complete.
        for report in [*msg.history, msg.report]:
            self._settle(pipe, msg.epoch, report)
        if msg.logits is not None:
            self._finish(pipe, wire.decode(msg.logits), pipe.routes[msg.epoch])
            return
        if msg.epoch != pipe.epoch or hop < pipe.hop:
            return     # an abandoned route, or a hop already passed by a later report
        pipe.source = (msg.epoch, hop, pipe.addresses[hop], device)
        pipe.hop = hop + 1
        if pipe.hop < len(pipe.route):
            self._begin_hop(pipe)

    def _replan(self, pipe: _Pipe) -> None:
        m, seg = pipe.msg, pipe.route[pipe.hop]
        pipe.failed.add(seg.device)
        pipe.current.status = "lost"
        gone = self._gone_devices()
        survivors = [d for d in m.candidates if d not in pipe.failed and d in self.workers
                     and d not in gone]
        if not survivors:     # all missed a t1 once: retry members, except the one just lost
            survivors = [d for d in m.candidates if d != seg.device and d in self.workers
                         and d not in gone]
        if not survivors or pipe.replans >= MAX_REPLANS:
            self._fail(pipe, f"no surviving device after losing {sorted(pipe.failed)} "
                             f"({pipe.replans} re-plans)")
            return
        source = pipe.source
        if source is None or source[3] in pipe.failed:
            source, start = None, 0           # nobody alive holds the input: from the image
        else:
            start = seg.start
        route = part.hierarchical_route(survivors, m.weights, start, m.cut_bytes)
        pipe.replans += 1
        pipe.source = source
        log.info("hierarchical re-plan", request=m.request, lost=seg.device,
                 from_layer=start, route=[(s.device, s.start, s.end) for s in route])
        self._dispatch(pipe, route, source)

    def _gone_devices(self) -> set:
        """Devices the registrar says left the cluster (a stale 'unresponsive' is not enough)."""
        if self.membership is None:
            return set()
        return {d.name for d in self.membership.devices if d.status == "gone"}

    def _finish(self, pipe: _Pipe, logits, route) -> None:
        self.pipes.pop(pipe.msg.request, None)
        for rec in pipe.records:
            if rec.status == "pending":
                rec.status = "lost"
        stats = {"route": [(s.device, s.start, s.end) for s in route],
                 "replans": pipe.replans, "failed": sorted(pipe.failed)}
        self.send(pipe.reply_to, InferReply(pipe.msg.request, np.asarray(logits),
                                            pipe.records, pipe.started, time.time(), stats))
        self._forget(pipe)

    def _fail(self, pipe: _Pipe, error: str) -> None:
        self.pipes.pop(pipe.msg.request, None)
        log.warning("pipeline failed", request=pipe.msg.request, error=error)
        self.send(pipe.reply_to, InferError(pipe.msg.request, error))
        self._forget(pipe)

    def _forget(self, pipe: _Pipe) -> None:
        seen = []
        for addr in pipe.used:
            if addr not in seen:
                seen.append(addr)
                self.send(addr, Forget(pipe.msg.request))

    # ------------------------------------------------------------ timer
    def _ensure_tick(self) -> None:
        if not self.ticking and (self.pipes or self.prepare is not None):
            self.ticking = True
            self.wakeupAfter(TICK_S, payload="tick")

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender):
        if msg.payload != "tick":
            return
        self.ticking = False
        now = time.monotonic()
        if self.prepare is not None and now > self.prepare[2]:
            self._prepared(force=True)
        for pipe in list(self.pipes.values()):
            if now > pipe.timeout_at:
                self._fail(pipe, f"timed out after {pipe.msg.timeout_s:.0f} s")
            elif pipe.msg.replan and now > pipe.deadline:   # only hierarchical watches t1
                log.info("hop missed t1", request=pipe.msg.request, hop=pipe.hop,
                         device=pipe.route[pipe.hop].device)
                self._replan(pipe)
        self._ensure_tick()

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender):
        for pipe in list(self.pipes.values()):
            self._fail(pipe, "requester shutting down")
        for addr in self.workers.values():
            self.send(addr, ActorExitRequest())
        if self.cfg is not None:
            self.send(self.cfg.registrar, Unsubscribe())
        self.close_data_plane()

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender):
        log.warning("undeliverable message", message=str(msg.poisonMessage)[:200])

    def receiveUnrecognizedMessage(self, msg, sender):
        pass
