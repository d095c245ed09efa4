"""Time dilation: this process runs as a CPU `f` times slower than the host, continuously.

With DECOLLA_DILATE=f (f ≥ 1) every unit of work is followed by a sleep of (f − 1) × the
CPU time it took, so its results come out when a device `f` times slower would have them.
A CFS quota emulates a slow device's average speed only: it runs at full speed for a slice
of each period, then stops, and idle time earns no credit, so fine-grained exchanges wait
for the next period. Dilation keeps the device's speed at every step instead.

The CPU time is the whole process's (every thread, user and system), measured between
settle points: what happens between two of them (message framing, the actor loop, a
reader thread) is charged at the next one. Settle points: every compiled kernel call
(`decolla.kernels.load` hands out wrapped modules; that covers layers, fused blocks and
the fp16 wire conversion), each data-plane send (a message leaves when the slow device
would send it) and each wait for a halo; and every SETTLE_PERIOD_S a background thread
settles while no kernel runs, so work done while idle (heartbeats, the actor loop) is
slept off when it happens, however small, rather than charged to the next request.
After a kernel, debts below LAZY_NS wait for the next settle point: nothing outside sees the device meanwhile,
and fewer sleeps cost less CPU and fewer cold caches. One lock makes the process one
core: while a thread sleeps off the process's debt, other threads reaching a settle
point wait, and no wrapped call starts while the background settle sleeps; CPU other
threads use during a sleep is charged at the next settle.
Oversleeping is carried as credit, so the total wall time stays f × CPU within one
sleep's jitter.

Off (no DECOLLA_DILATE, or 1), `settle` does nothing and kernels are not wrapped.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time
import types
from typing import Callable

ENV = "DECOLLA_DILATE"
MIN_SLEEP_NS = 20_000      # shorter debts wait for the next settle point (sleep's own cost)
# After a kernel (and in the background) debts wait until this large: nothing outside the
# process sees the device between its sends, and every sleep costs CPU and cold caches.
LAZY_NS = 2_000_000
# the background settle of work outside kernels: its wake-ups cost CPU too (at 5 ms, about
# 1 ms of a 5 ms forward). It sleeps off every debt, not only LAZY_NS ones: idle-time work
# (heartbeats, the actor loop) left owing would be slept at the next request's first
# settle, up to LAZY_NS later than a slow device would have been free.
SETTLE_PERIOD_S = 0.05
_PR_SET_TIMERSLACK = 29


def factor_from_env(environ=os.environ) -> float:
    """The dilation factor asked for by $DECOLLA_DILATE (1.0: off); a clear error if bad."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return 1.0
    try:
        f = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a number (the slowdown factor, >= 1)") from None
    if not f >= 1.0 or f != f or f == float("inf"):
        raise ValueError(f"{ENV}={raw!r}: the slowdown factor must be a finite number >= 1")
    return f


def _fine_timer_slack() -> None:
    """Ask Linux for 1 µs timer slack on this thread (default 50 µs per sleep)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Dilation:
    """The debt of one process: (f − 1) × its CPU time since the last settle, minus what
    was slept. `cpu_ns` (the process's), `thread_cpu_ns` (the calling thread's), `wall_ns`
    and `sleep` are injectable for tests; `background`: run the periodic settle thread
    (started by the first settle in each process)."""

    def __init__(self, factor: float, cpu_ns: Callable[[], int] = time.process_time_ns,
                 wall_ns: Callable[[], int] = time.perf_counter_ns,
                 sleep: Callable[[float], None] = time.sleep, background: bool = True,
                 thread_cpu_ns: Callable[[], int] = time.thread_time_ns):
        if not factor >= 1.0:
            raise ValueError(f"dilation factor must be >= 1, got {factor!r}")
        self.factor = float(factor)
        self._cpu_ns, self._wall_ns, self._sleep = cpu_ns, wall_ns, sleep
        self._thread_cpu_ns = thread_cpu_ns
        self.background = background
        self.restart()

    def restart(self) -> None:
        """Start the accounts afresh (a forked child: its CPU clock starts at zero, and a
        lock held by another thread at the fork would never be released)."""
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._in_kernels = 0       # wrapped calls running now (the settle thread waits)
        self._settler_pid = 0      # the process whose settle thread runs
        self._mark = self._cpu_ns()
        self._owed = 0.0           # ns still to sleep; negative: overslept, credit
        self.cpu_total_ns = 0      # CPU time charged so far
        self.slept_ns = 0          # wall time slept so far
        self._slack = threading.local()

    def settle(self, min_ns: int = MIN_SLEEP_NS) -> None:
        """Charge the CPU time since the last settle and sleep off the debt once it is
        `min_ns` or more (one thread at a time: the process is one slow core)."""
        if self.background and self._settler_pid != os.getpid():
            self._settler_pid = os.getpid()
            threading.Thread(target=self._settle_loop, daemon=True, name="dilation").start()
        with self._lock:
            cpu = self._cpu_ns()
            used, self._mark = cpu - self._mark, cpu
            self.cpu_total_ns += used
            self._owed += (self.factor - 1.0) * used
            if self._owed < min_ns:
                return
            if not getattr(self._slack, "set", False):
                _fine_timer_slack()
                self._slack.set = True
            t0, own0 = self._wall_ns(), self._thread_cpu_ns()
            self._sleep(self._owed * 1e-9)
            slept = self._wall_ns() - t0
            self.slept_ns += slept
            self._owed -= slept
            # the sleep's own CPU (the syscall) is not work of the device; what other
            # threads did meanwhile is, and the next settle charges it
            self._mark += self._thread_cpu_ns() - own0

    def _settle_loop(self) -> None:
        pid = os.getpid()
        while self._settler_pid == pid:
            time.sleep(SETTLE_PERIOD_S)
            # mid-kernel, its own settle charges it whole; and no kernel starts while
            # this sleeps, as none would on a slow core (one ran beside the sleep, and
            # a long kernel came out up to 4x too fast)
            with self._count_lock:
                if not self._in_kernels:
                    self.settle()

    def wrap(self, fn: Callable) -> Callable:
        """`fn`, settling after every call (also when it raises)."""
        @functools.wraps(fn)
        def dilated(*args, **kw):
            with self._count_lock:
                self._in_kernels += 1
            try:
                return fn(*args, **kw)
            finally:
                with self._count_lock:
                    self._in_kernels -= 1
                self.settle(LAZY_NS)
        return dilated

    def wrap_module(self, mod: types.ModuleType) -> types.ModuleType:
        """A copy of a compiled module whose functions settle after every call (constants
        and classes as they are)."""
        out = types.ModuleType(mod.__name__, mod.__doc__)
        for name, value in vars(mod).items():
            if callable(value) and not isinstance(value, type) and not name.startswith("__"):
                value = self.wrap(value)
            setattr(out, name, value)
        return out


_CURRENT: Dilation | None = None


def current() -> Dilation | None:
    """This process's dilation, or None when it runs at host speed."""
    return _CURRENT


def enable(factor: float) -> Dilation | None:
    """Dilate this process by `factor` from now on (1: off). Kernels loaded afterwards are
    wrapped; set DECOLLA_DILATE before start-up to cover every kernel."""
    global _CURRENT
    _CURRENT = Dilation(factor) if factor > 1.0 else None
    return _CURRENT


def settle() -> None:
    """Sleep off the CPU time used since the last settle point (nothing when off)."""
    if _CURRENT is not None:
        _CURRENT.settle()


def wrap_module(mod: types.ModuleType) -> types.ModuleType:
    """`mod` itself when off, else its dilated copy."""
    return mod if _CURRENT is None else _CURRENT.wrap_module(mod)


def wrap(fn: Callable) -> Callable:
    """`fn` itself when off, else `fn` settling after each call."""
    return fn if _CURRENT is None else _CURRENT.wrap(fn)


def _after_fork() -> None:
    if _CURRENT is not None:
        _CURRENT.restart()


os.register_at_fork(after_in_child=_after_fork)
enable(factor_from_env())
