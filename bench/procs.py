"""Processes and memory of what a test or benchmark started, read from /proc (Linux): leak
checks for the fault tests and the chaos soak.

Thespian's admin starts its own session, so neither process groups nor parentage find it:
`tag()` puts a mark in this process's environment, which every process started from here
afterwards (nodes, actor systems, workers, all forked or exec'd with it) carries."""
from __future__ import annotations

import os
import uuid

TAG_ENV = "DECOLLA_PROC_TAG"


def tag() -> str:
    """Mark this process's environment (inherited by whatever it starts from now on)."""
    os.environ[TAG_ENV] = os.environ.get(TAG_ENV) or uuid.uuid4().hex
    return os.environ[TAG_ENV]


def _read(pid: str, what: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{what}", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def tagged(mark: str, var: str = TAG_ENV) -> list[int]:
    """Live processes (zombies left out) whose environment holds `var`=`mark`, but this one."""
    want = f"{var}={mark}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid() and \
                want in _read(pid, "environ").split(b"\0"):
            stat = _read(pid, "stat")
            if stat and stat[stat.rindex(b")") + 2:][:1] != b"Z":
                out.append(int(pid))
    return sorted(out)


def by_node(pids) -> dict[str, list[int]]:
    """`pids` grouped by the --name of the node command line they run (forked actor
    processes keep their node's), '' for the others."""
    out: dict[str, list[int]] = {}
    for pid in pids:
        args = _read(str(pid), "cmdline").split(b"\0")
        name = args[args.index(b"--name") + 1].decode() if b"--name" in args[:-1] else ""
        out.setdefault(name, []).append(pid)
    return out


def rss_bytes(pids) -> int:
    """Sum of the resident set sizes of `pids` (those still running)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        fields = _read(str(pid), "statm").split()
        if len(fields) > 1:
            total += int(fields[1]) * page
    return total


def cpu_seconds(pids) -> float:
    """User + system CPU seconds `pids` (those still running) have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        stat = _read(str(pid), "stat")
        if stat:
            fields = stat[stat.rindex(b")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick
