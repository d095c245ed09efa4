"""bench.plans_testbed's `--against-best` table, from result files: each `auto` against the
better single-device baseline of its own run, onnxruntime credited with and without the
image's delivery."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench import plans_testbed  # noqa: E402


def _point(bw: float, plan: str, lat_s: float, without_s: float, stages: int = 1) -> dict:
    rows = [{"latency_s": lat_s, "without_input_s": without_s, "stages": stages}] * 3
    return {"bandwidth_mbit": bw, "plan": plan, "rows": rows, "median_s": lat_s,
            "predicted_s": None}


def test_against_best_credits_onnxruntime_with_and_without_the_delivery(tmp_path):
    doc = {"emulation": "dilation", "emulation_line": "dilation: f=6", "repeats": 3,
           "points": [_point(100, "single", 0.075, 0.057),           # 18 ms of delivery
                      _point(100, "auto", 0.057, 0.052, stages=2),
                      _point(100, "onnxruntime", 0.037, 0.037),
                      _point(1000, "single", 0.060, 0.058),
                      _point(1000, "auto:bandwidth_mbit=1000,shared_link=0,gmacs=9", 0.031, 0.03),
                      _point(1000, "onnxruntime", 0.030, 0.030)]}
    (tmp_path / "run.json").write_text(json.dumps(doc))
    assert plans_testbed.against_best(tmp_path, ["run"]) == 0
    rows = [line.split(" | ") for line in (tmp_path / "run_vs_best.md").read_text().splitlines()
            if line.startswith("| 1")]
    by = {(r[0], r[1]): r for r in rows}
    auto100 = by["| 100", "auto"]
    assert auto100[2] == "2" and auto100[7] == "55"          # 37 ms + 18 ms delivered
    assert auto100[-1] == "missed / met |"                  # 0.65x there, 0.96x delivered
    auto1000 = by["| 1000", "auto:bandwidth_mbit=1000,shared_link=0"]   # gmacs dropped
    assert auto1000[-1] == "met / met |" and auto1000[9] == "0.97x"


def _doc(emulation: str, bw: float, single_s: float) -> dict:
    return {"emulation": emulation, "emulation_line": f"{emulation}: test", "repeats": 3,
            "points": [{**_point(bw, "single", single_s, single_s), "loadavg": [0.5],
                        "median_without_input_s": single_s,
                        "packets_dropped_by_shaping": {"up": 0, "down": 0}}]}


def test_headline_combines_the_named_result_files(tmp_path):
    for name, emu, bw, s in (("a_dil_100", "dilation", 100, 0.067),
                             ("a_dil_1000", "dilation", 1000, 0.059),
                             ("a_quota_1000", "quota", 1000, 0.045)):
        doc = _doc(emu, bw, s)
        for r in doc["points"][0]["rows"]:
            r.update(bytes=300_000, top1_ok=True, planned_mbit=None)
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    assert plans_testbed.headline(tmp_path, ["a_dil_100", "a_dil_1000", "a_quota_1000"]) == 0
    rows = [line for line in (tmp_path / "a_dil_100_both.md").read_text().splitlines()
            if line.startswith("| dilation") or line.startswith("| quota")]
    assert [r.split(" | ")[1:4] for r in rows] == [["100", "single", "67"],
                                                  ["1000", "single", "59"],
                                                  ["1000", "single", "45"]]
    assert plans_testbed.headline(tmp_path, ["a_dil_100", "missing"]) == 2
