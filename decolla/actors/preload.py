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


class ModelRefused(Exception):
    """This node cannot compute with the leader's model (says why)."""


def leader_model(spec: str, digest: str) -> Model:
    """The model for `spec`, checked against the leader's `digest`: a worker and a
    requester computing a `local` stage must compute with the same weights as the rest
    of the cluster. Raises ModelRefused."""
    try:
        model = get_model(spec)
    except Exception as exc:  # a model this node cannot load is a refusal, not a crash
        raise ModelRefused(f"cannot load model: {exc}") from exc
    if model.digest() != digest:
        raise ModelRefused("model digest differs from the leader's")
    return model
