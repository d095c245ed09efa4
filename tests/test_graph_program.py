"""The compiled graph programs (decolla.graph.program) against the plain node-by-node
interpreter (segments.run_nodes) on random small networks: every segment, the whole map
and random strips of rows, fused squeeze-excitation and residual adds included; and a
program's buffers are not handed out to callers."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decolla import fusion, ops
from decolla.graph import GraphError, fused_steps, load_onnx_model, program
from decolla.graph.segments import GraphLayer, run_nodes

pytest.importorskip("onnx")
from tests.onnx_graphs import Net, networks  # noqa: E402


def _layers_with_inputs(model, image):
    """(layer, its input) for every layer, run with the plain interpreter."""
    x, tensors = image, {"input": image}
    for layer in model.layers:
        res = tensors[layer.residual] if layer.residual else None
        if isinstance(layer, GraphLayer):
            rows = layer.out_shape[0] if len(layer.out_shape) == 3 else 1
            y = run_nodes(layer.nodes, layer.source, x, 0, layer._shapes, 0, rows, 1)
        else:
            y = ops.run_layer(layer, x, res)
        yield layer, x
        x = tensors[layer.name] = np.ascontiguousarray(y, np.float32)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(networks(max_blocks=5), st.data())
def test_programs_equal_the_node_by_node_interpreter(tmp_path_factory, net, data):
    blob, shape = net
    path = tmp_path_factory.mktemp("prog") / "net.onnx"
    path.write_bytes(blob)
    model = load_onnx_model(str(path))
    image = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    for layer, x in _layers_with_inputs(model, image):
        if not isinstance(layer, GraphLayer):
            continue
        rows = layer.out_shape[0] if len(layer.out_shape) == 3 else 1
        r0, r1 = 0, rows
        if layer.kind == "graph":
            r0 = data.draw(st.integers(0, rows - 1))
            r1 = data.draw(st.integers(r0 + 1, rows))
        want = run_nodes(layer.nodes, layer.source, x, 0, layer._shapes, r0, r1, 1)
        scale = max(1.0, float(np.abs(want).max(initial=0)))
        chunk = data.draw(st.sampled_from([64, 1024, program.CHUNK_BYTES]))
        for threads in (1, 2):
            with mock.patch.object(program, "CHUNK_BYTES", chunk):   # conv strips + activation
                got = layer.run(x, r0=r0, r1=r1, threads=threads)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
            again = layer.run(x, r0=r0, r1=r1, threads=threads)     # buffers reused
            np.testing.assert_array_equal(again, got)
            assert not np.shares_memory(again, got)


def test_a_program_reads_the_rows_it_is_given(tmp_path):
    """A strip's program run on a window that lacks rows it needs is a clear error; a
    program compiled to write into the caller's buffer needs one."""
    net = Net(np.random.default_rng(0), 3, 12, 12)
    net.x, net.shape = net.act(net.conv(net.x, 3, 4, 5, 1, 2), "hardswish"), (4, 12, 12)
    path = tmp_path / "net.onnx"
    path.write_bytes(net.model(5))
    model = load_onnx_model(str(path))
    layer = next(l for l in model.layers if isinstance(l, GraphLayer) and l.kind == "graph")
    x = np.random.default_rng(1).standard_normal(layer.in_shape).astype(np.float32)
    with pytest.raises(GraphError, match=r"need input rows \[2, 10\) but x holds \[5, 7\)"):
        layer.run(x[5:7], r0=4, r1=8, in_row0=5)
    prog = layer.compile(1, into_dst=True)              # the single-device forward's kind
    dst = np.empty(layer.out_shape, np.float32)
    assert prog(x, 0, dst) is dst
    np.testing.assert_array_equal(dst, layer.run(x))
    with pytest.raises(ValueError, match="only into a given dst"):
        prog(x, 0)


def _fire(net, c, squeeze, e1, e3):
    """A SqueezeNet fire module on net.x: 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""
    s = net.act(net.conv(net.x, c, squeeze, 1), "relu")
    a = net.act(net.conv(s, squeeze, e1, 1), "relu")
    b = net.act(net.conv(s, squeeze, e3, 3, 1, 1), "relu")
    return net.node("Concat", [a, b], axis=1)


@pytest.mark.parametrize("threads", [1, 2])
def test_concat_branches_write_into_its_output(tmp_path, threads):
    """Fire modules whose expand convs write their channels of the concat's buffer: one
    inside a residual (the concat is not the segment's output), one whose concat is the
    output (into the caller's dst too), equal to the node-by-node interpreter on the whole
    map and on strips of rows."""
    net = Net(np.random.default_rng(4), 3, 13, 11)
    net.x = x0 = net.act(net.conv(net.x, 3, 12, 3, 1, 1), "relu")
    net.x = net.node("Add", [x0, _fire(net, 12, 4, 5, 7)])
    net.x, net.shape = _fire(net, 12, 3, 6, 10), (16, 13, 11)
    path = tmp_path / "net.onnx"
    path.write_bytes(net.model(3))
    model = load_onnx_model(str(path))
    image = np.random.default_rng(5).standard_normal(net.image).astype(np.float32)
    fused = 0
    for layer, x in _layers_with_inputs(model, image):
        if not isinstance(layer, GraphLayer) or layer.kind != "graph":
            continue
        rows = layer.out_shape[0]
        for r0, r1 in ((0, rows), (0, 5), (4, 9), (rows - 1, rows)):
            want = run_nodes(layer.nodes, layer.source, x, 0, layer._shapes, r0, r1, 1)
            prog = layer.compile(threads, r0, r1)
            fused += len(prog._branch)
            tol = 1e-6 * max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(prog(x, 0), want, rtol=0, atol=tol)
            dst = np.full(want.shape, np.nan, np.float32)
            into = layer.compile(threads, r0, r1, into_dst=True)
            assert into(x, 0, dst) is dst
            np.testing.assert_allclose(dst, want, rtol=0, atol=tol)
    if ops._gemm.RELU_FUSED and ops.PACKED_MAX_PIXELS:
        assert fused >= 4 * 4      # both fire modules, every strip, both branches
    else:                          # the ReLU would be a pass over the whole concat
        assert fused == 0


def _inverted_residual(net, c, ce, cout, s, act):
    """expand 1x1 (act) -> depthwise 3x3 / s (act) -> project 1x1, + the input when it fits."""
    x = net.x
    y = net.act(net.conv(x, c, ce, 1), act)
    y = net.act(net.conv(y, ce, ce, 3, s, 1, g=ce), act)
    y = net.conv(y, ce, cout, 1)
    return net.node("Add", [x, y]) if s == 1 and c == cout else y


@pytest.mark.parametrize("act", ["relu", "hardswish", "silu"])
def test_inverted_residual_blocks_run_fused(tmp_path, act):
    """Blocks with an activation other than ReLU6 (with ReLU6 they are the layer IR's), with and without their residual, stride 1 and 2: on the
    whole map and one thread a program computes each on kernels.fused (the stride-2 one
    joined into one segment), equal to the node-by-node interpreter, and on strips and two
    threads by its separate steps."""
    net = Net(np.random.default_rng(6), 8, 14, 13)
    net.x = _inverted_residual(net, 8, 24, 8, 1, act)
    net.x = _inverted_residual(net, 8, 32, 16, 2, act)
    net.shape = (16, 7, 7)
    path = tmp_path / "net.onnx"
    path.write_bytes(net.model(3))
    model = load_onnx_model(str(path))
    image = np.random.default_rng(7).standard_normal(net.image).astype(np.float32)
    fused = []
    for layer, x in _layers_with_inputs(model, image):
        if not isinstance(layer, GraphLayer):
            continue
        rows = layer.out_shape[0]
        for threads, r0, r1 in ((1, 0, rows), (2, 0, rows), (1, 1, rows - 1)):
            want = run_nodes(layer.nodes, layer.source, x, 0, layer._shapes, r0, r1, 1)
            prog = layer.compile(threads, r0, r1)
            if (threads, r0, r1) == (1, 0, rows):
                fused.append(len(fused_steps.find(prog)))
            tol = 1e-5 * max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(prog(x, 0), want, rtol=0, atol=tol)
    if ops.PACKED_MAX_PIXELS and fusion.active(1):
        assert sum(fused) == 2
