"""Testbed: real namespaces, tc shaping, cgroup quotas, faults and cleanup (needs root)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package; plain `pytest` needs this
    sys.path.insert(0, str(REPO))

from bench.testbed import (EmulationDoesNotFit, Testbed, UnsupportedEmulation,  # noqa: E402
                           check_environment, cleanup, is_empty, leftovers)
from bench.testbed import measure, netns  # noqa: E402

REASON = check_environment()
pytestmark = pytest.mark.testbed
needs_root = pytest.mark.skipif(REASON is not None, reason=f"testbed: {REASON}")

PREFIX = "dclt"  # not the default "dcl": tests never touch a run someone left up
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def root_namespace_state() -> tuple[str, str, str]:
    """Links, addresses and routes of the root namespace (must never change)."""
    out = [netns.run("ip", "-o", *a).stdout for a in (["link", "show"], ["addr", "show"], ["route", "show"])]
    links = "\n".join(sorted(line.split(":")[1] for line in out[0].splitlines()))
    return links, out[1], out[2]


@pytest.fixture(scope="module", autouse=True)
def no_leftovers():
    if REASON is not None:
        yield
        return
    cleanup(PREFIX)
    yield
    assert is_empty(cleanup(PREFIX)), "a test left testbed resources behind"


@pytest.fixture(scope="module")
def tb():
    with Testbed(prefix=PREFIX, cpu_budget=1.0) as bed:
        bed.add_host("capped", bandwidth_mbit=5)
        bed.add_host("sink")
        bed.add_host("free")
        bed.add_host("slow", cpu_quota=0.1)
        bed.add_host("busy", cpu_quota=0.2, background_load=0.5)
        yield bed


@needs_root
def test_up_down_leaves_nothing_and_root_namespace_untouched():
    before = root_namespace_state()
    with Testbed(prefix=PREFIX) as bed:
        h = bed.add_host("dev1", bandwidth_mbit=20, cpu_quota=0.2, background_load=0.3)
        bed.add_host("dev2", bandwidth_mbit=10, loss_pct=1.0)
        p = h.spawn(["sleep", "60"])
        during = leftovers(PREFIX, bed.run)
        assert len(during["netns"]) == 3 and len(during["cgroups"]) == 1
        assert p.pid in during["pids"] and h.loader.pid in during["pids"]
        assert root_namespace_state() == before
    assert is_empty(leftovers(PREFIX, bed.run))
    assert p.poll() is not None
    assert root_namespace_state() == before


@needs_root
def test_two_runs_back_to_back():
    for _ in range(2):
        with Testbed(prefix=PREFIX) as bed:
            a, b = bed.add_host("a"), bed.add_host("b")
            assert (a.address, b.address) == ("10.77.0.11", "10.77.0.12")
            assert measure.can_connect(a, b)[0]
        assert is_empty(leftovers(PREFIX, bed.run))


@needs_root
def test_bandwidth_limit_caps_tcp(tb):
    capped = measure.throughput(tb.host("capped"), tb.host("sink"), seconds=1.0)["mbit_per_s"]
    download = measure.throughput(tb.host("sink"), tb.host("capped"), seconds=0.7)["mbit_per_s"]
    free = measure.throughput(tb.host("free"), tb.host("sink"), seconds=0.5)["mbit_per_s"]
    assert 1.0 < capped < 10.0
    assert 1.0 < download < 10.0
    assert free > 50.0


UDP_RECV = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 5300)); s.settimeout(1.0)
print("ready", flush=True); n = 0
try:
    while True:
        s.recv(64); n += 1
except socket.timeout:
    print(n, flush=True)
"""
UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(400):
    s.sendto(b"x", (sys.argv[1], 5300)); time.sleep(0.001)
"""


@needs_root
def test_loss_drops_about_that_share_of_packets(tb):
    src, dst = tb.host("capped"), tb.host("sink")
    tb.set_loss("capped", 50)
    try:
        recv = dst.spawn([sys.executable, "-c", UDP_RECV, dst.address], stdout=subprocess.PIPE, text=True)
        assert recv.stdout.readline().strip() == "ready"
        src.spawn([sys.executable, "-c", UDP_SEND, dst.address]).wait(timeout=30)
        received = int(recv.communicate(timeout=30)[0].split()[-1])
    finally:
        tb.set_loss("capped", 0)
    assert 100 < received < 300  # 400 sent at 50 % loss: 200 expected, sd 10


@needs_root
def test_cpu_quota_slows_a_cpu_loop(tb):
    fast = measure.cpu_probe(tb.host("free"), iters=400_000, repeats=2)
    slow = measure.cpu_probe(tb.host("slow"), iters=400_000)
    # 0.1 core: ideally 10x its CPU time; unthrottled, wall ≈ CPU time (up to 2x with busy neighbours).
    assert slow["seconds"] > 2.5 * fast["cpu_seconds"]
    assert slow["seconds"] > 2.5 * slow["cpu_seconds"]
    assert tb.host("slow").cgroup.throttled_usec() > 0


@needs_root
def test_throttled_hosts_share_one_cpu_and_the_others_get_the_rest(tb):
    """Emulated devices computing at the same instant slow each other on a VM's CPUs, so
    throttled hosts are packed on one CPU (their quotas fit), unthrottled ones elsewhere;
    running processes (all their threads) move when a quota changes."""
    slow, busy, free = (tb.host(n) for n in ("slow", "busy", "free"))
    allowed = os.sched_getaffinity(0)
    assert len(slow.cgroup.cpus) == 1 and slow.cgroup.cpus == busy.cgroup.cpus
    if len(allowed) > 1:
        assert free.cgroup.cpus == allowed - slow.cgroup.cpus
    proc = slow.python("bench.testbed.cpuwork", "burn", stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        assert os.sched_getaffinity(proc.pid) == set(slow.cgroup.cpus)
        assert os.sched_getaffinity(busy.loader.pid) == set(busy.cgroup.cpus)
        tb.set_cpu_quota("slow", None)          # unthrottled: off the devices' CPU
        assert os.sched_getaffinity(proc.pid) == set(free.cgroup.cpus or allowed)
        tb.set_cpu_quota("slow", 0.1)
        assert os.sched_getaffinity(proc.pid) == set(busy.cgroup.cpus)
    finally:
        slow.signal(signal.SIGKILL, proc)
        proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_root
def test_background_load_takes_its_share(tb):
    loader = tb.host("busy").loader
    c0, t0 = cpu_seconds(loader.pid), time.monotonic()
    measure.cpu_probe(tb.host("busy"), iters=100_000)  # the host's own work competes meanwhile
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    rate = (cpu_seconds(loader.pid) - c0) / (time.monotonic() - t0)
    assert 0.03 < rate < 0.13  # target 0.5 x 0.2 cores = 0.1, a hard cap


@needs_root
def test_link_down_makes_connections_fail(tb):
    a, b = tb.host("free"), tb.host("sink")
    tb.link_down("sink")
    try:
        ok, err = measure.can_connect(a, b, timeout=1.0)
        assert not ok and err
    finally:
        tb.link_up("sink")
    assert measure.can_connect(a, b, timeout=5.0)[0]


@needs_root
def test_stop_cont_and_kill(tb):
    h = tb.host("free")
    p = h.spawn(["sleep", "60"])
    time.sleep(0.1)
    tb.stop("free", proc=p)
    time.sleep(0.1)
    assert Path(f"/proc/{p.pid}/stat").read_text().split(")")[1].split()[0] == "T"
    tb.cont("free", proc=p)
    time.sleep(0.1)
    assert Path(f"/proc/{p.pid}/stat").read_text().split(")")[1].split()[0] == "S"
    tb.kill("free")
    assert p.wait(timeout=5) == -signal.SIGKILL
    assert h.pids() == []
    assert [e["action"] for e in tb.describe()["events"][-3:]] == ["stop", "cont", "kill"]


@needs_root
def test_scheduled_fault(tb):
    tb.schedule(0.2, "link_down", "capped")
    assert netns.link_is_up(tb.bridge_ns, tb.host("capped").port)
    time.sleep(0.6)
    assert not netns.link_is_up(tb.bridge_ns, tb.host("capped").port)
    tb.link_up("capped")
    assert tb.describe()["events"][-2]["action"] == "link_down"


@needs_root
def test_cpu_budget_and_unsupported_emulation_are_refused(tb):
    with pytest.raises(EmulationDoesNotFit):
        tb.add_host("toomuch", cpu_quota=0.95)
    assert "toomuch" not in tb.hosts
    if not tb.netem:
        with pytest.raises(UnsupportedEmulation):
            tb.set_delay("capped", 5)
    d = tb.describe()
    assert d["hosts"]["capped"]["bandwidth_mbit"] == 5 and d["hosts"]["slow"]["cpu_quota_cores"] == 0.1


@needs_root
def test_calibration_finds_a_slowing_quota(tb):
    from functools import partial

    from bench.testbed.cpuwork import spin

    cal = tb.calibrate(partial(spin, 200_000), k=4, max_rounds=2)
    assert 0.05 < cal.quota < 0.6
    assert 2.0 < cal.achieved_slowdown < 10.0
    assert tb.describe()["calibration"]["k"] == 4


CRASHER = textwrap.dedent("""
    import sys, time
    from bench.testbed import Testbed
    tb = Testbed(prefix=sys.argv[1], reaper=sys.argv[2] == "reaper").start()
    h = tb.add_host("dev1", bandwidth_mbit=10, cpu_quota=0.2, background_load=0.2)
    tb.add_host("dev2")
    h.spawn(["sleep", "60"])
    print("RUN", tb.run, flush=True)
    time.sleep(60)
""")


def start_crasher(mode: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, PREFIX, mode], stdout=subprocess.PIPE,
                            text=True, env=ENV, cwd=REPO)
    run = ""
    for line in proc.stdout:  # structlog also writes here
        if line.startswith("RUN "):
            run = line.split()[1]
            break
    assert run, "crasher did not start"
    assert not is_empty(leftovers(PREFIX, run))
    return proc, run


def wait_empty(run: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_empty(leftovers(PREFIX, run)):
            return True
        time.sleep(0.2)
    return False


@needs_root
def test_cleanup_command_after_sigkill():
    proc, run = start_crasher("noreaper")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_empty(leftovers(PREFIX, run))  # nothing cleaned by itself
    out = subprocess.run([sys.executable, "-m", "bench.testbed", "--prefix", PREFIX, "cleanup"],
                         capture_output=True, text=True, env=ENV, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert is_empty(leftovers(PREFIX, run))


@needs_root
def test_reaper_cleans_after_sigkill():
    proc, run = start_crasher("reaper")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_empty(run, timeout=15)


@needs_root
def test_sigterm_cleans_up():
    proc, run = start_crasher("noreaper")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) != 0
    assert is_empty(leftovers(PREFIX, run))


def test_refuses_clearly_when_not_root(monkeypatch, capsys):
    from bench.testbed import NotRootError
    from bench.testbed.__main__ import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the venv interpreter is not runnable as nobody here
    assert "root" in check_environment()
    with pytest.raises(NotRootError, match="root"):
        Testbed(prefix=PREFIX).start()
    assert main(["status"]) == 2
    assert "root" in capsys.readouterr().err


def test_cgroup_files_v1_and_v2(tmp_path):
    """Quota arithmetic and files written, on a scratch directory standing in for the cgroup fs."""
    from bench.testbed import cgroup

    v1 = cgroup.CgroupRoot(tmp_path / "v1", 1)
    v1.path.mkdir()
    (v1.path / "run").mkdir()
    g = cgroup.CpuCgroup(v1, "run/dev1").create()
    g.set_quota(0.125)
    assert (g.path / "cpu.cfs_period_us").read_text() == "10000"
    assert (g.path / "cpu.cfs_quota_us").read_text() == "1250"
    g.set_quota(0.05)  # 500 µs would be under the kernel minimum: the period grows instead
    assert (g.path / "cpu.cfs_period_us").read_text() == "20000"
    assert (g.path / "cpu.cfs_quota_us").read_text() == "1000"
    g.set_quota(None)
    assert (g.path / "cpu.cfs_quota_us").read_text() == "-1"

    v2 = cgroup.CgroupRoot(tmp_path / "v2", 2)
    v2.path.mkdir()
    (v2.path / "cgroup.subtree_control").write_text("")
    run = v2.path / "run"
    run.mkdir()
    (run / "cgroup.subtree_control").write_text("")
    g = cgroup.CpuCgroup(v2, "run/dev1").create()
    g.set_quota(0.2)
    assert (g.path / "cpu.max").read_text() == "2000 10000"
    assert (v2.path / "cgroup.subtree_control").read_text() == "+cpu"
    assert (run / "cgroup.subtree_control").read_text() == "+cpu"
    g.set_quota(None)
    assert (g.path / "cpu.max").read_text() == "max 10000"
    with pytest.raises(ValueError):
        g.set_quota(0)


def test_loss_bytecode_threshold():
    from bench.testbed.netns import loss_bytecode, tbf_args

    prog = loss_bytecode(25.0).split(",")
    assert prog[0] == "4" and prog[2] == f"53 1 0 {2**30}"
    assert loss_bytecode(0.0).split(",")[2] == "53 1 0 0"
    assert tbf_args(5)[:3] == ["tbf", "rate", "5mbit"]
