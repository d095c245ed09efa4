"""Chaos soaks: a cluster serves several clients while faults are injected at random, and
every answer is checked against the single-process forward.

    python -m bench.chaos --minutes 3              # LocalCluster on loopback (soak.py)
    python -m bench.chaos --testbed --minutes 3    # bench.testbed, with link faults (testbed.py)
    python -m bench.chaos --leader-restarts 5      # processes and worker memory per restart
"""
from bench.chaos.soak import FAULTS, PLANS, SPEC, markdown, run, summarize

__all__ = ["FAULTS", "PLANS", "SPEC", "markdown", "run", "summarize"]
