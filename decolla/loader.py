"""Model from a spec string: the one place that picks the reader by file type.

It sits above the readers (decolla.model for .npz and seeded builds,
decolla.torch_import for .pt/.pth state_dicts, decolla.graph for .onnx files), so none
of them has to import another.
"""
from __future__ import annotations

import os

from decolla.graph import load_onnx_model
from decolla.model import Model, ModelError, build
from decolla.torch_import import load_state_dict_file

_OPTION_TYPES = {"seed": int, "width": float, "input_size": int, "num_classes": int}


def load_model(spec: str) -> Model:
    """Model from a spec: a file (.npz DeColla model, .pt/.pth torchvision state_dict, or
    .onnx network: decolla.graph) or 'arch[:key=value,...]' e.g. 'mobilenet_v2:seed=0,width=0.5,input_size=160'."""
    if os.path.exists(spec):
        if spec.endswith((".pt", ".pth")):
            return load_state_dict_file(spec)
        if spec.endswith(".onnx"):
            return load_onnx_model(spec)
        return Model.load(spec)
    if spec.endswith((".npz", ".pt", ".pth", ".onnx")):
        raise ModelError(f"model file {spec!r} does not exist")
    arch, _, opts = spec.partition(":")
    kwargs: dict = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in _OPTION_TYPES:
            raise ModelError(f"model spec {spec!r}: unknown option {key!r} "
                             f"(known: {', '.join(_OPTION_TYPES)})")
        try:
            kwargs[key] = _OPTION_TYPES[key](value)
        except ValueError as exc:
            raise ModelError(f"model spec {spec!r}: bad value for {key}: {value!r}") from exc
    return build(arch, **kwargs)
