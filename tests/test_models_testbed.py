"""bench.models_testbed's table from plans_testbed result files, and bench.ort_device on an
imported model's own ONNX file (no testbed: the runs themselves are bench commands)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

pytest.importorskip("torch")   # bench.zoo builds the networks with torch

from bench import models_testbed, ort_device  # noqa: E402

TOLD = "auto:bandwidth_mbit=100,shared_link=0,gmacs=2.00,overhead_ms=1"


def _rows(lat_s: float, stages: list[int], nbytes: int, rel_err: float = 1e-4) -> list[dict]:
    """Three requests whose timelines won `stages[i]` chunks in stage i (plus a late copy)."""
    line = [[s, c, "dev1", "won", 0, 0, 0, 0, 0, 1, 1, 0, 0.0]
            for s, n in enumerate(stages) for c in range(n)]
    line.append([0, 0, "dev2", "late", 0, 0, 0, 0, 0, 1, 1, 0, 0.0])
    return [{"latency_s": lat_s, "bytes": nbytes, "rel_err": rel_err, "top1_ok": True,
             "planned_mbit": 95.0, "planned_shared": False, "timeline": line}] * 3


def _point(plan: str, lat_s: float, stages: list[int], nbytes: int, predicted=None,
           pstages=None, rel_err: float = 1e-4) -> dict:
    return {"bandwidth_mbit": 100.0, "plan": plan, "median_s": lat_s, "predicted_s": predicted,
            "predicted_stages": pstages, "rows": _rows(lat_s, stages, nbytes, rel_err)}


def _doc() -> dict:
    return {"model": "/tmp/x/squeezenet1_1.onnx",
            "calibration": {"dilation": 4.0, "achieved_slowdown": 7.9},
            "onnx_rel_err": 5e-7, "onnx_host_ms": 6.4, "emulation": "dilation", "repeats": 3,
            "points": [_point("single", 0.080, [1], 300_000, predicted=0.060),
                       _point(TOLD, 0.040, [3, 3], 500_000, predicted=0.045,
                              pstages=["spatial x3 (13 layers)", "spatial+sum x3 (9 layers)"],
                              rel_err=3e-4),
                       _point("auto", 0.050, [3, 3], 520_000, predicted=0.045),
                       _point("onnxruntime", 0.032, [], 0)]}


def test_summary_measures_speed_ups_bytes_plan_prediction_and_error():
    (row,) = models_testbed.summarize(_doc())
    assert row["model"] == "squeezenet1_1" and row["bandwidth_mbit"] == 100.0
    assert row["told"]["vs_single"] == pytest.approx(2.0)
    assert row["told"]["vs_ort"] == pytest.approx(0.8)
    assert row["auto"]["vs_single"] == pytest.approx(1.6)
    assert row["told"]["chunks"] == "3+3"                     # the late copy is not a chunk
    assert row["auto"]["mb"] == pytest.approx(0.52)
    assert row["predicted"]["speedup"] == pytest.approx(0.060 / 0.045)
    assert row["max_rel_err"] == pytest.approx(3e-4)          # the worst distributed answer
    assert row["top1_ok"] == "9/9" and row["errors"] == {}
    # onnxruntime: 32 ms on the device, 6.4 ms on a host core
    assert row["slowdown"] == {"ours": 7.9, "ort": pytest.approx(5.0)}


def test_a_second_told_auto_is_told_apart_by_its_own_options():
    doc = _doc()
    doc["points"].append(_point(TOLD.replace("shared_link=0,", "shared_link=0,max_mb=0,"), 0.020,
                                [3, 3, 3], 2_000_000, predicted=0.030, pstages=["a", "b", "c"]))
    (row,) = models_testbed.summarize(doc)
    assert row["told"]["vs_single"] == pytest.approx(2.0)    # the first told auto stays
    variant = row["told+"]
    assert variant["options"] == "max_mb=0" and variant["chunks"] == "3+3+3"
    assert variant["vs_single"] == pytest.approx(4.0)
    assert variant["predicted"]["speedup"] == pytest.approx(2.0)
    (line,) = models_testbed.variant_table([{**row, "run": "r"}])[2:]
    assert "| r | max_mb=0 | 20 | 4.00x | 1.60x | 3+3+3 | 2.000 | a; b; c | 2.00x |" in line
    assert models_testbed.variant_table([{**models_testbed.summarize(_doc())[0], "run": "r"}]) \
        == []


def test_table_reports_prediction_error_and_failed_plans():
    doc = _doc()
    doc["points"][2] = {"bandwidth_mbit": 100.0, "plan": "auto", "error": "timeout",
                        "predicted_s": None}
    lines = models_testbed.table(models_testbed.summarize(doc))
    first = next(line for line in lines if line.startswith("| squeezenet1_1"))
    assert "| 80 | 32 | 40 | 2.00x | 0.80x | failed |" in first
    second = [line for line in lines if line.startswith("| squeezenet1_1")][1]
    # predicted 1.33x against 2.00x measured: the model predicted 33 % too little
    assert "| 1.33x | 2.00x | -33 % | 45 / 40 | 60 / 80 |" in second
    assert "spatial x3 (13 layers); spatial+sum x3 (9 layers)" in second
    assert second.endswith("| 7.90x / 5.00x |")


def test_feed_shape_makes_symbolic_dimensions_one():
    assert ort_device.feed_shape(["batch", 3, 224, 224]) == (1, 3, 224, 224)
    assert ort_device.feed_shape([None, 3, 8, 8]) == (1, 3, 8, 8)
    assert ort_device.is_onnx("/x/net.onnx") and not ort_device.is_onnx("mobilenet_v2:seed=0")


def test_export_of_an_onnx_model_copies_it_and_checks_it_against_decolla(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tests.onnx_graphs import Net
    net = Net(np.random.default_rng(0), 3, 16, 16)
    net.x, net.shape = net.conv(net.x, 3, 8, 3, 2, 1), (8, 8, 8)
    src = tmp_path / "net.onnx"
    src.write_bytes(net.model(5))
    dst = tmp_path / "copy.onnx"
    assert ort_device.export(str(src), str(dst)) < 1e-4
    assert dst.read_bytes() == src.read_bytes()
    assert ort_device.export(str(src), str(src)) < 1e-4     # the file itself: nothing copied


def test_export_refuses_a_file_that_onnxruntime_answers_differently(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tests.onnx_graphs import Net
    files = []
    for seed in (0, 1):          # the same network with other weights
        net = Net(np.random.default_rng(seed), 3, 16, 16)
        net.x, net.shape = net.conv(net.x, 3, 8, 3, 2, 1), (8, 8, 8)
        files.append(tmp_path / f"net{seed}.onnx")
        files[-1].write_bytes(net.model(5))
    # the copy goes wrong: onnxruntime then runs other weights than DeColla loaded
    monkeypatch.setattr(ort_device.shutil, "copyfile",
                        lambda a, b: Path(b).write_bytes(files[1].read_bytes()))
    with pytest.raises(RuntimeError, match="differs from decolla.forward"):
        ort_device.export(str(files[0]), str(tmp_path / "copy.onnx"))


def test_report_writes_the_table_bench_models_includes(tmp_path):
    import json
    assert models_testbed.section(tmp_path) == []            # never run: no section
    assert models_testbed.report(tmp_path) == 2
    (tmp_path / "models_testbed_squeezenet1_1.json").write_text(json.dumps(_doc()))
    assert models_testbed.report(tmp_path) == 0
    text = "\n".join(models_testbed.section(tmp_path))
    assert "(python -m bench.models_testbed)" in text
    assert "| squeezenet1_1 | 100 | 80 | 32 | 40 | 2.00x |" in text
    assert (tmp_path / "models_testbed.md").read_text().count("| squeezenet1_1 |") == 2
    # a second run of the network with a second told auto: its own table, the main ones keep
    # the first run
    doc = _doc()
    doc["points"].append(_point(TOLD + ",min_gain=0", 0.060, [2], 1, predicted=0.05))
    (tmp_path / "models_testbed_squeezenet1_1_gain0.json").write_text(json.dumps(doc))
    assert models_testbed.report(tmp_path) == 0
    md = (tmp_path / "models_testbed.md").read_text()
    assert md.count("| squeezenet1_1 |") == 3 and "| models_testbed_squeezenet1_1_gain0 |" in md


def test_predicted_takes_a_model_or_its_spec_and_the_plans_own_options_win():
    from bench.plans_testbed import predicted
    from decolla.loader import load_model
    spec = "mobilenet_v2:seed=0,width=0.35,input_size=64"
    told = "auto:bandwidth_mbit=1,shared_link=0,gmacs=2"
    one = predicted(spec, "single", told)
    assert one == predicted(load_model(spec), "single", told)
    assert one["stages"] == [f"spatial x1 ({len(load_model(spec).layers)} layers)"]
    # the image alone (64 x 64 x 3 fp16) takes 0.2 s at 1 Mb/s, 0.2 ms at 1000
    fast = predicted(spec, "single:bandwidth_mbit=1000", told)
    assert one["seconds"] - fast["seconds"] > 0.19
    assert predicted(spec, "onnxruntime", told) is None
