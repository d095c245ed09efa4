"""bench.single_testbed's arithmetic, from made-up samples: intervals of `single`'s one
chunk and per-thread CPU per request (the testbed run itself needs root)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench import single_testbed  # noqa: E402


def _row(latency_ms: float, sent, received, start, end, returned) -> dict:
    return {"latency_s": latency_ms / 1e3,
            "timeline": [[0, 0, "dev1", "won", sent, received, start, end, returned]]}


def test_intervals_leave_out_requests_whose_first_attempt_did_not_complete():
    rows = [_row(50, 3, 4, 8, 46, 48), _row(52, 3, 5, 9, 47, 50),
            _row(60, 3, None, None, None, None)]          # lost, re-sent elsewhere
    iv = single_testbed.intervals(rows)
    assert iv["requests"] == 3 and iv["requests with one attempt that completed"] == 2
    assert iv["sent -> received"] == pytest.approx(1.5)
    assert iv["received -> start"] == pytest.approx(4.0)
    assert iv["forward"] == pytest.approx(38.0)
    assert iv["returned -> done"] == pytest.approx(2.0)
    assert iv["latency"] == pytest.approx(52.0)


def test_per_thread_counts_threads_born_during_the_run_from_zero():
    before = {(1, 10): (1.0, 100, 90, 0.9, 0.1)}
    after = {(1, 10): (1.5, 150, 130, 1.3, 0.2),        # compute thread: 0.5 s over 10
             (1, 11): (0.02, 12, 11, 0.02, 0.0)}         # a reader born in the run
    rows = single_testbed.per_thread(before, after, {(1, 11)}, 10)
    assert [r["tid"] for r in rows] == [10, 11]
    assert rows[0]["cpu_ms"] == pytest.approx(50.0) and not rows[0]["born"]
    assert rows[1]["cpu_ms"] == pytest.approx(2.0) and rows[1]["born"]
    assert rows[1]["voluntary"] == pytest.approx(1.1)
