"""Fig. 6 machinery on the real testbed (needs root): every baseline and DeColla return the
reference output across shaped namespaces, and DeColla still does when a device's link is
cut mid-inference."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench.testbed import Testbed, check_environment  # noqa: E402

REASON = check_environment()
pytestmark = [pytest.mark.testbed, pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"testbed: {REASON}")]
SPEC = "mobilenet_v2:seed=0,width=0.35,input_size=96"


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    from bench.fig6 import Agent
    logs = tmp_path_factory.mktemp("fig6bed")
    with Testbed(prefix="dclf") as tb:
        for i in (1, 2, 3):
            tb.add_host(f"dev{i}", bandwidth_mbit=20, cpu_quota=0.25)
        tb.add_host("edge", role="edge", cpu_quota=0.5)
        req = tb.add_host("requester", role="requester")
        tb.spawn_node("edge", "leader", model=SPEC, log=logs / "edge.log")
        for i in (1, 2, 3):
            tb.spawn_node(f"dev{i}", "device", leader="edge", model=SPEC, log=logs / f"dev{i}.log")
        proc = req.spawn([sys.executable, "-m", "bench.fig6_agent", "--leader",
                          f"{tb.address('edge')}:1900", "--bind", req.address, "--model", SPEC,
                          "--cap", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=open(logs / "agent.log", "ab"), text=True, bufsize=1)
        agent = Agent(proc)
        hello = agent.reply(timeout=180)
        assert hello.get("ready"), (hello, (logs / "agent.log").read_text()[-3000:])
        agent("prepare", reprofile=False)
        try:
            yield tb, agent
        finally:
            agent.quit()


@pytest.mark.parametrize("method", ["mobile", "partition", "hierarchical", "decolla"])
def test_every_method_returns_the_reference_on_the_testbed(bed, method):
    tb, agent = bed
    point = agent("run", method=method, bandwidth=20, repeats=1)
    (row,) = point["inferences"]
    assert row["ok"], row
    assert row["correct"], row
    if method != "decolla":
        hosts = {seg[0] for seg in row["route"]}
        assert hosts <= {"dev1", "dev2", "dev3", "edge"}


def test_onnxruntime_runs_on_a_device_host_as_a_fig6_point(bed, tmp_path):
    """The onnxruntime method: the exported weights run inside dev1 and come back as a
    point the report reads (one device busy: normalized variance 1)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from bench import fig6, ort_device
    tb, _ = bed
    fig = fig6.Fig6("mobilenet_v2", True, 8.0, tmp_path, "a", spec=SPEC, methods=(fig6.ORT,))
    path = str(tmp_path / "m.onnx")
    fig.doc["onnx_rel_err"] = ort_device.export(SPEC, path)
    fig.state["bw"] = 20
    fig.ort = ort_device.start(tb.host("dev1"), path, tmp_path / "ort.log")
    try:
        point = fig.measure(fig6.ORT, 3)
    finally:
        fig.ort.stdin.close()
        fig.ort.wait(timeout=30)
    s = point["summary"]
    assert (s["ok"], s["n"], s["correct"], s["bytes_median"]) == (3, 3, True, 0)
    assert s["latency_median_s"] > 0 and s["norm_variance_median"] == pytest.approx(1.0)
    assert fig.doc["onnx_rel_err"] < 1e-3


def test_decolla_survives_a_link_cut_mid_inference(bed):
    tb, agent = bed
    for i in (1, 2, 3):                # slow links: the inference lasts seconds
        tb.set_bandwidth(f"dev{i}", 5)
    timer = tb.schedule(0.8, "link_down", "dev2")
    try:
        point = agent("run", method="decolla", bandwidth=5, repeats=1, seed=42)
    finally:
        timer.join()
        tb.link_up("dev2")
        for i in (1, 2, 3):
            tb.set_bandwidth(f"dev{i}", 20)
    (row,) = point["inferences"]
    assert row["ok"], row
    assert row["correct"], row
    assert row["latency_s"] > 0.8              # the cut happened while it ran
    assert row["retries"] > 0                  # chunks of the cut device were given to others
    assert row["busy_s"]["dev1"] > 0 and row["busy_s"]["dev3"] > 0
