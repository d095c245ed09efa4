"""Find and remove everything a testbed created, by its unique name prefix.

Names used (so a crashed run can always be found again):
  network namespaces  {prefix}-{run}-{host} and {prefix}-{run}-bridge
  cgroups             <cpu cgroup root>/{prefix}-{run}/{host}
  state files         /run/decolla-testbed/{prefix}-{run}.json (runs left up by `up`)
Processes are found through those namespaces and cgroups, never by command name.

The crash reaper (reaper.py) calls `cleanup` when the process that made a testbed dies.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from . import cgroup, netns

STATE_DIR = Path("/run/decolla-testbed")


def run_tag(prefix: str, run: str | None = None) -> str:
    """The name prefix shared by everything of one run (or of all runs with `prefix`)."""
    return f"{prefix}-{run}-" if run else f"{prefix}-"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def leftovers(prefix: str, run: str | None = None) -> dict:
    """What exists now for `prefix` (and `run`): namespaces, cgroups, pids, root links, state files."""
    tag = run_tag(prefix, run)
    names = [n for n in netns.list_netns() if n.startswith(tag)]
    root = cgroup.find_root()
    groups = []
    if root is not None:
        groups = [p for p in root.path.iterdir() if p.is_dir() and (p.name + "-").startswith(tag)]
    pids = set()
    for n in names:
        pids.update(netns.netns_pids(n))
    for g in groups:
        for sub in [g, *(p for p in g.rglob("*") if p.is_dir())]:
            try:
                pids.update(int(x) for x in (sub / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                pass
    links = []
    out = netns.run("ip", "-o", "link", "show", check=False).stdout
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(tag):
                links.append(name)
    pattern = f"{prefix}-{run}.json" if run else f"{prefix}-*.json"
    states = sorted(STATE_DIR.glob(pattern)) if STATE_DIR.exists() else []
    return {"netns": names, "cgroups": [str(g) for g in groups], "pids": sorted(pids),
            "root_links": links, "state_files": [str(s) for s in states]}


def cleanup(prefix: str, run: str | None = None) -> dict:
    """Kill the processes and remove namespaces, cgroups, stray links and state files; return what was found."""
    found = leftovers(prefix, run)
    for pid in found["pids"]:
        _kill(pid)
    for g in found["cgroups"]:
        cgroup.remove_tree(Path(g))
    for n in found["netns"]:
        for pid in netns.netns_pids(n):  # anything that raced in after the scan
            _kill(pid)
        netns.del_netns(n)
    for link in found["root_links"]:
        netns.run("ip", "link", "del", link, check=False)
    for s in found["state_files"]:
        Path(s).unlink(missing_ok=True)
    return found


def is_empty(found: dict) -> bool:
    """True when a `leftovers()` report lists nothing."""
    return not any(found.values())
