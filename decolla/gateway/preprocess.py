"""Image decoding and preprocessing: uploaded bytes -> the model's input tensor (H, W, 3) float32.

Two pipelines, chosen by the model's `meta["preprocess"]`:
- "imagenet": resize the shorter side to size*256/224, centre-crop size x size, scale to
  [0, 1], normalise with the ImageNet mean/std (torchvision's recipe).
- "digits": scikit-learn's digits are 8x8 counts (0..16) of ink pixels in 4x4 blocks of
  a 32x32 binary bitmap. A photo is reduced the same way (grey, ink made bright, cropped
  to the ink, fitted into 32x32, binarised, block-counted), then `digits_input` upsamples
  the 8x8 grid exactly as the training script did.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_PIXELS = 40_000_000  # decompression-bomb guard, well above any phone photo
WORKING_SIDE = 2048      # decoded images are reduced to fit this square: both pipelines shrink
                         # far below it, and it bounds the memory an admitted request holds
# Pillow's own guard at the same figure (a warning above it, an error at twice it), for any
# path that opens an image before the header check below.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImage(ValueError):
    """The uploaded bytes are not a decodable image."""


class ImageTooLarge(BadImage):
    """The image's header announces more pixels than MAX_PIXELS."""


@contextlib.contextmanager
def _opened(data: bytes):
    """The image opened from `data` with only its header read, the pixel limit checked;
    Pillow's errors become BadImage / ImageTooLarge."""
    if not data:
        raise BadImage("empty upload")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageTooLarge(f"image too large: {img.width}x{img.height} pixels "
                                    f"(limit {MAX_PIXELS})")
            yield img
    except BadImage:
        raise
    except UnidentifiedImageError as exc:
        raise BadImage("not an image: Pillow recognises no image format in the upload") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice MAX_IMAGE_PIXELS
        raise ImageTooLarge(f"image too large: its header announces more than twice the limit of "
                            f"{MAX_PIXELS} pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"broken or unsupported image ({exc.__class__.__name__}: {exc})") from exc


def probe(data: bytes) -> tuple[int, int]:
    """Width and height from the image's header, no pixel decoded; refuses what decode would
    refuse for its header (not an image, over MAX_PIXELS)."""
    with _opened(data) as img:
        return img.size


def decode(data: bytes, max_side: int = WORKING_SIDE) -> Image.Image:
    """Decode image bytes (any format Pillow reads) to an RGB image that fits max_side x max_side,
    EXIF orientation applied. The pixel limit is checked from the header before decoding; a
    JPEG is decoded at a reduced scale when it is larger than needed."""
    with _opened(data) as img:
        img.thumbnail((max_side, max_side))  # loads; reduces while decoding (JPEG draft)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent areas become white, as a page would show them.
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        return img.convert("RGB")


def imagenet_input(img: Image.Image, size: int) -> np.ndarray:
    """Resize, centre-crop and normalise an RGB image for an ImageNet-trained model."""
    short = max(1, round(size * 256 / 224))
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                     Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    return np.ascontiguousarray((x - IMAGENET_MEAN) / IMAGENET_STD, dtype=np.float32)


def digits_input(grid: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digits grid (values 0..16) -> model input (size, size, 3) in [-1, 1]."""
    grid = np.asarray(grid, dtype=np.float32).reshape(8, 8)
    up = Image.fromarray(grid / 16.0, mode="F").resize((size, size), Image.BILINEAR)
    x = (np.asarray(up, dtype=np.float32) - 0.5) / 0.5
    return np.ascontiguousarray(np.repeat(x[:, :, None], 3, axis=2), dtype=np.float32)


def photo_to_digit_grid(img: Image.Image) -> np.ndarray:
    """A photo or drawing of one digit -> an 8x8 grid of ink counts (0..16) like sklearn's digits."""
    grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    ink = 1.0 - grey if border.mean() > 0.5 else grey  # dark ink on light paper is the usual case
    lo, hi = np.percentile(ink, 5), ink.max()
    if hi - lo < 0.1:
        return np.zeros((8, 8), dtype=np.float32)  # a blank image: no ink to find
    ink = np.clip((ink - lo) / (hi - lo), 0.0, 1.0)
    mask = ink > 0.5
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = 32.0 / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(crop, mode="F").resize((nw, nh), Image.BOX))
    canvas = np.zeros((32, 32), dtype=np.float32)
    top, left = (32 - nh) // 2, (32 - nw) // 2
    canvas[top:top + nh, left:left + nw] = small
    bitmap = canvas > 0.5
    return bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(np.float32)


def preprocess(img: Image.Image, kind: str, size: int) -> np.ndarray:
    """Model input (size, size, 3) float32 for a decoded RGB image; `kind` is 'imagenet' or 'digits'."""
    if kind == "digits":
        return digits_input(photo_to_digit_grid(img), size)
    if kind == "imagenet":
        return imagenet_input(img, size)
    raise ValueError(f"unknown preprocessing {kind!r} (known: imagenet, digits)")
