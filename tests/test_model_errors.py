"""Every bad model file or impossible spec is one clear ModelError naming the file and what
is wrong; a node given one says so in one line and exits 2."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from decolla import model as M
from decolla.loader import load_model

SPEC = "mobilenet_v2:width=0.35,input_size=32,num_classes=3,seed=0"


def _good_bytes() -> bytes:
    buf = io.BytesIO()
    load_model(SPEC).save(buf)
    return buf.getvalue()


def _rewrite(path, drop=(), header_edit=None):
    """Save the small model to `path` without the arrays in `drop`, its header edited."""
    with np.load(io.BytesIO(_good_bytes())) as data:
        arrays = {k: data[k] for k in data.files if k not in drop}
    if header_edit is not None:
        header = json.loads(bytes(arrays["__header__"]).decode())
        header_edit(header)
        arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _truncated(path):
    path.write_bytes(_good_bytes()[:5000])


def _no_layers(path):
    _rewrite(path, header_edit=lambda h: h.pop("layers"))


def _no_bias(path):
    _rewrite(path, drop=("b3",))


def _no_weight(path):
    _rewrite(path, drop=("w0", "b0"))


def _not_npz(path):
    path.write_text("hello")


def _no_header(path):
    np.savez(path, w0=np.zeros(3))


CASES = [(_truncated, "truncated"), (_no_layers, "no 'layers'"), (_no_bias, "b3"),
         (_no_weight, r"weight shape None"), (_not_npz, "not a DeColla model"),
         (_no_header, "no DeColla header")]


@pytest.mark.parametrize("make,what", CASES, ids=[c[0].__name__ for c in CASES])
def test_a_bad_model_file_is_one_clear_model_error(tmp_path, make, what):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(M.ModelError, match=what) as err:
        load_model(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec,what", [
    ("mobilenet_v2:width=-1", "width -1"), ("mobilenet_v2:width=0", "width 0"),
    ("mobilenet_v2:input_size=0", "input size 0"), ("mobilenet_v2:num_classes=0", "num_classes"),
    ("mobilenet_v2:width=abc", "bad value for width")])
def test_impossible_specs_are_refused(spec, what):
    with pytest.raises(M.ModelError, match=what):
        load_model(spec)


@pytest.mark.parametrize("make", [_truncated, _no_layers, _no_bias])
def test_a_node_given_a_bad_model_says_so_in_one_line_and_exits_2(tmp_path, make):
    path = tmp_path / "bad.npz"
    make(path)
    out = subprocess.run([sys.executable, "-m", "decolla.node", "--role", "leader",
                          "--model", str(path), "--port", "1", "--log-json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert str(path) in json.loads(lines[0])["error"]
