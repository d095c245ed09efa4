"""Requester: runs inferences for its callers across the devices of the cluster.

For each request it walks the plan stage by stage. A stage's chunks are allocated
to usable devices, sent (chunks for the same device share one message and one
copy of their common input), and collected in the stage's queue; when the queue
holds all K results they are merged in order and the next stage starts. The
embedded `Supervisor` predicts every chunk's return time; a chunk not back by its
deadline (t2), or whose device leaves, is sent to another device. Results are
keyed by (request, stage, chunk): the first one wins, later duplicates are
dropped, so a reassignment can never corrupt an output. Work, results and
cancellations travel on the workers' data plane (decolla.runtime.dataplane) when they
offer one, as actor messages otherwise.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from thespian.actors import (ActorExitRequest, ActorTypeDispatcher, PoisonMessage,
                             WakeupMessage)

from decolla.runtime import dataplane, wire
from decolla.plans import Plan, PlanError, build_plan, parse_plan_name
from decolla.plans.compute import chunk_output_shape, compute_chunk, merge
from decolla.actors import system
from decolla.allocators import NoLiveDevice, StageInfo, make_allocator
from decolla.log import get_logger
from decolla.runtime.messages import (Cancel, ChunkEvent, ChunkFailed, ChunkJob, ChunkResult, ChunkResults,
                              ConfigureRequester, InferError, InferReply, InferRequest,
                              InFlight, LinkEcho, Membership, Ready, StageWork, Subscribe,
                              Unsubscribe)
from decolla.runtime.links import LinkProber
from decolla.runtime.supervisor import Supervisor
from decolla.runtime.trace import ChunkRecord

log = get_logger("requester")
TICK_S = 0.05
MAX_ATTEMPTS = 6


def check_image(image, shape) -> np.ndarray:
    """The image as float32 after checking shape, dtype and finiteness (raises TypeError/ValueError)."""
    from decolla.forward import check_image as _check
    return _check(image, tuple(shape))


class _Attempt:
    __slots__ = ("record", "deadline", "due", "expired")

    def __init__(self, record: ChunkRecord, deadline: float, due: float):
        # due: when the supervisor expects the result; deadline: when it gives up on it
        self.record, self.deadline, self.due, self.expired = record, deadline, due, False

    @property
    def pending(self) -> bool:
        return self.record.status == "pending"

    @property
    def active(self) -> bool:
        return self.pending and not self.expired


class _Request:
    def __init__(self, rid, reply_to, plan, image, top_k, timeout_s, events=False):
        self.id, self.reply_to, self.plan, self.top_k = rid, reply_to, plan, top_k
        self.events = events
        self.tensors = {"input": image}
        self.stage = 0
        self.slots: list = []
        self.attempts: dict[int, list[_Attempt]] = {}     # current stage: chunk -> attempts
        self.index: dict[tuple, _Attempt] = {}             # (stage, chunk, attempt) -> attempt
        self.blobs: dict = {}
        self.records: list[ChunkRecord] = []
        self.started = time.time()
        self.timeout_at = time.monotonic() + timeout_s
        self.waiting = False


class Requester(dataplane.WatchesInbox, ActorTypeDispatcher):
    """Per-client coordinator of inferences (lives in the client's actor system)."""

    DATA_TYPES = (ChunkResult, ChunkResults, ChunkFailed, LinkEcho, dataplane.Closed)

    actorSystemCapabilityCheck = staticmethod(system.on_named_node)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.cfg: ConfigureRequester | None = None
        self.membership: Membership | None = None
        self.requests: dict[str, _Request] = {}
        self.workers: dict = {}
        self.data_addrs: dict[str, tuple] = {}      # device -> its worker's data plane
        self.plans: dict[tuple, Plan] = {}
        self.ticking = False
        self.waiting_ready: list = []
        self.backlog: list = []
        self.links = LinkProber()
        self.measure_links = False
        self.links_reported = False
        self.reported_in_flight = 0

    # ------------------------------------------------------------ set-up
    def receiveMsg_ConfigureRequester(self, msg: ConfigureRequester, sender):
        self.cfg = msg
        try:
            self.allocator = make_allocator(msg.allocator)
        except Exception as exc:
            self.send(sender, Ready(False, f"allocator {msg.allocator!r}: {exc}"))
            return
        self.plan_name, self.plan_opts, stated = None, {}, 0.0
        try:           # a bad plan name is reported with the first request (build_plan says why)
            self.plan_name, self.plan_opts = parse_plan_name(msg.plan)
            if self.plan_name == "auto":
                stated = float(self.plan_opts.get("bandwidth_mbit", 0))
                self.measure_links = not stated     # auto plans with the links it measures
        except (PlanError, ValueError):
            pass
        self.sup = Supervisor(slack=msg.deadline_slack, floor=msg.deadline_floor,
                              link_bytes_per_s=stated * 1e6 / 8)
        self.waiting_ready.append(sender)
        self.send(msg.registrar, Subscribe(msg.node))

    def receiveMsg_Membership(self, msg: Membership, sender):
        first = self.membership is None
        if not first and msg.digest != self.membership.digest:
            log.warning("leader model changed; dropping plans", digest=msg.digest[:12])
            self.plans.clear()
            self.local_model = None
        self.membership = msg
        self.workers = {d.name: d.worker for d in msg.devices}
        self.data_addrs = {d.name: tuple(d.data_addr) for d in msg.devices
                           if d.data_addr and self.cfg.data_plane}
        if self.peers is not None:
            self.peers.forget(set(self.data_addrs.values()))
        lost = self.sup.update_membership(msg.devices)
        if self.measure_links:
            # a device that misses heartbeats or check-ins keeps its figure: no re-probing
            # a slow link each time it flaps
            self.links.track([d.name for d in msg.devices if d.alive and d.worker is not None],
                             keep=[d.name for d in msg.devices])
            self._probe()
        status = {d.name: d.status for d in msg.devices}
        for name in lost:
            # Its chunks move as soon as they are late (the tick), not all at once: on a slow
            # link busy with our own chunks a heartbeat or a convention check-in can be
            # stuck behind them, and the device is back a moment later.
            log.warning("device not usable; its chunks move once late", device=name,
                        status=status.get(name, "gone"))
        for addr in self.waiting_ready:
            self.send(addr, Ready(True))
        self.waiting_ready.clear()
        self._start_backlog()
        for req in list(self.requests.values()):
            if req.waiting:
                self._start_stage(req)
            else:
                self._retry_orphans(req)

    # ------------------------------------------------------------ requests
    def receiveMsg_InferRequest(self, msg: InferRequest, sender):
        if self.cfg is None:
            self.send(sender, InferError(msg.request, "requester is not configured"))
        elif self.membership is None or self._measuring_links():
            self.backlog.append((msg, sender))
        else:
            self._start_request(msg, sender)

    def _start_request(self, msg: InferRequest, sender) -> None:
        if msg.request in self.requests:
            self.send(sender, InferError(msg.request, "duplicate request id", "input"))
            return
        try:
            image = check_image(msg.image, self.membership.input_shape)
        except (TypeError, ValueError) as exc:
            log.info("request rejected", request=msg.request, error=str(exc))
            self.send(sender, InferError(msg.request, f"bad image: {exc}", "input"))
            return
        n = len(self.sup.usable()) or len(self.sup.members()) or 1
        try:
            plan = self._plan_for(n)
        except PlanError as exc:
            self.send(sender, InferError(msg.request, f"bad plan: {exc}", "input"))
            return
        req = _Request(msg.request, sender, plan, image, msg.top_k, self.cfg.request_timeout,
                       getattr(msg, "events", False))
        self.requests[req.id] = req
        self._report_in_flight()
        self._start_stage(req)
        self._ensure_tick()

    def _start_stage(self, req: _Request) -> None:
        stage = req.plan.stages[req.stage]
        req.waiting = False
        req.slots = [None] * len(stage.chunks)
        req.attempts = {c.index: [] for c in stage.chunks}
        req.blobs = {}
        if stage.local and self._run_local(req, stage):
            return
        names = self.sup.usable() or self.sup.members()
        names = [n for n in names if self.workers.get(n) is not None]
        if not names:
            req.waiting = True
            return
        info = StageInfo(stage.index, len(req.plan.stages), stage.kind)
        costs = [c.cost for c in stage.chunks]
        try:
            assignment = self.allocator.assign(info, costs, self.sup.device_states(names))
            if len(assignment) != len(costs) or any(a not in names for a in assignment):
                raise ValueError(f"allocator returned {assignment!r} for devices {names}")
        except NoLiveDevice:
            req.waiting = True
            return
        except Exception as exc:  # a broken policy must not stop inference
            log.warning("allocator failed; using round-robin", error=repr(exc))
            assignment = [names[i % len(names)] for i in range(len(costs))]
        groups: dict[str, list] = {}
        for chunk, dev in zip(stage.chunks, assignment):
            groups.setdefault(dev, []).append(chunk)
        swap = self._swap_map(stage, assignment)
        for dev, chunks in groups.items():
            self._send(req, stage, chunks, dev, "first", swap)

    def _swap_map(self, stage, assignment: list) -> dict | None:
        """For an exchange stage whose strips can reach each other (all on one device, or
        every device on the data plane): chunk index -> (device, data address)."""
        if not stage.exchange:
            return None
        devices = set(assignment)
        if len(devices) > 1 and not all(self.data_addrs.get(d) for d in devices):
            return None
        return {c.index: (dev, self.data_addrs.get(dev)) for c, dev in zip(stage.chunks, assignment)}

    def _report_in_flight(self) -> None:
        """Tell the registrar how many requests are in flight here: other requesters'
        `auto` counts them too (whole_above)."""
        n = len(self.requests)
        if n != self.reported_in_flight:
            self.reported_in_flight = n
            self.send(self.cfg.registrar, InFlight(n))

    def _in_flight_elsewhere(self) -> int:
        """Requests the other requesters have in flight, as the registrar last pushed them."""
        return sum(c for node, c in self.membership.in_flight.items() if node != self.cfg.node)

    def _plan_for(self, n: int) -> Plan:
        """The plan for a new request with `n` usable devices (cached).

        `auto` sends whole requests (the `single` plan, placed by the allocator) while at
        least `whole_above` requests are in flight (default 1: only a request that finds
        the cluster idle is split; 0 = never): splitting costs extra messages and halo
        work, which only pays while devices would otherwise sit idle. Other requesters'
        requests count too, as the registrar last pushed them (every heartbeat period)."""
        opts = self.plan_opts
        kind, k, extra = self.cfg.plan, self.cfg.k or 2 * n, {}
        auto = self.plan_name == "auto"
        if auto and 0 < int(opts.get("whole_above", 1)) <= len(self.requests) + \
                self._in_flight_elsewhere():
            kind, k = "single", 1
        elif auto:
            if "devices" not in opts:
                extra["devices"] = n
            speeds = sorted(d.speed for d in self.membership.devices      # calibrated at start-up
                            if getattr(d, "speed", 0) > 0)
            if speeds and "gmacs" not in opts:   # rounded so the plan cache stays small
                extra["gmacs"] = float(f"{speeds[len(speeds) // 2] / 1e9:.1g}")
            measured = self.links.bandwidth_mbit()
            if measured and "bandwidth_mbit" not in opts:
                extra["bandwidth_mbit"] = float(f"{measured:.1g}")
                if self.links.shared is not None and "shared_link" not in opts:
                    extra["shared_link"] = int(self.links.shared)
        key = (kind, k, n, tuple(sorted(extra.items())))
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = build_plan(
                self.membership.specs, k, kind, self.membership.input_shape,
                self.cfg.min_chunk_macs, **extra)
        return plan

    def _local_layers(self):
        """This node's copy of the model's layers (None if it cannot load the leader's model)."""
        if getattr(self, "local_model", None) is None:
            try:
                from decolla.actors.preload import get_model
                model = get_model(self.membership.model)
                if model.digest() != self.membership.digest:
                    raise ValueError("model digest differs from the leader's")
                self.local_model = {l.name: l for l in model.layers}
                self.local_cache: dict = {}
            except Exception as exc:
                log.warning("cannot compute locally; sending local stages out", error=repr(exc))
                self.local_model = False
        return self.local_model or None

    def _run_local(self, req: _Request, stage) -> bool:
        """Compute a one-chunk `local` stage on this node; False to send it out instead."""
        layers = self._local_layers()
        if layers is None:
            return False
        c = stage.chunks[0]
        now = time.time()
        try:
            out = compute_chunk(layers, stage, c,
                                {n: n.select(req.tensors[n.tensor]) for n in c.needs},
                                cache=self.local_cache)
        except Exception as exc:
            log.warning("local stage failed; sending it out", stage=stage.index, error=repr(exc))
            return False
        end = time.time()
        rec = ChunkRecord(req.id, stage.index, c.index, 0, f"local:{self.cfg.node}",
                          ",".join(stage.layers), c.cost.macs, now, 0, reason="local")
        rec.returned, rec.received, rec.start, rec.end, rec.status = end, now, now, end, "won"
        req.records.append(rec)
        req.slots[c.index] = out
        self._stage_done(req, stage)
        return True

    def _send(self, req: _Request, stage, chunks, dev: str, reason: str,
              swap: dict | None = None) -> None:
        """Send `chunks` of `stage` to `dev` (as strips swapping halos when `swap` is given)."""
        cfg = self.cfg
        blobs, jobs, counted = {}, [], set()
        now = time.time()
        wait_s = 0.0
        for c in chunks:
            keys, nbytes = [], 0
            needs, cost = c.run_as(swap is not None)
            for need in needs:
                key = need.key
                if key not in req.blobs:
                    req.blobs[key] = wire.encode(need.select(req.tensors[need.tensor]),
                                                 cfg.wire_dtype, cfg.compress)
                blobs[key] = req.blobs[key]
                keys.append(key)
                if key not in counted:
                    counted.add(key)
                    nbytes += len(req.blobs[key])
            attempt = len(req.attempts[c.index])
            jobs.append(ChunkJob(c, tuple(keys), attempt))
            rec = ChunkRecord(req.id, stage.index, c.index, attempt, dev, ",".join(stage.layers),
                              cost.macs, now, nbytes, reason=reason + ("+swap" if swap else ""))
            predicted = self.sup.predict(dev, cost.macs, nbytes + cost.bytes_out)
            due = time.monotonic() + predicted
            deadline = self.sup.dispatched(dev, (req.id, stage.index, c.index, attempt),
                                           cost.macs, nbytes + cost.bytes_out, predicted)
            left = deadline - time.monotonic()
            wait_s = max(wait_s, left)
            rec.deadline = now + left
            att = _Attempt(rec, deadline, due)
            req.attempts[c.index].append(att)
            req.index[(stage.index, c.index, attempt)] = att
            req.records.append(rec)
            self._event(req, "reassigned" if attempt else "sent", stage.index, c.index, dev, reason)
        stub = dataclasses.replace(stage, chunks=())
        self._deliver(dev, StageWork(req.id, stub, jobs, blobs, cfg.wire_dtype, swap, wait_s))

    def _deliver(self, dev: str, msg) -> None:
        """Send `msg` to `dev`'s worker: on its data plane if it has one, else as a message."""
        if self.peers is None and self.data_addrs:
            self.dial()
        self.send_data(self.data_addrs.get(dev), self.workers[dev], msg)

    def receiveMsg_Closed(self, msg, conn):
        """A data connection ended: what was sent on it is lost, so send it again (to another
        device if there is one; the same device may be fine, the connection is made anew)."""
        dev = next((d for d, a in self.data_addrs.items() if a == conn.address), None)
        if dev is None:
            return
        for req in list(self.requests.values()):
            for i, attempts in list(req.attempts.items()):
                lost = [a for a in attempts if a.pending and a.record.device == dev]
                for a in lost:
                    a.record.status, a.expired = "lost", True
                    self.sup.released(dev, (req.id, req.stage, i, a.record.attempt))
                if lost and req.slots[i] is None:
                    self._reassign(req, i, "connection-lost", avoid=dev)
                    if req.id not in self.requests:
                        break

    def _start_backlog(self) -> None:
        if self.membership is None or self._measuring_links():
            return
        backlog, self.backlog = self.backlog, []
        for req_msg, reply_to in backlog:
            self._start_request(req_msg, reply_to)

    # ------------------------------------------------------------ link measurement
    def _measuring_links(self) -> bool:
        """True while `auto` waits for the first measurement of the links to plan with
        (once over, devices that join later are measured while requests go on)."""
        return self.measure_links and not self.links.settled

    def _probe(self) -> None:
        for dev, probe in self.links.next_probes():
            self._deliver(dev, probe)
            self.wakeupAfter(self.links.timeout_s, payload=("probe", probe.seq))
        if not self.links.settled:
            self.links_reported = False
        elif not self.links_reported:
            self.links_reported = True
            log.info("links measured", median_mbit=round(self.links.bandwidth_mbit() or 0, 1),
                     shared=self.links.shared)
        self._start_backlog()

    def receiveMsg_LinkEcho(self, msg: LinkEcho, sender):
        link = self.links.echo(msg)
        if link is not None:
            log.info("link measured", device=msg.device, mbit=round(link.mbit, 1),
                     rtt_ms=round(link.rtt_s * 1e3, 2))
            self.sup.link_measured(msg.device, link.bytes_per_s)
        self._probe()

    def _event(self, req: _Request, kind: str, stage: int, chunk: int, device: str,
               reason: str = "") -> None:
        """Tell the caller what just happened, if it asked to follow the request live."""
        if req.events:
            self.send(req.reply_to, ChunkEvent(req.id, kind, stage, chunk, device, reason,
                                               time.time()))

    # ------------------------------------------------------------ results
    def _find(self, msg):
        req = self.requests.get(msg.request)
        if req is None:
            return None, None
        return req, req.index.get((msg.stage, msg.chunk, msg.attempt))

    def receiveMsg_ChunkResult(self, msg: ChunkResult, sender):
        now = time.time()
        req, att = self._find(msg)
        self.sup.heard_from(msg.device)
        if att is None or att.record.device != msg.device:
            return      # a request or stage already finished: late duplicate
        rec = att.record
        rec.returned, rec.received, rec.start, rec.end = now, msg.received, msg.start, msg.end
        rec.bytes_out = len(msg.payload)
        rec.halo_bytes, rec.halo_wait_s = msg.halo_bytes, msg.halo_wait_s
        key = (req.id, msg.stage, msg.chunk, msg.attempt)
        stage = req.plan.stages[msg.stage]
        chunk = stage.chunks[msg.chunk]
        compute = msg.end - msg.start
        comm = (now - rec.sent) - (msg.end - msg.received - compute)   # minus queueing on the worker
        if msg.stage != req.stage or req.slots[msg.chunk] is not None:
            rec.status = "late"    # first result already won; drop this duplicate
            self.sup.completed(msg.device, key, rec.macs, rec.bytes_in + rec.bytes_out,
                               compute, comm)
            return
        try:
            out = wire.decode(msg.payload)
            want = chunk_output_shape(stage, chunk)
            if tuple(out.shape) != want:
                raise wire.WireError(f"result shape {out.shape}, expected {want}")
        except wire.WireError as exc:
            log.warning("corrupt result; recomputing", request=req.id, stage=msg.stage,
                        chunk=msg.chunk, device=msg.device, error=str(exc))
            rec.status, rec.reason = "failed", rec.reason + f"; corrupt result: {exc}"
            self.sup.released(msg.device, key)
            self._event(req, "failed", msg.stage, msg.chunk, msg.device, "corrupt")
            self._reassign(req, msg.chunk, "corrupt")
            return
        rec.status = "won"
        self.sup.completed(msg.device, key, rec.macs, rec.bytes_in + rec.bytes_out,
                           compute, comm)
        self._event(req, "won", msg.stage, msg.chunk, msg.device)
        req.slots[msg.chunk] = out
        self._cancel_others(req, msg.chunk)
        if all(s is not None for s in req.slots):
            self._stage_done(req, stage)

    def receiveMsg_ChunkResults(self, msg: ChunkResults, sender):
        for result in msg.results:
            self.receiveMsg_ChunkResult(result, sender)

    def receiveMsg_ChunkFailed(self, msg: ChunkFailed, sender):
        req, att = self._find(msg)
        self.sup.heard_from(msg.device)
        if att is None or not att.pending or msg.stage != req.stage:
            return
        att.record.status = "failed"
        att.record.reason += f"; {msg.error}"
        self._event(req, "failed", msg.stage, msg.chunk, msg.device, msg.error)
        self.sup.released(msg.device, (req.id, msg.stage, msg.chunk, msg.attempt))
        log.warning("chunk failed on device", request=req.id, stage=msg.stage, chunk=msg.chunk,
                    device=msg.device, error=msg.error)
        if req.slots[msg.chunk] is None:
            self._reassign(req, msg.chunk, "failed")

    def _cancel_others(self, req: _Request, chunk: int) -> None:
        for a in req.attempts[chunk]:
            if a.pending:
                # an attempt past its deadline never came back in time: it was lost
                a.record.status = "lost" if a.expired else "cancelled"
                self.sup.released(a.record.device, (req.id, a.record.stage, chunk,
                                                    a.record.attempt))
                if a.record.device in self.workers:
                    self._deliver(a.record.device, Cancel(req.id, ((a.record.stage, chunk),)))

    def _stage_done(self, req: _Request, stage) -> None:
        try:
            req.tensors[stage.output] = merge(stage, req.slots)
        except PlanError as exc:
            self._fail(req, f"merge failed: {exc}")
            return
        for name in [t for t in req.tensors if req.plan.last_use.get(t, -1) <= stage.index
                     and t != stage.output]:
            del req.tensors[name]
        req.stage += 1
        if req.stage == len(req.plan.stages):
            self._finish(req, req.tensors[stage.output])
        else:
            self._start_stage(req)

    def _finish(self, req: _Request, logits) -> None:
        for rec in req.records:
            if rec.status == "pending":
                rec.status = "lost"
        del self.requests[req.id]
        self._report_in_flight()
        profile = req.plan.notes.get("profile", {})
        stats = {"plan": req.plan.name, "k": max(len(s.chunks) for s in req.plan.stages),
                 "stages": len(req.plan.stages), "allocator": self.cfg.allocator,
                 "wire_dtype": self.cfg.wire_dtype,
                 "retries": sum(1 for r in req.records if r.attempt > 0),
                 # the links an auto plan assumed (stated, measured or the defaults)
                 "bandwidth_mbit": profile.get("bandwidth_mbit"),
                 "shared_link": profile.get("shared_link")}
        self.send(req.reply_to, InferReply(req.id, np.asarray(logits), req.records,
                                           req.started, time.time(), stats))

    def _fail(self, req: _Request, error: str) -> None:
        log.warning("request failed", request=req.id, error=error)
        devices = {r.device for r in req.records if r.status == "pending"}
        for rec in req.records:
            if rec.status == "pending":
                rec.status = "lost"
                self.sup.released(rec.device, (req.id, rec.stage, rec.chunk, rec.attempt))
        for dev in devices:
            if self.workers.get(dev) is not None:
                self._deliver(dev, Cancel(req.id))
        self.requests.pop(req.id, None)
        self._report_in_flight()
        self.send(req.reply_to, InferError(req.id, error))

    # ------------------------------------------------------------ supervision
    def _reassign(self, req: _Request, chunk_index: int, reason: str,
                  avoid: str | None = None) -> None:
        """Send a chunk that has no active attempt to the best device not already holding it
        (nor `avoid`, unless no other is left)."""
        attempts = req.attempts[chunk_index]
        if any(a.active for a in attempts):
            return
        if len(attempts) >= MAX_ATTEMPTS:
            last = attempts[-1].record.reason if attempts else ""
            self._fail(req, f"chunk {req.stage}/{chunk_index} failed {len(attempts)} times "
                            f"({last.strip('; ')})")
            return
        holding = {a.record.device for a in attempts if a.pending}
        pool = [n for n in self.sup.usable() if n not in holding]
        if not pool:
            pool = [n for n in self.sup.members() if n not in holding]
        pool = [n for n in pool if self.workers.get(n) is not None]
        pool = [n for n in pool if n != avoid] or pool
        if not pool:
            return      # nobody to ask now; the tick retries once membership changes
        stage = req.plan.stages[req.stage]
        chunk = stage.chunks[chunk_index]
        dev = self.sup.best(pool, chunk.cost.macs, chunk.cost.bytes_in + chunk.cost.bytes_out)
        log.info("chunk reassigned", request=req.id, stage=req.stage, chunk=chunk_index,
                 to=dev, reason=reason,
                 previous=[a.record.device for a in attempts])
        self._send(req, stage, [chunk], dev, reason)

    def _retry_orphans(self, req: _Request) -> None:
        for i, slot in enumerate(req.slots):
            if slot is None and not any(a.active for a in req.attempts.get(i, [])):
                self._reassign(req, i, "retry")
                if req.id not in self.requests:
                    return

    def _ensure_tick(self) -> None:
        if not self.ticking and self.requests:
            self.ticking = True
            self.wakeupAfter(TICK_S, payload="tick")

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender):
        if isinstance(msg.payload, tuple) and msg.payload[0] == "probe":
            dev = self.links.expire(msg.payload[1])
            if dev is not None:
                log.warning("link probe unanswered; device not measured", device=dev)
                self._probe()
            return
        if msg.payload != "tick":
            return
        self.ticking = False
        now = time.monotonic()
        usable = set(self.sup.usable())
        for req in list(self.requests.values()):
            if now > req.timeout_at:
                self._fail(req, f"timed out after {self.cfg.request_timeout:.0f} s at stage "
                                f"{req.stage}/{len(req.plan.stages)}")
                continue
            if req.waiting:
                self._start_stage(req)
                continue
            for i, attempts in list(req.attempts.items()):
                if req.slots[i] is not None:
                    continue
                reason = None
                for a in attempts:
                    if not a.active:
                        continue
                    key = (req.id, req.stage, i, a.record.attempt)
                    if now >= a.deadline:
                        a.expired, reason = True, "deadline"
                        state = self.sup.missed(a.record.device, key)
                        log.info("chunk deadline missed", request=req.id, stage=req.stage,
                                 chunk=i, device=a.record.device, device_state=state)
                    elif now >= a.due and a.record.device not in usable:
                        a.expired, reason = True, reason or "device-lost"
                        self.sup.released(a.record.device, key)
                if reason:
                    self._reassign(req, i, reason)
                    if req.id not in self.requests:
                        break
            else:
                self._retry_orphans(req)
        self._ensure_tick()

    # ------------------------------------------------------------ misc
    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender):
        for req in list(self.requests.values()):
            self._fail(req, "requester shutting down")
        if self.cfg is not None:
            self.send(self.cfg.registrar, Unsubscribe())
        self.close_data_plane()

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender):
        log.warning("undeliverable or failing message", message=str(msg.poisonMessage)[:200])

    def receiveUnrecognizedMessage(self, msg, sender):
        log.debug("ignored message", type=type(msg).__name__)
