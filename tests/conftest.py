"""Shared pytest fixtures (generic: local clusters that always get cleaned up)."""
from __future__ import annotations

import pytest


@pytest.fixture
def make_cluster(request):
    """Factory for decolla.api.LocalCluster; every cluster is closed even if the test fails."""
    from decolla.api import LocalCluster
    clusters = []

    def _make(**kw):
        cluster = LocalCluster(**kw)
        clusters.append(cluster)
        return cluster

    def _cleanup():
        for c in reversed(clusters):
            c.close()
    request.addfinalizer(_cleanup)
    return _make


@pytest.fixture
def asys():
    """An in-process Thespian actor system (simpleSystemBase), shut down after the test."""
    from thespian.actors import ActorSystem
    system = ActorSystem("simpleSystemBase", {"decolla.compute": True}, transientUnique=True)
    try:
        yield system
    finally:
        system.shutdown()


@pytest.fixture
def tcp_asys():
    """A real multiprocTCPBase actor system on loopback (workers get real data planes)."""
    from thespian.actors import ActorSystem
    from decolla.actors.system import free_port
    system = ActorSystem("multiprocTCPBase", {"decolla.compute": True,
                                              "Admin Port": free_port()}, transientUnique=True)
    try:
        yield system
    finally:
        system.shutdown()
