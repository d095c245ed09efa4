"""Small random ONNX networks from the supported ops, for the property tests: a stem, a few
blocks (plain convs of any kernel, stride, padding, dilation and groups with BatchNorm and an
activation; residual adds; squeeze-excitation; concat branches; max and average pools), and
a head (global pool, flatten, gemm). Built with onnx.helper only."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

onnx = __import__("pytest").importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


class Net:
    """An ONNX graph under construction: the current tensor and its (C, H, W)."""

    def __init__(self, rng: np.random.Generator, c: int, h: int, w: int):
        self.rng, self.nodes, self.inits = rng, [], []
        self.x, self.shape, self.n = "image", (c, h, w), 0
        self.image = (h, w, c)

    def name(self, op: str) -> str:
        self.n += 1
        return f"{op}_{self.n}"

    def const(self, a: np.ndarray) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k, s=1, p=0, g=1, d=1, bias=True):
        w = self.rng.standard_normal((cout, cin // g, k, k)) * np.sqrt(2.0 / (cin // g * k * k))
        ins = [x, self.const(w)] + ([self.const(0.1 * self.rng.standard_normal(cout))] if bias else [])
        return self.node("Conv", ins, kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p],
                         group=g, dilations=[d, d])

    def bn(self, x, c):
        r = self.rng
        parts = [0.5 + r.random(c), 0.2 * r.standard_normal(c), 0.2 * r.standard_normal(c),
                 0.5 + r.random(c)]
        return self.node("BatchNormalization", [x] + [self.const(p) for p in parts], epsilon=1e-3)

    def act(self, x, kind):
        if kind == "clip":
            return self.node("Clip", [x, self.const(np.float32(0)), self.const(np.float32(6))])
        if kind == "hardsigmoid":
            return self.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
        if kind == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        return self.node({"relu": "Relu", "hardswish": "HardSwish", "sigmoid": "Sigmoid"}[kind], [x])

    def model(self, classes: int) -> bytes:
        x = self.node("GlobalAveragePool", [self.x])
        x = self.node("Flatten", [x], axis=1)
        c = self.shape[0]
        w = self.const(self.rng.standard_normal((classes, c)) / np.sqrt(c))
        self.node("Gemm", [x, w, self.const(0.1 * self.rng.standard_normal(classes))],
                        transB=1)
        self.nodes[-1].output[0] = "logits"
        g = helper.make_graph(self.nodes, "random", [helper.make_tensor_value_info(
            "image", TensorProto.FLOAT, [1, self.image[2], *self.image[:2]])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
            self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m.SerializeToString()


ACTS = ("relu", "clip", "hardswish", "hardsigmoid", "sigmoid", "silu")


def _out(size, k, s, p, d=1):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def networks(draw, max_blocks: int = 4) -> tuple[bytes, tuple[int, int, int]]:
    """(ONNX bytes, image shape (H, W, C)) of a random small network."""
    h = draw(st.integers(9, 20))
    w = draw(st.integers(9, 20))
    c = draw(st.sampled_from([1, 3, 4]))
    net = Net(np.random.default_rng(draw(st.integers(0, 2**31))), c, h, w)
    for _ in range(draw(st.integers(1, max_blocks))):
        c, h, w = net.shape
        kind = draw(st.sampled_from(["conv", "conv", "residual", "se", "concat", "pool"]))
        if kind == "conv":
            k = draw(st.sampled_from([1, 2, 3, 5, 7]))
            s = draw(st.sampled_from([1, 1, 2, 3]))
            p = draw(st.integers(0, k // 2 + 1))
            d = draw(st.sampled_from([1, 1, 2]))
            if _out(min(h, w), k, s, p, d) < 2:
                continue
            groups = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
            if groups == "depthwise":
                g, cout = c, c * draw(st.sampled_from([1, 1, 2]))
            elif groups == "grouped" and c % 2 == 0:
                g, cout = 2, 2 * draw(st.integers(1, 4))
            else:
                g, cout = 1, draw(st.integers(1, 12))
            x = net.conv(net.x, c, cout, k, s, p, g, d, bias=draw(st.booleans()))
            if draw(st.booleans()):
                x = net.bn(x, cout)
            if draw(st.booleans()):
                x = net.act(x, draw(st.sampled_from(ACTS)))
            net.x, net.shape = x, (cout, _out(h, k, s, p, d), _out(w, k, s, p, d))
        elif kind == "residual":
            y = net.act(net.bn(net.conv(net.x, c, c, 3, 1, 1, bias=False), c), "relu")
            k = draw(st.sampled_from([1, 3]))
            y = net.conv(y, c, c, k, 1, k // 2)
            x = net.node("Add", [net.x, y] if draw(st.booleans()) else [y, net.x])
            net.x = net.act(x, "relu") if draw(st.booleans()) else x
        elif kind == "se":
            sq = net.node("GlobalAveragePool", [net.x])
            sq = net.act(net.conv(sq, c, max(1, c // 2), 1), "relu")
            sq = net.act(net.conv(sq, max(1, c // 2), c, 1), draw(st.sampled_from(["sigmoid", "hardsigmoid"])))
            net.x = net.node("Mul", [net.x, sq] if draw(st.booleans()) else [sq, net.x])
            if draw(st.booleans()):     # a projection, as in MobileNetV3 and EfficientNet
                cout = draw(st.integers(1, 12))
                net.x, net.shape = net.bn(net.conv(net.x, c, cout, 1, bias=False), cout), (cout, h, w)
        elif kind == "concat":
            a = net.act(net.conv(net.x, c, 3, 1), "relu")
            b = net.act(net.conv(net.x, c, 5, 3, 1, 1), "relu")
            net.x, net.shape = net.node("Concat", [a, b], axis=1), (8, h, w)
        else:
            k, s = draw(st.sampled_from([(2, 2), (3, 2), (3, 1), (2, 1)]))
            p = draw(st.integers(0, k // 2))
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            ceil = int(op == "MaxPool" and draw(st.booleans()))
            if _out(min(h, w), k, s, p) < 2:
                continue
            extra = {"ceil_mode": ceil} if ceil else {}
            if op == "AveragePool":
                extra["count_include_pad"] = draw(st.sampled_from([0, 1]))
            net.x = net.node(op, [net.x], kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p],
                             **extra)
            ho, wo = (-(-(h + 2 * p - k) // s) + 1, -(-(w + 2 * p - k) // s) + 1) if ceil else \
                (_out(h, k, s, p), _out(w, k, s, p))
            if ceil:
                ho -= (ho - 1) * s >= h + p
                wo -= (wo - 1) * s >= w + p
            net.shape = (c, ho, wo)
    return net.model(draw(st.integers(2, 7))), net.image
