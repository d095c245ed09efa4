"""Class labels shipped with the package.

imagenet_labels.txt: the 1000 ImageNet-1k class names in class-index order, one per line,
taken from torchvision 0.29.1 (`torchvision.models._meta._IMAGENET_CATEGORIES`, BSD-3-Clause).
Digits labels are '0'..'9' (scikit-learn's digits targets).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

DIGITS_LABELS = [str(i) for i in range(10)]


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index i = class i."""
    text = resources.files("decolla").joinpath("data/imagenet_labels.txt").read_text("utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet_labels.txt has {len(labels)} labels, expected 1000")
    return labels


def labels_for(meta: dict, num_classes: int) -> list[str]:
    """Labels for a model: its own meta['labels'], ImageNet's for 1000 classes, else 'class i'."""
    own = meta.get("labels")
    if own and len(own) == num_classes:
        return [str(x) for x in own]
    if num_classes == 1000:
        return list(imagenet_labels())
    return [f"class {i}" for i in range(num_classes)]
