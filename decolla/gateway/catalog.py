"""The models the gateway offers: the shipped digits recogniser, a seeded ImageNet-shaped
MobileNetV2, and checkpoints named on the command line."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

from decolla.gateway.labels import labels_for
from decolla.loader import load_model
from decolla.model import Model, ModelError

DIGITS_FILE = "digits_mobilenet_v2.npz"
SEEDED_SPEC = "mobilenet_v2:seed=0"


def digits_model_path() -> str:
    """Path of the digits model shipped in decolla/data (may not exist in a source tree)."""
    return str(resources.files("decolla").joinpath("data", DIGITS_FILE))


@dataclass
class ModelEntry:
    """One selectable model and everything needed to prepare its input and read its output."""
    key: str
    title: str
    spec: str                 # what decolla.loader.load_model (and a cluster) is given
    model: Model
    preprocess: str           # 'imagenet' or 'digits'
    labels: list[str]
    trained: bool             # False: seeded weights, the labels it picks mean nothing
    note: str = ""
    digest: str = field(init=False)

    def __post_init__(self):
        self.digest = self.model.digest()

    @property
    def input_size(self) -> int:
        return int(self.model.input_shape[0])

    def describe(self) -> dict:
        """JSON-friendly summary."""
        return {"key": self.key, "title": self.title, "spec": self.spec,
                "input_size": self.input_size, "num_classes": self.model.num_classes,
                "preprocess": self.preprocess, "trained": self.trained, "note": self.note,
                "macs": self.model.macs, "digest": self.digest,
                "accuracy": self.model.meta.get("heldout_accuracy")}


def entry_from_spec(key: str, spec: str, title: str | None = None) -> ModelEntry:
    """A catalogue entry for a model spec or file (.npz DeColla model or .pt/.pth torchvision)."""
    model = load_model(spec)
    meta = model.meta or {}
    is_file = os.path.exists(spec)
    trained = (is_file and "seed" not in meta) or bool(meta.get("heldout_accuracy"))
    preprocess = meta.get("preprocess", "imagenet")
    note = "" if trained else "seeded random weights: shows the cluster working, the labels it picks mean nothing"
    return ModelEntry(key=key, title=title or key, spec=spec, model=model, preprocess=preprocess,
                      labels=labels_for(meta, model.num_classes), trained=trained, note=note)


def default_catalog(extra: dict[str, str] | None = None, seeded_spec: str = SEEDED_SPEC,
                    include_digits: bool = True) -> dict[str, ModelEntry]:
    """digits (if shipped), the seeded MobileNetV2, then `extra` name -> spec/path entries."""
    entries: dict[str, ModelEntry] = {}
    if include_digits and os.path.exists(digits_model_path()):
        e = entry_from_spec("digits", digits_model_path(), "Digits 0-9 (MobileNetV2-0.35, 32 px)")
        acc = e.model.meta.get("heldout_accuracy")
        e.note = (f"trained on scikit-learn digits; held-out accuracy {acc:.1%}" if acc else
                  "trained on scikit-learn digits")
        entries["digits"] = e
    if seeded_spec:
        entries["mobilenet_v2"] = entry_from_spec(
            "mobilenet_v2", seeded_spec, f"ImageNet-shaped MobileNetV2 ({seeded_spec})")
    for key, spec in (extra or {}).items():
        if key in entries:
            raise ModelError(f"model name {key!r} is already used")
        entries[key] = entry_from_spec(key, spec, f"{key} ({os.path.basename(spec)})")
    if not entries:
        raise ModelError("no model to serve")
    return entries


def cluster_first(catalog: dict[str, ModelEntry], spec: str,
                  digest: str) -> dict[str, ModelEntry]:
    """The catalogue with the cluster's model first (the default): the entry with its
    digest, else a new entry "cluster" loaded from the leader's `spec`. Raises ModelError
    when the spec cannot be loaded here or gives another digest."""
    same = [k for k, e in catalog.items() if e.digest == digest]
    if same:
        return {same[0]: catalog[same[0]], **{k: e for k, e in catalog.items() if k != same[0]}}
    entry = entry_from_spec("cluster", spec, f"The cluster's model ({spec})")
    if entry.digest != digest:
        raise ModelError(f"{spec!r} loads here with digest {entry.digest[:12]}, the cluster's "
                         f"is {digest[:12]}")
    return {"cluster": entry, **{k: e for k, e in catalog.items() if k != "cluster"}}

