"""Import (and export) torchvision-format MobileNet state_dicts, folding BatchNorm.

Key names follow torchvision's `mobilenet_v2` (decolla.model.mobilenet_v2_layers
maps every layer to its key prefix) and, for V1, the layout described in
decolla.model.mobilenet_v1_layers. Values may be numpy arrays or torch tensors;
torch itself is only needed to read .pt/.pth files.
"""
from __future__ import annotations

import os

import numpy as np

from decolla.model import ARCHS, Layer, Model, ModelError, fold_batchnorm, validate

BN_EPS = 1e-5  # torchvision MobileNetV2 uses BatchNorm2d's default eps


def _np(v, key: str) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu().numpy()
    a = np.asarray(v)
    if a.dtype.kind not in "fiu":
        raise ModelError(f"state_dict key {key!r}: dtype {a.dtype} is not numeric")
    return a


def _get(sd: dict, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in sd:
        raise ModelError(f"state_dict has no key {key!r} (expected shape {shape})")
    a = _np(sd[key], key)
    if tuple(a.shape) != tuple(shape):
        raise ModelError(f"state_dict key {key!r} has shape {tuple(a.shape)}, expected {shape}")
    if not np.isfinite(a).all():
        raise ModelError(f"state_dict key {key!r} has non-finite values")
    return a


def _conv_keys(arch: str, layer: Layer, prefix: str) -> tuple[str, str | None]:
    """(conv/linear module prefix, BatchNorm prefix or None) for one layer."""
    if layer.kind == "linear":
        return prefix, None
    if (arch == "mobilenet_v1" and layer.name != "stem") or layer.name.endswith(".project"):
        head, _, idx = prefix.rpartition(".")
        return prefix, f"{head}.{int(idx) + 1}"
    return f"{prefix}.0", f"{prefix}.1"


def _torch_shape(layer: Layer) -> tuple[int, ...]:
    cin, cout = layer.in_shape[-1], layer.out_shape[-1]
    return {"conv3x3": (cout, cin, 3, 3), "dwconv3x3": (cin, 1, 3, 3),
            "pwconv": (cout, cin, 1, 1), "linear": (cout, cin)}[layer.kind]


def _to_decolla(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "conv3x3":
        return w.transpose(2, 3, 1, 0)
    if kind == "dwconv3x3":
        return w[:, 0].transpose(1, 2, 0)
    if kind == "pwconv":
        return w[:, :, 0, 0].T
    return w.T


def _to_torch(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "conv3x3":
        return w.transpose(3, 2, 0, 1)
    if kind == "dwconv3x3":
        return w.transpose(2, 0, 1)[:, None]
    if kind == "pwconv":
        return w.T[:, :, None, None]
    return w.T


def _clean(state_dict) -> dict:
    if not isinstance(state_dict, dict):
        raise ModelError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _shapes_fit(sd: dict, arch: str, width: float, num_classes: int) -> bool:
    layers, keys = ARCHS[arch](width, 224, num_classes)
    for layer in layers:
        if layer.name not in keys:
            continue
        conv, _ = _conv_keys(arch, layer, keys[layer.name])
        v = sd.get(conv + ".weight")
        if v is None or tuple(np.shape(v)) != _torch_shape(layer):
            return False
    return True


def _infer_width(sd: dict, arch: str, hint: float, num_classes: int) -> float:
    if _shapes_fit(sd, arch, hint, num_classes):
        return hint
    for w in sorted({round(0.05 * i, 2) for i in range(2, 41)} | {0.35, 0.75, 1.3, 1.4},
                    key=lambda w: abs(w - hint)):
        if _shapes_fit(sd, arch, w, num_classes):
            return w
    return hint  # nothing fits: the import below names the first mis-shaped key


def import_state_dict(state_dict, arch: str = "mobilenet_v2", width: float | None = 1.0,
                      num_classes: int | None = None, input_size: int = 224) -> Model:
    """A Model from a torchvision-format state_dict (BN folded into the convolutions).

    num_classes is read from the classifier; width is inferred from the weight shapes
    when the given one (a hint) does not fit.
    """
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
    sd = _clean(state_dict)
    cls_key = "classifier.1.weight" if arch == "mobilenet_v2" else "classifier.weight"
    if num_classes is None:
        if cls_key not in sd or np.ndim(sd[cls_key]) != 2:
            raise ModelError(f"state_dict has no 2-D {cls_key!r} to read num_classes from")
        num_classes = int(np.shape(sd[cls_key])[0])
    width = _infer_width(sd, arch, 1.0 if width is None else float(width), num_classes)
    layers, keys = ARCHS[arch](width, input_size, num_classes)
    for layer in layers:
        if layer.kind == "gap":
            continue
        conv, bn = _conv_keys(arch, layer, keys[layer.name])
        w = _get(sd, conv + ".weight", _torch_shape(layer)).astype(np.float64)
        cout = layer.out_shape[-1]
        b = _get(sd, conv + ".bias", (cout,)).astype(np.float64) if conv + ".bias" in sd else None
        w = _to_decolla(layer.kind, w)
        if bn is None:
            layer.weight = np.ascontiguousarray(w, dtype=np.float32)
            layer.bias = (np.zeros(cout) if b is None else b).astype(np.float32)
            continue
        gamma, beta, mean, var = (_get(sd, f"{bn}.{n}", (cout,)).astype(np.float64)
                                  for n in ("weight", "bias", "running_mean", "running_var"))
        if (var < 0).any():
            raise ModelError(f"state_dict key {bn + '.running_var'!r} has negative values")
        fw, fb = fold_batchnorm(w, b, gamma, beta, mean, var, BN_EPS)
        layer.weight, layer.bias = np.ascontiguousarray(fw), fb
    meta = {"arch": arch, "width": width, "input_size": input_size,
            "num_classes": num_classes, "source": "state_dict"}
    model = Model(arch, (input_size, input_size, 3), layers, meta)
    validate(model)
    return model


def export_state_dict(model: Model, arch: str | None = None) -> dict[str, np.ndarray]:
    """torchvision-format state_dict of a (folded) model, BatchNorm set to identity."""
    arch = arch or model.meta.get("arch", model.name)
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
    _, keys = ARCHS[arch](model.meta.get("width", 1.0), model.input_shape[0],
                          model.num_classes)
    sd: dict[str, np.ndarray] = {}
    for layer in model.layers:
        if layer.kind == "gap":
            continue
        if layer.name not in keys:
            raise ModelError(f"layer {layer.name} has no {arch} key (width in meta wrong?)")
        conv, bn = _conv_keys(arch, layer, keys[layer.name])
        sd[conv + ".weight"] = np.ascontiguousarray(_to_torch(layer.kind, layer.weight))
        cout = layer.out_shape[-1]
        if bn is None:
            sd[conv + ".bias"] = layer.bias.copy()
            continue
        sd[f"{bn}.weight"] = np.ones(cout, np.float32)
        sd[f"{bn}.bias"] = layer.bias.copy()
        sd[f"{bn}.running_mean"] = np.zeros(cout, np.float32)
        sd[f"{bn}.running_var"] = np.full(cout, 1.0 - BN_EPS, np.float32)
        sd[f"{bn}.num_batches_tracked"] = np.zeros((), np.int64)
    return sd


def guess_arch(state_dict) -> str:
    """'mobilenet_v2' or 'mobilenet_v1' from the key names."""
    sd = _clean(state_dict)
    if "features.1.conv.0.0.weight" in sd:
        return "mobilenet_v2"
    if "features.1.0.weight" in sd:
        return "mobilenet_v1"
    raise ModelError("state_dict keys match neither torchvision mobilenet_v2 nor the V1 layout")


def load_state_dict_file(path: str | os.PathLike, arch: str | None = None,
                         width: float | None = 1.0, num_classes: int | None = None,
                         input_size: int = 224) -> Model:
    """A Model from a .pt/.pth state_dict file (torch.load with weights_only=True)."""
    try:
        import torch
    except ImportError as exc:
        raise ModelError(f"{path}: reading PyTorch files needs torch "
                         f"(pip install 'decolla[train]')") from exc
    if not os.path.exists(path):
        raise ModelError(f"model file {str(path)!r} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise ModelError(f"{path}: not a loadable PyTorch state_dict ({exc})") from exc
    arch = arch or guess_arch(sd)
    return import_state_dict(sd, arch, width, num_classes, input_size)
