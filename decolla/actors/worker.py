"""Worker: one per device; holds the model and computes the chunks it is sent.

Every job, whether it came on a data-plane connection or as an actor message, goes into one
queue that one compute thread works through, so the actor stays free for heartbeats and
cancellations while a chunk computes or waits for halos. Work on the data plane is taken on
its connection's reader thread and its results go straight back on the connection:
Thespian's message loop costs a device ≈ 0.3 ms of host CPU per message (≈ 2.5 ms on a
Pi-class core). Results of work that came as actor messages go back as actor messages, sent
from the actor's thread (Thespian's send is not thread-safe): the compute thread hands them
over through the inbox.
"""
from __future__ import annotations

import collections
import dataclasses
import socket
import threading
import time

from thespian.actors import ActorTypeDispatcher, WakeupMessage

from decolla import ops
from decolla.actors import speed, system
from decolla.actors.preload import ModelRefused, leader_model
from decolla.log import get_logger
from decolla.plans.compute import compute_chunk
from decolla.plans.exchange import HaloBox, HaloMissing, StripExchange, run_lockstep
from decolla.runtime import channels, dataplane, wire
from decolla.runtime.messages import (Cancel, ChunkFailed, ChunkResult, ChunkResults, Halo,
                                      Heartbeat, InitWorker, LinkEcho, LinkProbe, StageWork,
                                      WorkerReady, WorkerRefused)

log = get_logger("worker")
BATCH_S = 0.02          # results computed back to back within this long go back in one message
POLL_S = 0.002          # how often an actor whose inbox is not watched hands results over


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

    RECEIVER = channels.WORKER

    @staticmethod
    def actorSystemCapabilityCheck(capabilities, requirements):
        return bool(capabilities.get(system.CAP_COMPUTE)) and \
            capabilities.get(system.CAP_NODE) == requirements.get(system.CAP_NODE)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.name = None
        self.seq = 0
        self.cache: dict = {}
        self.cpu = speed.FreeCpuMeter()
        self.halos = HaloBox()
        self.jobs: collections.deque = collections.deque()
        self.jobs_cv = threading.Condition()
        self.computing = False    # the compute thread holds a job or results not yet sent
        self.polling = False
        self.stopping = False
        self.open_inbox()         # results for actor addresses come back through it

    def receiveMsg_InitWorker(self, msg: InitWorker, sender):
        self.name, self.registrar, self.hb = msg.name, sender, msg.heartbeat_s
        try:
            self.model = leader_model(msg.model_spec, msg.digest)
        except ModelRefused as exc:
            self.send(sender, WorkerRefused(msg.name, str(exc)))
            return
        self.layers = {l.name: l for l in self.model.layers}
        try:
            ops.set_threads(max(1, int(msg.threads)))
        except Exception as exc:
            log.warning("could not set kernel threads", error=str(exc))
        mac_s = self._calibrate()
        threading.Thread(target=self._compute_loop, daemon=True, name="worker-compute").start()
        info = system.proc_info()
        self.send(sender, WorkerReady(msg.name, mac_s, info["pid"], info["pgid"],
                                      socket.gethostname(), int(msg.threads),
                                      self.listen(dataplane.env_port())))
        log.info("worker ready", node=msg.name, pid=info["pid"], speed_gmacs=round(mac_s / 1e9, 2))
        self.wakeupAfter(self.hb, payload="beat")

    def _calibrate(self) -> float:
        """This device's speed in MAC/s."""
        return speed.calibrate(self.model)

    def _reply(self, to, msg) -> None:
        """Send `msg` back the way the work came: a data connection (from any thread) or an
        actor address (from the actor's thread)."""
        if isinstance(to, dataplane.Connection):
            try:
                to.send(msg)
            except ConnectionError:
                pass         # the requester went away; its supervisor re-sends elsewhere
        else:
            self.send(to, msg)

    def _send_back(self, to, msg) -> None:
        """`_reply` from the compute thread: an actor message goes through the inbox."""
        if isinstance(to, dataplane.Connection):
            self._reply(to, msg)
        else:
            self.send_from_thread(to, msg)

    # ------------------------------------------------------------ work
    def receiveMsg_StageWork(self, msg: StageWork, sender):
        self._queue(self._jobs(msg, sender))
        self._poll_results()

    def takeMsg_StageWork(self, msg: StageWork, conn) -> None:
        self._queue(self._jobs(msg, conn))

    def _queue(self, jobs: list) -> None:
        with self.jobs_cv:
            self.jobs.extend(jobs)
            self.jobs_cv.notify()

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

    def _compute_loop(self) -> None:
        """The compute thread: jobs one at a time; results computed back to back (within
        BATCH_S) go back in one message per requester."""
        out: list = []
        flush_at = 0.0
        while True:
            with self.jobs_cv:
                flush = bool(out) and (not self.jobs or time.perf_counter() > flush_at)
                if not flush:
                    while not self.jobs and not self.stopping:
                        self.computing = False
                        self.jobs_cv.wait()
                    if self.stopping:
                        return
                    job = self.jobs.popleft()
                    self.computing = True
            if flush:
                for reply_to, results in _by_target(out):
                    self._send_back(reply_to, results[0] if len(results) == 1
                                    else ChunkResults(results))
                out = []
                continue
            if not out:
                flush_at = time.perf_counter() + BATCH_S
            try:
                if isinstance(job, _SwapJob):
                    self._run_swap(job, out)
                else:
                    self._run_alone(job, out)
            except Exception as exc:      # never let the thread die: the deadline retries it
                log.error("compute thread", error=repr(exc))

    def _poll_results(self) -> None:
        """Where the actor system does not watch the inbox, drain it on wake-ups while the
        compute thread has work whose results it hands over."""
        if not self.polling and not self.inbox_watched():
            self.polling = True
            self.wakeupAfter(POLL_S, payload="results")

    def _run_alone(self, job: _Job, out: list) -> None:
        """Compute one chunk; its result goes to `out`, a failure back at once."""
        c = job.chunk
        try:
            start = time.time()
            y = compute_chunk(self.layers, job.stage, c, job.inputs, cache=self.cache)
            end = time.time()
            payload = wire.encode(y, job.dtype)
        except Exception as exc:
            log.warning("chunk failed", request=job.request, stage=c.stage, chunk=c.index,
                        error=repr(exc))
            self._send_back(job.reply_to, ChunkFailed(job.request, c.stage, c.index,
                                                      job.attempt, self.name, repr(exc)))
            return
        out.append((job.reply_to, ChunkResult(job.request, c.stage, c.index, job.attempt,
                                              self.name, payload, job.received, start, end)))

    def _run_swap(self, job: _SwapJob, out: list) -> None:
        """Compute strips of an exchange stage, swapping halo rows with the strips on other
        devices (this holds the compute thread until done or a halo is `wait_s` late: then
        every strip fails and the requester sends each alone elsewhere)."""
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
            strips = {c.index: StripExchange(self.layers, job.stage, c, inputs, cache=self.cache)
                      for c, _, inputs in job.strips}
            results = run_lockstep(strips, send, take)
            end = time.time()
            payloads = {i: wire.encode(y, job.dtype) for i, y in results.items()}
        except Exception as exc:
            log.warning("strips failed", request=job.request, stage=job.stage.index,
                        chunks=sorted(c.index for c, _, _ in job.strips), error=repr(exc))
            self.halos.forget(job.request)
            for c, attempt, _ in job.strips:
                self._send_back(job.reply_to, ChunkFailed(job.request, c.stage, c.index,
                                                          attempt, self.name, f"exchange: {exc}"))
            return
        for c, attempt, _ in job.strips:
            out.append((job.reply_to, ChunkResult(job.request, c.stage, c.index, attempt,
                                                  self.name, payloads[c.index], job.received,
                                                  start, end, received[c.index], waited)))

    def receiveMsg_Closed(self, msg, conn):
        # nobody is left to read these results
        self._drop(lambda j: j.reply_to is conn)

    def receiveMsg_Cancel(self, msg: Cancel, sender):
        """Drop queued jobs (from the actor's thread or a connection's reader thread)."""
        self._drop(lambda j: _cancelled(j, msg))

    takeMsg_Cancel = receiveMsg_Cancel

    def _drop(self, gone) -> None:
        """Remove the queued jobs `gone` picks."""
        with self.jobs_cv:
            self.jobs = collections.deque(j for j in self.jobs if not gone(j))

    def receiveMsg_LinkProbe(self, msg: LinkProbe, sender):
        self._reply(sender, LinkEcho(msg.seq, self.name))

    takeMsg_LinkProbe = receiveMsg_LinkProbe

    def takeMsg_Halo(self, msg: Halo, conn) -> None:
        self.halos.put(msg)       # taken at once: a computing strip may be waiting for it

    # ------------------------------------------------------------ liveness
    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender):
        if msg.payload == "results":
            self.polling = False
            with self.jobs_cv:
                busy = bool(self.jobs) or self.computing
            self.drain_inbox()     # after the check: what the thread handed over by then is in
            if busy:
                self._poll_results()
            return
        if msg.payload != "beat" or self.name is None:
            return
        self.seq += 1
        with self.jobs_cv:
            queued = len(self.jobs)
        self.send(self.registrar, Heartbeat(self.name, self.seq, self.cpu.available(), queued))
        self.wakeupAfter(self.hb, payload="beat")

    def receiveMsg_ActorExitRequest(self, msg, sender):
        with self.jobs_cv:
            self.stopping = True
            self.jobs.clear()
            self.jobs_cv.notify()
        self.close_data_plane()

    def receiveUnrecognizedMessage(self, msg, sender):
        log.debug("ignored message", type=type(msg).__name__)
