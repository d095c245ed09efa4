"""Models loaded by a node before its actor system starts.

Actor processes are forked from the node's admin, so a model loaded here is
inherited (copy-on-write) instead of being rebuilt in every actor.
"""
from __future__ import annotations

from decolla.loader import load_model
from decolla.model import Model

_MODELS: dict[str, Model] = {}


def preload(spec: str, model: Model | None = None) -> Model:
    """Load (or register) the model for `spec` in this process."""
    if model is None:
        model = _MODELS.get(spec) or load_model(spec)
    _MODELS[spec] = model
    return model


def get_model(spec: str) -> Model:
    """The preloaded model for `spec`, loading it if this process has none."""
    return _MODELS.get(spec) or preload(spec)
