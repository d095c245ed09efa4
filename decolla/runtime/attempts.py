"""A request's attempts at its chunks, and what the supervisor hears of them.

An attempt is opened when its chunk is sent (the supervisor counts it as outstanding on
its device and gives it a deadline). It stops counting when it won or came late (the
supervisor also learns the device's speed), failed, was lost or cancelled, or is no
longer expected: past its deadline (a miss against its device) or late on a device gone;
such an attempt may still come back and win. Why apart from decolla.runtime.request: the
request decides what to do when an attempt ends (send the chunk again, merge the stage,
give up); the bookkeeping of each attempt (its trace record, deadline and the
supervisor's calls, keyed by (request, stage, chunk, attempt)) stays in one place.
"""
from __future__ import annotations

from typing import Collection, NamedTuple

from decolla.cost import ChunkCost
from decolla.log import get_logger
from decolla.runtime.messages import ChunkResult
from decolla.runtime.supervisor import Supervisor
from decolla.runtime.trace import ChunkRecord

log = get_logger("requester")


class Time(NamedTuple):
    """The present on both clocks: `mono` for deadlines, `wall` for records and events
    (comparable with the workers' clocks)."""
    mono: float
    wall: float


class Attempt:
    """One attempt at a chunk: its trace record, when the supervisor expects it back
    (`due`), when it gives up on it (`deadline`) and which worker of its device it went
    to (`incarnation`)."""
    __slots__ = ("record", "deadline", "due", "expired", "incarnation")

    def __init__(self, record: ChunkRecord, deadline: float, due: float, incarnation: str = ""):
        self.record, self.deadline, self.due, self.expired = record, deadline, due, False
        self.incarnation = incarnation

    @property
    def pending(self) -> bool:
        return self.record.status == "pending"

    @property
    def active(self) -> bool:
        return self.pending and not self.expired


class Ledger:
    """Every attempt of one request, by (stage, chunk, attempt), with the trace records,
    and the chunks of its current stage: each one's attempts and its result once one won."""

    def __init__(self, rid: str, sup: Supervisor):
        self.rid, self.sup = rid, sup
        self.index: dict[tuple, Attempt] = {}
        self.records: list[ChunkRecord] = []
        self.slots: list = []                          # current stage: chunk -> result won
        self.attempts: dict[int, list[Attempt]] = {}   # current stage: chunk -> attempts

    def begin(self, stage) -> None:
        """Start on `stage`: none of its chunks has an attempt or a result yet."""
        self.slots = [None] * len(stage.chunks)
        self.attempts = {c.index: [] for c in stage.chunks}

    @property
    def complete(self) -> bool:
        """Every chunk of the current stage has its result."""
        return all(s is not None for s in self.slots)

    def orphans(self) -> list[int]:
        """Chunks of the current stage with no result and no attempt still expected."""
        return [i for i, slot in enumerate(self.slots)
                if slot is None and not any(a.active for a in self.attempts.get(i, []))]

    def tries(self, chunk: int) -> int:
        """Attempts at `chunk` that went to its devices' current workers: those that went to
        a worker since replaced (a restarted device, a new leader's workers) say nothing of
        whether the chunk can be computed."""
        return sum(a.incarnation == self.sup.incarnation(a.record.device)
                   for a in self.attempts.get(chunk, []))

    def replaced(self) -> None:
        """Attempts still out on a worker that has been replaced died with it: lost."""
        for atts in self.attempts.values():
            for a in atts:
                if a.pending and a.incarnation != self.sup.incarnation(a.record.device):
                    a.record.status, a.expired = "lost", True
                    self.sup.released(a.record.device, self._key(a.record))

    def _key(self, rec: ChunkRecord) -> tuple:
        return (self.rid, rec.stage, rec.chunk, rec.attempt)

    # ------------------------------------------------------------ opening
    def open(self, stage, chunk: int, device: str, cost: ChunkCost, bytes_in: int, reason: str,
             t: Time) -> tuple[Attempt, float]:
        """A new attempt at `chunk` of `stage`, sent to `device` at `t` with `bytes_in`
        bytes of inputs; returns it and the seconds the supervisor gives it."""
        rec = ChunkRecord(self.rid, stage.index, chunk, len(self.attempts[chunk]), device,
                          ",".join(stage.layers), cost.macs, t.wall, bytes_in, reason=reason)
        moved = bytes_in + cost.bytes_out
        predicted = self.sup.predict(device, cost.macs, moved)
        left = self.sup.timeout(device, cost.macs, moved, predicted)
        self.sup.dispatched(device, self._key(rec), cost.macs, moved, predicted)
        rec.deadline = t.wall + left
        att = Attempt(rec, t.mono + left, t.mono + predicted, self.sup.incarnation(device))
        self.attempts[chunk].append(att)
        self.index[(rec.stage, chunk, rec.attempt)] = att
        self.records.append(rec)
        return att, left

    def local(self, stage, device: str, y, start: Time, end: Time) -> None:
        """`stage`'s one chunk was computed on this node (`device`) between `start` and
        `end`: no attempt went out, its record says so."""
        c = stage.chunks[0]
        rec = ChunkRecord(self.rid, stage.index, c.index, 0, device, ",".join(stage.layers),
                          c.cost.macs, start.wall, 0, reason="local")
        rec.returned, rec.received, rec.start, rec.end = end.wall, start.wall, start.wall, end.wall
        rec.status = "won"
        self.records.append(rec)
        self.slots[c.index] = y

    # ------------------------------------------------------------ closing
    def arrived(self, att: Attempt, msg: ChunkResult, t: Time) -> None:
        """Note when and how `att`'s result came back (before judging it)."""
        rec = att.record
        rec.returned, rec.received, rec.start, rec.end = t.wall, msg.received, msg.start, msg.end
        rec.bytes_out = len(msg.payload)
        rec.halo_bytes, rec.halo_wait_s = msg.halo_bytes, msg.halo_wait_s

    def late(self, att: Attempt) -> None:
        """`att`'s result came after another attempt's had won: it still says how fast
        its device is."""
        att.record.status = "late"
        self._completed(att.record)

    def won(self, att: Attempt, y) -> list[str]:
        """`att`'s result `y` is its chunk's: the chunk's other attempts still out are
        cancelled (lost, those no longer expected). Returns their devices."""
        rec = att.record
        rec.status = "won"
        self._completed(rec)
        self.slots[rec.chunk] = y
        others = []
        for a in self.attempts[rec.chunk]:
            if a.pending:
                # an attempt past its deadline never came back in time: it was lost
                a.record.status = "lost" if a.expired else "cancelled"
                self.sup.released(a.record.device, self._key(a.record))
                others.append(a.record.device)
        return others

    def _completed(self, rec: ChunkRecord) -> None:
        compute = rec.end - rec.start
        # the round trip minus the time the chunk waited for the device
        comm = (rec.returned - rec.sent) - (rec.end - rec.received - compute)
        self.sup.completed(rec.device, self._key(rec), rec.macs, rec.bytes_in + rec.bytes_out,
                           compute, comm)

    def failed(self, att: Attempt, why: str) -> None:
        """`att` brought no usable result, for reason `why`."""
        att.record.status = "failed"
        att.record.reason += f"; {why}"
        self.sup.released(att.record.device, self._key(att.record))

    def lose(self, chunk: int, device: str) -> bool:
        """The attempts at `chunk` out on `device` are lost; returns whether there were any."""
        lost = [a for a in self.attempts[chunk] if a.pending and a.record.device == device]
        for a in lost:
            a.record.status, a.expired = "lost", True
            self.sup.released(device, self._key(a.record))
        return bool(lost)

    def expire(self, chunk: int, now: float, usable: Collection[str]) -> str | None:
        """Stop expecting `chunk`'s attempts past their deadline at monotonic time `now`,
        or past their due time on a device not `usable`. Returns why ('deadline' if any
        missed one, else 'device-lost'), None if the chunk needs nothing new."""
        if self.slots[chunk] is not None:
            return None
        reason = None
        for a in self.attempts[chunk]:
            if not a.active:
                continue
            if now >= a.deadline:
                a.expired, reason = True, "deadline"
                state = self.sup.missed(a.record.device, self._key(a.record))
                log.info("chunk deadline missed", request=self.rid, stage=a.record.stage,
                         chunk=chunk, device=a.record.device, device_state=state)
            elif now >= a.due and a.record.device not in usable:
                a.expired, reason = True, reason or "device-lost"
                self.sup.released(a.record.device, self._key(a.record))
        return reason

    def abandon(self) -> list[ChunkRecord]:
        """The request is over: every attempt still out is lost. Returns their records."""
        out = [rec for rec in self.records if rec.status == "pending"]
        for rec in out:
            rec.status = "lost"
            self.sup.released(rec.device, self._key(rec))
        return out
