"""The CLI gives up within its --timeout and leaves no process behind when it fails, is
stopped by SIGTERM or interrupted by Ctrl-C (real `decolla` processes on loopback)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from bench.procs import TAG_ENV, tagged
from decolla.actors import system

pytestmark = pytest.mark.integration


def _cli(*args) -> subprocess.Popen:
    """`decolla ARGS` in its own session, its environment tagged: whatever it starts (its
    actor system's admin starts a session of its own) carries `p.tag`."""
    tag = uuid.uuid4().hex
    p = subprocess.Popen([sys.executable, "-m", "decolla.cli", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, **{TAG_ENV: tag}))
    p.tag = tag
    return p


def _nobody_left(p, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while tagged(p.tag):
        if time.monotonic() > deadline:
            left = tagged(p.tag)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes left behind: {left}")
        time.sleep(0.1)


def _nowhere() -> str:
    return f"127.0.0.1:{system.free_port()}"      # nobody listens there


@pytest.mark.parametrize("cmd", ["infer", "status"])
def test_no_leader_fails_within_the_timeout_and_leaves_nothing(cmd):
    t0 = time.monotonic()
    p = _cli(cmd, "--leader", _nowhere(), "--timeout", "3")
    out, err = p.communicate(timeout=60)
    took = time.monotonic() - t0
    assert p.returncode != 0
    assert "no DeColla leader answered" in err, err
    assert took < 3 + 6, f"took {took:.1f} s with --timeout 3"
    _nobody_left(p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_cli_leaves_no_process(sig):
    p = _cli("infer", "--leader", _nowhere(), "--timeout", "60")
    deadline = time.monotonic() + 20
    while len(tagged(p.tag)) < 3:          # the CLI, its actor system's admin and logger
        assert time.monotonic() < deadline and p.poll() is None, "the CLI did not start"
        time.sleep(0.1)
    time.sleep(0.5)
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)                  # Ctrl-C: the terminal signals the whole group
    else:
        p.send_signal(sig)
    p.communicate(timeout=30)
    assert p.returncode != 0
    _nobody_left(p)
