"""Trace: one span from submission to answer, on one clock, split into phases."""
from __future__ import annotations

from decolla.runtime.events import EventBatches
from decolla.runtime.messages import ChunkEvent
from decolla.runtime.trace import ChunkRecord, Trace


def _trace() -> Trace:
    rec = ChunkRecord("r", 0, 0, 0, "dev1", "conv", 10, sent=100.30, bytes_in=40,
                      returned=100.50, received=100.31, start=100.32, end=100.49,
                      bytes_out=60, halo_bytes=8, status="won")
    return Trace("r", 100.25, 100.55, [rec], submitted=100.0, answered=100.6)


def test_span_is_submission_to_answer_and_phases_add_up():
    t = _trace()
    assert abs(t.span() - 0.6) < 1e-9
    ph = t.phases()
    assert abs(ph["waiting"] - 0.25) < 1e-9 and abs(ph["reply"] - 0.05) < 1e-9
    assert abs(sum(ph.values()) - t.span()) < 1e-9
    assert t.bytes_moved() == 108


def test_chrome_trace_spans_what_latency_reports():
    t = _trace()
    events = t.to_chrome()["traceEvents"]
    (whole,) = [e for e in events if e.get("name", "").startswith("inference")]
    assert whole["ts"] == 0.0 and abs(whole["dur"] - 0.6e6) < 1
    (wait,) = [e for e in events if e.get("name", "").startswith("waiting")]
    assert abs(wait["dur"] - 0.25e6) < 1
    assert all(0 <= e["ts"] <= whole["dur"] for e in events if "ts" in e)


def test_a_trace_without_caller_times_spans_the_run():
    t = Trace("r", 5.0, 5.5)
    assert t.span() == 0.5 and t.phases()["waiting"] == 0.0


def _ev(i: int) -> ChunkEvent:
    return ChunkEvent("r", "sent", 0, i, "dev1", "", float(i))


def test_events_wait_for_their_batch_then_go_together():
    b = EventBatches(interval=0.1)
    for i in range(300):
        b.add("r", "caller", _ev(i), now=10.0 + i * 1e-4)
    assert b.due(10.05) == []
    ((caller, msg),) = b.due(10.11)
    assert caller == "caller" and [e.chunk for e in msg.events] == list(range(300))
    assert b.due(11.0) == [] and b.take("r") is None


def test_events_left_go_before_the_reply():
    b = EventBatches()
    b.add("r", "c", _ev(0), now=1.0)
    b.add("q", "c", _ev(1), now=1.0)
    caller, msg = b.take("r")
    assert msg.request == "r" and len(msg.events) == 1
    assert [m.request for _, m in b.due(5.0)] == ["q"]
