"""The first hour of a user: fast defaults, photos in and labels out, the learned policy
from the CLI and the API, and the runtime commands on a device without the extras."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from decolla import cli, node
from decolla.api import Client
from decolla.loader import load_model
from decolla.runtime.messages import ConfigureRequester

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "mobilenet_v2:seed=0"
ES_POLICY = os.path.join(ROOT, "bench", "results", "policies", "es", "policy.npz")
# Everything a device does not install: the gateway, training and test extras.
EXTRAS = ("PIL", "starlette", "uvicorn", "multipart", "httpx", "torch", "evotorch", "sklearn",
          "selenium", "onnx", "onnxruntime")


def test_auto_is_the_default_plan_everywhere():
    assert inspect.signature(Client).parameters["plan"].default == "auto"
    assert ConfigureRequester(None, "me").plan == "auto"
    parser = cli.build_parser()
    assert parser.parse_args(["infer", "--leader", "h:1"]).plan == "auto"
    assert parser.parse_args(["demo"]).plan == "auto"
    assert node.parse_args(["--role", "requester", "--leader", "h:1"]).plan == "auto"
    assert node.parse_args(["--role", "requester", "--leader", "h:1", "--plan", "exchange"]).plan


def runtime_only(tmp_path, blocked=EXTRAS) -> dict:
    """An environment whose Python cannot import the extras (nor can its child processes:
    a sitecustomize on PYTHONPATH installs the block in each)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {tuple(blocked)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (runtime only)", name=name)
        sys.meta_path.insert(0, _Block())
    """))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]))


def run_cli(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decolla", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_runtime_commands_need_no_extras(tmp_path):
    env = runtime_only(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import PIL"], env=env, capture_output=True,
                             text=True)
    assert blocked.returncode != 0 and "runtime only" in blocked.stderr
    plan = run_cli(["plan", "--devices", "2"], env)
    assert plan.returncode == 0 and "plan auto" in plan.stdout, plan.stderr
    assert run_cli(["--help"], env).returncode == 0
    serve = run_cli(["serve", "--port", "0"], env)
    assert serve.returncode == 2 and "decolla[gateway]" in serve.stderr
    (tmp_path / "notes.txt").write_text("not an image")
    bad = run_cli(["infer", "--leader", "127.0.0.1:9", "--image", str(tmp_path / "notes.txt")], env)
    assert bad.returncode == 2 and "neither a JPEG, PNG or WebP photo nor a .npy" in bad.stderr
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    photo = run_cli(["infer", "--leader", "127.0.0.1:9", "--image", str(tmp_path / "photo.jpg")], env)
    assert photo.returncode == 2 and "reading photos needs Pillow" in photo.stderr
    helps = subprocess.run([sys.executable, "-m", "decolla.node", "--help"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert helps.returncode == 0 and "learned:path=" in helps.stdout


def _pytest(tmp_path, blocked, *args) -> tuple[subprocess.CompletedProcess, str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          *args], env=runtime_only(tmp_path, blocked), capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    return out, out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("blocked", [EXTRAS, ("PIL",)], ids=["extras", "pil"])
def test_test_files_skip_cleanly_without_an_optional_dependency(tmp_path, blocked):
    out, summary = _pytest(tmp_path, blocked, "--collect-only", "tests")
    assert out.returncode == 0 and "error" not in summary, out.stdout[-3000:]


def test_the_heldout_policy_test_skips_without_torch(tmp_path):
    out, summary = _pytest(tmp_path, ("torch",), "tests/test_policy_fast.py::"
                           "test_compiled_matches_numpy_on_heldout_scenarios")
    assert out.returncode == 0 and "1 skipped" in summary, out.stdout[-3000:]


# ------------------------------------------------------------------ on a loopback cluster
@pytest.fixture(scope="module")
def cluster():
    from decolla.api import LocalCluster
    c = LocalCluster(devices=2, model=SPEC)
    try:
        yield c
    finally:
        c.close()


def _jpeg(path):
    Image = pytest.importorskip("PIL.Image")
    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 320, y * 255 // 240, (x + y) % 256], axis=-1).astype(np.uint8)
    rgb[60:180, 100:220] = (200, 40, 30)
    Image.fromarray(rgb).save(path, "JPEG", quality=90)


@pytest.mark.integration
def test_a_jpeg_through_decolla_infer_prints_label_names(cluster, tmp_path):
    pp = pytest.importorskip("decolla.gateway.preprocess")
    from decolla.forward import forward
    from decolla.gateway.labels import imagenet_labels
    path = tmp_path / "photo.jpg"
    _jpeg(path)
    want = forward(load_model(SPEC), pp.preprocess(pp.decode(path.read_bytes()), "imagenet", 224))
    best = int(np.argmax(want))
    key = ["--leader", cluster.leader, "--key-file", cluster.key_path]
    out = run_cli(["infer", *key, "--image", str(path), "--json"])
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["top"][0][:1] == [best] and res["top"][0][2] == imagenet_labels()[best]
    assert res["plan"] != "layer" and res["trained"] is False
    assert "JPEG photo 320x240 resized to 224x224" in out.stderr
    assert "seeded, untrained weights" in out.stderr
    table = run_cli(["infer", *key, "--image", str(path)])
    assert table.returncode == 0 and imagenet_labels()[best] in table.stdout, table.stderr


@pytest.mark.integration
def test_the_learned_allocator_from_the_cli_and_the_api(cluster, tmp_path):
    from decolla.reference import forward
    x = np.random.default_rng(3).standard_normal((224, 224, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    want = forward(load_model(SPEC), x)
    key = ["--leader", cluster.leader, "--key-file", cluster.key_path]
    for alloc in ("learned", f"learned:path={ES_POLICY}"):
        out = run_cli(["infer", *key, "--image", str(tmp_path / "x.npy"), "--allocator", alloc,
                       "--plan", "layer", "-k", "4", "--json"])
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["allocator"] == alloc and res["top"][0][0] == int(np.argmax(want))
    with Client(cluster.leader, allocator="learned", plan="layer", k=4, min_devices=2) as client:
        r = client.infer(x)
    assert r.stats["allocator"] == "learned" and r.retries == 0
    assert np.abs(r.logits - want).max() <= 1e-5 * np.abs(want).max()
    assert set(r.devices_used) == {"dev1", "dev2"}
    bad = run_cli(["infer", *key, "--allocator", f"learned:path={tmp_path / 'x.npy'}"])
    assert bad.returncode != 0 and "not a policy .npz" in bad.stderr
    requester = subprocess.run(
        [sys.executable, "-m", "decolla.node", "--role", "requester", "--leader", cluster.leader,
         "--allocator", f"learned:path={ES_POLICY}", "--plan", "layer", "-k", "4",
         "--image", str(tmp_path / "x.npy"), "--log-level", "warning"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=dict(os.environ, DECOLLA_KEY_FILE=cluster.key_path))
    assert requester.returncode == 0, requester.stdout + requester.stderr
    res = json.loads(requester.stdout.splitlines()[-1])
    assert res["allocator"] == f"learned:path={ES_POLICY}" and res["top"][0][0] == int(np.argmax(want))


@pytest.mark.integration
def test_demo_on_the_runtime_alone_shows_single_layer_and_auto(tmp_path):
    out = run_cli(["demo", "--devices", "1", "--runs", "1", "--model",
                   "mobilenet_v2:width=0.35,input_size=96,seed=0",
                   "--trace", str(tmp_path / "t.json")], runtime_only(tmp_path), timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in ("single", "layer", "auto")}
    assert set(rows) == {"single", "layer", "auto"}
    assert all(line.rstrip().endswith("OK") for line in rows.values())
    assert " 1.00x" in rows["single"] and "demo passed" in out.stdout
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
