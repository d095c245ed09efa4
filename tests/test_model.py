"""Model weights: torchvision state_dict import/export, .npz save/load, digest."""
from __future__ import annotations

import io

import numpy as np
import pytest

from decolla import model as M
from decolla.loader import load_model
from decolla.torch_import import (export_state_dict, guess_arch, import_state_dict,
                                  load_state_dict_file)


def _same_weights(a: M.Model, b: M.Model, atol=1e-6):
    assert [l.spec() for l in a.layers] == [l.spec() for l in b.layers]
    for la, lb in zip(a.layers, b.layers):
        if la.weight is not None:
            np.testing.assert_allclose(la.weight, lb.weight, rtol=1e-5, atol=atol)
            np.testing.assert_allclose(la.bias, lb.bias, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v1"])
@pytest.mark.parametrize("width", [1.0, 0.5, 0.75])
def test_state_dict_round_trip(arch, width):
    model = M.build(arch, width, input_size=64, num_classes=17, seed=1)
    sd = export_state_dict(model)
    assert guess_arch(sd) == arch
    back = import_state_dict(sd, arch, width=1.0, input_size=64)  # width and classes inferred
    assert back.meta["width"] == width and back.num_classes == 17
    _same_weights(model, back)


def test_torchvision_key_names_v2():
    sd = export_state_dict(M.mobilenet_v2(input_size=32, num_classes=10))
    for key in ["features.0.0.weight", "features.0.1.running_var",
                "features.1.conv.0.0.weight", "features.1.conv.0.1.weight",
                "features.1.conv.1.weight", "features.1.conv.2.bias",
                "features.2.conv.0.0.weight", "features.2.conv.1.0.weight",
                "features.2.conv.2.weight", "features.2.conv.3.running_mean",
                "features.18.0.weight", "features.18.1.bias",
                "classifier.1.weight", "classifier.1.bias"]:
        assert key in sd, key
    assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert sd["features.2.conv.2.weight"].shape == (24, 96, 1, 1)
    assert sd["classifier.1.weight"].shape == (10, 1280)


def test_batchnorm_is_folded():
    model = M.mobilenet_v1(width=0.25, input_size=32, num_classes=3, seed=2)
    sd = export_state_dict(model)
    rng = np.random.default_rng(0)
    gamma, beta = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    mean, var = rng.normal(size=8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
    sd["features.0.1.weight"], sd["features.0.1.bias"] = gamma, beta
    sd["features.0.1.running_mean"], sd["features.0.1.running_var"] = mean, var
    stem = import_state_dict(sd, "mobilenet_v1", input_size=32).layers[0]
    scale = gamma / np.sqrt(var + 1e-5)
    w = sd["features.0.0.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_allclose(stem.weight, w * scale, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stem.bias, beta - mean * scale, rtol=1e-5, atol=1e-6)


def test_import_accepts_torch_tensors_and_pt_files(tmp_path):
    torch = pytest.importorskip("torch")
    model = M.mobilenet_v2(width=0.5, input_size=32, num_classes=5, seed=4)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in export_state_dict(model).items()}
    _same_weights(model, import_state_dict(sd, input_size=32))
    path = tmp_path / "mnv2.pth"
    torch.save(sd, path)
    loaded = load_state_dict_file(str(path), input_size=32)
    _same_weights(model, loaded)
    assert loaded.meta["arch"] == "mobilenet_v2"
    # through the generic spec loader too
    assert load_model(str(path)).num_classes == 5


def test_bad_files(tmp_path):
    pytest.importorskip("torch")
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(M.ModelError, match="not a loadable"):
        load_state_dict_file(str(bad))
    with pytest.raises(M.ModelError, match="does not exist"):
        load_state_dict_file(str(tmp_path / "missing.pt"))


def _sd():
    return export_state_dict(M.mobilenet_v2(width=0.5, input_size=32, num_classes=5))


def test_missing_key_is_named():
    sd = _sd()
    del sd["features.3.conv.1.1.running_var"]
    with pytest.raises(M.ModelError, match=r"no key 'features.3.conv.1.1.running_var'"):
        import_state_dict(sd, width=0.5)


def test_misshaped_key_is_named():
    sd = _sd()
    sd["features.4.conv.2.weight"] = np.zeros((16, 95, 1, 1), np.float32)
    with pytest.raises(M.ModelError, match=r"'features.4.conv.2.weight' has shape "
                                           r"\(16, 95, 1, 1\), expected \(16, 96, 1, 1\)"):
        import_state_dict(sd, width=0.5)
    sd = _sd()
    sd["features.4.conv.3.bias"] = np.zeros(7, np.float32)
    with pytest.raises(M.ModelError, match=r"features.4.conv.3.bias.*\(7,\)"):
        import_state_dict(sd, width=0.5)


def test_non_finite_and_wrong_type_state_dicts():
    sd = _sd()
    sd["features.0.1.running_mean"] = sd["features.0.1.running_mean"].copy()
    sd["features.0.1.running_mean"][0] = np.nan
    with pytest.raises(M.ModelError, match="non-finite"):
        import_state_dict(sd, width=0.5)
    with pytest.raises(M.ModelError, match="must be a dict"):
        import_state_dict([1, 2, 3])
    with pytest.raises(M.ModelError, match="unknown architecture"):
        import_state_dict(_sd(), arch="resnet50")
    with pytest.raises(M.ModelError, match="neither"):
        guess_arch({"fc.weight": np.zeros((2, 2))})
    with pytest.raises(M.ModelError, match="classifier"):
        import_state_dict({"features.0.0.weight": np.zeros((16, 3, 3, 3))})


def test_npz_save_load_and_digest(tmp_path):
    model = M.mobilenet_v2(width=0.5, input_size=32, num_classes=7, seed=5)
    path = tmp_path / "m.npz"
    model.save(path)
    back = M.Model.load(path)
    assert back.digest() == model.digest()
    _same_weights(model, back, atol=0)
    buf = io.BytesIO(M.to_bytes(model))
    assert M.Model.load(buf).digest() == model.digest()
    back.layers[3].weight = back.layers[3].weight.copy()
    back.layers[3].weight[0, 0] += 1e-3
    assert back.digest() != model.digest()
    assert M.mobilenet_v2(width=0.5, input_size=32, num_classes=7, seed=6).digest() != \
        model.digest()


def test_import_digest_is_stable():
    sd = _sd()
    assert import_state_dict(sd, width=0.5).digest() == import_state_dict(sd).digest()
