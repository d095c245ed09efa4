"""A short chaos soak (bench.chaos, ~60 s): devices killed and stopped, the leader killed
and restarted, while two clients keep sending; no request lost, no answer wrong, at most
1 % failed with a clear error and only during a leader restart, nothing leaked, memory
flat. On the testbed (root), the link faults too."""
from __future__ import annotations

import argparse

import pytest

from bench import chaos
from bench.chaos import __main__ as cli
from bench.chaos import testbed

integration = pytest.mark.integration


def _healthy(rep: dict) -> None:
    print(chaos.markdown(rep))
    assert rep["lost"] == 0 and rep["wrong"] == 0, rep
    assert rep["failed"] <= 0.01 * rep["requests"], rep["errors"]
    assert rep["outside_leader_restart"] == 0, rep["unanswered"]
    assert rep["end"]["per_node"] == rep["start"]["per_node"], (rep["start"], rep["end"])
    assert rep["end"]["rss_mb"] < 1.5 * rep["start"]["rss_mb"], (rep["start"], rep["end"])


@integration
def test_a_minute_of_chaos_loses_nothing_and_leaks_nothing():
    rep = chaos.run(60, devices=3, clients=2, every=4.0, seed=1, timeout=30, progress=False)
    assert rep["requests"] >= 20, rep
    assert sum(rep["faults"].values()) >= 5, rep["faults"]
    _healthy(rep)


@integration
@pytest.mark.testbed
@pytest.mark.skipif(testbed.unavailable() is not None,
                    reason=f"testbed: {testbed.unavailable()}")
def test_links_down_and_lossy_on_the_testbed_lose_nothing_and_fail_nothing():
    rep = testbed.run(30, devices=3, clients=2, every=3.0, plans=("auto",),
                      faults=testbed.LINK_FAULTS, seed=2, timeout=30)
    assert sum(rep["faults"].values()) >= 2, rep["faults"]
    assert rep["failed"] == 0, rep["unanswered"]        # no leader restart in this one
    _healthy(rep)


def test_link_faults_are_skipped_with_the_reason_off_the_testbed(capsys):
    args = argparse.Namespace(faults="kill-device,link-down,loss", testbed=False)
    assert cli._faults(args) == ("kill-device",)
    assert "link faults need --testbed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli._faults(argparse.Namespace(faults="unplug", testbed=True))
