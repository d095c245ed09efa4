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
(decolla.actors.requester) feeds the events and carries out the actions. Each attempt's
bookkeeping (its record, the supervisor's count of it, its deadline) is
decolla.runtime.attempts'; what to do when one ends is decided here.

Events: `start`, `result`, `failed`, `local_done`, `local_failed`, `tick`,
`membership`, `connection_lost`, `cancel`. Actions: `Deliver` (a message for a
device's worker), `Tell` (one for the caller), `RunLocal` (compute a `local` stage on
this node, then report `local_done` or `local_failed` before any other event).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Collection

import numpy as np

from decolla.allocators import NoLiveDevice
from decolla.cost import StageInfo
from decolla.log import get_logger
from decolla.plans import PlanError
from decolla.plans.compute import chunk_inputs, chunk_output_shape, merge
from decolla.runtime import wire
from decolla.runtime.attempts import Ledger, Time
from decolla.runtime.messages import (Cancel, ChunkEvent, ChunkFailed, ChunkJob, ChunkResult,
                                      ConfigureRequester, InferError, InferReply, StageWork)
from decolla.runtime.supervisor import Supervisor
from decolla.runtime.trace import ChunkRecord

log = get_logger("requester")
MAX_ATTEMPTS = 6


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
    and their data-plane addresses; from them, which devices get a stage's chunks."""
    cfg: ConfigureRequester
    sup: Supervisor
    allocator: Any
    workers: dict = dataclasses.field(default_factory=dict)
    data_addrs: dict = dataclasses.field(default_factory=dict)
    # The requester is asking where the registrar is (the leader may have restarted and
    # replaced every worker): a chunk out of attempts waits for the next membership
    # instead of failing; the request's timeout still bounds it.
    looking: bool = False

    def update(self, devices: list, data_plane: bool = True) -> list[str]:
        """Take the registrar's devices (DeviceInfo; their data planes unless `data_plane`
        is off); returns those that just stopped being usable."""
        self.looking = False
        self.workers = {d.name: d.worker for d in devices if d.worker is not None}
        self.data_addrs = {d.name: tuple(d.data_addr) for d in devices
                           if d.data_addr and data_plane}
        return self.sup.update_membership(devices)

    def compress_for(self, dev: str) -> bool:
        """Whether chunk traffic with `dev` is lz4-compressed: as configured, or ("auto")
        where the device's link (as the supervisor estimates it) is slow enough to pay."""
        if self.cfg.compress != "auto":
            return bool(self.cfg.compress)
        d = self.sup.devices.get(dev)
        return d is not None and wire.compress_pays(1.0 / d.sec_per_byte)

    def pool(self, holding: Collection[str] = ()) -> list[str]:
        """Devices with a worker that work may go to, minus `holding`: usable ones if any
        (those not under suspicion first), else the members."""
        names = [n for n in self.sup.preferred() if n not in holding] or \
            [n for n in self.sup.usable() if n not in holding] or \
            [n for n in self.sup.members() if n not in holding]
        return [n for n in names if n in self.workers]

    def assign(self, stage, stages: int, names: list[str]) -> list[str] | None:
        """The device of `names` for each chunk of `stage` (of `stages`), as the allocator
        decides; None if it finds no live device."""
        info = StageInfo(stage.index, stages, stage.kind)
        costs = [c.cost for c in stage.chunks]
        try:
            assignment = self.allocator.assign(info, costs, self.sup.device_states(names))
            if len(assignment) != len(costs) or any(a not in names for a in assignment):
                raise ValueError(f"allocator returned {assignment!r} for devices {names}")
        except NoLiveDevice:
            return None
        except Exception as exc:  # a broken policy must not stop inference
            log.warning("allocator failed; using round-robin", error=repr(exc))
            assignment = [names[i % len(names)] for i in range(len(costs))]
        return assignment

    def resend_to(self, chunk, holding: Collection[str], avoid: str | None) -> str | None:
        """The best device to send `chunk` to again, of those not `holding` it (nor
        `avoid`, unless no other is left); None if there is none."""
        pool = self.pool(holding)
        pool = [n for n in pool if n != avoid] or pool
        if not pool:
            return None
        return self.sup.best(pool, chunk.cost.macs, chunk.cost.bytes_in + chunk.cost.bytes_out)

    def swap_map(self, stage, assignment: list[str]) -> dict | None:
        """For an exchange stage whose strips can reach each other (all on one device, or
        every device on the data plane): chunk index -> (device, data address)."""
        if not stage.exchange:
            return None
        devices = set(assignment)
        if len(devices) > 1 and not all(self.data_addrs.get(d) for d in devices):
            return None
        return {c.index: (dev, self.data_addrs.get(dev))
                for c, dev in zip(stage.chunks, assignment)}


def decode_result(stage, msg: ChunkResult) -> np.ndarray:
    """The chunk result `msg` carries, if it has the shape its chunk's must (WireError if not)."""
    y = wire.decode(msg.payload)
    want = chunk_output_shape(stage, stage.chunks[msg.chunk])
    if tuple(y.shape) != want:
        raise wire.WireError(f"result shape {y.shape}, expected {want}")
    return y


def reply_stats(plan, cfg: ConfigureRequester, records: list[ChunkRecord]) -> dict:
    """What a reply says about how its request ran."""
    profile = plan.notes.get("profile", {})
    return {"plan": plan.name, "k": max(len(s.chunks) for s in plan.stages),
            "stages": len(plan.stages), "allocator": cfg.allocator, "wire_dtype": cfg.wire_dtype,
            "retries": sum(1 for r in records if r.attempt > 0),
            # the links an auto plan assumed (stated, measured or the defaults)
            "bandwidth_mbit": profile.get("bandwidth_mbit"),
            "shared_link": profile.get("shared_link")}


class Request:
    """One inference in flight. `done` once it replied or failed."""

    def __init__(self, rid: str, plan, image: np.ndarray, ctx: Context, t: Time,
                 events: bool = False, caller: Any = None):
        self.id, self.plan, self.ctx, self.events = rid, plan, ctx, events
        self.caller = caller      # where `Tell` goes (the actor's business, not ours)
        self.tensors = {"input": image}
        self.stage = 0
        self.ledger = Ledger(rid, ctx.sup)
        self.blobs: dict = {}     # current stage: input slices encoded, by (blob key, compressed, sealed)
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
        ledger = self.ledger
        att = ledger.index.get((msg.stage, msg.chunk, msg.attempt))
        if self.done or att is None or att.record.device != msg.device:
            return []      # a stage already finished: late duplicate
        out: list = []
        ledger.arrived(att, msg, t)
        if msg.stage != self.stage or ledger.slots[msg.chunk] is not None:
            ledger.late(att)    # the first result already won
            return out
        stage = self.plan.stages[msg.stage]
        try:
            y = decode_result(stage, msg)
        except wire.WireError as exc:
            log.warning("corrupt result; recomputing", request=self.id, stage=msg.stage,
                        chunk=msg.chunk, device=msg.device, error=str(exc))
            ledger.failed(att, f"corrupt result: {exc}")
            self._event("failed", msg.stage, msg.chunk, msg.device, t, out, "corrupt")
            self._reassign(msg.chunk, "corrupt", t, out)
            return out
        others = ledger.won(att, y)
        self._event("won", msg.stage, msg.chunk, msg.device, t, out)
        out.extend(Deliver(dev, Cancel(self.id, ((msg.stage, msg.chunk),))) for dev in others
                   if dev in self.ctx.workers)
        if ledger.complete:
            self._stage_done(stage, t, out)
        return out

    def failed(self, msg: ChunkFailed, t: Time) -> list:
        """A worker could not compute a chunk."""
        att = self.ledger.index.get((msg.stage, msg.chunk, msg.attempt))
        if self.done or att is None or not att.pending or msg.stage != self.stage:
            return []
        out: list = []
        self.ledger.failed(att, msg.error)
        self._event("failed", msg.stage, msg.chunk, msg.device, t, out, msg.error)
        log.warning("chunk failed on device", request=self.id, stage=msg.stage, chunk=msg.chunk,
                    device=msg.device, error=msg.error)
        if self.ledger.slots[msg.chunk] is None:
            self._reassign(msg.chunk, "failed", t, out)
        return out

    def local_done(self, y: np.ndarray, start: Time, end: Time) -> list:
        """This node computed the `RunLocal` chunk between `start` and `end`."""
        out: list = []
        stage = self.plan.stages[self.stage]
        self.ledger.local(stage, f"local:{self.ctx.cfg.node}", y, start, end)
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
        usable = set(self.ctx.sup.usable())
        for i in list(self.ledger.attempts):
            reason = self.ledger.expire(i, t.mono, usable)
            if reason:
                self._reassign(i, reason, t, out)
                if self.done:
                    return out
        self._retry_orphans(t, out)
        return out

    def membership(self, t: Time) -> list:
        """The devices changed: a waiting stage may start; chunks nobody holds, or held by
        a worker since replaced, go out."""
        out: list = []
        self.ledger.replaced()
        if self.waiting:
            self._start_stage(t, out)
        else:
            self._retry_orphans(t, out)
        return out

    def connection_lost(self, device: str, t: Time) -> list:
        """The data connection to `device` ended: what it held is lost; send it again (to
        another device if there is one; the same one may be fine on a new connection)."""
        out: list = []
        for i in list(self.ledger.attempts):
            if self.ledger.lose(i, device) and self.ledger.slots[i] is None:
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
        self.ledger.begin(stage)
        self.blobs = {}
        if stage.local:
            c = stage.chunks[0]
            out.append(RunLocal(stage, c, chunk_inputs(c, self.tensors)))
        else:
            self._dispatch(stage, t, out)

    def _dispatch(self, stage, t: Time, out: list) -> None:
        """Allocate the stage's chunks to devices and send them (one message per device)."""
        names = self.ctx.pool()
        assignment = self.ctx.assign(stage, len(self.plan.stages), names) if names else None
        if assignment is None:
            self.waiting = True
            return
        groups: dict[str, list] = {}
        for chunk, dev in zip(stage.chunks, assignment):
            groups.setdefault(dev, []).append(chunk)
        swap = self.ctx.swap_map(stage, assignment)
        for dev, chunks in groups.items():
            self._send(stage, chunks, dev, "first", t, out, swap)

    def _send(self, stage, chunks, dev: str, reason: str, t: Time, out: list,
              swap: dict | None = None) -> None:
        """Send `chunks` of `stage` to `dev` (as strips swapping halos when `swap` is given)."""
        cfg = self.ctx.cfg
        compress = self.ctx.compress_for(dev)
        sealed = dev in self.ctx.data_addrs     # a data-plane frame: its tag checks the bytes
        blobs, jobs, counted = {}, [], set()
        wait_s = 0.0
        for c in chunks:
            keys, nbytes = [], 0
            needs, cost = c.run_as(swap is not None)
            for need in needs:
                key = need.key
                blob = self.blobs.get((key, compress, sealed))
                if blob is None:              # encoded once per stage, whoever needs it
                    blob = self.blobs[key, compress, sealed] = wire.encode(
                        need.select(self.tensors[need.tensor]), cfg.wire_dtype, compress,
                        checksum=not sealed)
                blobs[key] = blob
                keys.append(key)
                if key not in counted:
                    counted.add(key)
                    nbytes += len(blob)
            att, left = self.ledger.open(stage, c.index, dev, cost, nbytes,
                                         reason + ("+swap" if swap else ""), t)
            jobs.append(ChunkJob(c, tuple(keys), att.record.attempt))
            wait_s = max(wait_s, left)
            self._event("reassigned" if att.record.attempt else "sent", stage.index, c.index,
                        dev, t, out, reason)
        stub = dataclasses.replace(stage, chunks=())
        out.append(Deliver(dev, StageWork(self.id, stub, jobs, blobs, cfg.wire_dtype, swap,
                                          wait_s, compress)))

    def _stage_done(self, stage, t: Time, out: list) -> None:
        try:
            self.tensors[stage.output] = merge(stage, self.ledger.slots)
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
        records = self.ledger.records
        for rec in records:
            if rec.status == "pending":
                rec.status = "lost"
        self.done = True
        out.append(Tell(InferReply(self.id, np.asarray(logits), records, self.started, t.wall,
                                   reply_stats(self.plan, self.ctx.cfg, records))))

    def _fail(self, error: str, out: list) -> None:
        log.warning("request failed", request=self.id, error=error)
        devices = {rec.device for rec in self.ledger.abandon()}
        out.extend(Deliver(dev, Cancel(self.id)) for dev in sorted(devices)
                   if dev in self.ctx.workers)
        self.done = True
        out.append(Tell(InferError(self.id, error)))

    # ------------------------------------------------------------ supervision
    def _reassign(self, chunk_index: int, reason: str, t: Time, out: list,
                  avoid: str | None = None) -> None:
        """Send a chunk that has no active attempt to the best device not already holding it
        (nor `avoid`, unless no other is left); when every device holds it (attempts past
        their deadline, kept in case they answer late), to the best device again: a worker
        that died with them never answers, and its device may have a new one. A chunk
        that used up its attempts on the current workers fails the request, unless the
        requester is looking for the leader (then it waits for the new workers)."""
        attempts = self.ledger.attempts[chunk_index]
        if any(a.active for a in attempts):
            return
        tries = self.ledger.tries(chunk_index)
        if tries >= MAX_ATTEMPTS:
            if not self.ctx.looking:
                last = attempts[-1].record.reason if attempts else ""
                self._fail(f"chunk {self.stage}/{chunk_index} failed {tries} times "
                           f"({last.strip('; ')})", out)
            return
        stage = self.plan.stages[self.stage]
        chunk = stage.chunks[chunk_index]
        held = {a.record.device for a in attempts if a.pending}
        dev = self.ctx.resend_to(chunk, held, avoid) or self.ctx.resend_to(chunk, (), avoid)
        if dev is None:
            return      # nobody to ask now; retried at a tick or membership change
        log.info("chunk reassigned", request=self.id, stage=self.stage, chunk=chunk_index,
                 to=dev, reason=reason, previous=[a.record.device for a in attempts])
        self._send(stage, [chunk], dev, reason, t, out)

    def _retry_orphans(self, t: Time, out: list) -> None:
        for i in self.ledger.orphans():
            self._reassign(i, "retry", t, out)
            if self.done:
                return

    def _event(self, kind: str, stage: int, chunk: int, device: str, t: Time, out: list,
               reason: str = "") -> None:
        """Tell the caller what just happened, if it asked to follow the request live."""
        if self.events:
            out.append(Tell(ChunkEvent(self.id, kind, stage, chunk, device, reason, t.wall)))
