"""CPU-quota cgroups, v1 (`cpu.cfs_quota_us`/`cpu.cfs_period_us`) or v2 (`cpu.max`)."""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PERIOD_US = 10_000  # short, so throttling gaps stay far below millisecond-scale latencies
MIN_QUOTA_US = 1_000  # kernel minimum for cfs quota
PERIOD_ENV = "DECOLLA_TESTBED_PERIOD_US"   # overrides the default period (1: the shortest allowed)
PIN_ENV = "DECOLLA_TESTBED_PIN"            # CPU placement of hosts: pack, spread or none


def default_period_us() -> int:
    """The CFS period quotas get unless one is given: $DECOLLA_TESTBED_PERIOD_US or 10 ms.
    A shorter period makes a throttled host a smoother slow CPU (shorter throttled gaps),
    which matters for work that synchronises often; `period_for` keeps it valid."""
    return int(os.environ.get(PERIOD_ENV) or DEFAULT_PERIOD_US)


@dataclass(frozen=True)
class CgroupRoot:
    """Where our cgroups live: a v1 `cpu` hierarchy or a v2 unified hierarchy with the cpu controller."""

    path: Path
    version: int


def _mounts() -> list[tuple[str, str, str]]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append((parts[2], parts[1], parts[3]))  # fstype, mountpoint, options
    return out


def find_root() -> CgroupRoot | None:
    """The cgroup hierarchy that controls CPU bandwidth here, or None when there is none."""
    for fstype, mnt, opts in _mounts():
        if fstype == "cgroup" and "cpu" in opts.split(",") and Path(mnt, "cpu.cfs_quota_us").exists():
            return CgroupRoot(Path(mnt), 1)
    for fstype, mnt, _ in _mounts():
        if fstype == "cgroup2":
            controllers = Path(mnt, "cgroup.controllers")
            if controllers.exists() and "cpu" in controllers.read_text().split():
                return CgroupRoot(Path(mnt), 2)
    return None


def placement() -> str:
    """How the testbed places hosts on CPUs: $DECOLLA_TESTBED_PIN, "pack" (default), "spread"
    or "none" (see Testbed._place)."""
    mode = os.environ.get(PIN_ENV, "pack").strip().lower()
    mode = {"0": "none", "no": "none", "1": "pack"}.get(mode, mode)
    if mode not in ("pack", "spread", "none"):
        raise ValueError(f"{PIN_ENV} must be pack, spread or none, got {mode!r}")
    return mode


def set_affinity(pid: int, cpus: frozenset[int] | None) -> None:
    """Put every thread of process `pid` on `cpus` (None: every CPU this process may use)."""
    cpus = cpus or os.sched_getaffinity(0)
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass            # the thread ended meanwhile


def period_for(cores: float, period_us: int = DEFAULT_PERIOD_US) -> int:
    """The shortest period ≥ `period_us` whose quota for `cores` is ≥ the kernel minimum."""
    return max(period_us, math.ceil(MIN_QUOTA_US / cores)) if cores > 0 else period_us


class CpuCgroup:
    """One cgroup directory with an optional CPU quota (in cores, e.g. 0.125)."""

    def __init__(self, root: CgroupRoot, name: str, cpus: frozenset[int] | None = None):
        self.root = root
        self.path = root.path / name
        self.cores: float | None = None
        self.period_us = DEFAULT_PERIOD_US
        # CPUs the group's processes may run on (None: any). A quota spread over several
        # CPUs is handed out per CPU in slices (sched_cfs_bandwidth_slice_us, 5 ms) larger
        # than a device's whole quota, so a process whose threads move between CPUs is
        # throttled early and irregularly; on one CPU it runs like one slow core.
        self.cpus = cpus

    def create(self) -> "CpuCgroup":
        """Create the directory (v2: delegate the cpu controller down to it)."""
        if self.root.version == 2:
            # v2: a child only gets cpu.max when every ancestor delegates the cpu controller.
            ancestor = self.root.path
            for part in (*self.path.relative_to(self.root.path).parent.parts, None):
                ancestor.mkdir(exist_ok=True)
                ctl = ancestor / "cgroup.subtree_control"
                if "cpu" not in ctl.read_text().split():
                    ctl.write_text("+cpu")
                if part is not None:
                    ancestor = ancestor / part
        self.path.mkdir(exist_ok=True)
        return self

    def set_quota(self, cores: float | None, period_us: int | None = None) -> None:
        """Limit the group to `cores` CPUs on average (None = unlimited), in periods of
        `period_us` (default: `default_period_us()`), or longer where the quota would be
        below the kernel's minimum."""
        period_us = period_us or default_period_us()
        if cores is not None and cores <= 0:
            raise ValueError(f"cpu quota must be > 0 cores, got {cores}")
        period = period_for(cores, period_us) if cores else max(MIN_QUOTA_US, period_us)
        quota = int(round(cores * period)) if cores else -1
        if self.root.version == 1:
            # Lower the quota before changing the period, so no intermediate state is invalid.
            (self.path / "cpu.cfs_quota_us").write_text("-1")
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{'max' if quota < 0 else quota} {period}")
        self.cores, self.period_us = cores, period

    def add_self(self) -> None:
        """Move the calling process into this group, on its CPUs (used in a child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def set_weight(self, top: bool) -> None:
        """Give the group the highest (top) or the default CPU weight among its siblings."""
        if self.root.version == 1:
            (self.path / "cpu.shares").write_text("262144" if top else "1024")
        else:
            (self.path / "cpu.weight").write_text("10000" if top else "100")

    def child(self, name: str) -> "CpuCgroup":
        """A sub-group `name` (not created yet)."""
        return CpuCgroup(self.root, str(self.path.relative_to(self.root.path) / name), self.cpus)

    def pids(self) -> list[int]:
        """Pids of processes in the group and all its sub-groups."""
        pids: list[int] = []
        for sub in [self.path, *(p for p in self.path.rglob("*") if p.is_dir())]:
            try:
                pids += [int(p) for p in (sub / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                pass
        return sorted(set(pids))

    def throttled_usec(self) -> int:
        """Total time the group was throttled, in µs (from cpu.stat)."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        if "throttled_usec" in stat:
            return int(stat["throttled_usec"])
        return int(stat.get("throttled_time", 0)) // 1000

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left inside and remove the directory (and any children)."""
        remove_tree(self.path, timeout)


def remove_tree(path: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process in cgroup `path` and below, then rmdir bottom-up."""
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [path]:
        while True:
            try:
                pids = [int(p) for p in (sub / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                break
            for pid in pids:
                _sigkill(pid)
            try:
                sub.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
