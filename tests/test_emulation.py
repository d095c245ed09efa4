"""Time dilation (decolla.emulation): the sleep asked for is (f − 1) × the CPU time used,
checked on a fake clock; the kernels are wrapped only when it is on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decolla import emulation, kernels

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """CPU and wall clocks the test advances by hand; sleeping advances the wall clock by
    what was asked plus `oversleep_ns`."""

    def __init__(self, oversleep_ns: int = 0):
        self.cpu = self.wall = 0
        self.oversleep_ns = oversleep_ns
        self.asked: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.wall += int(round(seconds * 1e9)) + self.oversleep_ns

    def dilation(self, factor: float) -> emulation.Dilation:
        return emulation.Dilation(factor, cpu_ns=lambda: self.cpu, wall_ns=lambda: self.wall,
                                  sleep=self.sleep, background=False,
                                  thread_cpu_ns=lambda: 0)


@pytest.mark.parametrize("factor", [2.0, 7.5, 12.0])
def test_sleep_asked_is_factor_minus_one_times_the_cpu_used(factor):
    clock = FakeClock()
    d = clock.dilation(factor)
    rng = np.random.default_rng(int(factor))
    work = [int(x) for x in rng.integers(100_000, 5_000_000, size=20)]
    for ns in work:
        clock.cpu += ns
        d.settle()
    assert clock.asked == pytest.approx([(factor - 1) * ns * 1e-9 for ns in work])
    assert d.cpu_total_ns == sum(work)
    assert d.slept_ns == pytest.approx((factor - 1) * sum(work), abs=len(work))  # ns rounding


def test_oversleeping_is_credit_for_the_next_sleep():
    clock = FakeClock(oversleep_ns=300_000)
    d = clock.dilation(8.0)
    for _ in range(10):
        clock.cpu += 1_000_000
        d.settle()
    # first sleep 7 ms, then each 0.3 ms less: the total stays 7 ms per ms of CPU
    assert clock.asked[0] == pytest.approx(7e-3)
    assert clock.asked[1:] == pytest.approx([6.7e-3] * 9)
    assert d.slept_ns == 10 * 7_000_000 + 300_000


def test_small_debts_add_up_before_a_sleep():
    clock = FakeClock()
    d = clock.dilation(3.0)
    step = emulation.MIN_SLEEP_NS // 8
    for _ in range(3):
        clock.cpu += step
        d.settle()
    assert clock.asked == []            # 3 × 2 × step < MIN_SLEEP_NS: carried
    clock.cpu += step
    d.settle()
    assert clock.asked == pytest.approx([2 * 4 * step * 1e-9])


def test_wrapped_function_settles_even_when_it_raises():
    clock = FakeClock()
    d = clock.dilation(5.0)

    def work(ns, fail=False):
        clock.cpu += ns
        if fail:
            raise RuntimeError("boom")
        return ns

    w = d.wrap(work)
    assert w(1_000_000) == 1_000_000
    with pytest.raises(RuntimeError):
        w(2_000_000, fail=True)
    assert clock.asked == pytest.approx([4e-3, 8e-3])
    assert w.__name__ == "work"


def test_wrapped_kernel_module_keeps_constants_and_name():
    gemm = kernels.load("gemm")
    d = FakeClock().dilation(4.0)
    copy = d.wrap_module(gemm)
    assert copy.__name__ == gemm.__name__
    assert copy.PACK_NR == gemm.PACK_NR
    assert copy.pwconv is not gemm.pwconv and callable(copy.pwconv)


def test_off_by_default_costs_nothing():
    if os.environ.get(emulation.ENV):
        pytest.skip(f"{emulation.ENV} is set for this test run")
    assert emulation.current() is None
    gemm = kernels.load("gemm")
    assert kernels.load("gemm") is gemm      # the compiled module itself, not a copy
    assert emulation.wrap(len) is len
    emulation.settle()                       # a no-op


@pytest.mark.parametrize("raw", ["fast", "0.5", "-3", "nan", "inf"])
def test_bad_factor_is_a_clear_error(raw):
    with pytest.raises(ValueError, match=emulation.ENV):
        emulation.factor_from_env({emulation.ENV: raw})


def test_factor_from_env():
    assert emulation.factor_from_env({}) == 1.0
    assert emulation.factor_from_env({emulation.ENV: " 7.25 "}) == 7.25


def test_a_dilated_process_charges_its_forward_to_the_kernels():
    """A process started with DECOLLA_DILATE runs the model through wrapped kernels, and
    its debt accounting holds: slept + still owed = (f − 1) × CPU charged."""
    code = (
        "import json, numpy as np\n"
        "from decolla import emulation, ops\n"
        "from decolla.forward import forward\n"
        "from decolla.loader import load_model\n"
        "m = load_model('mobilenet_v2:seed=0,width=0.35,input_size=64')\n"
        "x = np.zeros(m.input_shape, np.float32)\n"
        "forward(m, x)\n"
        "d = emulation.current()\n"
        "print(json.dumps({'factor': d.factor, 'cpu': d.cpu_total_ns, 'slept': d.slept_ns,\n"
        "                  'owed': d._owed, 'wrapped': type(ops._gemm.pwconv).__name__}))\n")
    env = {**os.environ, emulation.ENV: "3", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["factor"] == 3.0 and doc["cpu"] > 0 and doc["wrapped"] == "function"
    assert doc["slept"] + doc["owed"] == pytest.approx(2 * doc["cpu"], rel=1e-6)


def test_a_forked_child_starts_its_accounts_afresh(monkeypatch):
    """A child's CPU clock starts at zero: the parent's mark would be a huge credit."""
    clock = FakeClock()
    d = clock.dilation(4.0)
    clock.cpu += 5_000_000
    d.settle()
    monkeypatch.setattr(emulation, "_CURRENT", d)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if d.cpu_total_ns == 0 and d.slept_ns == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert d.cpu_total_ns == 5_000_000          # the parent's accounts are untouched


def test_idle_work_is_settled_in_the_background_but_never_mid_kernel():
    """CPU used outside kernels (heartbeats, the actor loop) is slept off as it happens,
    not charged to the next request; a kernel running is charged whole at its end."""
    import threading
    import time
    clock = FakeClock()
    d = emulation.Dilation(4.0, cpu_ns=lambda: clock.cpu, wall_ns=lambda: clock.wall,
                           sleep=clock.sleep, thread_cpu_ns=lambda: 0)
    try:
        d.settle()                            # starts the background thread
        clock.cpu += 1_000_000                # idle-time work
        deadline = time.monotonic() + 5
        while not clock.asked and time.monotonic() < deadline:
            time.sleep(0.001)
        assert clock.asked == pytest.approx([3e-3])
        inside, release = threading.Event(), threading.Event()

        def kernel():
            clock.cpu += 2_000_000
            inside.set()
            release.wait(5)

        t = threading.Thread(target=d.wrap(kernel))
        t.start()
        inside.wait(5)
        time.sleep(20 * emulation.SETTLE_PERIOD_S)   # many background periods
        assert len(clock.asked) == 1                 # none while the kernel runs
        release.set()
        t.join(5)
        assert clock.asked == pytest.approx([3e-3, 6e-3])
    finally:
        d._settler_pid = -1                   # stops the background thread


def test_small_idle_debts_are_slept_off_in_the_background_not_by_the_next_request():
    """Idle-time work owing less than LAZY_NS is slept off while idle too: left owing, it
    would delay the next request's first kernel, when a slow device would be free."""
    import time
    clock = FakeClock()
    d = emulation.Dilation(4.0, cpu_ns=lambda: clock.cpu, wall_ns=lambda: clock.wall,
                           sleep=clock.sleep, thread_cpu_ns=lambda: 0)
    try:
        d.settle()                            # starts the background thread
        clock.cpu += 100_000                  # 0.3 ms of debt: below LAZY_NS
        deadline = time.monotonic() + 5
        while not clock.asked and time.monotonic() < deadline:
            time.sleep(0.001)
        assert clock.asked == pytest.approx([0.3e-3])
    finally:
        d._settler_pid = -1                   # stops the background thread


def test_after_a_kernel_small_debts_wait_for_the_next_send():
    clock = FakeClock()
    d = clock.dilation(5.0)

    def kernel():
        clock.cpu += 100_000          # 0.4 ms of debt: below LAZY_NS

    w = d.wrap(kernel)
    w()
    w()
    assert clock.asked == []
    d.settle()                        # a send: the whole debt, before the bytes leave
    assert clock.asked == pytest.approx([0.8e-3])


@pytest.mark.parametrize("bad", ["0.5", "inf", "nan"])
def test_node_refuses_a_bad_dilation_factor(bad, capsys):
    from decolla import node
    with pytest.raises(SystemExit):
        node.parse_args(["--dilate", bad])
    assert "--dilate" in capsys.readouterr().err
    assert node.parse_args(["--dilate", "7.5"]).dilate == 7.5


def test_cpu_other_threads_use_while_one_sleeps_is_charged_next():
    """A reader thread decoding while the compute thread sleeps off its debt is work of
    the device too: the next settle charges it (only the sleep's own CPU is not)."""
    clock = FakeClock()
    own = {"ns": 0}
    d = emulation.Dilation(5.0, cpu_ns=lambda: clock.cpu, wall_ns=lambda: clock.wall,
                           sleep=clock.sleep, background=False,
                           thread_cpu_ns=lambda: own["ns"])

    def sleep_beside_a_busy_thread(seconds):
        clock.sleep(seconds)
        clock.cpu += 700_000 + 10_000          # another thread's work + the syscall
        own["ns"] += 10_000                    # ... of which the syscall is this thread's
    d._sleep = sleep_beside_a_busy_thread
    clock.cpu += 1_000_000
    d.settle()
    d.settle()
    assert clock.asked == pytest.approx([4e-3, 4 * 0.7e-3])
    assert d.cpu_total_ns == 1_700_000


def test_no_kernel_starts_while_the_background_sleeps_off_idle_work():
    """The process is one slow core: a kernel called while the background settle sleeps
    waits for it (one that ran beside the sleep came out up to 4x too fast)."""
    import threading
    import time
    clock = FakeClock()
    asleep, wake, entered = threading.Event(), threading.Event(), threading.Event()

    def sleep(seconds):
        if threading.current_thread().name == "dilation":
            asleep.set()
            wake.wait(5)
        clock.sleep(seconds)
    d = emulation.Dilation(4.0, cpu_ns=lambda: clock.cpu, wall_ns=lambda: clock.wall,
                           sleep=sleep, thread_cpu_ns=lambda: 0)
    try:
        d.settle()                                 # starts the background thread
        clock.cpu += 1_000_000                     # idle work: 3 ms to sleep off
        assert asleep.wait(5)
        t = threading.Thread(target=d.wrap(entered.set))
        t.start()
        assert not entered.wait(0.3)               # held while the background sleeps
        wake.set()
        assert entered.wait(5)
        t.join(5)
    finally:
        d._settler_pid = -1
        wake.set()
