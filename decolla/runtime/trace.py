"""Per-chunk trace of one inference and its export to Chrome trace JSON (Perfetto).

Times `sent`/`returned` are the requester's clock (time.time()); `received`,
`start`, `end` are the worker's clock. On one host they agree; across hosts the
export shifts worker times by an NTP-style offset estimated per attempt.

A trace spans the caller's whole wait: from `submitted` (the caller sent the request)
to `answered` (the reply reached it), both on the caller's clock, which is the
requester's (the requester actor runs on the caller's host). Inside it, `started` to
`finished` is the requester running the plan; before it the request waited for a plan,
link measurement or earlier requests; after it the reply travelled back.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class ChunkRecord:
    """One attempt at one chunk."""
    request: str
    stage: int
    chunk: int
    attempt: int
    device: str
    layers: str
    macs: int
    sent: float
    bytes_in: int                  # encoded bytes of the slices it needed (shared ones counted once per message)
    deadline: float = 0.0          # requester clock
    returned: float | None = None  # requester clock, result arrived
    received: float | None = None  # worker clock, job arrived
    start: float | None = None     # worker clock
    end: float | None = None       # worker clock
    bytes_out: int = 0
    halo_bytes: int = 0            # halo rows this strip received from other devices (exchange)
    halo_wait_s: float = 0.0       # its device's wait for halos while computing it (exchange)
    status: str = "pending"        # won | late | lost | failed | cancelled | pending
    reason: str = ""               # why this attempt was made (first | deadline | device-lost | failed | corrupt)

    def offset(self) -> float:
        """Estimated worker-minus-requester clock offset for this attempt."""
        if None in (self.returned, self.received, self.end):
            return 0.0
        return ((self.received - self.sent) - (self.returned - self.end)) / 2.0


@dataclass
class Trace:
    """All chunk attempts of one inference."""
    request: str
    started: float                 # requester started the plan
    finished: float                # requester had the logits
    records: list[ChunkRecord] = field(default_factory=list)
    submitted: float | None = None  # caller sent the request (None: same as started)
    answered: float | None = None   # reply reached the caller (None: same as finished)

    @property
    def begin(self) -> float:
        return self.started if self.submitted is None else self.submitted

    @property
    def end(self) -> float:
        return self.finished if self.answered is None else self.answered

    def span(self) -> float:
        """Seconds from submission to answer: what `Result.latency` reports."""
        return self.end - self.begin

    def phases(self) -> dict[str, float]:
        """Where the span went, in seconds: waiting to start (plan choice, link
        measurement, queue, request transit), running the plan, the reply's way back."""
        return {"waiting": self.started - self.begin, "running": self.finished - self.started,
                "reply": self.end - self.finished}

    def reassigned(self) -> list[ChunkRecord]:
        """Attempts made because an earlier one missed its deadline, was lost or failed."""
        return [r for r in self.records if r.attempt > 0]

    def devices(self) -> dict[str, int]:
        """Chunks won per device."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.status == "won":
                out[r.device] = out.get(r.device, 0) + 1
        return out

    def bytes_moved(self) -> int:
        return sum(r.bytes_in + r.bytes_out + r.halo_bytes for r in self.records)

    def overhead_per_chunk(self) -> float:
        """Mean seconds a won chunk spent outside the worker's compute (messaging, codec, queueing)."""
        won = [r for r in self.records if r.status == "won" and r.returned is not None]
        if not won:
            return 0.0
        return sum((r.returned - r.sent) - (r.end - r.start) for r in won) / len(won)

    def to_chrome(self) -> dict:
        """Chrome trace-event JSON object: one track per device, one for the requester."""
        events = []
        tids = {"requester": 0}
        for r in self.records:
            tids.setdefault(r.device, len(tids))
        for name, tid in tids.items():
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid,
                           "args": {"name": name}})
        t0 = self.begin

        def us(t: float) -> float:
            return round((t - t0) * 1e6, 1)

        events.append({"ph": "X", "name": f"inference {self.request}", "cat": "request",
                       "pid": 1, "tid": 0, "ts": 0.0, "dur": us(self.end)})
        for name, a, b in (("waiting (plan, links, queue)", self.begin, self.started),
                           ("reply", self.finished, self.end)):
            if b > a:
                events.append({"ph": "X", "name": name, "cat": "request", "pid": 1, "tid": 0,
                               "ts": us(a), "dur": round((b - a) * 1e6, 1)})
        for r in self.records:
            args = {"stage": r.stage, "chunk": r.chunk, "attempt": r.attempt, "status": r.status,
                    "reason": r.reason, "layers": r.layers, "macs": r.macs,
                    "bytes_in": r.bytes_in, "bytes_out": r.bytes_out}
            tid = tids[r.device]
            label = f"s{r.stage}c{r.chunk}" + (f" retry{r.attempt}" if r.attempt else "")
            if r.start is not None and r.end is not None:
                off = r.offset()
                events.append({"ph": "X", "name": f"{label} compute", "cat": r.status,
                               "pid": 1, "tid": tid, "ts": us(r.start - off),
                               "dur": round((r.end - r.start) * 1e6, 1), "args": args})
            end = r.returned if r.returned is not None else max(r.deadline, r.sent)
            events.append({"ph": "X", "name": f"{label} {r.status}", "cat": "chunk",
                           "pid": 2, "tid": tid, "ts": us(r.sent),
                           "dur": round((min(end, self.finished) - r.sent) * 1e6, 1),
                           "args": args})
            if r.attempt > 0:
                events.append({"ph": "i", "s": "g", "name": f"reassign s{r.stage}c{r.chunk} -> "
                               f"{r.device} ({r.reason})", "pid": 1, "tid": 0, "ts": us(r.sent)})
        events.append({"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "compute"}})
        events.append({"ph": "M", "name": "process_name", "pid": 2,
                       "args": {"name": "chunk round trips (requester view)"}})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"request": self.request}}

    def save_chrome(self, path: str) -> None:
        """Write the Chrome trace JSON to `path` (open it in https://ui.perfetto.dev)."""
        with open(path, "w") as fh:
            json.dump(self.to_chrome(), fh)

    def as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def merge_chrome(traces: list[Trace]) -> dict:
    """Several inferences in one Chrome trace (one process per inference)."""
    events = []
    if not traces:
        return {"traceEvents": []}
    t0 = min(t.begin for t in traces)
    for i, t in enumerate(traces):
        shift = round((t.begin - t0) * 1e6, 1)
        for ev in t.to_chrome()["traceEvents"]:
            ev = dict(ev)
            ev["pid"] = ev.get("pid", 1) + 10 * i
            if "ts" in ev:
                ev["ts"] = ev["ts"] + shift
            if ev.get("name") == "process_name":
                ev["args"] = {"name": f"{t.request}: {ev['args']['name']}"}
            events.append(ev)
    return {"traceEvents": events, "displayTimeUnit": "ms"}
