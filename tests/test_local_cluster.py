"""LocalCluster's node processes on loopback."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from decolla.api import LocalCluster

pytestmark = pytest.mark.integration

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"


def test_a_node_whose_port_was_taken_starts_on_another(monkeypatch):
    """Another process may take the port LocalCluster picked before the node binds it: the
    node starts again on another port instead of failing the cluster."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = LocalCluster._pick_port
    picks = iter([taken])
    monkeypatch.setattr(LocalCluster, "_pick_port", lambda self: next(picks, None) or real(self))
    try:
        with LocalCluster(devices=1, model=SPEC, plan="single") as c:
            assert c.nodes["leader"].port != taken
            assert c.infer(np.zeros(c.input_shape, np.float32)).logits.shape[-1] > 0
    finally:
        squatter.close()
