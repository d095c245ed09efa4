"""Whole-model forward on the kernels: against torch models with torchvision's key
names, against the numpy reference, chunk splits, and bad images."""
from __future__ import annotations

import numpy as np
import pytest

from decolla import model as M
from decolla import ops, reference
from decolla.forward import Forward, forward
from decolla.torch_import import import_state_dict

try:
    import torch
    nn = torch.nn
except ImportError:  # pragma: no cover - torch is an optional extra
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


# --------------------------------------------------------------------------- torch models
# Built here with plain torch.nn modules so that their state_dict keys are exactly
# torchvision's (mobilenet_v2) and the V1 layout documented in decolla.model.

if torch is not None:
    from bench.zoo import randomize_batchnorm

    def _cbr(cin, cout, k, stride, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = int(round(cin * t))
            self.use_res = stride == 1 and cin == cout
            layers = [] if t == 1 else [_cbr(cin, hidden, 1, 1)]
            layers += [_cbr(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)


    class TorchMobileNetV2(nn.Module):
        def __init__(self, width=1.0, num_classes=1000):
            super().__init__()
            cin = M.make_divisible(32 * width)
            feats = [_cbr(3, cin, 3, 2)]
            for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
                cout = M.make_divisible(c * width)
                for i in range(n):
                    feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            last = M.make_divisible(1280 * max(1.0, width))
            feats.append(_cbr(cin, last, 1, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))


    class TorchMobileNetV1(nn.Module):
        def __init__(self, width=1.0, num_classes=1000):
            super().__init__()
            cin = M.make_divisible(32 * width)
            feats = [_cbr(3, cin, 3, 2)]
            setting = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + \
                [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
            for c, s in setting:
                cout = M.make_divisible(c * width)
                feats.append(nn.Sequential(*_cbr(cin, cin, 3, s, groups=cin), *_cbr(cin, cout, 1, 1)))
                cin = cout
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Linear(cin, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))


    TORCH_NETS = {"mobilenet_v2": TorchMobileNetV2, "mobilenet_v1": TorchMobileNetV1}


def _compare(arch, width, size, num_classes=1000, seed=0):
    torch.manual_seed(seed)
    net = randomize_batchnorm(TORCH_NETS[arch](width, num_classes), seed)
    sd = net.state_dict()
    model = import_state_dict(sd, arch, input_size=size)
    assert model.meta["width"] == width and model.num_classes == num_classes
    image = np.random.default_rng(seed).standard_normal((size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(image).permute(2, 0, 1)[None])[0].numpy()
    got = forward(model, image)
    assert got.shape == (num_classes,) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    return model, image, got


@needs_torch
@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v1"])
@pytest.mark.parametrize("width", [1.0, 0.5])
def test_forward_matches_torch_small_inputs(arch, width):
    _compare(arch, width, 96, num_classes=10, seed=int(width * 10))


@needs_torch
@pytest.mark.slow
def test_forward_matches_torch_224():
    _compare("mobilenet_v2", 1.0, 224)


def test_forward_matches_reference_and_is_repeatable():
    model = M.mobilenet_v2(width=0.5, input_size=64, num_classes=20, seed=3)
    image = np.random.default_rng(0).uniform(0, 1, (64, 64, 3))  # float64 is cast
    want = reference.forward(model, image)
    f = Forward(model)
    got = f(image)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(f(image), got)  # reused buffers, same answer
    # two threads: BLAS may sum in another order, so equal up to rounding
    np.testing.assert_allclose(f(image, threads=2), got, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(forward(model, image), got)


@pytest.mark.parametrize("image, exc, msg", [
    (np.zeros((64, 64, 4), np.float32), ValueError, r"image has shape \(64, 64, 4\)"),
    (np.zeros((3, 64, 64), np.float32), ValueError, "the model expects"),
    (np.zeros((64, 64), np.float32), ValueError, "image has shape"),
    (np.full((64, 64, 3), np.nan, np.float32), ValueError, "non-finite"),
    (np.full((64, 64, 3), np.inf), ValueError, "non-finite"),
    (np.zeros((64, 64, 3), complex), TypeError, "real numbers"),
    ("not an image", TypeError, "real numbers"),
])
def test_bad_images(image, exc, msg):
    model = M.mobilenet_v1(width=0.25, input_size=64, num_classes=5)
    with pytest.raises(exc, match=msg):
        forward(model, image)


def test_uint8_image_is_accepted():
    model = M.mobilenet_v1(width=0.25, input_size=64, num_classes=5)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(forward(model, image), reference.forward(model, image),
                               atol=1e-4)


# --------------------------------------------------------------------------- splits

def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


def same(got, whole, layer):
    """Depthwise and pooling compute each output element the same way in any chunk:
    bitwise equal. BLAS-based kernels may block a smaller GEMM differently, which
    changes the rounding of the sums: equal to a few ulp."""
    assert got.shape == whole.shape
    if layer.kind in ("dwconv3x3", "gap"):
        np.testing.assert_array_equal(got, whole)
    else:
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5 * max(1.0, np.abs(whole).max()))


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v1"])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_channel_and_row_splits_concatenate_to_the_whole(arch, k):
    model = M.build(arch, width=0.5, input_size=48, num_classes=12, seed=k)
    image = np.random.default_rng(k).standard_normal((48, 48, 3)).astype(np.float32)
    _, tensors = reference.forward(model, image, keep=True)
    prev = "input"
    for layer in model.layers:
        x = tensors[prev]
        res = tensors[layer.residual] if layer.residual else None
        whole = ops.run_layer(layer, x, res)
        np.testing.assert_allclose(whole, tensors[layer.name],
                                   atol=1e-5 * max(1.0, np.abs(whole).max()))
        cout = layer.out_shape[-1]
        parts = []
        for c0, c1 in _chunks(cout, k):
            xin = x
            if layer.kind == "dwconv3x3" and c1 > c0:  # a depthwise chunk may get only its channels
                xin = np.ascontiguousarray(x[..., c0:c1])
            rin = None if res is None else np.ascontiguousarray(res[..., c0:c1])
            parts.append(ops.run_layer(layer, xin, rin, c0=c0, c1=c1))
        same(np.concatenate(parts, axis=-1), whole, layer)
        if layer.kind in ("conv3x3", "dwconv3x3", "pwconv"):
            h = layer.in_shape[0]
            parts = []
            for r0, r1 in _chunks(layer.out_shape[0], k):
                lo, hi = ops.input_rows_needed(layer, None, r0, r1, h)
                parts.append(ops.run_layer(layer, np.ascontiguousarray(x[lo:hi]), res, r0=r0,
                                           r1=r1, in_row0=lo, in_height=h))
            same(np.concatenate(parts, axis=0), whole, layer)
        prev = layer.name


def test_run_layer_errors():
    model = M.mobilenet_v2(width=0.5, input_size=32, num_classes=4)
    proj = next(l for l in model.layers if l.residual)
    x = np.zeros(proj.in_shape, np.float32)
    with pytest.raises(ValueError, match="adds the residual"):
        ops.run_layer(proj, x)
    stem = model.layers[0]
    with pytest.raises(ValueError, match="has no residual"):
        ops.run_layer(stem, np.zeros(stem.in_shape, np.float32),
                      np.zeros(stem.out_shape, np.float32))
    with pytest.raises(ValueError, match="does not match the layer input"):
        ops.run_layer(stem, np.zeros((32, 31, 3), np.float32))
    with pytest.raises(ValueError, match="in_height 20 differs"):
        ops.run_layer(stem, np.zeros((20, 32, 3), np.float32), in_height=20)
    with pytest.raises(ValueError, match="cannot be split by rows"):
        ops.run_layer(model.layers[-1], np.zeros(model.layers[-1].in_shape, np.float32), r0=1)
    with pytest.raises(TypeError, match="Layer"):
        ops.run_layer("stem", x)


def test_non_contiguous_weights_are_handled():
    model = M.mobilenet_v1(width=0.25, input_size=32, num_classes=5, seed=1)
    image = np.random.default_rng(0).standard_normal((32, 32, 3)).astype(np.float32)
    want = forward(model, image)
    layer = model.layers[2]
    layer.weight = np.asfortranarray(layer.weight)  # same values, other memory order
    np.testing.assert_allclose(Forward(model)(image), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="weight must be C-contiguous"):
        ops.run_layer(layer, np.zeros(layer.in_shape, np.float32))
