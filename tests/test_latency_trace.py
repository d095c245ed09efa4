"""Real node processes on loopback: the latency a caller is told is the span its trace
shows, and live events arrive in batches without holding the reply back."""
from __future__ import annotations

import numpy as np
import pytest

from decolla.gateway.timeline import timeline
from decolla.loader import load_model

pytestmark = pytest.mark.integration

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"


def test_latency_is_the_trace_span_first_request_included(make_cluster):
    """The first `auto` request waits for link measurement: that wait is inside both the
    reported latency and the trace (it was outside the trace)."""
    from decolla.api import Client
    cluster = make_cluster(devices=2, model=SPEC)
    image = np.random.default_rng(0).standard_normal(load_model(SPEC).input_shape)
    with Client(cluster.leader, plan="auto", bind=cluster.host) as client:
        for _ in range(2):
            events: list = []
            r = client.infer(image.astype(np.float32), on_event=events.append)
            chrome = r.trace.to_chrome()["traceEvents"]
            (whole,) = [e for e in chrome if e.get("name", "").startswith("inference")]
            assert abs(whole["dur"] / 1e6 - r.latency) <= 0.05 * r.latency
            view = timeline(r.trace)
            assert abs(view["span_ms"] / 1e3 - r.latency) <= 0.05 * r.latency
            assert all(0 <= c["send"] <= c["receive"] <= view["span_ms"] for c in view["chunks"])
            assert abs(sum(r.trace.phases().values()) - r.latency) < 1e-6
            assert r.bytes_moved == r.trace.bytes_moved() > 0
            won = sum(c.status == "won" for c in r.trace.records)
            assert sum(e["kind"] == "won" for e in events) == won


def test_cli_latency_is_the_span_of_the_trace_it_writes(make_cluster, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from decolla.runtime import keys
    cluster = make_cluster(devices=2, model=SPEC)
    trace = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "decolla", "infer", "--leader", cluster.leader,
                        "--bind", cluster.host, "--json", "--trace", str(trace)],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **{keys.KEY_ENV: cluster.key_path}))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    (whole,) = [e for e in json.loads(trace.read_text())["traceEvents"]
                if e.get("name", "").startswith("inference")]
    assert abs(whole["dur"] / 1e3 - out["latency_ms"]) <= 0.05 * out["latency_ms"]
    assert abs(sum(out["phases_ms"].values()) - out["latency_ms"]) <= 0.05
    assert out["bytes"] > 0
