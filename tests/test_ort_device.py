"""bench.ort_device: the onnxruntime baseline exports our weights faithfully and runs
under the device's dilation (needs the `bench` and `train` extras: onnxruntime, torch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench import ort_device  # noqa: E402

SMALL = "mobilenet_v2:seed=0,width=0.35,input_size=64"


def test_export_matches_decolla_and_the_agent_runs_dilated(tmp_path):
    path = str(tmp_path / "m.onnx")
    assert ort_device.export(SMALL, path) < 1e-4
    env = {**os.environ, "PYTHONPATH": str(REPO), "DECOLLA_DILATE": "3"}
    proc = subprocess.run([sys.executable, "-m", "bench.ort_device", "--agent", "--onnx", path],
                          input='{"cmd": "run", "repeats": 3}\n{"cmd": "quit"}\n', text=True,
                          capture_output=True, env=env, timeout=120, check=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines[0] == {"ready": True, "dilation": 3.0}
    rows = lines[1]["result"]
    assert lines[1]["ok"] and len(rows) == 3
    assert all(r["latency_s"] > 0 and r["cpu_s"] > 0 for r in rows)
