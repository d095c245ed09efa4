"""ONNX import: the standard CNNs against onnxruntime, the MobileNetV2 export against the
.pth import, random small networks of every supported op, and clear errors for what is
not supported."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decolla.forward import forward
from decolla.graph import GraphError, load_onnx_model
from decolla.loader import load_model
from decolla.model import ModelError
from decolla.plans import build_plan
from decolla.plans.run import run_plan

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("bench.zoo")   # needs torch
from tests.onnx_graphs import networks  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402


def ort_session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ort_logits(sess, image: np.ndarray) -> np.ndarray:
    return sess.run(None, {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None])})[0][0]


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> path of the zoo network exported at 64 x 64 (made once)."""
    d = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(name, size=64):
        if (name, size) not in cache:
            path = str(d / f"{name}_{size}.onnx")
            zoo.export(name, path, size, seed=len(cache))
            cache[(name, size)] = path
        return cache[(name, size)]
    return get


@pytest.mark.parametrize("name", zoo.MODELS)
def test_zoo_network_matches_onnxruntime(exported, name):
    path = exported(name)
    model = load_model(path)
    sess = ort_session(path)
    rng = np.random.default_rng(7)
    for _ in range(20):
        image = rng.standard_normal(model.input_shape).astype(np.float32)
        assert rel_err(forward(model, image), ort_logits(sess, image)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.MODELS)
def test_zoo_network_matches_onnxruntime_at_224(exported, name):
    path = exported(name, 224)
    model = load_model(path)
    image = np.random.default_rng(1).standard_normal((224, 224, 3)).astype(np.float32)
    assert rel_err(forward(model, image), ort_logits(ort_session(path), image)) <= 1e-4


def test_mobilenet_v2_onnx_equals_the_pth_import(exported, tmp_path):
    from decolla.torch_import import import_state_dict
    net = zoo.build("mobilenet_v2", seed=3, num_classes=10)
    path = str(tmp_path / "m.onnx")
    zoo.export(net, path, 64)
    via_onnx = load_model(path)
    via_pth = import_state_dict(net.state_dict(), "mobilenet_v2", input_size=64)
    # the same layers of the IR (so the same kernels and plans), named after the graph
    def arch(model):   # (a pool's relu6 flag means nothing)
        return [(l.kind, l.in_shape, l.out_shape, l.stride, l.relu6 and l.kind != "gap",
                 l.residual is None) for l in model.layers]
    assert arch(via_onnx) == arch(via_pth)
    rng = np.random.default_rng(0)
    for _ in range(5):
        image = rng.standard_normal((64, 64, 3)).astype(np.float32)
        assert rel_err(forward(via_onnx, image), forward(via_pth, image)) <= 1e-5


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(networks())
def test_random_networks_match_onnxruntime(tmp_path_factory, net):
    blob, shape = net
    path = tmp_path_factory.mktemp("rand") / "net.onnx"
    path.write_bytes(blob)
    model = load_onnx_model(str(path))
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = ort_logits(ort_session(blob), image)
    assert rel_err(forward(model, image), want) <= 1e-4


def _one_node_model(tmp_path, op, attrs=None, inputs=("image",)):
    node = helper.make_node(op, list(inputs), ["y"], name="the_node", **(attrs or {}))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "image", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)])
    path = tmp_path / "bad.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                     .SerializeToString())
    return str(path)


@pytest.mark.parametrize("op, attrs, msg", [
    ("LeakyRelu", {}, r"node 'the_node': op LeakyRelu is not supported; supported: Conv, "),
    ("Softmax", {}, r"op Softmax is not supported; supported: .*GlobalAveragePool"),
    ("MaxPool", {"kernel_shape": [2, 2], "storage_order": 1},
     r"node 'the_node' \(MaxPool\): storage_order=1 is not supported"),
    ("Concat", {"axis": 2}, r"node 'the_node' \(Concat\): axis 2 is not supported"),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
     r"ceil_mode=1 that changes the output size is not supported"),
])
def test_unsupported_op_or_attribute_is_a_clear_error(tmp_path, op, attrs, msg):
    inputs = ("image", "image") if op == "Concat" else ("image",)
    with pytest.raises(GraphError, match=msg):
        load_model(_one_node_model(tmp_path, op, attrs, inputs))


def test_bad_onnx_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(GraphError, match="not a readable ONNX model"):
        load_model(str(junk))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.onnx"))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(networks(max_blocks=5), st.sampled_from(["single", "layer", "fused", "block", "spatial",
                                                "exchange", "auto:bandwidth_mbit=1000,min_gain=1"]),
       st.integers(2, 4))
def test_every_plan_of_a_random_network_equals_the_single_process_forward(
        tmp_path_factory, net, plan, k):
    blob, shape = net
    path = tmp_path_factory.mktemp("plan") / "net.onnx"
    path.write_bytes(blob)
    model = load_onnx_model(str(path))
    image = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want = forward(model, image)
    p = build_plan(model.layer_specs(), k, plan, model.input_shape)
    got, _ = run_plan(model, p, image, wire_dtype=None)
    assert rel_err(got, want) <= 1e-5


def test_plan_explain_lists_the_operators_of_an_imported_network(exported, capsys):
    from decolla import cli
    args = cli.build_parser().parse_args(["plan", "--explain", "--plan", "spatial", "--model",
                                          exported("resnet18")])
    assert cli._plan(args) == 0
    out = capsys.readouterr().out
    assert "ops conv 7x7/2, maxpool 3x3/2" in out and "add x" in out
    assert re.search(r"\n  0 spatial +3 ", out), out     # the stem's strips carry 7x7 halos


def test_a_strip_whose_rows_read_only_padding(tmp_path):
    from tests.onnx_graphs import Net
    net = Net(np.random.default_rng(0), 2, 9, 10)
    x = net.conv(net.x, 2, 2, 7)                                  # 3 x 4
    for _ in range(2):                                            # 2 x 3, then 2 x 2
        x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1])
    net.x, net.shape = net.conv(x, 2, 3, 1, 1, 1), (3, 4, 4)   # 1x1, pad 1: a zero border
    path = tmp_path / "pad.onnx"
    path.write_bytes(net.model(4))
    model = load_onnx_model(str(path))
    image = np.random.default_rng(1).standard_normal((9, 10, 2)).astype(np.float32)
    want = ort_logits(ort_session(str(path)), image)
    for k in (2, 3, 4):
        plan = build_plan(model.layer_specs(), k, "spatial", model.input_shape)
        assert len(plan.stages[0].chunks) == k
        assert all(a <= b for c in plan.stages[0].chunks for a, b in c.layer_rows)
        assert rel_err(run_plan(model, plan, image, wire_dtype=None)[0], want) <= 1e-5
