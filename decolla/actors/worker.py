"""Worker: one per device; holds the model and computes the chunks it is sent.

Work on the data plane is taken on its connection's reader thread and computed on the
worker's compute thread, results sent straight back: Thespian's message loop costs a
device ≈ 0.3 ms of host CPU per message (≈ 2.5 ms on a Pi-class core), and the actor stays
free for heartbeats while a chunk computes or waits for halos. Work sent as actor messages
goes into the actor's own queue; the actor computes for a short slice of time, then sends
itself `Continue`, so heartbeats, cancellations and new work interleave with computation.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import socket
import threading
import time

import numpy as np
from thespian.actors import ActorTypeDispatcher, WakeupMessage

from decolla.plans import build_plan
from decolla.plans.compute import compute_chunk
from decolla.plans.exchange import HaloBox, HaloMissing, StripExchange, run_lockstep
from decolla.runtime import dataplane, wire
from decolla.actors import system
from decolla.actors.preload import ModelRefused, leader_model
from decolla.log import get_logger
from decolla.runtime.messages import (Cancel, ChunkFailed, ChunkResult, ChunkResults, Continue,
                              Halo, Heartbeat, InitWorker, LinkEcho, LinkProbe, StageWork,
                              WorkerReady, WorkerRefused)

log = get_logger("worker")
SLICE_S = 0.02          # compute at most this long before letting other messages in


class _CpuMeter:
    """Free CPU fraction of the host between two calls (from /proc/stat)."""

    def __init__(self):
        self.prev = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as fh:
                vals = [int(v) for v in fh.readline().split()[1:]]
            return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals)
        except (OSError, ValueError, IndexError):
            return None

    def available(self) -> float:
        cur = self._read()
        if cur is None or self.prev is None:
            load = os.getloadavg()[0] / max(1, os.cpu_count() or 1)
            return float(min(1.0, max(0.0, 1.0 - load)))
        (idle0, tot0), (idle1, tot1) = self.prev, cur
        self.prev = cur
        return float((idle1 - idle0) / (tot1 - tot0)) if tot1 > tot0 else 1.0


UNKNOWN_QUOTA_WINDOW_S = 0.3    # 3 periods of the kernel's default 100 ms CFS period


def _cpu_cgroups(cgroup_root: str, proc_cgroup: str) -> list[tuple[str, bool, list[str]]]:
    """(hierarchy dir, is v2, path parts) of this process's CPU cgroups, from /proc/self/cgroup."""
    try:
        with open(proc_cgroup) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        parts = [p for p in path.split("/") if p]
        if controllers == "":
            out.append((cgroup_root, True, parts))
        elif "cpu" in controllers.split(","):
            out.append((os.path.join(cgroup_root, controllers), False, parts))
    return out


def _quota_period(d: str, v2: bool) -> float | None:
    """The CFS period (s) of the quota set on cgroup dir `d`; None when unlimited.
    Raises OSError when the directory cannot be read."""
    def read(name: str) -> str:
        with open(os.path.join(d, name)) as fh:
            return fh.read().strip()
    if v2:
        quota, period = read("cpu.max").split()
        return None if quota == "max" else int(period) / 1e6
    quota, period = read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")
    return None if quota.startswith("-") else int(period) / 1e6


def cfs_period_s(cgroup_root: str = "/sys/fs/cgroup",
                 proc_cgroup: str = "/proc/self/cgroup") -> tuple[float | None, bool]:
    """(longest CFS period in s of a CPU quota on this process's cgroup or its ancestors, or
    None; whether some cgroup of ours could not be read, e.g. under `ip netns exec`, which
    mounts a fresh /sys without the cgroup hierarchies)."""
    periods, unreadable = [], False
    for base, v2, parts in _cpu_cgroups(cgroup_root, proc_cgroup):
        for depth in range(len(parts), -1, -1):
            try:
                period = _quota_period(os.path.join(base, *parts[:depth]), v2)
            except (OSError, ValueError):
                unreadable = unreadable or depth > 0
                continue
            if period:
                periods.append(period)
    return (max(periods) if periods else None), unreadable


def calibration_window(min_s: float = 0.05, periods: int = 5, max_s: float = 2.0) -> float:
    """Seconds of wall time the start-up speed check must span: under a CFS quota a burst
    shorter than one period runs at full host speed, so at least `periods` periods (a
    fixed 0.3 s when our cgroup exists but cannot be read). DECOLLA_SPEED_CHECK_S overrides."""
    env = os.environ.get("DECOLLA_SPEED_CHECK_S")
    if env:
        return float(env)
    period, unreadable = cfs_period_s()
    if period:
        return min(max_s, max(min_s, periods * period))
    return UNKNOWN_QUOTA_WINDOW_S if unreadable else min_s


def measure_speed(run, macs: float, window_s: float, min_runs: int = 3) -> float:
    """MAC/s of `run()` (doing `macs` MACs) as total work over total wall time across at least
    `window_s` seconds and `min_runs` runs, after one warm-up run. Averaging (not the
    fastest run) is what makes CPU-quota throttling visible."""
    run()
    n, t0 = 0, time.perf_counter()
    while True:
        run()
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= min_runs and elapsed >= window_s:
            return n * macs / max(elapsed, 1e-9)


def _by_target(pairs: list) -> list:
    """[(address, msg)] grouped by address, in first-seen order (addresses are unhashable)."""
    groups: list = []
    for addr, msg in pairs:
        for g in groups:
            if g[0] == addr:
                g[1].append(msg)
                break
        else:
            groups.append((addr, [msg]))
    return groups


@dataclasses.dataclass(slots=True)
class _Job:
    """One chunk to compute alone."""
    request: str
    stage: object
    chunk: object
    attempt: int
    inputs: dict
    reply_to: object
    received: float
    dtype: str

    def keys(self) -> set:
        return {self.chunk.key}


@dataclasses.dataclass(slots=True)
class _SwapJob:
    """The strips of one exchange stage this device computes together (StageWork.swap)."""
    request: str
    stage: object
    strips: list                  # (chunk, attempt, inputs)
    swap: dict
    wait_s: float
    reply_to: object
    received: float
    dtype: str

    def keys(self) -> set:
        return {c.key for c, _, _ in self.strips}


def _cancelled(job, msg: Cancel) -> bool:
    """Whether `msg` drops queued `job` (a group of strips only once all of them are dropped)."""
    return job.request == msg.request and (not msg.keys or job.keys() <= set(msg.keys))


class Worker(dataplane.WatchesInbox, ActorTypeDispatcher):
    """Computes chunks on one device. Work arrives as actor messages or on the data plane
    (decolla.runtime.dataplane); results go back the way their work came."""

    DATA_TYPES = (StageWork, Cancel, LinkProbe, dataplane.Closed)

    @staticmethod
    def actorSystemCapabilityCheck(capabilities, requirements):
        return bool(capabilities.get(system.CAP_COMPUTE)) and \
            capabilities.get(system.CAP_NODE) == requirements.get(system.CAP_NODE)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.name = None
        self.queue: collections.deque[_Job] = collections.deque()
        self.continuing = False
        self.seq = 0
        self.cache: dict = {}
        self.cpu = _CpuMeter()
        self.halos = HaloBox()
        self.fast: collections.deque = collections.deque()   # data-plane jobs
        self.fast_cv = threading.Condition()
        self.compute_lock = threading.Lock()    # one computation at a time: shared buffers
        self.stopping = False
        # data-plane traffic is handled on the reader threads, past the actor's queue (halos
        # are taken while a strip waits for them)
        self.inbox = dataplane.Inbox(route={Halo: lambda halo, conn: self.halos.put(halo),
                                            StageWork: self._take_work, Cancel: self._take_cancel,
                                            LinkProbe: self.receiveMsg_LinkProbe})

    def receiveMsg_InitWorker(self, msg: InitWorker, sender):
        self.name, self.registrar, self.hb = msg.name, sender, msg.heartbeat_s
        try:
            self.model = leader_model(msg.model_spec, msg.digest)
        except ModelRefused as exc:
            self.send(sender, WorkerRefused(msg.name, str(exc)))
            return
        self.layers = {l.name: l for l in self.model.layers}
        try:
            from decolla import ops
            ops.set_threads(max(1, int(msg.threads)))
        except Exception as exc:
            log.warning("could not set kernel threads", error=str(exc))
        speed = self._calibrate()
        threading.Thread(target=self._compute_loop, daemon=True, name="worker-compute").start()
        info = system.proc_info()
        self.send(sender, WorkerReady(msg.name, speed, info["pid"], info["pgid"],
                                      socket.gethostname(), int(msg.threads),
                                      self.listen(dataplane.env_port())))
        log.info("worker ready", node=msg.name, pid=info["pid"], speed_gmacs=round(speed / 1e9, 2))
        self.wakeupAfter(self.hb, payload="beat")

    def _reply(self, to, msg) -> None:
        """Send `msg` back the way the work came: a data connection or an actor address."""
        if isinstance(to, dataplane.Connection):
            try:
                to.send(msg)
            except ConnectionError:
                pass         # the requester went away; its supervisor re-sends elsewhere
        else:
            self.send(to, msg)

    def _calibrate(self) -> float:
        """MAC/s on a representative chunk (the heaviest pointwise layer, 1/6 of its channels)."""
        pw = [l for l in self.model.layers if l.kind == "pwconv"] or self.model.layers
        layer = dataclasses.replace(max(pw, key=lambda l: l.macs), residual=None)
        p = build_plan([layer.spec()], 6)
        stage, chunk = p.stages[0], p.stages[0].chunks[0]
        x = np.random.default_rng(0).random(layer.in_shape, dtype=np.float32)
        inputs = {n: (n.select(x) if n.tensor == "input" else
                      np.zeros(n.shape(layer.out_shape), np.float32)) for n in chunk.needs}
        cache: dict = {}     # as real chunks run: sliced (and packed) weights kept
        return measure_speed(lambda: compute_chunk({layer.name: layer}, stage, chunk, inputs,
                                                   cache=cache),
                             chunk.cost.macs, calibration_window())

    # ------------------------------------------------------------ work
    def receiveMsg_StageWork(self, msg: StageWork, sender):
        self.queue.extend(self._jobs(msg, sender))
        if not self.continuing:       # otherwise a Continue is already on its way
            self._work()

    def _take_work(self, msg: StageWork, conn) -> None:
        """Data-plane work (on the connection's reader thread): queued for the compute thread."""
        jobs = self._jobs(msg, conn)
        with self.fast_cv:
            self.fast.extend(jobs)
            self.fast_cv.notify()

    def _compute_loop(self) -> None:
        """The compute thread: data-plane jobs one at a time; results computed back to back
        (within SLICE_S) go back in one message per requester."""
        out: list = []
        flush_at = 0.0
        while True:
            with self.fast_cv:
                flush = bool(out) and (not self.fast or time.perf_counter() > flush_at)
                if not flush:
                    while not self.fast and not self.stopping:
                        self.fast_cv.wait()
                    if self.stopping:
                        return
                    job = self.fast.popleft()
            if flush:
                self._send_results(out)
                out = []
                continue
            if not out:
                flush_at = time.perf_counter() + SLICE_S
            try:
                self._run(job, out)
            except Exception as exc:      # never let the thread die: the deadline retries it
                log.error("compute thread", error=repr(exc))

    def _jobs(self, msg: StageWork, sender) -> list:
        """The jobs of `msg`, inputs decoded; a chunk whose input is damaged fails at once."""
        now = time.time()
        decoded: dict = {}
        strips, jobs = [], []
        for job in msg.jobs:
            inputs = {}
            needs = job.chunk.run_as(msg.swap is not None)[0]
            try:
                for need, key in zip(needs, job.blob_keys):
                    if key not in decoded:
                        decoded[key] = wire.decode(msg.blobs[key])
                    inputs[need] = decoded[key]
            except (wire.WireError, KeyError) as exc:
                self._reply(sender, ChunkFailed(msg.request, job.chunk.stage, job.chunk.index,
                                              job.attempt, self.name, f"bad input: {exc}"))
                continue
            if msg.swap:
                strips.append((job.chunk, job.attempt, inputs))
            else:
                jobs.append(_Job(msg.request, msg.stage, job.chunk, job.attempt, inputs,
                                 sender, now, msg.wire_dtype))
        if strips:
            jobs.append(_SwapJob(msg.request, msg.stage, strips, msg.swap, msg.wait_s,
                                 sender, now, msg.wire_dtype))
        return jobs

    def receiveMsg_Continue(self, msg, sender):
        self.continuing = False
        self._work()

    def _work(self) -> None:
        # Results computed in one slice go back in one message per requester: one
        # Thespian hop instead of one per chunk.
        t_end = time.perf_counter() + SLICE_S
        out: list = []
        while self.queue and time.perf_counter() < t_end:
            self._run(self.queue.popleft(), out)
        self._send_results(out)
        self._kick()

    def _send_results(self, out: list) -> None:
        """Results computed back to back: one message per requester."""
        for reply_to, results in _by_target(out):
            self._reply(reply_to, results[0] if len(results) == 1 else ChunkResults(results))

    def _kick(self) -> None:
        if self.queue and not self.continuing:
            self.continuing = True
            self.send(self.myAddress, Continue())

    def _run(self, job: _Job, out: list) -> None:
        with self.compute_lock:
            if isinstance(job, _SwapJob):
                self._run_swap(job, out)
            else:
                self._run_alone(job, out)

    def _run_alone(self, job: _Job, out: list) -> None:
        c = job.chunk
        try:
            start = time.time()
            y = compute_chunk(self.layers, job.stage, c, job.inputs, cache=self.cache)
            end = time.time()
            payload = wire.encode(y, job.dtype)
        except Exception as exc:
            log.warning("chunk failed", request=job.request, stage=c.stage, chunk=c.index,
                        error=repr(exc))
            self._reply(job.reply_to, ChunkFailed(job.request, c.stage, c.index, job.attempt,
                                                self.name, repr(exc)))
            return
        out.append((job.reply_to, ChunkResult(job.request, c.stage, c.index, job.attempt,
                                              self.name, payload, job.received, start, end)))

    def _run_swap(self, job: _SwapJob, out: list) -> None:
        """Compute strips of an exchange stage, swapping halo rows with the strips on other
        devices (this blocks the actor until done or a halo is `wait_s` late: then every
        strip fails and the requester sends each alone elsewhere)."""
        deadline = time.monotonic() + job.wait_s
        mine = {c.index for c, _, _ in job.strips}
        local: dict = {}
        received = collections.Counter()       # strip -> halo bytes from other devices
        waited = 0.0

        def send(src, dst, layer, rows):
            if dst in mine:
                local[(src, dst, layer)] = rows
                return
            dev, addr = job.swap[dst]
            halo = Halo(job.request, job.stage.index, src, dst, layer, wire.encode(rows, job.dtype))
            if self.peers is None or not self.peers.send(addr, halo):
                raise HaloMissing(f"cannot reach strip {dst} on {dev}")

        def take(src, dst, layer):
            nonlocal waited
            if (src, dst, layer) in local:
                return local.pop((src, dst, layer))
            t = time.perf_counter()
            blob = self.halos.take((job.request, job.stage.index, src, dst, layer), deadline)
            waited += time.perf_counter() - t
            received[dst] += len(blob)
            return wire.decode(blob)

        start = time.time()
        try:
            strips = {c.index: StripExchange(self.layers, job.stage, c, inputs,
                                             cache=self.cache)
                      for c, _, inputs in job.strips}
            results = run_lockstep(strips, send, take)
            end = time.time()
            payloads = {i: wire.encode(y, job.dtype) for i, y in results.items()}
        except Exception as exc:
            log.warning("strips failed", request=job.request, stage=job.stage.index,
                        chunks=sorted(c.index for c, _, _ in job.strips), error=repr(exc))
            self.halos.forget(job.request)
            for c, attempt, _ in job.strips:
                self._reply(job.reply_to, ChunkFailed(job.request, c.stage, c.index, attempt,
                                                      self.name, f"exchange: {exc}"))
            return
        for c, attempt, _ in job.strips:
            out.append((job.reply_to, ChunkResult(job.request, c.stage, c.index, attempt,
                                                  self.name, payloads[c.index], job.received,
                                                  start, end, received[c.index], waited)))

    def receiveMsg_Closed(self, msg, conn):
        # nobody is left to read these results
        self._drop(lambda j: j.reply_to is conn)

    def receiveMsg_Cancel(self, msg: Cancel, sender):
        self._drop(lambda j: _cancelled(j, msg))

    def _take_cancel(self, msg: Cancel, conn) -> None:
        """A data-plane Cancel (on the reader thread: the actor's own queue is not ours)."""
        self._drop(lambda j: _cancelled(j, msg), actor_queue=False)

    def _drop(self, gone, actor_queue: bool = True) -> None:
        """Remove the queued jobs `gone` picks: the compute thread's, and the actor's."""
        if actor_queue:
            self.queue = collections.deque(j for j in self.queue if not gone(j))
        with self.fast_cv:
            self.fast = collections.deque(j for j in self.fast if not gone(j))

    def receiveMsg_LinkProbe(self, msg: LinkProbe, sender):
        self._reply(sender, LinkEcho(msg.seq, self.name))

    # ------------------------------------------------------------ liveness
    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender):
        if msg.payload != "beat" or self.name is None:
            return
        self.seq += 1
        self.send(self.registrar, Heartbeat(self.name, self.seq, self.cpu.available(),
                                            len(self.queue) + len(self.fast)))
        self.wakeupAfter(self.hb, payload="beat")

    def receiveMsg_ActorExitRequest(self, msg, sender):
        self.queue.clear()
        with self.fast_cv:
            self.stopping = True
            self.fast.clear()
            self.fast_cv.notify()
        self.close_data_plane()

    def receiveUnrecognizedMessage(self, msg, sender):
        log.debug("ignored message", type=type(msg).__name__)
