"""decolla.fusion in the forward and in chunk compute: fused blocks give the separate
layers' bits (same build), fuse only where they can (packed builds, one thread, whole
maps, intermediate tensors nobody else reads), and can be turned off."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from decolla import fusion, ops, reference
from decolla import model as M
from decolla.forward import Forward
from decolla.model import Layer, Model
from decolla.plans import build_plan
from decolla.plans.compute import chunk_inputs, compute_chunk, merge
from decolla.plans.run import run_plan

PACKED = ops.PACKED_MAX_PIXELS > 0     # the baseline build keeps BLAS: nothing fuses


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused kernel's calls (the real kernel runs)."""
    count = [0]
    real = fusion._fused

    def counted(*args):
        count[0] += 1
        return real.inverted_residual(*args)

    monkeypatch.setattr(fusion, "_fused", types.SimpleNamespace(inverted_residual=counted))
    monkeypatch.setattr(fusion, "_enabled", True)
    monkeypatch.setattr(ops, "_THREADS", 1)       # whatever DECOLLA_THREADS says
    return count


def image(m: Model, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(m.input_shape).astype(np.float32)


@pytest.mark.parametrize("width, size", [(0.5, 64), (1.0, 224), (0.35, 33)])
def test_forward_fused_equals_separate_layers(calls, width, size):
    m = M.mobilenet_v2(width=width, input_size=size, num_classes=10, seed=size)
    f, img = Forward(m), image(m)
    got = f(img)
    assert calls[0] == (17 if PACKED else 0)     # every block of MobileNetV2
    np.testing.assert_array_equal(got, f(img, fuse=False))
    assert calls[0] == (17 if PACKED else 0)
    want = reference.forward(m, img)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_no_fusion_on_threads_when_off_or_without_the_packed_kernel(calls, monkeypatch):
    m = M.mobilenet_v2(width=0.5, input_size=64, num_classes=10, seed=1)
    f, img = Forward(m), image(m)
    want = f(img, fuse=False)
    np.testing.assert_array_equal(f(img, threads=2), want)
    fusion.set_enabled(False)
    np.testing.assert_array_equal(f(img), want)
    assert calls[0] == 0
    # where ops multiplies by BLAS (the baseline build) the bits would differ: no block
    monkeypatch.setattr(ops, "PACKED_MAX_PIXELS", 0)
    monkeypatch.setattr(ops, "PACKED_MAX_WEIGHTS", 0)
    assert fusion.find(m.layers, "input") == {}


def _run_env(env: dict) -> str:
    code = ("from decolla import fusion, model; "
            "print(fusion.active(), len(fusion.find(model.mobilenet_v2().layers, 'input')))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_environment_switches():
    assert _run_env({"DECOLLA_FUSE": "0"}).startswith("False")
    assert _run_env({"DECOLLA_THREADS": "2"}).startswith("False")
    assert _run_env({"DECOLLA_KERNELS": "baseline", "DECOLLA_FUSE": "1",
                     "DECOLLA_THREADS": "1"}) == "True 0"


def _layer(rng, name, kind, cin, cout, hw, **kw) -> Layer:
    layer = Layer(name, kind, (hw, hw, cin), (hw, hw, cout), **kw)
    layer.weight = rng.standard_normal(M.weight_shape(layer)).astype(np.float32) * 0.3
    layer.bias = rng.standard_normal(cout).astype(np.float32) * 0.1
    return layer


def test_blocks_whose_tensors_are_read_elsewhere_are_not_fused(calls):
    """Later layers add block a's expanded tensor: a's expand layer runs on its own (its
    depthwise + project pair still fuses); block b, whose project adds another tensor
    than b's input, does not fuse."""
    rng = np.random.default_rng(5)
    layers = [_layer(rng, "a.expand", "pwconv", 8, 16, 10, relu6=True),
              _layer(rng, "a.dw", "dwconv3x3", 16, 16, 10, relu6=True),
              _layer(rng, "a.project", "pwconv", 16, 16, 10),
              _layer(rng, "b.expand", "pwconv", 16, 16, 10, relu6=True),
              _layer(rng, "b.dw", "dwconv3x3", 16, 16, 10, relu6=True),
              _layer(rng, "b.project", "pwconv", 16, 16, 10, residual="a.expand"),
              _layer(rng, "c", "pwconv", 16, 16, 10, residual="a.expand"),
              Layer("pool", "gap", (10, 10, 16), (16,)),
              _layer(rng, "fc", "linear", 16, 3, 1)]
    layers[-1].in_shape, layers[-1].out_shape = (16,), (3,)
    found = fusion.find(layers, "input")
    assert {i: b.names for i, b in found.items()} == (
        {1: ("a.dw", "a.project")} if PACKED else {})
    m = Model("t", (10, 10, 8), layers)
    f, img = Forward(m), image(m)
    np.testing.assert_array_equal(f(img), f(img, fuse=False))
    assert calls[0] == (1 if PACKED else 0)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v1"])
@pytest.mark.parametrize("kind, k", [("single", 1), ("block", 1), ("block", 3), ("spatial", 1),
                                     ("spatial", 3), ("auto", 3), ("exchange", 3),
                                     ("layer", 2)])
def test_chunks_fused_equal_separate_layers(calls, arch, kind, k):
    m = M.build(arch, width=0.5, input_size=64, num_classes=10, seed=k)
    img = image(m, k)
    p = build_plan(m.layer_specs(), k, kind)
    got, _ = run_plan(m, p, img, wire_dtype=None, cache={})
    fused = calls[0]
    fusion.set_enabled(False)
    want, _ = run_plan(m, p, img, wire_dtype=None, cache={})
    np.testing.assert_array_equal(got, want)
    assert calls[0] == fused
    # whole-map stages of MobileNetV2 and the partial sums of `block` stages fuse, single
    # layers do not (MobileNetV1's project has a ReLU6: only its partial sums fuse, the
    # ReLU6 follows the sum); row strips fuse their stride-1 blocks
    expect = {("mobilenet_v2", "single"): 17, ("mobilenet_v2", "block"): 16 * k,
              ("mobilenet_v1", "block"): 12 * k, ("mobilenet_v2", "spatial"): 17,
              ("mobilenet_v1", "single"): 0, ("mobilenet_v2", "layer"): 0,
              ("mobilenet_v1", "layer"): 0}.get((arch, kind))
    if kind == "spatial" and k > 1:
        expect = None     # some strips of small maps cover them whole
    if expect is not None:
        assert fused == (expect if PACKED else 0)


def test_chunks_use_the_callers_run_layer_one_layer_at_a_time(calls):
    m = M.mobilenet_v2(width=0.5, input_size=64, num_classes=10, seed=2)
    layers = {l.name: l for l in m.layers}
    tensors = {"input": image(m)}
    p = build_plan(m.layer_specs(), 2, "block")
    for stage in p.stages:
        parts = [compute_chunk(layers, stage, c, chunk_inputs(c, tensors),
                               run_layer=ops.run_layer) for c in stage.chunks]
        tensors[stage.output] = merge(stage, parts)
    assert calls[0] == 0


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("rows, cols", [(-1, 0), (0, -1), (1, 0)])
def test_a_chunk_input_of_the_wrong_shape_is_refused_fused_or_not(monkeypatch, fuse, rows,
                                                                  cols):
    """A short map must not pass for a padded one (the kernel pads the edges itself)."""
    m = M.mobilenet_v2(width=0.5, input_size=64, num_classes=10, seed=2)
    layers = {l.name: l for l in m.layers}
    shapes = {"input": m.input_shape} | {l.name: l.out_shape for l in m.layers}
    stage = next(s for s in build_plan(m.layer_specs(), 2, "block").stages
                 if s.layers[0] == "b2.expand")     # stride 2: 31 rows give 16 as 32 do
    monkeypatch.setattr(fusion, "_enabled", fuse)
    c = stage.chunks[0]
    inputs = {n: np.ones(np.add(n.shape(shapes[n.tensor]), (rows, cols, 0)), np.float32)
              for n in c.needs}
    with pytest.raises(ValueError, match="shape|rows"):
        compute_chunk(layers, stage, c, inputs)


@pytest.mark.skipif(not PACKED, reason="the baseline build fuses nothing")
@pytest.mark.parametrize("rows", [(0, 3), (2, 5), (5, 8), (0, 8), (7, 8), (3, 4)])
@pytest.mark.parametrize("name", ["b1.dw", "b3.expand"])    # without and with expansion
def test_a_strip_of_a_stride_1_block_gets_the_whole_maps_bits(rows, name):
    m = M.mobilenet_v2(width=0.5, input_size=64, num_classes=10, seed=4)
    found = fusion.find(m.layers, "input")
    i = next(i for i, b in found.items() if b.names[0] == name)
    blk = found[i]
    assert blk.stride == 1
    x = np.random.default_rng(5).standard_normal((8,) + blk.in_shape[1:]).astype(np.float32)
    blk = dataclasses.replace(blk, in_shape=x.shape, out_shape=(8,) + blk.out_shape[1:])
    whole = blk(x)
    a, b = rows
    w0, w1 = blk.window(a, b)
    for x0 in sorted({w0, 0}):         # the window alone, or more rows than it needs
        y = blk.rows(x[x0:], x0, a, b)
        assert y.shape[0] == w1 - w0
        np.testing.assert_array_equal(y[a - w0:b - w0], whole[a:b])
    with pytest.raises(ValueError, match="do not cover"):
        blk.rows(x[w0 + 1:], w0 + 1, a, b)

