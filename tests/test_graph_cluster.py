"""Imported ONNX networks on a real loopback cluster (leader + 3 device processes started as
`python -m decolla.node --model net.onnx`): every plan's answer equals onnxruntime's, and
`decolla infer` names the classes from the model's labels file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from decolla.graph import labels_path
from decolla.loader import load_model
from tests.test_cli import run_cli

pytestmark = pytest.mark.integration
ort = pytest.importorskip("onnxruntime")
zoo = pytest.importorskip("bench.zoo")   # needs torch
from tests.test_graph_onnx import ort_logits, ort_session, rel_err  # noqa: E402

CLASSES = 10


def _cluster_for(tmp_path_factory, name):
    from decolla.api import LocalCluster
    path = str(tmp_path_factory.mktemp(name) / f"{name}.onnx")
    zoo.export(name, path, 64, seed=5, num_classes=CLASSES)
    with open(labels_path(path), "w") as fh:
        fh.write("\n".join(f"{name} label {i}" for i in range(CLASSES)) + "\n")
    return path, LocalCluster(devices=3, model=path, deadline_floor=0.5)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    path, cluster = _cluster_for(tmp_path_factory, "resnet18")
    try:
        yield path, cluster
    finally:
        cluster.close()


@pytest.mark.parametrize("plan", ["auto:bandwidth_mbit=1000,min_gain=1", "spatial", "layer",
                                  "exchange", "single"])
def test_every_plan_on_the_cluster_matches_onnxruntime(resnet, plan):
    from decolla.api import Client
    path, cluster = resnet
    image = np.random.default_rng(11).standard_normal((64, 64, 3)).astype(np.float32)
    with Client(cluster.leader, plan=plan, wire_dtype="float32", k=3, min_devices=3) as client:
        r = client.infer(image)
    assert rel_err(r.logits, ort_logits(ort_session(path), image)) <= 1e-4
    if not plan.startswith(("single", "auto")):   # auto may keep a 64 px network on one device
        assert len(set(r.devices_used)) > 1, r.devices_used


def test_decolla_infer_names_classes_from_the_labels_file(resnet, tmp_path):
    path, cluster = resnet
    x = np.random.default_rng(4).standard_normal((64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    best = int(np.argmax(ort_logits(ort_session(path), x)))
    out = run_cli(["infer", "--leader", cluster.leader, "--key-file", cluster.key_path,
                   "--image", str(tmp_path / "x.npy"), "--json"])
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["top"][0][0] == best and res["top"][0][2] == f"resnet18 label {best}"
    assert load_model(path).digest() == cluster.client.status()["digest"]


# the squeeze-excitation networks (make test's time: each cluster takes 6-20 s; the other
# zoo networks pass the same way: bench.zoo.MODELS)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0"])
def test_each_zoo_network_runs_auto_on_three_devices(tmp_path_factory, name):
    from decolla.api import Client
    path, cluster = _cluster_for(tmp_path_factory, name)
    try:
        image = np.random.default_rng(2).standard_normal((64, 64, 3)).astype(np.float32)
        with Client(cluster.leader, plan="auto:bandwidth_mbit=1000,min_gain=1",
                    wire_dtype="float32", k=3, min_devices=3) as client:
            r = client.infer(image)
        assert rel_err(r.logits, ort_logits(ort_session(path), image)) <= 1e-4
    finally:
        cluster.close()
