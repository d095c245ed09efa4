"""The testbed's time-dilation mode (needs root): a dilated host's processes run dilated,
it is placed with the throttled hosts, and calibration finds a factor that slows a probe."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench.testbed import Testbed, check_environment, cleanup, is_empty  # noqa: E402
from bench.testbed import core as testbed_core  # noqa: E402

REASON = check_environment()
pytestmark = [pytest.mark.testbed,
              pytest.mark.skipif(REASON is not None, reason=f"testbed: {REASON}")]
PREFIX = "dcle"
SMALL = "mobilenet_v2:seed=0,width=0.35,input_size=96"


@pytest.fixture(scope="module")
def tb():
    cleanup(PREFIX)
    with Testbed(prefix=PREFIX, cpu_budget=1.0) as bed:
        bed.add_host("dil", cpu_dilation=6.0)
        bed.add_host("slow", cpu_quota=0.1)
        bed.add_host("free")
        bed.add_host("dilbg", cpu_dilation=4.0, background_load=0.5)
        yield bed
    assert is_empty(cleanup(PREFIX)), "the test left testbed resources behind"


def test_a_dilated_hosts_processes_run_dilated(tb):
    code = "from decolla import emulation as e; print(e.current().factor if e.current() else 1)"
    for name, want in (("dil", 6.0), ("free", 1.0)):
        p = tb.host(name).spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate(timeout=60)
        assert float(out.strip().splitlines()[-1]) == want
    d = tb.describe()["hosts"]
    assert d["dil"]["cpu_dilation"] == 6.0 and d["dil"]["cpu_quota_cores"] is None


def test_a_dilated_hosts_background_load_slows_its_processes_instead_of_a_busy_loop(tb):
    h = tb.host("dilbg")
    assert h.loader is None and not h.bg.pids()     # no loop taking unaccounted host CPU
    code = "from decolla import emulation as e; print(e.current().factor, flush=True)"
    p = h.spawn([sys.executable, "-c", code + "; import sys; sys.stdin.read()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        # half of the slow CPU taken by the load: the rest runs twice as slow again
        assert float(p.stdout.readline()) == pytest.approx(8.0)
        with pytest.raises(testbed_core.TestbedError, match="cannot change while they run"):
            tb.set_background_load("dilbg", 0.3)
        assert tb.describe()["hosts"]["dilbg"]["cpu_dilation_with_load"] == pytest.approx(8.0)
    finally:
        p.communicate(timeout=30)
    tb.set_background_load("dilbg", 0.75)           # nothing runs: the next process gets it
    out = h.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE,
                  text=True).communicate(timeout=60)[0]
    assert float(out.strip().splitlines()[-1]) == pytest.approx(16.0)


def test_a_dilated_host_is_placed_with_the_throttled_ones(tb):
    dil, slow, free = (tb.host(n) for n in ("dil", "slow", "free"))
    assert dil.cgroup.cpus == slow.cgroup.cpus and len(dil.cgroup.cpus) == 1
    if len(os.sched_getaffinity(0)) > 1:
        assert not (free.cgroup.cpus & dil.cgroup.cpus)


def test_quota_and_dilation_together_are_refused(tb):
    with pytest.raises(ValueError, match="not both"):
        tb.add_host("both", cpu_quota=0.1, cpu_dilation=4.0)
    with pytest.raises(ValueError, match=">= 1"):
        tb.add_host("faster", cpu_dilation=0.5)
    assert "both" not in tb.hosts and "faster" not in tb.hosts


def test_dilation_calibration_slows_the_probe(tb):
    probe = [sys.executable, "-m", "bench.fig6_probe", "--model", SMALL, "--repeats", "3"]
    cal = tb.calibrate(probe, k=3.0, mode="dilation", max_rounds=2)
    assert cal.mode == "dilation" and cal.quota is None
    assert 1.0 < cal.dilation < 6.0
    assert 2.0 < cal.achieved_slowdown < 4.5        # loose: the machine may be busy
    assert json.loads(json.dumps(tb.describe()["calibration"]))["dilation"] == cal.dilation
