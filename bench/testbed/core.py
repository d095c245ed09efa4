"""The testbed: emulated hosts (network namespace + shaped veth + CPU-quota cgroup) on one machine.

    with Testbed(prefix="dcl") as tb:
        h = tb.add_host("dev1", bandwidth_mbit=20, cpu_quota=0.125, background_load=0.3)
        p = h.spawn(["python", "-m", "bench.testbed.netperf", "recv", "--bind", h.address])
        tb.set_bandwidth("dev1", 5); tb.link_down("dev1"); tb.stop("dev1"); tb.cont("dev1")
        tb.schedule(2.0, "kill", "dev1")       # a fault 2 s from now
        print(tb.describe())                  # what was emulated, for every result file

Hosts get 10.77.0.11, .12, ... on one bridge that lives in its own namespace. Each host's
veth is shaped on both ends (host side = upload, bridge side = download). Everything is
removed on close(), at interpreter exit, on SIGTERM/SIGHUP/Ctrl-C, and — via a small reaper
process watching a pipe — even when the creating process is SIGKILLed. `cleanup(prefix)`
(CLI: `python -m bench.testbed cleanup`) removes leftovers of any run by name prefix.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import structlog

from decolla import emulation
from decolla.runtime import keys

from . import cgroup, janitor, netns
from .calibrate import Calibration, calibrate_dilation, calibrate_quota

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,11}$")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,5}$")
FAULTS = ("kill", "stop", "cont", "link_down", "link_up")
NODE_PORT = 1900  # decolla.node's default leader port
PACK_CORES = 0.8  # most quota (cores) "pack" puts on one CPU, as the machine-wide budget


class TestbedError(RuntimeError):
    """The testbed cannot run here or was misused (message says why)."""


class NotRootError(TestbedError):
    """The testbed needs root (network namespaces, tc, cgroups)."""


class UnsupportedEmulation(TestbedError):
    """The kernel lacks a feature the requested emulation needs."""


class EmulationDoesNotFit(TestbedError):
    """The requested CPU quotas exceed the machine's budget for devices."""


def check_environment() -> str | None:
    """None when the testbed can run here, else a human-readable reason why not."""
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, tc, cgroups); run as root or with sudo"
    missing = netns.missing_tools()
    if missing:
        return f"missing tools {missing}: apt-get install iproute2"
    if not Path("/run").exists() or netns.run("ip", "netns", "list", check=False).returncode != 0:
        return "`ip netns` does not work here"
    if cgroup.find_root() is None:
        return "no cgroup hierarchy with the cpu controller (v1 `cpu` or v2 `cpu.max`) is mounted"
    return None


def machine_info() -> dict:
    """The machine the emulation ran on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}


@dataclass
class Host:
    """One emulated machine. Use `spawn` to run commands inside it; shaping via the Testbed."""

    tb: "Testbed"
    name: str
    address: str
    netns: str
    port: str  # bridge-side veth name (inside the bridge namespace)
    cgroup: cgroup.CpuCgroup  # the host's CPU: quota here; processes in its sub-groups main/ and bg/
    role: str = "device"
    bandwidth_mbit: float | None = None
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    cpu_quota: float | None = None
    cpu_dilation: float | None = None  # time dilation factor of the node processes it spawns
    background_load: float = 0.0
    procs: list[subprocess.Popen] = field(default_factory=list)
    loader: subprocess.Popen | None = None
    ready: bool = False  # set once add_host finished; only later changes are logged as events

    @property
    def work(self) -> cgroup.CpuCgroup:
        """Sub-group of spawned processes."""
        return self.cgroup.child("main")

    @property
    def bg(self) -> cgroup.CpuCgroup:
        """Sub-group of the background load: its own quota, and top weight so it gets it first."""
        return self.cgroup.child("bg")

    def spawn(self, cmd: Sequence[str], env: dict | None = None, log: str | Path | None = None,
              cwd: str | Path | None = None, stdout=None, stderr=None, group: cgroup.CpuCgroup | None = None,
              **popen_kw) -> subprocess.Popen:
        """Start `cmd` inside this host's network namespace and CPU cgroup.

        `env` is added to the current environment (the repo root is put on PYTHONPATH;
        a dilated host's processes get DECOLLA_DILATE).
        `log` sends stdout+stderr to that file; otherwise `stdout`/`stderr` (and any other
        keyword, e.g. stdin or text) are as for Popen.
        The process gets its own session, so signals reach its whole process group.
        """
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
        if self.tb.key_path:        # the nodes listen beyond loopback: they need the cluster key
            full_env.setdefault(keys.KEY_ENV, self.tb.key_path)
        if self.cpu_dilation:
            full_env[emulation.ENV] = f"{self.dilation:.4f}"
        full_env.update(env or {})
        out = err = None
        if log is not None:
            out = open(log, "ab")
            err = subprocess.STDOUT
        group = group or self.work
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *cmd], env=full_env, cwd=cwd or REPO_ROOT,
            stdout=out if out is not None else stdout, stderr=err if out is not None else stderr,
            start_new_session=True, preexec_fn=group.add_self, **popen_kw)
        if out is not None:
            out.close()
        self.procs.append(proc)
        return proc

    def python(self, module: str, *args: str, **kw) -> subprocess.Popen:
        """Spawn `python -m module args...` (this interpreter) inside the host."""
        return self.spawn([sys.executable, "-m", module, *args], **kw)

    def pids(self) -> list[int]:
        """Every process inside the host (its cgroup and its network namespace)."""
        return sorted(set(self.cgroup.pids()) | set(netns.netns_pids(self.netns)))

    def signal(self, sig: int, proc: subprocess.Popen | None = None) -> list[int]:
        """Send `sig` to `proc`'s process group, or to every process in the host; return the pids."""
        pids = [proc.pid] if proc is not None else self.pids()
        for pid in pids:
            try:
                if proc is not None:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    @property
    def dilation(self) -> float | None:
        """The factor its processes are dilated by: `cpu_dilation` with the background load's
        share of the slow CPU taken out (30 % load: the rest runs 1/0.7 times slower still,
        as a fair scheduler slicing one slow core finely would give it)."""
        if not self.cpu_dilation:
            return None
        return self.cpu_dilation / (1.0 - self.background_load)

    def emulated(self) -> dict:
        """What this host emulates."""
        return {"role": self.role, "address": self.address, "bandwidth_mbit": self.bandwidth_mbit,
                "delay_ms": self.delay_ms, "loss_pct": self.loss_pct,
                "cpu_quota_cores": self.cpu_quota, "cpu_period_us": self.cgroup.period_us,
                "cpu_dilation": self.cpu_dilation, "cpu_dilation_with_load": self.dilation,
                "cpus": sorted(self.cgroup.cpus) if self.cgroup.cpus else "any",
                "background_load": self.background_load}


class Testbed:
    """A set of emulated hosts on one bridge; a context manager that always cleans up.

    prefix: short unique name prefix (namespaces, cgroups); `cleanup(prefix)` finds leftovers.
    subnet: first three octets of the test-host /24 used only inside the namespaces.
    cpu_budget: most CPU (cores) that host quotas may sum to (default 0.8 × CPUs, 1.6 on 2 cores).
    reaper: start a watcher process that cleans up if this process dies without closing.
    persist: leave everything up on exit (the `up` command); `down`/`cleanup` remove it later.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, prefix: str = "dcl", subnet: str = "10.77.0", first_host: int = 11,
                 cpu_budget: float | None = None, reaper: bool = True, persist: bool = False):
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match {PREFIX_RE.pattern}, got {prefix!r}")
        if not re.match(r"^10\.77\.\d{1,3}$", subnet):
            raise ValueError("subnet must be inside 10.77.0.0/16 (the project's test hosts)")
        self.prefix, self.subnet, self.first_host = prefix, subnet, first_host
        self.run = secrets.token_hex(3)
        self.cpu_budget = cpu_budget if cpu_budget is not None else 0.8 * (os.cpu_count() or 1)
        self.use_reaper, self.persist = reaper, persist
        self.hosts: dict[str, Host] = {}
        self.bridge_ns = f"{self.tag}bridge"
        self.faults: list[dict] = []
        self.calibration: Calibration | None = None
        self.netem = False
        self.cg_root: cgroup.CgroupRoot | None = None
        self.run_cgroup: cgroup.CpuCgroup | None = None
        self._timers: list[threading.Timer] = []
        self._lock = threading.RLock()
        self._reaper: subprocess.Popen | None = None
        self._old_handlers: dict[int, object] = {}
        self._t0 = 0.0
        self.key_path: str | None = None   # this run's cluster key, given to every process spawned
        self.started = self.closed = False

    @property
    def tag(self) -> str:
        """Name prefix of everything this run creates."""
        return janitor.run_tag(self.prefix, self.run)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Testbed":
        """Check the machine, create the bridge namespace and install the cleanup hooks."""
        if self.started:
            return self
        reason = check_environment()
        if reason:
            raise NotRootError(reason) if os.geteuid() != 0 else TestbedError(reason)
        self.started = True
        fd, self.key_path = tempfile.mkstemp(prefix=f"{self.tag}-", suffix=".key")
        os.close(fd)
        keys.write_key(self.key_path, overwrite=True)
        if not self.persist:
            atexit.register(self.close)
            self._install_signal_handlers()
            if self.use_reaper:
                self._reaper = subprocess.Popen(
                    [sys.executable, "-m", "bench.testbed.reaper", "--prefix", self.prefix,
                     "--run", self.run], stdin=subprocess.PIPE, cwd=REPO_ROOT, start_new_session=True,
                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        try:
            self.cg_root = cgroup.find_root()
            self.run_cgroup = cgroup.CpuCgroup(self.cg_root, f"{self.prefix}-{self.run}").create()
            netns.add_netns(self.bridge_ns)
            netns.add_bridge(self.bridge_ns)
            self.netem = netns.probe_qdisc(self.bridge_ns, ["netem", "delay", "1ms"])
        except Exception:
            self.close()
            raise
        self._t0 = time.monotonic()
        log.info("testbed.up", prefix=self.prefix, run=self.run, netem=self.netem,
                 cgroup=f"v{self.cg_root.version}")
        return self

    def __enter__(self) -> "Testbed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop faults and processes, remove namespaces and cgroups (idempotent).

        Ctrl-C/SIGTERM arriving meanwhile are held back until the cleanup is done.
        """
        with self._lock:
            if self.closed or not self.started:
                return
            self.closed = True
        deferred: list[int] = []
        held = self._hold_signals(deferred)
        try:
            for t in self._timers:
                t.cancel()
            if not self.persist:
                found = janitor.cleanup(self.prefix, self.run)
                for h in self.hosts.values():
                    for p in h.procs:
                        try:
                            p.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            pass
                log.info("testbed.down", prefix=self.prefix, run=self.run, removed_netns=len(found["netns"]))
            if self._reaper is not None:
                try:
                    self._reaper.stdin.write(b"done")
                    self._reaper.stdin.close()
                    self._reaper.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        finally:
            if self.key_path and not self.persist and os.path.exists(self.key_path):
                os.unlink(self.key_path)
            for sig, old in held.items():
                signal.signal(sig, old)
            self._restore_signal_handlers()
            atexit.unregister(self.close)
        if deferred:
            if deferred[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + deferred[0])

    @staticmethod
    def _hold_signals(deferred: list[int]) -> dict[int, object]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, lambda signum, frame: deferred.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise SystemExit(128 + signum)  # unwinds through `with` blocks and atexit

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, handler)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    # -- hosts -----------------------------------------------------------------------------
    def add_host(self, name: str, bandwidth_mbit: float | None = None, delay_ms: float = 0.0,
                 loss_pct: float = 0.0, cpu_quota: float | None = None, background_load: float = 0.0,
                 role: str = "device", cpu_dilation: float | None = None) -> Host:
        """Create host `name` and return it.

        bandwidth_mbit: cap in each direction (None = unshaped); delay_ms/loss_pct: per direction
        (delay needs netem); cpu_quota: CPU cores the host may use (None = unthrottled);
        cpu_dilation: instead of a quota, the processes it spawns run `cpu_dilation`× slower
        by time dilation (decolla.emulation: continuously, not in quota periods);
        background_load: fraction 0..1 of the host's CPU (quota, or one core) kept busy by a load
        process, the paper's "CPU usage" of a device.
        """
        if not self.started or self.closed:
            raise TestbedError("start the testbed first (use `with Testbed() as tb:`)")
        if not NAME_RE.match(name) or name == "bridge":
            raise ValueError(f"host name must match {NAME_RE.pattern} and not be 'bridge', got {name!r}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        if not 0.0 <= background_load < 1.0:
            raise ValueError("background_load is a fraction in [0, 1)")
        self._check_shaping(delay_ms, loss_pct)
        self._check_budget(name, cpu_quota)
        if cpu_dilation is not None and (cpu_quota is not None or not cpu_dilation >= 1.0):
            raise ValueError("cpu_dilation is a factor >= 1, and a host is slowed by a quota or "
                             "by dilation, not both")
        index = len(self.hosts)
        host = Host(tb=self, name=name, address=f"{self.subnet}.{self.first_host + index}",
                    netns=f"{self.tag}{name}", port=f"v-{name}",
                    cgroup=cgroup.CpuCgroup(self.cg_root, f"{self.prefix}-{self.run}/{name}"), role=role,
                    bandwidth_mbit=bandwidth_mbit, delay_ms=delay_ms, loss_pct=loss_pct,
                    cpu_dilation=cpu_dilation)
        self.hosts[name] = host
        try:
            netns.add_netns(host.netns)
            netns.add_veth(host.netns, self.bridge_ns, host.port, host.address, 24)
            self._shape(host)
            host.cgroup.create()
            host.work.create()
            host.bg.create().set_weight(top=True)
            self.set_cpu_quota(name, cpu_quota)
            if background_load > 0:
                self.set_background_load(name, background_load)
        except BaseException:
            del self.hosts[name]
            host.cgroup.remove()
            netns.del_netns(host.netns)
            raise
        host.ready = True
        log.info("testbed.host", name=name, **host.emulated())
        return host

    def host(self, name: str) -> Host:
        """The host called `name`."""
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r}; hosts: {sorted(self.hosts)}") from None

    def address(self, name: str) -> str:
        """IPv4 address of host `name`."""
        return self.host(name).address

    def _check_shaping(self, delay_ms: float, loss_pct: float) -> None:
        if delay_ms < 0 or not 0 <= loss_pct < 100:
            raise ValueError("delay_ms must be ≥ 0 and loss_pct in [0, 100)")
        if delay_ms > 0 and not self.netem:
            raise UnsupportedEmulation(
                "a delay needs the netem qdisc, which this kernel lacks (CONFIG_NET_SCH_NETEM); "
                "bandwidth (tbf) and loss (BPF) still work")

    def _check_budget(self, name: str, cores: float | None) -> None:
        used = sum(h.cpu_quota for n, h in self.hosts.items() if h.cpu_quota and n != name)
        if cores is not None and used + cores > self.cpu_budget + 1e-9:
            raise EmulationDoesNotFit(
                f"host {name!r} wants {cores:.3f} cores but {used:.3f} of the {self.cpu_budget:.2f}-core "
                f"budget are taken ({os.cpu_count()} CPUs here); use fewer devices or a larger slowdown k")

    def _shape(self, host: Host) -> None:
        shaping = netns.Shaping(host.bandwidth_mbit, host.delay_ms, host.loss_pct)
        netns.apply_shaping(host.netns, netns.HOST_IF, shaping, self.netem)  # host -> bridge
        netns.apply_shaping(self.bridge_ns, host.port, shaping, self.netem)  # bridge -> host

    def drops(self, name: str) -> dict:
        """Packets dropped so far by host `name`'s shaping: {'up': ..., 'down': ...}."""
        host = self.host(name)
        return {"up": netns.qdisc_drops(host.netns, netns.HOST_IF),
                "down": netns.qdisc_drops(self.bridge_ns, host.port)}

    # -- live changes ----------------------------------------------------------------------
    def set_bandwidth(self, name: str, mbit: float | None) -> None:
        """Change host `name`'s bandwidth cap (both directions; None = unshaped)."""
        with self._lock:
            h = self.host(name)
            h.bandwidth_mbit = mbit
            self._shape(h)
            self._record("set_bandwidth", name, mbit=mbit)

    def set_delay(self, name: str, delay_ms: float) -> None:
        """Change host `name`'s one-way delay per direction (needs netem)."""
        with self._lock:
            h = self.host(name)
            self._check_shaping(delay_ms, h.loss_pct)
            h.delay_ms = delay_ms
            self._shape(h)
            self._record("set_delay", name, delay_ms=delay_ms)

    def set_loss(self, name: str, loss_pct: float) -> None:
        """Change host `name`'s packet loss per direction, in percent."""
        with self._lock:
            h = self.host(name)
            self._check_shaping(h.delay_ms, loss_pct)
            h.loss_pct = loss_pct
            self._shape(h)
            self._record("set_loss", name, loss_pct=loss_pct)

    def set_cpu_quota(self, name: str, cores: float | None) -> None:
        """Change host `name`'s CPU quota in cores (None = unthrottled)."""
        with self._lock:
            h = self.host(name)
            self._check_budget(name, cores)
            h.cgroup.set_quota(cores)
            h.cpu_quota = cores
            self._place()
            if h.loader is not None:  # the load stays the same fraction of the new capacity
                h.bg.set_quota(h.background_load * (cores or 1.0))
            self._record("set_cpu_quota", name, cores=cores)

    def _place(self) -> None:
        """Choose every host's CPUs (cgroup.placement) and move running processes there.

        "pack": throttled hosts share as few CPUs as their quotas fit (≤ PACK_CORES each),
        so emulated devices never compute at the same instant: two computations at once on
        this VM's CPUs each run ≈ 1.3x slower (shared caches and memory), which a quota
        calibrated on one process alone does not include and separate devices would not
        have. Unthrottled hosts (the requester) get the other CPUs. "spread": throttled hosts
        one CPU each, least loaded first. "none": no pinning. A dilated host counts as
        throttled to 1/f of a core, the share it uses."""
        mode = cgroup.placement()
        allowed = sorted(os.sched_getaffinity(0))
        load = dict.fromkeys(allowed, 0.0)
        want: dict[str, frozenset] = {}
        share = {h.name: h.cpu_quota or (1.0 / h.cpu_dilation if h.cpu_dilation else 0.0)
                 for h in self.hosts.values()}
        throttled = [h for h in self.hosts.values() if share[h.name] and mode != "none"]
        for h in throttled:
            if mode == "pack":     # first fit from the last CPU
                fits = [c for c in reversed(allowed) if load[c] + share[h.name] <= PACK_CORES]
                cpu = fits[0] if fits else min(allowed, key=load.get)
            else:
                cpu = min(allowed, key=lambda c: (load[c], c))
            load[cpu] += share[h.name]
            want[h.name] = frozenset({cpu})
        free = frozenset(c for c in allowed if load[c] == 0.0)
        others = free if mode == "pack" and want and free else None   # unthrottled hosts
        for h in self.hosts.values():
            cpus = want.get(h.name, others)
            if cpus != h.cgroup.cpus:
                h.cgroup.cpus = cpus
                for pid in h.cgroup.pids():
                    cgroup.set_affinity(pid, cpus)

    def set_background_load(self, name: str, fraction: float) -> None:
        """Run (or replace) the background load of host `name`: `fraction` of its CPU kept busy.

        The load is a busy loop in the host's `bg` sub-group, capped at fraction × the host's
        quota (or × one core when unthrottled) and weighted above the host's own work, so it
        takes its share first, as the other programs of a busy device would. On a dilated
        host a busy loop would take host CPU the dilated processes do not account for: there
        the load raises the dilation factor of the processes it spawns (Host.dilation), so it
        is fixed once they run.
        """
        if not 0.0 <= fraction < 1.0:
            raise ValueError("background load is a fraction in [0, 1)")
        with self._lock:
            h = self.host(name)
            if h.cpu_dilation:
                if any(p.poll() is None for p in h.procs):
                    raise TestbedError(
                        f"host {name!r} is dilated: its background load sets the dilation of "
                        "the processes it spawns and cannot change while they run (use the "
                        "quota emulation to vary the load)")
                h.background_load = fraction
                self._record("set_background_load", name, fraction=fraction)
                return
            if h.loader is not None:
                h.signal(signal.SIGKILL, h.loader)
                h.loader.wait()
                h.procs.remove(h.loader)
                h.loader = None
            h.background_load = fraction
            if fraction > 0:
                h.bg.set_quota(fraction * (h.cpu_quota or 1.0))
                h.loader = h.python("bench.testbed.cpuwork", "burn", group=h.bg,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._record("set_background_load", name, fraction=fraction)

    # -- faults ----------------------------------------------------------------------------
    def kill(self, name: str, proc: subprocess.Popen | None = None) -> None:
        """kill -9 `proc`, or every process of host `name` (the device dies)."""
        self._record("kill", name, pids=self.host(name).signal(signal.SIGKILL, proc))

    def stop(self, name: str, proc: subprocess.Popen | None = None) -> None:
        """SIGSTOP `proc` or the whole host (a straggler that stops answering)."""
        self._record("stop", name, pids=self.host(name).signal(signal.SIGSTOP, proc))

    def cont(self, name: str, proc: subprocess.Popen | None = None) -> None:
        """SIGCONT what `stop` froze."""
        self._record("cont", name, pids=self.host(name).signal(signal.SIGCONT, proc))

    def link_down(self, name: str) -> None:
        """Unplug host `name`: its bridge port goes down, so the host sees no carrier."""
        netns.set_link(self.bridge_ns, self.host(name).port, up=False)
        self._record("link_down", name)

    def link_up(self, name: str) -> None:
        """Plug host `name` back in."""
        netns.set_link(self.bridge_ns, self.host(name).port, up=True)
        self._record("link_up", name)

    def fault(self, action: str, name: str, **kw) -> None:
        """Apply fault `action` (one of FAULTS) to host `name` now."""
        if action not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {action!r}")
        getattr(self, action)(name, **kw)

    def schedule(self, after_s: float, action: str, name: str, **kw) -> threading.Timer:
        """Apply fault `action` to host `name` `after_s` seconds from now; returns the timer."""
        if action not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {action!r}")
        self.host(name)
        timer = threading.Timer(after_s, self._scheduled, args=(action, name), kwargs=kw)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return timer

    def _scheduled(self, action: str, name: str, **kw) -> None:
        if not self.closed:
            try:
                self.fault(action, name, **kw)
            except Exception as exc:  # a timer thread has nobody to raise to
                log.error("testbed.fault_failed", action=action, host=name, error=str(exc))

    def _record(self, action: str, name: str, **kw) -> None:
        if not self.hosts[name].ready:
            return
        event = {"t": round(time.monotonic() - self._t0, 4), "action": action, "host": name, **kw}
        self.faults.append(event)
        log.info("testbed.event", **event)

    # -- node integration ------------------------------------------------------------------
    def node_command(self, host: str | Host, role: str, port: int = NODE_PORT, leader: str | None = None,
                     leader_port: int = NODE_PORT, model: str = "mobilenet_v2:seed=0",
                     extra: Sequence[str] = ()) -> list[str]:
        """The `python -m decolla.node` command line for `host`, bound to the host's address.

        leader: the leader's host name or address (required unless role is 'leader'). Every host
        has its own network namespace, so all nodes may use the same port.
        """
        h = host if isinstance(host, Host) else self.host(host)
        cmd = [sys.executable, "-m", "decolla.node", "--role", role, "--port", str(port),
               "--host", h.address, "--name", h.name, "--model", model]
        if role != "leader":
            if leader is None:
                raise ValueError(f"a {role} needs leader= (host name or address)")
            addr = self.hosts[leader].address if leader in self.hosts else leader
            cmd += ["--leader", f"{addr}:{leader_port}"]
        return cmd + list(extra)

    def spawn_node(self, host: str | Host, role: str, port: int = NODE_PORT, leader: str | None = None,
                   leader_port: int = NODE_PORT, model: str = "mobilenet_v2:seed=0",
                   extra: Sequence[str] = (), **spawn_kw) -> subprocess.Popen:
        """Start a DeColla node inside `host` (command from `node_command`; spawn_kw go to `spawn`)."""
        h = host if isinstance(host, Host) else self.host(host)
        return h.spawn(self.node_command(h, role, port, leader, leader_port, model, extra), **spawn_kw)

    # -- calibration and description -------------------------------------------------------
    def calibrate(self, probe: Callable[[], object] | Sequence[str], k: float = 8.0,
                  tolerance: float = 0.1, max_rounds: int = 4, mode: str = "quota") -> Calibration:
        """Find the CPU quota (mode "quota") or the dilation factor (mode "dilation": `probe`
        must be a command) making `probe` run `k`× slower than on one unthrottled core."""
        parent = f"{self.prefix}-{self.run}"
        if mode == "quota":
            self.calibration = calibrate_quota(self.cg_root, parent, probe, k, tolerance, max_rounds)
        elif mode == "dilation":
            self.calibration = calibrate_dilation(self.cg_root, parent, probe, k,
                                                  min(tolerance, 0.03), max_rounds)
        else:
            raise ValueError(f"emulation mode must be 'quota' or 'dilation', got {mode!r}")
        return self.calibration

    def describe(self) -> dict:
        """Everything that was emulated: machine, mechanisms, hosts, calibration, faults."""
        return {
            "testbed": "network namespaces + veth/bridge + tc + cgroup CPU quotas on one Linux machine",
            "prefix": self.prefix, "run": self.run, "machine": machine_info(),
            "mechanisms": {
                "bandwidth": "tc tbf on both veth ends",
                "delay": "tc netem" if self.netem else "unavailable (kernel without netem)",
                "loss": "tc netem" if self.netem else "classic-BPF random drop on clsact egress",
                "cpu": f"cgroup v{self.cg_root.version if self.cg_root else '?'} CFS quota, or "
                       "time dilation (DECOLLA_DILATE: after each kernel call and data-plane "
                       "send, sleep (f-1) x the process's CPU time since the last)",
                "background_load": "busy loop in a sub-cgroup capped at that fraction of the host quota, "
                                   "top weight (the device's CPU usage); on a dilated host the "
                                   "dilation factor divided by (1 - load) instead",
            },
            "cpu_budget_cores": self.cpu_budget,
            "cpu_quota_sum_cores": sum(h.cpu_quota or 0 for h in self.hosts.values()),
            "hosts": {n: h.emulated() for n, h in self.hosts.items()},
            "calibration": self.calibration.as_dict() if self.calibration else None,
            "events": list(self.faults),
        }

    def write_state(self) -> Path:
        """Save describe() where `status`/`down` find it (for runs left up)."""
        janitor.STATE_DIR.mkdir(parents=True, exist_ok=True)
        path = janitor.STATE_DIR / f"{self.prefix}-{self.run}.json"
        path.write_text(json.dumps(self.describe(), indent=2))
        return path
