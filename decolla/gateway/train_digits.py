"""Train the demo recogniser: MobileNetV2 (width 0.35, 32x32 input, 10 classes) on scikit-learn's
digits, import it into a DeColla model file and measure held-out accuracy with DeColla's forward.

    python -m decolla.gateway.train_digits --out decolla/data/digits_mobilenet_v2.npz

Needs the `train` extra (torch) and scikit-learn. The data set ships inside scikit-learn (no
download). The torch network uses torchvision's MobileNetV2 module layout and key names, so the
checkpoint goes through the same importer as any torchvision checkpoint (decolla.torch_import).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import structlog

from decolla.forward import forward
from decolla.gateway.preprocess import digits_input
from decolla.model import make_divisible
from decolla.torch_import import import_state_dict

log = structlog.get_logger("decolla.train_digits")

ARCH, WIDTH, INPUT_SIZE, NUM_CLASSES = "mobilenet_v2", 0.35, 32, 10


def torch_mobilenet_v2(width: float, num_classes: int):
    """MobileNetV2 in torch with torchvision's module tree (same state_dict keys)."""
    from torch import nn

    def conv_bn(cin, cout, k, stride, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = int(round(cin * t))
            self.use_res = stride == 1 and cin == cout
            layers = [conv_bn(cin, hidden, 1, 1)] if t != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            cin = make_divisible(32 * width)
            feats = [conv_bn(3, cin, 3, 2)]
            for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
                cout = make_divisible(c * width)
                for i in range(n):
                    feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            last = make_divisible(1280 * max(1.0, width))
            feats.append(conv_bn(cin, last, 1, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

        def forward(self, x):
            x = self.features(x).mean(dim=(2, 3))
            return self.classifier(x)

    return MobileNetV2()


def load_split(seed: int):
    """Digits as model inputs (N, H, W, 3) and labels, split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = np.stack([digits_input(g, INPUT_SIZE) for g in d.images])
    return train_test_split(x, d.target.astype(np.int64), test_size=0.2, random_state=seed,
                            stratify=d.target)


def _augment(torch, xb, gen):
    """Random small affine jitter (shift, scale, rotation) of a NCHW batch; background is -1."""
    n = xb.shape[0]
    ang = (torch.rand(n, generator=gen) - 0.5) * math.radians(20)
    scale = 1.0 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.25
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, xb.shape, align_corners=False)
    return torch.nn.functional.grid_sample(xb + 1.0, grid, align_corners=False) - 1.0


def train(epochs: int, seed: int, threads: int):
    """Train the torch network; returns (net, x_test, y_test, torch_test_accuracy)."""
    import torch
    from tqdm import tqdm
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals made some epochs 20x slower
    x_tr, x_te, y_tr, y_te = load_split(seed)
    xt = torch.from_numpy(x_tr).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y_tr)
    net = torch_mobilenet_v2(WIDTH, NUM_CLASSES)
    batch = 64
    steps = epochs * math.ceil(len(xt) / batch)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in tqdm(range(epochs), desc="epochs"):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(net(_augment(torch, xt[idx], gen)), yt[idx],
                                                     label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(x_te).permute(0, 3, 1, 2).contiguous()).argmax(1).numpy()
    return net, x_te, y_te, float((pred == y_te).mean())


def decolla_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of a DeColla model computed with DeColla's own forward pass."""
    pred = np.array([int(np.argmax(forward(model, img))) for img in x])
    return float((pred == y).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="decolla/data/digits_mobilenet_v2.npz")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-torch", default=None, help="also write the torch state_dict (.pt)")
    args = p.parse_args(argv)
    import torch

    t0 = time.perf_counter()
    net, x_te, y_te, torch_acc = train(args.epochs, args.seed, args.threads)
    train_s = time.perf_counter() - t0
    sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if args.save_torch:
        torch.save(sd, args.save_torch)
    model = import_state_dict(sd, arch=ARCH, width=WIDTH, num_classes=NUM_CLASSES,
                              input_size=INPUT_SIZE)
    acc = decolla_accuracy(model, x_te, y_te)
    model.name = "digits_mobilenet_v2"
    model.meta.update({"preprocess": "digits", "labels": [str(i) for i in range(10)],
                       "dataset": "scikit-learn digits (1797 images, 8x8), 80/20 stratified split",
                       "split_seed": args.seed, "epochs": args.epochs,
                       "heldout_accuracy": round(acc, 4), "heldout_size": int(len(y_te)),
                       "train_seconds": round(train_s, 1)})
    model.save(args.out)
    log.info("trained digits model", out=args.out, train_seconds=round(train_s, 1),
             torch_accuracy=round(torch_acc, 4), decolla_accuracy=round(acc, 4),
             heldout=int(len(y_te)), digest=model.digest()[:12])
    print(f"held-out accuracy {acc:.4f} on {len(y_te)} images (torch {torch_acc:.4f}); "
          f"trained in {train_s:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
