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
import os
import signal
import socket
import tempfile
import threading
import time

from thespian.actors import ActorTypeDispatcher, WakeupMessage

from decolla import ops
from decolla.actors import jobs, speed, system
from decolla.actors.preload import ModelRefused, leader_model
from decolla.log import get_logger
from decolla.plans.exchange import HaloBox
from decolla.runtime import channels, dataplane
from decolla.runtime.messages import (Cancel, ChunkFailed, ChunkResults, Halo, Heartbeat,
                                      InitWorker, LinkEcho, LinkProbe, StageWork, WorkerReady,
                                      WorkerRefused)

log = get_logger("worker")
BATCH_S = 0.02          # results computed back to back within this long go back in one message
POLL_S = 0.002          # how often an actor whose inbox is not watched hands results over


def _take_over(name: str) -> None:
    """One worker per device: a worker of device `name` started here before this one (by
    a leader that has since restarted, its registrar gone with it, or being replaced) is
    stopped, and this one takes its place. Workers are children of their device's actor
    system admin; its pid and the device's name name the file holding the worker's pid."""
    admin = os.getppid()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = os.path.join(tempfile.gettempdir(),
                        f"decolla-worker-{os.getuid()}-{admin}-{safe}.pid")
    try:
        with open(path) as fh:
            old = int(fh.read().strip() or 0)
    except (OSError, ValueError):
        old = 0
    if old and old != os.getpid() and _parent(old) == admin:
        log.warning("stopping this device's previous worker", pid=old)
        try:
            os.kill(old, signal.SIGCONT)      # a stopped one could not act on the SIGTERM
            os.kill(old, signal.SIGTERM)      # Thespian's actor shutdown
        except ProcessLookupError:
            pass
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, path)


def _parent(pid: int) -> int:
    """Parent pid of a running process (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


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
        self.queue: collections.deque = collections.deque()
        self.queue_cv = threading.Condition()
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
        _take_over(msg.name)
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
        self._take_work(msg, sender)
        self._poll_results()

    def takeMsg_StageWork(self, msg: StageWork, conn) -> None:
        self._take_work(msg, conn)

    def _take_work(self, msg: StageWork, reply_to) -> None:
        """Queue the jobs of `msg` for the compute thread (a chunk whose input is damaged
        fails at once)."""
        queued, failed = jobs.jobs_of(msg, reply_to, self.name,
                                      sealed=isinstance(reply_to, dataplane.Connection))
        for f in failed:
            self._reply(reply_to, f)
        with self.queue_cv:
            self.queue.extend(queued)
            self.queue_cv.notify()

    def _compute_loop(self) -> None:
        """The compute thread: jobs one at a time; results computed back to back (within
        BATCH_S) go back in one message per requester."""
        out: list = []
        flush_at = 0.0
        while True:
            with self.queue_cv:
                flush = bool(out) and (not self.queue or time.perf_counter() > flush_at)
                if not flush:
                    while not self.queue and not self.stopping:
                        self.computing = False
                        self.queue_cv.wait()
                    if self.stopping:
                        return
                    job = self.queue.popleft()
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
                self._run(job, out)
            except Exception as exc:      # never let the thread die: the deadline retries it
                log.error("compute thread", error=repr(exc))

    def _poll_results(self) -> None:
        """Where the actor system does not watch the inbox, drain it on wake-ups while the
        compute thread has work whose results it hands over."""
        if not self.polling and not self.inbox_watched():
            self.polling = True
            self.wakeupAfter(POLL_S, payload="results")

    def _run(self, job, out: list) -> None:
        """Compute `job`: results go to `out`, failures back at once."""
        if isinstance(job, jobs.SwapJob):
            done = jobs.run_swap(job, self.layers, self.cache, self.name, self._send_halo,
                                 self.halos)
        else:
            done = [jobs.run_alone(job, self.layers, self.cache, self.name)]
        for msg in done:
            if isinstance(msg, ChunkFailed):
                self._send_back(job.reply_to, msg)
            else:
                out.append((job.reply_to, msg))

    def _send_halo(self, addr, halo: Halo) -> bool:
        return self.peers is not None and self.peers.send(addr, halo)

    def receiveMsg_Closed(self, msg, conn):
        # nobody is left to read these results
        self._drop(lambda j: j.reply_to is conn)

    def receiveMsg_Cancel(self, msg: Cancel, sender):
        """Drop queued jobs (from the actor's thread or a connection's reader thread)."""
        self._drop(lambda j: jobs.cancelled(j, msg))

    takeMsg_Cancel = receiveMsg_Cancel

    def _drop(self, gone) -> None:
        """Remove the queued jobs `gone` picks."""
        with self.queue_cv:
            self.queue = collections.deque(j for j in self.queue if not gone(j))

    def receiveMsg_LinkProbe(self, msg: LinkProbe, sender):
        self._reply(sender, LinkEcho(msg.seq, self.name))

    takeMsg_LinkProbe = receiveMsg_LinkProbe

    def takeMsg_Halo(self, msg: Halo, conn) -> None:
        self.halos.put(msg)       # taken at once: a computing strip may be waiting for it

    # ------------------------------------------------------------ liveness
    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender):
        if msg.payload == "results":
            self.polling = False
            with self.queue_cv:
                busy = bool(self.queue) or self.computing
            self.drain_inbox()     # after the check: what the thread handed over by then is in
            if busy:
                self._poll_results()
            return
        if msg.payload != "beat" or self.name is None:
            return
        self.seq += 1
        with self.queue_cv:
            queued = len(self.queue)
        self.send(self.registrar, Heartbeat(self.name, self.seq, self.cpu.available(), queued))
        self.wakeupAfter(self.hb, payload="beat")

    def receiveMsg_ActorExitRequest(self, msg, sender):
        with self.queue_cv:
            self.stopping = True
            self.queue.clear()
            self.queue_cv.notify()
        self.close_data_plane()

    def receiveUnrecognizedMessage(self, msg, sender):
        log.debug("ignored message", type=type(msg).__name__)
