"""An image file as a model's input, for `decolla infer` and the requester node.

A photo (JPEG, PNG or WebP, told by its first bytes) is decoded, resized and normalised
by the gateway's own functions (decolla.gateway.preprocess), so the CLI and the web page
feed a model alike. They need Pillow, which is imported only for photos: a device with
the runtime alone still reads `.npy` arrays. A `.npy` file is read with
allow_pickle=False, since loading a pickle can run code; a uint8 (0-255) array is
converted like a photo, and the caller is told.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from decolla.gateway.catalog import entry_from_spec
from decolla.gateway.labels import labels_for

NPY_MAGIC = b"\x93NUMPY"
PHOTO_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))


class ImageFileError(ValueError):
    """The file is not an image DeColla can feed to the model (the message says why)."""


@dataclass
class ModelFacts:
    """What reading an image and its answer needs to know about the cluster's model."""
    preprocess: str = "imagenet"          # 'imagenet' or 'digits' (decolla.gateway.preprocess)
    labels: list[str] | None = None       # None: from the number of logits
    trained: bool | None = None           # None: unknown (the model is not readable here)

    def label(self, cls: int, num_classes: int) -> str:
        """The name of class `cls`."""
        return (self.labels or labels_for({}, num_classes))[cls]


def model_facts(spec: str, digest: str) -> ModelFacts:
    """Facts about the model `spec` when it can be loaded here with the cluster's `digest`
    (a seeded spec always can); otherwise the ImageNet defaults, training unknown."""
    try:
        entry = entry_from_spec("cluster", spec)
    except Exception:       # a file on the leader's host only, or one needing torch
        return ModelFacts()
    if entry.digest != digest:
        return ModelFacts()
    return ModelFacts(entry.preprocess, entry.labels, entry.trained)


@dataclass
class LoadedImage:
    """The model input, and what the user should be told: notes (a photo resized) and
    warnings (an input that was probably not meant as given)."""
    array: np.ndarray
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ImageFile:
    """A file read and recognised, not yet fitted to a model: a photo's bytes or an array."""
    path: str
    kind: str                             # 'JPEG', 'PNG', 'WebP' or 'npy'
    data: bytes = b""
    array: np.ndarray | None = None


def photo_kind(head: bytes) -> str | None:
    """'JPEG', 'PNG' or 'WebP' from a file's first bytes, else None."""
    for magic, kind in PHOTO_MAGIC:
        if head.startswith(magic):
            return kind
    return "WebP" if head[:4] == b"RIFF" and head[8:12] == b"WEBP" else None


def _preprocessing():
    """decolla.gateway.preprocess, which needs Pillow (the gateway extra)."""
    try:
        from decolla.gateway import preprocess
    except ImportError as exc:
        raise ImageFileError(f"reading photos needs Pillow ({exc}): pip install pillow, or "
                             "give a .npy array of the model's input") from None
    return preprocess


def read_image_file(path: str) -> ImageFile:
    """Read and recognise `path` (before any cluster is reached, so a wrong file fails fast)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data.startswith(NPY_MAGIC):
        return ImageFile(path, "npy", array=_load_npy(path))
    kind = photo_kind(data[:16])
    if kind is None:
        raise ImageFileError(f"{path} is neither a JPEG, PNG or WebP photo nor a .npy array")
    _preprocessing()        # without Pillow, say so now
    return ImageFile(path, kind, data=data)


def model_input(f: ImageFile, shape: tuple, facts: ModelFacts | None = None) -> LoadedImage:
    """The model input (H, W, 3) float32 from a file read by `read_image_file`."""
    facts = facts or ModelFacts()
    if f.array is not None:
        return _from_array(f.array, shape, facts)
    pp = _preprocessing()
    try:
        img = pp.decode(f.data)
    except pp.BadImage as exc:
        raise ImageFileError(f"{f.path}: {exc}") from None
    return LoadedImage(pp.preprocess(img, facts.preprocess, shape[0]),
                       [f"{f.kind} photo {img.width}x{img.height} resized to {shape[0]}x{shape[1]} "
                        f"and normalised ({facts.preprocess} preprocessing)"])


def load_image(path: str, shape: tuple, facts: ModelFacts | None = None) -> LoadedImage:
    """The model input (H, W, 3) float32 from a photo or a .npy file at `path`."""
    return model_input(read_image_file(path), shape, facts)


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ImageFileError(f"{path} holds pickled Python objects: refused, because loading "
                                 "a pickle can run code. Save a plain numeric array "
                                 "(np.save(path, image.astype(np.float32)))") from None
        raise ImageFileError(f"{path}: not a readable .npy array ({exc})") from None


def _from_array(arr: np.ndarray, shape: tuple, facts: ModelFacts) -> LoadedImage:
    """A .npy array: normalised floats as they are, uint8 pixels converted like a photo."""
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        pp = _preprocessing()
        x = pp.preprocess(pp.Image.fromarray(arr), facts.preprocess, shape[0])
        return LoadedImage(x, warnings=[f"uint8 array (0-255 pixels, {arr.shape[1]}x{arr.shape[0]}): "
                                        f"converted like a photo (resized, normalised for "
                                        f"{facts.preprocess})"])
    if arr.dtype.kind != "f":
        raise ImageFileError(f"the array holds {arr.dtype}: give normalised float32 {tuple(shape)} "
                             "or uint8 (H, W, 3) pixels")
    warnings = []
    if arr.size and float(np.nanmax(np.abs(arr))) > 20:
        warnings.append(f"the array's values reach {float(np.nanmax(np.abs(arr))):.0f}: are they "
                        "0-255 pixels? the model expects normalised input (mean 0, std 1)")
    return LoadedImage(np.asarray(arr, dtype=np.float32), warnings=warnings)
