"""Plans: chunk results merged in order equal the unsplit layers, for any K."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from decolla.plans import PLANS, PlanError, build_plan
from decolla.plans.compute import chunk_inputs, chunk_output_shape, compute_chunk, merge
from decolla.plans.data import CHANNELWISE, split_bounds
from decolla import reference
from decolla.loader import load_model

SMALL = {"v2": "mobilenet_v2:width=0.35,input_size=32,num_classes=10",
         "v1": "mobilenet_v1:width=0.25,input_size=32,num_classes=10"}
_models = {}


def model(name):
    if name not in _models:
        m = load_model(SMALL[name])
        img = np.random.default_rng(3).standard_normal(m.input_shape).astype(np.float32)
        logits, tensors = reference.forward(m, img, keep=True)
        _models[name] = (m, img, tensors)
    return _models[name]


def run_plan(m, p, img):
    layers = {l.name: l for l in m.layers}
    tensors = {"input": img}
    for stage in p.stages:
        parts = []
        # compute chunks in a shuffled order: merging must not depend on arrival order
        order = np.random.default_rng(stage.index).permutation(len(stage.chunks))
        done = {}
        for i in order:
            c = stage.chunks[i]
            done[i] = compute_chunk(layers, stage, c, chunk_inputs(c, tensors))
            assert done[i].shape == chunk_output_shape(stage, c)
        parts = [done[i] for i in range(len(stage.chunks))]
        tensors[stage.output] = merge(stage, parts)
    return tensors


@given(arch=st.sampled_from(["v1", "v2"]), k=st.integers(1, 40),
       kind=st.sampled_from(PLANS))
@settings(max_examples=25, deadline=None)
def test_merged_chunks_equal_unsplit_layers(arch, k, kind):
    m, img, ref = model(arch)
    p = build_plan(m.layer_specs(), k, kind)
    got = run_plan(m, p, img)
    for stage in p.stages:
        want = ref[stage.output]
        np.testing.assert_allclose(got[stage.output], want, rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(np.abs(want).max())))


@given(n=st.integers(1, 500), k=st.integers(1, 64))
def test_split_bounds_cover_range_evenly(n, k):
    b = split_bounds(n, k)
    assert b[0][0] == 0 and b[-1][1] == n and len(b) == min(n, k)
    assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    sizes = [hi - lo for lo, hi in b]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_layer_plan_is_one_stage_per_layer_with_k_chunks():
    m, _, _ = model("v2")
    p = build_plan(m.layer_specs(), 6)
    assert [s.layers for s in p.stages] == [(l.name,) for l in m.layers]
    for s, l in zip(p.stages, m.layers):
        assert len(s.chunks) == min(6, l.out_shape[-1])
        assert sum(c.cost.macs for c in s.chunks) == pytest.approx(l.macs, abs=len(s.chunks))


def test_channelwise_chunks_need_only_their_channels():
    m, _, _ = model("v2")
    p = build_plan(m.layer_specs(), 4)
    for s in p.stages:
        for c in s.chunks:
            if s.kind in CHANNELWISE:
                assert c.needs[0].channels == (c.c0, c.c1)
            else:
                assert c.needs[0].channels is None
            for extra in c.needs[1:]:          # residuals: only the chunk's channels
                assert extra.channels == (c.c0, c.c1)


def test_fused_plan_moves_fewer_bytes_and_keeps_residual_sources():
    m = load_model("mobilenet_v2:input_size=96,width=0.5")
    layer = build_plan(m.layer_specs(), 6, "layer")
    fused = build_plan(m.layer_specs(), 6, "fused")
    assert len(fused.stages) < len(layer.stages)
    assert fused.bytes_moved() < layer.bytes_moved()
    outputs = {s.output for s in fused.stages} | {"input"}
    assert all(l.residual in outputs for l in m.layers if l.residual)


def test_min_chunk_macs_keeps_small_stages_whole():
    m, _, _ = model("v2")
    p = build_plan(m.layer_specs(), 6, min_chunk_macs=10**12)
    assert all(len(s.chunks) == 1 for s in p.stages)


def test_bad_plans_are_refused():
    m, _, _ = model("v2")
    with pytest.raises(PlanError):
        build_plan(m.layer_specs(), 0)
    with pytest.raises(PlanError):
        build_plan(m.layer_specs(), 2, "diagonal")
    p = build_plan(m.layer_specs(), 2)
    with pytest.raises(PlanError):
        merge(p.stages[0], [np.zeros(1)])
    with pytest.raises(PlanError, match="missing"):
        compute_chunk({l.name: l for l in m.layers}, p.stages[0], p.stages[0].chunks[0], {})
