"""The standard CNNs the ONNX importer is checked and timed on, with seeded random weights.

torchvision's own model code cannot be imported beside the CPU torch build this project
pins (its compiled operators do not load), so the architectures are written here in plain
torch.nn, following torchvision's definitions (module names too, so a MobileNetV2
state_dict is torchvision's): resnet18, mobilenet_v2, mobilenet_v3_small/large,
efficientnet_b0, squeezenet1_1. `export(name, path, size)` writes one as ONNX, NCHW input
'image' of shape (1, 3, size, size). Needs torch (the `train` extra).
"""
from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
          "efficientnet_b0", "squeezenet1_1")


def divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation (torchvision's Conv2dNormActivation)."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, norm=nn.BatchNorm2d):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                  norm(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


# --------------------------------------------------------------------------- resnet18

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + idt)


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, c in enumerate((64, 128, 256, 512), start=1):
            s = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, c, s), BasicBlock(c, c, 1)))
            cin = c
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- mobilenet_v2

class InvertedResidualV2(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = int(round(cin * t))
        self.use_res = stride == 1 and cin == cout
        layers = [] if t == 1 else [ConvNormAct(cin, hidden, 1, act=nn.ReLU6)]
        layers += [ConvNormAct(hidden, hidden, 3, stride, hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        cin = 32
        feats: list = [ConvNormAct(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
            for i in range(n):
                feats.append(InvertedResidualV2(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(ConvNormAct(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- SE blocks

class SqueezeExcitation(nn.Module):
    def __init__(self, cin, squeeze, act=nn.ReLU, scale=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(cin, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, cin, 1)
        self.activation = act()
        self.scale_activation = scale()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, k, exp, cout, se, hs, stride, norm):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res = stride == 1 and cin == cout
        layers: list = [] if exp == cin else [ConvNormAct(cin, exp, 1, act=act, norm=norm)]
        layers.append(ConvNormAct(exp, exp, k, stride, exp, act=act, norm=norm))
        if se:
            layers.append(SqueezeExcitation(exp, divisible(exp // 4), scale=nn.Hardsigmoid))
        layers.append(ConvNormAct(exp, cout, 1, act=None, norm=norm))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


V3_LARGE = [(16, 3, 16, 16, 0, 0, 1), (16, 3, 64, 24, 0, 0, 2), (24, 3, 72, 24, 0, 0, 1),
            (24, 5, 72, 40, 1, 0, 2), (40, 5, 120, 40, 1, 0, 1), (40, 5, 120, 40, 1, 0, 1),
            (40, 3, 240, 80, 0, 1, 2), (80, 3, 200, 80, 0, 1, 1), (80, 3, 184, 80, 0, 1, 1),
            (80, 3, 184, 80, 0, 1, 1), (80, 3, 480, 112, 1, 1, 1), (112, 3, 672, 112, 1, 1, 1),
            (112, 5, 672, 160, 1, 1, 2), (160, 5, 960, 160, 1, 1, 1), (160, 5, 960, 160, 1, 1, 1)]
V3_SMALL = [(16, 3, 16, 16, 1, 0, 2), (16, 3, 72, 24, 0, 0, 2), (24, 3, 88, 24, 0, 0, 1),
            (24, 5, 96, 40, 1, 1, 2), (40, 5, 240, 40, 1, 1, 1), (40, 5, 240, 40, 1, 1, 1),
            (40, 5, 120, 48, 1, 1, 1), (48, 5, 144, 48, 1, 1, 1), (48, 5, 288, 96, 1, 1, 2),
            (96, 5, 576, 96, 1, 1, 1), (96, 5, 576, 96, 1, 1, 1)]


class MobileNetV3(nn.Module):
    def __init__(self, setting, last_channel, num_classes=1000):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        feats: list = [ConvNormAct(3, 16, 3, 2, act=nn.Hardswish, norm=norm)]
        feats += [InvertedResidualV3(*row, norm=norm) for row in setting]
        last_in = setting[-1][3]
        feats.append(ConvNormAct(last_in, 6 * last_in, 1, act=nn.Hardswish, norm=norm))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last_channel), nn.Hardswish(),
                                        nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- efficientnet_b0

class MBConv(nn.Module):
    def __init__(self, t, k, stride, cin, cout):
        super().__init__()
        exp = divisible(cin * t)
        self.use_res = stride == 1 and cin == cout
        layers: list = [] if exp == cin else [ConvNormAct(cin, exp, 1, act=nn.SiLU)]
        layers += [ConvNormAct(exp, exp, k, stride, exp, act=nn.SiLU),
                   SqueezeExcitation(exp, max(1, cin // 4), act=nn.SiLU),
                   ConvNormAct(exp, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        feats: list = [ConvNormAct(3, 32, 3, 2, act=nn.SiLU)]
        for t, k, s, cin, cout, n in [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2),
                                      (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                                      (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
                                      (6, 3, 1, 192, 320, 1)]:
            feats.append(nn.Sequential(*[MBConv(t, k, s if i == 0 else 1, cin if i == 0 else cout,
                                                cout) for i in range(n)]))
        feats.append(ConvNormAct(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- squeezenet1_1

class Fire(nn.Module):
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.squeeze(x))
        return torch.cat([self.act(self.expand1x1(x)), self.act(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        pool = partial(nn.MaxPool2d, 3, 2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), pool(),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# --------------------------------------------------------------------------- building

BUILDERS = {
    "resnet18": ResNet18,
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v3_small": partial(MobileNetV3, V3_SMALL, 1024),
    "mobilenet_v3_large": partial(MobileNetV3, V3_LARGE, 1280),
    "efficientnet_b0": EfficientNetB0,
    "squeezenet1_1": SqueezeNet11,
}


def build(name: str, seed: int = 0, num_classes: int = 1000) -> nn.Module:
    """Network `name` in eval mode with seeded weights and non-trivial BatchNorm statistics
    (so that folding them is really exercised)."""
    torch.manual_seed(seed)
    return randomize_batchnorm(BUILDERS[name](num_classes=num_classes), seed + 1)


def randomize_batchnorm(net: nn.Module, seed: int) -> nn.Module:
    """`net` in eval mode with seeded, non-trivial BatchNorm statistics (so that folding
    them is really exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return net.eval()


def export(net: nn.Module | str, path: str, size: int, seed: int = 0,
           num_classes: int = 1000) -> nn.Module:
    """Write `net` (or the zoo network of that name) as ONNX (opset 17, input 'image'
    (1, 3, size, size), output 'logits'); returns the torch network."""
    if isinstance(net, str):
        net = build(net, seed, num_classes)
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter is deprecated
        torch.onnx.export(net, (x,), path, input_names=["image"], output_names=["logits"],
                          opset_version=17, dynamo=False)
    return net
