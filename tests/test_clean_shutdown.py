"""A clean run and shutdown on loopback says nothing alarming: no ERROR line in any node's
log or in the embedding application's output, no info lines printed into the application,
and no /tmp/decolla-cluster-* folder left behind."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from decolla.actors.system import ShutdownNoise

SPEC = "mobilenet_v2:width=0.35,input_size=96,seed=0"


def _record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("thespian", logging.ERROR, __file__, 1, msg, args, None)


def test_only_the_shutdown_code_is_dropped():
    f = ShutdownNoise()
    fmt = "Pending Actor create for %s failed (%s): %s"
    assert not f.filter(_record(fmt, "ActorAddr-(T|:1)", 3585, None))
    assert f.filter(_record(fmt, "ActorAddr-(T|:1)", 3586, None))
    assert f.filter(_record("something else failed (3585)"))


@pytest.mark.integration
def test_node_logs_have_no_error_after_a_clean_shutdown(make_cluster, tmp_path):
    cluster = make_cluster(devices=2, model=SPEC, log_dir=str(tmp_path))
    image = np.random.default_rng(0).standard_normal(cluster.input_shape).astype(np.float32)
    cluster.infer(image)
    cluster.close()
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert set(logs) >= {"leader.log", "dev1.log", "dev2.log"}
    for name, text in logs.items():
        bad = [line for line in text.splitlines()
               if " ERROR " in line or '"level": "error"' in line]
        assert not bad, f"{name}: {bad}"
    assert os.path.isdir(tmp_path)           # a log_dir the caller gave is kept


APP = f"""
import numpy as np
from decolla.api import LocalCluster
with LocalCluster(devices=2, model={SPEC!r}, plan="auto") as c:
    print("LOGDIR", c.log_dir)
    c.infer(np.random.default_rng(0).standard_normal(c.input_shape).astype(np.float32))
"""


@pytest.mark.integration
def test_an_embedding_application_sees_no_info_lines_and_no_leftovers():
    r = subprocess.run([sys.executable, "-c", APP], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "links measured" not in out and "[info" not in out, out[-3000:]
    assert "ERROR" not in out and "[error" not in out, out[-3000:]
    log_dir = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("LOGDIR"))
    assert not os.path.exists(log_dir)
