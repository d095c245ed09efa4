"""bench.kernels on a tiny network: every column filled, onnxruntime's node times mapped
back to the layers."""
from __future__ import annotations

import pytest

from bench import kernels as bk
from decolla import ops


def test_onnxruntime_nodes_map_to_layers():
    per, other = bk.ort_per_layer({"/mods.0/mods.0.1/Clip_output_0_nchwc": 1.0,
                                   "/mods.2/Conv_output_0_nchwc": 0.5,
                                   "/mods.2/mods.2.1/x": 0.25,
                                   "ReorderOutput": 0.125, "/mods.9/Gemm": 2.0}, 3)
    assert per == [1.0, 0.0, 0.75]
    assert other == 2.125


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit, used by the bench
def test_bench_runs_on_a_tiny_network(tmp_path):
    pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    r = bk.run("mobilenet_v2", 0.35, 32, 1)
    n = r["network"]
    assert n["max_abs_diff_logits"] < 1e-3
    o = n["onnxruntime"]
    assert r["machine"]["onnxruntime"] == ort.__version__
    assert o["ms"] > 0 and o["max_abs_diff_logits"] < 1e-3
    assert o["profiled_nodes_ms"] > 0
    for g in r["per_type"].values():
        assert g["onnxruntime_ms"] > 0, g      # every layer type has onnxruntime nodes
    assert all("onnxruntime_ms" in row and row["ours_in_network_ms"] > 0 for row in r["layers"])
    # the baseline build keeps BLAS for pointwise layers: nothing fuses there
    assert bool(r["fused_blocks"]) == (ops.PACKED_MAX_PIXELS > 0)
    assert all(b["equal"] for b in r["fused_blocks"])
    md = bk.markdown(r)
    assert "| onnxruntime |" in md and "ours / onnxruntime" in md
    assert "inverted-residual block" in md
