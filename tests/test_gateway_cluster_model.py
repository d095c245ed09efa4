"""A gateway pointed at a running cluster serves the cluster's model by default (it asks
the leader) and says which model answered; real device processes on loopback."""
from __future__ import annotations

import argparse
import io

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from decolla.gateway.app import create_app  # noqa: E402
from decolla.gateway.catalog import cluster_first, default_catalog  # noqa: E402
from decolla.gateway.server import add_arguments, build_gateway  # noqa: E402
from decolla.model import ModelError  # noqa: E402

SMALL = "mobilenet_v2:seed=1,width=0.35,input_size=32,num_classes=1000"
CLUSTER = "mobilenet_v2:seed=3,width=0.35,input_size=32,num_classes=1000"


def _png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_entry_with_the_clusters_digest_goes_first():
    cat = default_catalog(seeded_spec=SMALL)            # digits first when shipped
    small = cat["mobilenet_v2"]
    assert next(iter(cluster_first(cat, SMALL, small.digest))) == "mobilenet_v2"
    added = cluster_first(cat, CLUSTER, default_catalog(
        seeded_spec=CLUSTER, include_digits=False)["mobilenet_v2"].digest)
    assert next(iter(added)) == "cluster" and set(cat) < set(added)
    with pytest.raises(ModelError, match="digest"):
        cluster_first(cat, CLUSTER, "0" * 64)


@pytest.mark.integration
def test_gateway_on_a_cluster_defaults_to_its_model(make_cluster):
    cluster = make_cluster(devices=1, model=CLUSTER)
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--leader", cluster.leader, "--seeded-spec", SMALL])
    gw = build_gateway(args)
    first = next(iter(gw.catalog.values()))
    assert first.digest == cluster.digest and first.key == "cluster"
    with TestClient(create_app(gw)) as c:
        assert c.get("/api/models").json()["default"] == "cluster"
        r = c.post("/api/infer", files={"image": ("p.png", _png(), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["digest"] == cluster.digest
    for b in gw.backends.values():
        b.close()
