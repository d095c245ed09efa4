"""The page's view of one request's trace: the JSON that static/timeline.js draws.

One row per chunk attempt, times in ms since the caller submitted the request (the
requester's clock, the span `Result.latency` reports); worker times are shifted by the attempt's clock-offset estimate, so rows from
devices on other hosts line up.
"""
from __future__ import annotations

from decolla.runtime.trace import ChunkRecord, Trace

# attempt status (decolla.runtime.trace) -> the page's word; 'late' and 'failed' are drawn red
_STATUS = {"won": "ok", "lost": "failed"}


def timeline(trace: Trace) -> dict:
    """{'devices': [name, ...], 'chunks': [row, ...]} for the page and the JSON API."""
    return {"devices": sorted({r.device for r in trace.records}),
            "span_ms": round(trace.span() * 1e3, 3),
            "chunks": [timeline_row(r, trace.begin) for r in trace.records]}


def timeline_row(r: ChunkRecord, t0: float) -> dict:
    """One attempt: send/receive on the requester's clock, start/end of its compute."""
    off = r.offset()
    start = r.sent if r.start is None else r.start - off
    if r.end is not None:
        end = r.end - off
    else:
        end = start if r.returned is None else r.returned
    receive = end if r.returned is None else r.returned
    status = "reassigned" if r.attempt and r.status == "won" else _STATUS.get(r.status, r.status)

    def ms(t: float) -> float:
        return round((t - t0) * 1e3, 3)

    return {"stage": r.stage, "chunk": r.chunk, "device": r.device, "send": ms(r.sent),
            "start": ms(start), "end": ms(end), "receive": ms(receive),
            "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "retries": r.attempt,
            "name": r.layers, "status": status}
