"""One inference request as a state machine: events in, actions out.

A request walks its plan stage by stage: a stage's chunks go to usable devices (those
for one device in one message, sharing one copy of their common input), their results
fill the stage's slots, and once all are in they are merged in order and the next stage
starts. A chunk not back by its deadline (t2, from the `Supervisor`'s prediction), or
late while its device is not usable, goes to another device. Results are keyed by
(stage, chunk, attempt): the first one wins, later ones are dropped, so a reassignment
can never corrupt an output.

Why apart from the actor: which chunk goes where, when an attempt counts as lost and
which result wins are the decisions worth testing, in any order of results, failures,
deadlines and membership changes. Here they read no clock (time comes in as `Time`),
open no socket and send nothing: each event returns the actions to carry out, so tests
drive a request in microseconds, as they drive the supervisor. The requester actor
(decolla.actors.requester) feeds the events and carries out the actions.

Events: `start`, `result`, `failed`, `local_done`, `local_failed`, `tick`,
`membership`, `connection_lost`, `cancel`. Actions: `Deliver` (a message for a
device's worker), `Tell` (one for the caller), `RunLocal` (compute a `local` stage on
this node, then report `local_done` or `local_failed` before any other event).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Collection, NamedTuple

import numpy as np

from decolla.allocators import NoLiveDevice
from decolla.cost import StageInfo
from decolla.log import get_logger
from decolla.plans import PlanError
from decolla.plans.compute import chunk_inputs, chunk_output_shape, merge
from decolla.runtime import wire
from decolla.runtime.messages import (Cancel, ChunkEvent, ChunkFailed, ChunkJob, ChunkResult,
                                      ConfigureRequester, InferError, InferReply, StageWork)
from decolla.runtime.supervisor import Supervisor
from decolla.runtime.trace import ChunkRecord

log = get_logger("requester")
MAX_ATTEMPTS = 6


class Time(NamedTuple):
    """The present on both clocks: `mono` for deadlines, `wall` for records and events
    (comparable with the workers' clocks)."""
    mono: float
    wall: float


@dataclasses.dataclass(frozen=True)
class Deliver:
    """Send `msg` (StageWork or Cancel) to `device`'s worker."""
    device: str
    msg: Any


@dataclasses.dataclass(frozen=True)
class Tell:
    """Send `msg` (ChunkEvent, InferReply or InferError) to the request's caller."""
    msg: Any


@dataclasses.dataclass(frozen=True)
class RunLocal:
    """Compute `chunk` of `stage` from `inputs` on this node."""
    stage: Any
    chunk: Any
    inputs: dict


@dataclasses.dataclass
class Context:
    """What requests share, kept by their requester: its configuration, the supervisor,
    the allocator, the devices' workers (name -> actor address, for those that have one)
    and their data-plane addresses."""
    cfg: ConfigureRequester
    sup: Supervisor
    allocator: Any
    workers: dict = dataclasses.field(default_factory=dict)
    data_addrs: dict = dataclasses.field(default_factory=dict)

    def update(self, devices: list, data_plane: bool = True) -> list[str]:
        """Take the registrar's devices (DeviceInfo; their data planes unless `data_plane`
        is off); returns those that just stopped being usable."""
        self.workers = {d.name: d.worker for d in devices if d.worker is not None}
        self.data_addrs = {d.name: tuple(d.data_addr) for d in devices
                           if d.data_addr and data_plane}
        return self.sup.update_membership(devices)

    def pool(self, holding: Collection[str] = ()) -> list[str]:
        """Devices with a worker that work may go to, usable ones if any, minus `holding`."""
        names = [n for n in self.sup.usable() if n not in holding] or \
            [n for n in self.sup.members() if n not in holding]
        return [n for n in names if n in self.workers]


class Attempt:
    """One attempt at a chunk: its trace record, when the supervisor expects it back
    (`due`) and when it gives up on it (`deadline`)."""
    __slots__ = ("record", "deadline", "due", "expired")

    def __init__(self, record: ChunkRecord, deadline: float, due: float):
        self.record, self.deadline, self.due, self.expired = record, deadline, due, False

    @property
    def pending(self) -> bool:
        return self.record.status == "pending"

    @property
    def active(self) -> bool:
        return self.pending and not self.expired


class Request:
    """One inference in flight. `done` once it replied or failed."""

    def __init__(self, rid: str, plan, image: np.ndarray, ctx: Context, t: Time,
                 events: bool = False, caller: Any = None):
        self.id, self.plan, self.ctx, self.events = rid, plan, ctx, events
        self.caller = caller      # where `Tell` goes (the actor's business, not ours)
        self.tensors = {"input": image}
        self.stage = 0
        self.slots: list = []
        self.attempts: dict[int, list[Attempt]] = {}     # current stage: chunk -> attempts
        self.index: dict[tuple, Attempt] = {}             # (stage, chunk, attempt) -> attempt
        self.blobs: dict = {}
        self.records: list[ChunkRecord] = []
        self.started = t.wall
        self.timeout_at = t.mono + ctx.cfg.request_timeout
        self.waiting = False      # no device to send the current stage to yet
        self.done = False

    # ------------------------------------------------------------ events
    def start(self, t: Time) -> list:
        out: list = []
        self._start_stage(t, out)
        return out

    def result(self, msg: ChunkResult, t: Time) -> list:
        """A chunk's result came back (possibly a late duplicate, possibly damaged)."""
        att = self.index.get((msg.stage, msg.chunk, msg.attempt))
        if self.done or att is None or att.record.device != msg.device:
            return []      # a stage already finished: late duplicate
        out: list = []
        rec, sup = att.record, self.ctx.sup
        rec.returned, rec.received, rec.start, rec.end = t.wall, msg.received, msg.start, msg.end
        rec.bytes_out = len(msg.payload)
        rec.halo_bytes, rec.halo_wait_s = msg.halo_bytes, msg.halo_wait_s
        key = (self.id, msg.stage, msg.chunk, msg.attempt)
        stage = self.plan.stages[msg.stage]
        compute = msg.end - msg.start
        comm = (t.wall - rec.sent) - (msg.end - msg.received - compute)  # minus queueing there
        if msg.stage != self.stage or self.slots[msg.chunk] is not None:
            rec.status = "late"    # the first result already won
            sup.completed(msg.device, key, rec.macs, rec.bytes_in + rec.bytes_out, compute, comm)
            return out
        try:
            y = wire.decode(msg.payload)
            want = chunk_output_shape(stage, stage.chunks[msg.chunk])
            if tuple(y.shape) != want:
                raise wire.WireError(f"result shape {y.shape}, expected {want}")
        except wire.WireError as exc:
            log.warning("corrupt result; recomputing", request=self.id, stage=msg.stage,
                        chunk=msg.chunk, device=msg.device, error=str(exc))
            rec.status, rec.reason = "failed", rec.reason + f"; corrupt result: {exc}"
            sup.released(msg.device, key)
            self._event("failed", msg.stage, msg.chunk, msg.device, t, out, "corrupt")
            self._reassign(msg.chunk, "corrupt", t, out)
            return out
        rec.status = "won"
        sup.completed(msg.device, key, rec.macs, rec.bytes_in + rec.bytes_out, compute, comm)
        self._event("won", msg.stage, msg.chunk, msg.device, t, out)
        self.slots[msg.chunk] = y
        self._cancel_others(msg.chunk, out)
        if all(s is not None for s in self.slots):
            self._stage_done(stage, t, out)
        return out

    def failed(self, msg: ChunkFailed, t: Time) -> list:
        """A worker could not compute a chunk."""
        att = self.index.get((msg.stage, msg.chunk, msg.attempt))
        if self.done or att is None or not att.pending or msg.stage != self.stage:
            return []
        out: list = []
        att.record.status = "failed"
        att.record.reason += f"; {msg.error}"
        self._event("failed", msg.stage, msg.chunk, msg.device, t, out, msg.error)
        self.ctx.sup.released(msg.device, (self.id, msg.stage, msg.chunk, msg.attempt))
        log.warning("chunk failed on device", request=self.id, stage=msg.stage, chunk=msg.chunk,
                    device=msg.device, error=msg.error)
        if self.slots[msg.chunk] is None:
            self._reassign(msg.chunk, "failed", t, out)
        return out

    def local_done(self, y: np.ndarray, start: Time, end: Time) -> list:
        """This node computed the `RunLocal` chunk between `start` and `end`."""
        out: list = []
        stage = self.plan.stages[self.stage]
        c = stage.chunks[0]
        rec = ChunkRecord(self.id, stage.index, c.index, 0, f"local:{self.ctx.cfg.node}",
                          ",".join(stage.layers), c.cost.macs, start.wall, 0, reason="local")
        rec.returned, rec.received, rec.start, rec.end = end.wall, start.wall, start.wall, end.wall
        rec.status = "won"
        self.records.append(rec)
        self.slots[c.index] = y
        self._stage_done(stage, end, out)
        return out

    def local_failed(self, t: Time) -> list:
        """This node could not compute the `RunLocal` chunk: the stage goes out instead."""
        out: list = []
        self._dispatch(self.plan.stages[self.stage], t, out)
        return out

    def tick(self, t: Time) -> list:
        """Time passed: the request's timeout, attempts past their deadline, and attempts
        late on a device no longer usable (moved once late, not at once: on a slow link a
        heartbeat can be stuck behind our own chunks, and the device is back a moment later)."""
        out: list = []
        if t.mono > self.timeout_at:
            self._fail(f"timed out after {self.ctx.cfg.request_timeout:.0f} s at stage "
                       f"{self.stage}/{len(self.plan.stages)}", out)
            return out
        if self.waiting:
            self._start_stage(t, out)
            return out
        sup = self.ctx.sup
        usable = set(sup.usable())
        for i, attempts in list(self.attempts.items()):
            if self.slots[i] is not None:
                continue
            reason = None
            for a in attempts:
                if not a.active:
                    continue
                key = (self.id, self.stage, i, a.record.attempt)
                if t.mono >= a.deadline:
                    a.expired, reason = True, "deadline"
                    state = sup.missed(a.record.device, key)
                    log.info("chunk deadline missed", request=self.id, stage=self.stage,
                             chunk=i, device=a.record.device, device_state=state)
                elif t.mono >= a.due and a.record.device not in usable:
                    a.expired, reason = True, reason or "device-lost"
                    sup.released(a.record.device, key)
            if reason:
                self._reassign(i, reason, t, out)
                if self.done:
                    return out
        self._retry_orphans(t, out)
        return out

    def membership(self, t: Time) -> list:
        """The devices changed: a waiting stage may start, chunks nobody holds may go out."""
        out: list = []
        if self.waiting:
            self._start_stage(t, out)
        else:
            self._retry_orphans(t, out)
        return out

    def connection_lost(self, device: str, t: Time) -> list:
        """The data connection to `device` ended: what it held is lost; send it again (to
        another device if there is one; the same one may be fine on a new connection)."""
        out: list = []
        for i, attempts in list(self.attempts.items()):
            lost = [a for a in attempts if a.pending and a.record.device == device]
            for a in lost:
                a.record.status, a.expired = "lost", True
                self.ctx.sup.released(device, (self.id, self.stage, i, a.record.attempt))
            if lost and self.slots[i] is None:
                self._reassign(i, "connection-lost", t, out, avoid=device)
                if self.done:
                    break
        return out

    def cancel(self, error: str) -> list:
        """Give up on the request (the requester is stopping)."""
        out: list = []
        self._fail(error, out)
        return out

    # ------------------------------------------------------------ stages
    def _start_stage(self, t: Time, out: list) -> None:
        stage = self.plan.stages[self.stage]
        self.waiting = False
        self.slots = [None] * len(stage.chunks)
        self.attempts = {c.index: [] for c in stage.chunks}
        self.blobs = {}
        if stage.local:
            c = stage.chunks[0]
            out.append(RunLocal(stage, c, chunk_inputs(c, self.tensors)))
        else:
            self._dispatch(stage, t, out)

    def _dispatch(self, stage, t: Time, out: list) -> None:
        """Allocate the stage's chunks to devices and send them (one message per device)."""
        ctx = self.ctx
        names = ctx.pool()
        if not names:
            self.waiting = True
            return
        info = StageInfo(stage.index, len(self.plan.stages), stage.kind)
        costs = [c.cost for c in stage.chunks]
        try:
            assignment = ctx.allocator.assign(info, costs, ctx.sup.device_states(names))
            if len(assignment) != len(costs) or any(a not in names for a in assignment):
                raise ValueError(f"allocator returned {assignment!r} for devices {names}")
        except NoLiveDevice:
            self.waiting = True
            return
        except Exception as exc:  # a broken policy must not stop inference
            log.warning("allocator failed; using round-robin", error=repr(exc))
            assignment = [names[i % len(names)] for i in range(len(costs))]
        groups: dict[str, list] = {}
        for chunk, dev in zip(stage.chunks, assignment):
            groups.setdefault(dev, []).append(chunk)
        swap = self._swap_map(stage, assignment)
        for dev, chunks in groups.items():
            self._send(stage, chunks, dev, "first", t, out, swap)

    def _swap_map(self, stage, assignment: list) -> dict | None:
        """For an exchange stage whose strips can reach each other (all on one device, or
        every device on the data plane): chunk index -> (device, data address)."""
        if not stage.exchange:
            return None
        addrs = self.ctx.data_addrs
        devices = set(assignment)
        if len(devices) > 1 and not all(addrs.get(d) for d in devices):
            return None
        return {c.index: (dev, addrs.get(dev)) for c, dev in zip(stage.chunks, assignment)}

    def _send(self, stage, chunks, dev: str, reason: str, t: Time, out: list,
              swap: dict | None = None) -> None:
        """Send `chunks` of `stage` to `dev` (as strips swapping halos when `swap` is given)."""
        cfg, sup = self.ctx.cfg, self.ctx.sup
        blobs, jobs, counted = {}, [], set()
        wait_s = 0.0
        for c in chunks:
            keys, nbytes = [], 0
            needs, cost = c.run_as(swap is not None)
            for need in needs:
                key = need.key
                if key not in self.blobs:
                    self.blobs[key] = wire.encode(need.select(self.tensors[need.tensor]),
                                                  cfg.wire_dtype, cfg.compress)
                blobs[key] = self.blobs[key]
                keys.append(key)
                if key not in counted:
                    counted.add(key)
                    nbytes += len(self.blobs[key])
            attempt = len(self.attempts[c.index])
            jobs.append(ChunkJob(c, tuple(keys), attempt))
            rec = ChunkRecord(self.id, stage.index, c.index, attempt, dev, ",".join(stage.layers),
                              cost.macs, t.wall, nbytes, reason=reason + ("+swap" if swap else ""))
            moved = nbytes + cost.bytes_out
            predicted = sup.predict(dev, cost.macs, moved)
            left = sup.timeout(dev, cost.macs, moved, predicted)
            sup.dispatched(dev, (self.id, stage.index, c.index, attempt), cost.macs, moved,
                           predicted)
            wait_s = max(wait_s, left)
            rec.deadline = t.wall + left
            att = Attempt(rec, t.mono + left, t.mono + predicted)
            self.attempts[c.index].append(att)
            self.index[(stage.index, c.index, attempt)] = att
            self.records.append(rec)
            self._event("reassigned" if attempt else "sent", stage.index, c.index, dev, t, out,
                        reason)
        stub = dataclasses.replace(stage, chunks=())
        out.append(Deliver(dev, StageWork(self.id, stub, jobs, blobs, cfg.wire_dtype, swap,
                                          wait_s)))

    def _cancel_others(self, chunk: int, out: list) -> None:
        for a in self.attempts[chunk]:
            if a.pending:
                # an attempt past its deadline never came back in time: it was lost
                a.record.status = "lost" if a.expired else "cancelled"
                self.ctx.sup.released(a.record.device, (self.id, a.record.stage, chunk,
                                                        a.record.attempt))
                if a.record.device in self.ctx.workers:
                    out.append(Deliver(a.record.device, Cancel(self.id, ((a.record.stage,
                                                                            chunk),))))

    def _stage_done(self, stage, t: Time, out: list) -> None:
        try:
            self.tensors[stage.output] = merge(stage, self.slots)
        except PlanError as exc:
            self._fail(f"merge failed: {exc}", out)
            return
        for name in [n for n in self.tensors if self.plan.last_use.get(n, -1) <= stage.index
                     and n != stage.output]:
            del self.tensors[name]
        self.stage += 1
        if self.stage == len(self.plan.stages):
            self._finish(self.tensors[stage.output], t, out)
        else:
            self._start_stage(t, out)

    def _finish(self, logits, t: Time, out: list) -> None:
        for rec in self.records:
            if rec.status == "pending":
                rec.status = "lost"
        self.done = True
        cfg, plan = self.ctx.cfg, self.plan
        profile = plan.notes.get("profile", {})
        stats = {"plan": plan.name, "k": max(len(s.chunks) for s in plan.stages),
                 "stages": len(plan.stages), "allocator": cfg.allocator,
                 "wire_dtype": cfg.wire_dtype,
                 "retries": sum(1 for r in self.records if r.attempt > 0),
                 # the links an auto plan assumed (stated, measured or the defaults)
                 "bandwidth_mbit": profile.get("bandwidth_mbit"),
                 "shared_link": profile.get("shared_link")}
        out.append(Tell(InferReply(self.id, np.asarray(logits), self.records, self.started,
                                   t.wall, stats)))

    def _fail(self, error: str, out: list) -> None:
        log.warning("request failed", request=self.id, error=error)
        devices = {r.device for r in self.records if r.status == "pending"}
        for rec in self.records:
            if rec.status == "pending":
                rec.status = "lost"
                self.ctx.sup.released(rec.device, (self.id, rec.stage, rec.chunk, rec.attempt))
        out.extend(Deliver(dev, Cancel(self.id)) for dev in sorted(devices)
                   if dev in self.ctx.workers)
        self.done = True
        out.append(Tell(InferError(self.id, error)))

    # ------------------------------------------------------------ supervision
    def _reassign(self, chunk_index: int, reason: str, t: Time, out: list,
                  avoid: str | None = None) -> None:
        """Send a chunk that has no active attempt to the best device not already holding it
        (nor `avoid`, unless no other is left)."""
        attempts = self.attempts[chunk_index]
        if any(a.active for a in attempts):
            return
        if len(attempts) >= MAX_ATTEMPTS:
            last = attempts[-1].record.reason if attempts else ""
            self._fail(f"chunk {self.stage}/{chunk_index} failed {len(attempts)} times "
                       f"({last.strip('; ')})", out)
            return
        pool = self.ctx.pool(holding={a.record.device for a in attempts if a.pending})
        pool = [n for n in pool if n != avoid] or pool
        if not pool:
            return      # nobody to ask now; retried at a tick or membership change
        stage = self.plan.stages[self.stage]
        chunk = stage.chunks[chunk_index]
        dev = self.ctx.sup.best(pool, chunk.cost.macs, chunk.cost.bytes_in + chunk.cost.bytes_out)
        log.info("chunk reassigned", request=self.id, stage=self.stage, chunk=chunk_index,
                 to=dev, reason=reason, previous=[a.record.device for a in attempts])
        self._send(stage, [chunk], dev, reason, t, out)

    def _retry_orphans(self, t: Time, out: list) -> None:
        for i, slot in enumerate(self.slots):
            if slot is None and not any(a.active for a in self.attempts.get(i, [])):
                self._reassign(i, "retry", t, out)
                if self.done:
                    return

    def _event(self, kind: str, stage: int, chunk: int, device: str, t: Time, out: list,
               reason: str = "") -> None:
        """Tell the caller what just happened, if it asked to follow the request live."""
        if self.events:
            out.append(Tell(ChunkEvent(self.id, kind, stage, chunk, device, reason, t.wall)))
