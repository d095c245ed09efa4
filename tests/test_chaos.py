"""A short chaos soak (bench.chaos, ~60 s): devices killed and stopped, the leader killed
and restarted, while two clients keep sending; no request lost, no answer wrong, at most
1 % failed with a clear error and only during a leader restart, nothing leaked, memory
flat."""
from __future__ import annotations

import pytest

from bench import chaos

pytestmark = pytest.mark.integration


def test_a_minute_of_chaos_loses_nothing_and_leaks_nothing():
    rep = chaos.run(60, devices=3, clients=2, every=4.0, seed=1, timeout=30, progress=False)
    print(chaos.markdown(rep))
    assert rep["requests"] >= 20, rep
    assert rep["lost"] == 0 and rep["wrong"] == 0, rep
    assert rep["failed"] <= 0.01 * rep["requests"], rep["errors"]
    assert rep["outside_leader_restart"] == 0, rep["unanswered"]
    assert sum(rep["faults"].values()) >= 5, rep["faults"]
    assert rep["end"]["per_node"] == rep["start"]["per_node"], (rep["start"], rep["end"])
    assert rep["end"]["rss_mb"] < 1.5 * rep["start"]["rss_mb"], (rep["start"], rep["end"])
