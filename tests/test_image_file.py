"""Image files for the CLI: photos through the gateway's preprocessing, .npy arrays without
pickles, uint8 pixels converted, clear errors; the model facts (labels, trained or not)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from decolla.gateway.catalog import digits_model_path
from decolla.image_file import ImageFileError, load_image, model_facts, read_image_file
from decolla.loader import load_model

SEEDED = "mobilenet_v2:seed=0"
SHAPE = (224, 224, 3)


def _photo(path, fmt):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    img = Image.fromarray((rng.random((180, 260, 3)) * 255).astype(np.uint8))
    img.save(path, fmt)
    return img


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_a_photo_is_preprocessed_as_the_gateway_does(tmp_path, fmt, suffix):
    pp = pytest.importorskip("decolla.gateway.preprocess")
    path = tmp_path / f"photo.{suffix}"
    _photo(path, fmt)
    got = load_image(str(path), SHAPE)
    want = pp.preprocess(pp.decode(path.read_bytes()), "imagenet", 224)
    assert got.array.dtype == np.float32 and np.array_equal(got.array, want)
    assert "resized to 224x224" in got.notes[0] and not got.warnings


def test_a_digits_model_gets_the_digits_preprocessing(tmp_path):
    pp = pytest.importorskip("decolla.gateway.preprocess")
    path = tmp_path / "d.png"
    _photo(path, "PNG")
    digits = load_model(digits_model_path())
    facts = model_facts(digits_model_path(), digits.digest())
    assert facts.trained and facts.preprocess == "digits" and facts.label(3, 10) == "3"
    got = load_image(str(path), digits.input_shape, facts)
    assert np.array_equal(got.array, pp.preprocess(pp.decode(path.read_bytes()), "digits", 32))


def test_npy_float_passes_and_uint8_is_converted_with_a_warning(tmp_path):
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    got = load_image(str(tmp_path / "x.npy"), SHAPE)
    assert np.array_equal(got.array, x) and not got.warnings
    pp = pytest.importorskip("decolla.gateway.preprocess")
    pixels = (np.random.default_rng(2).random((100, 150, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "u8.npy", pixels)
    got = load_image(str(tmp_path / "u8.npy"), SHAPE)
    assert "uint8" in got.warnings[0] and "converted" in got.warnings[0]
    assert np.array_equal(got.array, pp.preprocess(pp.Image.fromarray(pixels), "imagenet", 224))
    np.save(tmp_path / "raw.npy", pixels.astype(np.float32))     # pixels saved as floats
    assert "0-255" in load_image(str(tmp_path / "raw.npy"), SHAPE).warnings[0]


def test_bad_files_are_refused_with_the_reason(tmp_path):
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageFileError, match="pickled .* can run code"):
        read_image_file(str(obj))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageFileError, match="neither a JPEG, PNG or WebP photo nor a .npy"):
        read_image_file(str(text))
    with pytest.raises(ImageFileError, match="cannot read"):
        read_image_file(str(tmp_path / "missing.jpg"))
    np.save(tmp_path / "ints.npy", np.zeros(SHAPE, dtype=np.int64))
    with pytest.raises(ImageFileError, match="int64"):
        load_image(str(tmp_path / "ints.npy"), SHAPE)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    pytest.importorskip("PIL")
    with pytest.raises(ImageFileError, match="broken.jpg"):
        load_image(str(broken), SHAPE)


def test_model_facts_say_seeded_weights_and_fall_back_for_unknown_models():
    seeded = model_facts(SEEDED, load_model(SEEDED).digest())
    assert seeded.trained is False and seeded.preprocess == "imagenet"
    assert seeded.label(1, 1000) == "goldfish"
    for facts in (model_facts(SEEDED, "another digest"), model_facts("/elsewhere/m.npz", "d")):
        assert facts.trained is None and facts.label(1, 1000) == "goldfish"
        assert facts.label(3, 10) == "class 3"


def test_reading_npy_files_does_not_import_pillow(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(SHAPE, dtype=np.float32))
    code = ("import sys; from decolla.image_file import load_image; "
            f"load_image({str(tmp_path / 'x.npy')!r}, {SHAPE}); "
            "assert 'PIL' not in sys.modules, 'Pillow imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
