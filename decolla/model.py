"""MobileNet V1/V2 as a small layer IR with BatchNorm folded into the weights.

Tensors are single images in NHWC without the batch axis: (H, W, C) float32.
Weight layouts (all float32, C-contiguous):
  conv3x3   weight (3, 3, Cin, Cout)   stem convolution, pad 1
  dwconv3x3 weight (3, 3, C)           depthwise convolution, pad 1
  pwconv    weight (Cin, Cout)         pointwise 1x1 convolution
  linear    weight (Cin, Cout)         logits = x @ weight + bias
  gap       no weights                 global average pool (H, W, C) -> (C,)
  graph, graph-global   a segment of an imported ONNX graph (decolla.graph.segments
                       GraphLayer): its own nodes and weights; row-wise or not
Every layer with weights has a bias (Cout,). `relu6` clamps the output to [0, 6];
`residual` names the tensor ('input' or an earlier layer's name) added to the
output after the bias (MobileNetV2 projections; no activation follows it).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

KINDS = ("conv3x3", "dwconv3x3", "pwconv", "gap", "linear", "graph", "graph-global")


class ModelError(ValueError):
    """A model file, spec or state_dict that cannot be used."""


@dataclass
class Layer:
    """One layer of the IR; see the module docstring for the weight layouts."""
    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: int = 1
    relu6: bool = False
    residual: str | None = None

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the whole layer."""
        out = int(np.prod(self.out_shape))
        if self.kind == "conv3x3":
            return out * 9 * self.in_shape[2]
        if self.kind == "dwconv3x3":
            return out * 9
        if self.kind in ("pwconv", "linear"):
            return out * self.in_shape[-1]
        return int(np.prod(self.in_shape))  # gap: one add per input element

    def arrays(self) -> list:
        """The layer's weight arrays, in the order the digest reads them."""
        return [a for a in (self.weight, self.bias) if a is not None]

    def spec(self) -> dict:
        """Shape and cost summary (no weights)."""
        return {"name": self.name, "kind": self.kind, "in_shape": tuple(self.in_shape),
                "out_shape": tuple(self.out_shape), "macs": self.macs, "stride": self.stride,
                "relu6": self.relu6, "residual": self.residual}


@dataclass
class Model:
    """A sequence of layers; each consumes the previous layer's output."""
    name: str
    input_shape: tuple[int, int, int]
    layers: list[Layer] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.layers[-1].out_shape[-1]

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def layer_specs(self) -> list[dict]:
        """Shape and cost summary of every layer."""
        return [layer.spec() for layer in self.layers]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def digest(self) -> str:
        """sha256 over the architecture and every weight, stable across save/load."""
        h = hashlib.sha256()
        h.update(json.dumps({"input_shape": list(self.input_shape),
                             "layers": [_jsonable(l.spec()) for l in self.layers]},
                            sort_keys=True).encode())
        for layer in self.layers:
            for arr in layer.arrays():
                h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write the model (architecture + weights) to an .npz file (not a model imported
        from ONNX: its file is the one to keep)."""
        if any(layer.kind not in KINDS[:5] for layer in self.layers):
            raise ModelError(f"model {self.name}: an imported graph is not saved as .npz "
                             "(keep its .onnx file)")
        arrays = {}
        for i, layer in enumerate(self.layers):
            if layer.weight is not None:
                arrays[f"w{i}"] = layer.weight
                arrays[f"b{i}"] = layer.bias
        header = {"format": "decolla-model-1", "name": self.name,
                  "input_shape": list(self.input_shape), "meta": self.meta,
                  "layers": [_jsonable(l.spec()) for l in self.layers]}
        hdr = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        if hasattr(path, "write"):
            np.savez(path, __header__=hdr, **arrays)
        else:
            with open(path, "wb") as fh:
                np.savez(fh, __header__=hdr, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Model":
        """Read a model written by `save`; raises ModelError, naming the file and what is
        wrong, on a file that is not one (truncated, no header, a weight missing...)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if "__header__" not in data.files:
                    raise ModelError("no DeColla header (an .npz, but not a DeColla model)")
                header = json.loads(bytes(data["__header__"]).decode())
                arrays = {k: data[k] for k in data.files if k != "__header__"}
            model = _from_header(cls, header, arrays)
            validate(model)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from None
        except (OSError, EOFError, ValueError, TypeError, KeyError, zipfile.BadZipFile,
                UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: not a DeColla model file, or truncated "
                             f"({type(exc).__name__}: {exc})") from None
        return model


_LAYER_KEYS = ("name", "kind", "in_shape", "out_shape", "stride", "relu6", "residual")


def _from_header(cls, header, arrays: dict) -> Model:
    """The model a file's header and arrays describe (ModelError saying what is missing)."""
    if not isinstance(header, dict):
        raise ModelError("the header is not a JSON object")
    if header.get("format") != "decolla-model-1":
        raise ModelError(f"unknown model format {header.get('format')!r}")
    missing = [k for k in ("name", "input_shape", "layers") if k not in header]
    if missing:
        raise ModelError(f"the header has no {', '.join(map(repr, missing))}")
    layers = []
    for i, spec in enumerate(header["layers"]):
        lacks = [k for k in _LAYER_KEYS if not isinstance(spec, dict) or k not in spec]
        if lacks:
            raise ModelError(f"layer {i} of the header has no {', '.join(map(repr, lacks))}")
        layer = Layer(name=spec["name"], kind=spec["kind"], in_shape=tuple(spec["in_shape"]),
                      out_shape=tuple(spec["out_shape"]), stride=spec["stride"],
                      relu6=spec["relu6"], residual=spec["residual"])
        if (f"w{i}" in arrays) != (f"b{i}" in arrays):
            raise ModelError(f"layer {layer.name}: array {'b' if f'w{i}' in arrays else 'w'}{i} "
                             "(its bias or weight) is missing")
        if f"w{i}" in arrays:
            layer.weight = arrays[f"w{i}"].astype(np.float32, copy=False)
            layer.bias = arrays[f"b{i}"].astype(np.float32, copy=False)
        layers.append(layer)
    return cls(header["name"], tuple(header["input_shape"]), layers, header.get("meta", {}))


def _jsonable(spec: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()}


def weight_shape(layer: Layer) -> tuple[int, ...] | None:
    """Expected weight shape of a layer (None for layers without weights)."""
    cin, cout = layer.in_shape[-1], layer.out_shape[-1]
    return {"conv3x3": (3, 3, cin, cout), "dwconv3x3": (3, 3, cin),
            "pwconv": (cin, cout), "linear": (cin, cout)}.get(layer.kind)


def validate(model: Model) -> None:
    """Check shapes, dtypes and finiteness of every layer; raise ModelError naming the problem."""
    names = {"input"}
    prev = tuple(model.input_shape)
    for layer in model.layers:
        if layer.kind not in KINDS:
            raise ModelError(f"layer {layer.name}: unknown kind {layer.kind!r}")
        if tuple(layer.in_shape) != prev:
            raise ModelError(f"layer {layer.name}: input shape {layer.in_shape} does not follow "
                             f"the previous output {prev}")
        expected = weight_shape(layer)
        if expected is not None:
            for what, arr, shape in (("weight", layer.weight, expected),
                                     ("bias", layer.bias, (layer.out_shape[-1],))):
                if arr is None or tuple(arr.shape) != shape:
                    got = None if arr is None else tuple(arr.shape)
                    raise ModelError(f"layer {layer.name}: {what} shape {got}, expected {shape}")
                if arr.dtype != np.float32:
                    raise ModelError(f"layer {layer.name}: {what} dtype {arr.dtype}, expected float32")
                if not np.isfinite(arr).all():
                    raise ModelError(f"layer {layer.name}: {what} has non-finite values")
        if layer.residual is not None and layer.residual not in names:
            raise ModelError(f"layer {layer.name}: residual source {layer.residual!r} is not an "
                             f"earlier tensor")
        names.add(layer.name)
        prev = tuple(layer.out_shape)


# --------------------------------------------------------------------------- builders

def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Channel rounding used by torchvision's MobileNetV2."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_out(size: int, stride: int) -> int:
    return (size + 2 - 3) // stride + 1


class _Builder:
    """Appends layers while tracking the current shape."""

    def __init__(self, input_size: int):
        self.shape = (input_size, input_size, 3)
        self.layers: list[Layer] = []

    def add(self, name: str, kind: str, cout: int | None = None, stride: int = 1,
            relu6: bool = True, residual: str | None = None) -> Layer:
        h, w, c = self.shape if len(self.shape) == 3 else (None, None, self.shape[0])
        if kind == "conv3x3":
            out = (_conv_out(h, stride), _conv_out(w, stride), cout)
        elif kind == "dwconv3x3":
            out = (_conv_out(h, stride), _conv_out(w, stride), c)
        elif kind == "pwconv":
            out = (h, w, cout)
        elif kind == "gap":
            out = (c,)
        else:
            out = (cout,)
        layer = Layer(name, kind, tuple(self.shape), out, stride=stride, relu6=relu6,
                      residual=residual)
        self.layers.append(layer)
        self.shape = out
        return layer


def mobilenet_v2_layers(width: float = 1.0, input_size: int = 224,
                        num_classes: int = 1000) -> tuple[list[Layer], dict[str, str]]:
    """MobileNetV2 layers without weights, and a map layer name -> torchvision key prefix."""
    b = _Builder(input_size)
    keys: dict[str, str] = {}
    cin = make_divisible(32 * width)
    b.add("stem", "conv3x3", cin, stride=2)
    keys["stem"] = "features.0"
    setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    idx = 1
    prev_name = "stem"
    for t, c, n, s in setting:
        cout = make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"b{idx}"
            f = f"features.{idx}.conv"
            hidden = int(round(cin * t))
            if t != 1:
                b.add(f"{p}.expand", "pwconv", hidden)
                keys[f"{p}.expand"] = f"{f}.0"
                b.add(f"{p}.dw", "dwconv3x3", stride=stride)
                keys[f"{p}.dw"] = f"{f}.1"
                proj_key = f"{f}.2"
            else:
                b.add(f"{p}.dw", "dwconv3x3", stride=stride)
                keys[f"{p}.dw"] = f"{f}.0"
                proj_key = f"{f}.1"
            residual = prev_name if (stride == 1 and cin == cout) else None
            b.add(f"{p}.project", "pwconv", cout, relu6=False, residual=residual)
            keys[f"{p}.project"] = proj_key
            prev_name = f"{p}.project"
            cin = cout
            idx += 1
    last = make_divisible(1280 * max(1.0, width))
    b.add("head", "pwconv", last)
    keys["head"] = f"features.{idx}"
    b.add("pool", "gap")
    b.add("classifier", "linear", num_classes, relu6=False)
    keys["classifier"] = "classifier.1"
    return b.layers, keys


def mobilenet_v1_layers(width: float = 1.0, input_size: int = 224,
                        num_classes: int = 1000) -> tuple[list[Layer], dict[str, str]]:
    """MobileNetV1 layers (ReLU6, as TF-slim) and a map to torch-style key prefixes.

    Torch layout the keys describe: features.0 = Sequential(conv, bn, relu6);
    features.i = Sequential(dwconv, bn, relu6, pwconv, bn, relu6); classifier = Linear.
    """
    b = _Builder(input_size)
    keys: dict[str, str] = {}
    b.add("stem", "conv3x3", make_divisible(32 * width), stride=2)
    keys["stem"] = "features.0"
    setting = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + \
        [(1024, 2), (1024, 1)]
    for i, (c, s) in enumerate(setting, start=1):
        b.add(f"b{i}.dw", "dwconv3x3", stride=s)
        keys[f"b{i}.dw"] = f"features.{i}.0"
        b.add(f"b{i}.pw", "pwconv", make_divisible(c * width))
        keys[f"b{i}.pw"] = f"features.{i}.3"
    b.add("pool", "gap")
    b.add("classifier", "linear", num_classes, relu6=False)
    keys["classifier"] = "classifier"
    return b.layers, keys


ARCHS = {"mobilenet_v1": mobilenet_v1_layers, "mobilenet_v2": mobilenet_v2_layers}


def _init_weights(layers: list[Layer], seed: int) -> None:
    """He-style init of folded weights; biases small so activations stay in range."""
    rng = np.random.default_rng(seed)
    for layer in layers:
        shape = weight_shape(layer)
        if shape is None:
            continue
        fan_in = {"conv3x3": 9 * layer.in_shape[-1], "dwconv3x3": 9}.get(layer.kind,
                                                                       layer.in_shape[-1])
        gain = 1.0 if layer.kind == "linear" or not layer.relu6 else 2.0
        layer.weight = (rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32)
        layer.bias = (rng.standard_normal(layer.out_shape[-1]) * 0.1).astype(np.float32)


def build(arch: str, width: float = 1.0, input_size: int = 224, num_classes: int = 1000,
          seed: int = 0) -> Model:
    """A model with deterministic seeded weights."""
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
    if input_size < 32:
        raise ModelError(f"input size {input_size} is too small (minimum 32)")
    if not 0 < width <= 8:
        raise ModelError(f"width {width} is impossible (a multiplier in (0, 8])")
    if num_classes < 1:
        raise ModelError(f"num_classes {num_classes} is impossible (at least 1)")
    layers, _ = ARCHS[arch](width, input_size, num_classes)
    _init_weights(layers, seed)
    meta = {"arch": arch, "width": width, "input_size": input_size,
            "num_classes": num_classes, "seed": seed}
    return Model(arch, (input_size, input_size, 3), layers, meta)


def mobilenet_v2(width: float = 1.0, input_size: int = 224, num_classes: int = 1000,
                 seed: int = 0) -> Model:
    """MobileNetV2 with seeded weights."""
    return build("mobilenet_v2", width, input_size, num_classes, seed)


def mobilenet_v1(width: float = 1.0, input_size: int = 224, num_classes: int = 1000,
                 seed: int = 0) -> Model:
    """MobileNetV1 with seeded weights."""
    return build("mobilenet_v1", width, input_size, num_classes, seed)


def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, gamma: np.ndarray,
                   beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                   eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN into a conv whose output channel is the LAST weight axis."""
    scale = (gamma / np.sqrt(var + eps)).astype(np.float64)
    b = np.zeros_like(mean) if bias is None else bias
    w = (weight.astype(np.float64) * scale).astype(np.float32)
    new_b = ((b - mean) * scale + beta).astype(np.float32)
    return w, new_b


def to_bytes(model: Model) -> bytes:
    """Serialise a model to bytes (the .npz format)."""
    buf = io.BytesIO()
    model.save(buf)
    return buf.getvalue()
