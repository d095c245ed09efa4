"""`python -m bench.chaos`: the chaos soak's command line (see bench.chaos)."""
from __future__ import annotations

import argparse
import json
import os

import bench.chaos
from bench.chaos import restarts, soak, testbed

RESULTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "results")


def _faults(a) -> tuple:
    """The fault kinds asked for; the link faults only on the testbed (skipped with the
    reason elsewhere)."""
    every = soak.FAULTS + testbed.LINK_FAULTS
    kinds = tuple(a.faults.split(",")) if a.faults else every
    unknown = [k for k in kinds if k not in every]
    if unknown:
        raise SystemExit(f"unknown fault kinds {unknown}; choose from {list(every)}")
    if not a.testbed:
        link = [k for k in kinds if k in testbed.LINK_FAULTS]
        if link:
            print(f"skipping {', '.join(link)}: link faults need --testbed "
                  f"({testbed.unavailable() or 'network namespaces to cut'})")
        kinds = tuple(k for k in kinds if k not in testbed.LINK_FAULTS)
    return kinds


def _save(rep: dict, out: str, text: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump(rep, fh, indent=1)
    with open(out + ".md", "w") as fh:
        fh.write(text)
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=bench.chaos.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--every", type=float, default=4.0, help="mean seconds between faults")
    p.add_argument("--plans", default=",".join(soak.PLANS))
    p.add_argument("--faults", default="",
                   help=f"comma-separated, of {', '.join(soak.FAULTS + testbed.LINK_FAULTS)} "
                        "(default: all the run can inject)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="request timeout (s): the requester fails a request after it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--testbed", action="store_true",
                   help="run on bench.testbed (root): each host in a network namespace, "
                        "adds the link faults")
    p.add_argument("--leader-restarts", type=int, default=0,
                   help="instead of a soak: restart the leader N times under load and "
                        "report processes and each worker's memory per restart")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.leader_restarts:
        rep = restarts.run(a.leader_restarts, a.devices)
        _save(rep, a.out or os.path.join(RESULTS, "chaos_restarts"), restarts.markdown(rep))
        return 0 if rep["flat"] else 1
    kinds, plans = _faults(a), tuple(a.plans.split(","))
    if a.testbed:
        reason = testbed.unavailable()
        if reason:
            print(f"--testbed: {reason}")
            return 2
        rep = testbed.run(a.minutes * 60, a.devices, a.clients, a.every, plans, kinds,
                          seed=a.seed, timeout=a.timeout)
    else:
        rep = soak.run(a.minutes * 60, a.devices, a.clients, a.every, plans, kinds,
                       seed=a.seed, timeout=a.timeout)
    _save(rep, a.out or os.path.join(RESULTS, "chaos_testbed" if a.testbed else "chaos"),
          soak.markdown(rep))
    return 0 if rep["lost"] == 0 and rep["wrong"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
