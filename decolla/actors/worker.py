"""Worker: one per device; holds the model and computes the chunks it is sent.

Jobs go into a local queue; the worker computes for a short slice of time, then
sends itself `Continue`, so heartbeats, cancellations and new work interleave
with computation and the reported queue length is real.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time

import numpy as np
from thespian.actors import ActorTypeDispatcher, WakeupMessage

from decolla import plan as planmod
from decolla import wire
from decolla.actors import system
from decolla.actors.preload import get_model
from decolla.log import get_logger
from decolla.messages import (Cancel, ChunkFailed, ChunkResult, ChunkResults, Continue,
                              Heartbeat, InitWorker, StageWork, WorkerReady, WorkerRefused)

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


class _Job:
    __slots__ = ("request", "stage", "chunk", "attempt", "inputs", "reply_to", "received",
                 "dtype")

    def __init__(self, request, stage, chunk, attempt, inputs, reply_to, received, dtype):
        self.request, self.stage, self.chunk, self.attempt = request, stage, chunk, attempt
        self.inputs, self.reply_to, self.received, self.dtype = inputs, reply_to, received, dtype


class Worker(ActorTypeDispatcher):
    """Computes chunks on one device."""

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

    def receiveMsg_InitWorker(self, msg: InitWorker, sender):
        self.name, self.registrar, self.hb = msg.name, sender, msg.heartbeat_s
        try:
            self.model = get_model(msg.model_spec)
        except Exception as exc:  # a model this node cannot load is a refusal, not a crash
            self.send(sender, WorkerRefused(msg.name, f"cannot load model: {exc}"))
            return
        if self.model.digest() != msg.digest:
            self.send(sender, WorkerRefused(msg.name, "model digest differs from the leader's"))
            return
        self.layers = {l.name: l for l in self.model.layers}
        try:
            from decolla import ops
            ops.set_threads(max(1, int(msg.threads)))
        except Exception as exc:
            log.warning("could not set kernel threads", error=str(exc))
        speed = self._calibrate()
        info = system.proc_info()
        self.send(sender, WorkerReady(msg.name, speed, info["pid"], info["pgid"],
                                      socket.gethostname(), int(msg.threads)))
        log.info("worker ready", node=msg.name, pid=info["pid"], speed_gmacs=round(speed / 1e9, 2))
        self.wakeupAfter(self.hb, payload="beat")

    def _calibrate(self) -> float:
        """MAC/s on a representative chunk (the heaviest pointwise layer, 1/6 of its channels)."""
        pw = [l for l in self.model.layers if l.kind == "pwconv"] or self.model.layers
        layer = dataclasses.replace(max(pw, key=lambda l: l.macs), residual=None)
        p = planmod.build_plan([layer.spec()], 6)
        stage, chunk = p.stages[0], p.stages[0].chunks[0]
        x = np.random.default_rng(0).random(layer.in_shape, dtype=np.float32)
        inputs = {n: (n.select(x) if n.tensor == "input" else
                      np.zeros(n.shape(layer.out_shape), np.float32)) for n in chunk.needs}
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            planmod.compute_chunk({layer.name: layer}, stage, chunk, inputs)
            best = min(best, time.perf_counter() - t0)
        return chunk.cost.macs / max(best, 1e-6)

    # ------------------------------------------------------------ work
    def receiveMsg_StageWork(self, msg: StageWork, sender):
        now = time.time()
        decoded: dict = {}
        for job in msg.jobs:
            inputs = {}
            try:
                for need, key in zip(job.chunk.needs, job.blob_keys):
                    if key not in decoded:
                        decoded[key] = wire.decode(msg.blobs[key])
                    inputs[need] = decoded[key]
            except (wire.WireError, KeyError) as exc:
                self.send(sender, ChunkFailed(msg.request, job.chunk.stage, job.chunk.index,
                                              job.attempt, self.name, f"bad input: {exc}"))
                continue
            self.queue.append(_Job(msg.request, msg.stage, job.chunk, job.attempt, inputs,
                                   sender, now, msg.wire_dtype))
        if not self.continuing:       # otherwise a Continue is already on its way
            self._work()

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
        for reply_to, results in _by_target(out):
            self.send(reply_to, results[0] if len(results) == 1 else ChunkResults(results))
        self._kick()

    def _kick(self) -> None:
        if self.queue and not self.continuing:
            self.continuing = True
            self.send(self.myAddress, Continue())

    def _run(self, job: _Job, out: list) -> None:
        c = job.chunk
        try:
            start = time.time()
            y = planmod.compute_chunk(self.layers, job.stage, c, job.inputs, cache=self.cache)
            end = time.time()
            payload = wire.encode(y, job.dtype)
        except Exception as exc:
            log.warning("chunk failed", request=job.request, stage=c.stage, chunk=c.index,
                        error=repr(exc))
            self.send(job.reply_to, ChunkFailed(job.request, c.stage, c.index, job.attempt,
                                                self.name, repr(exc)))
            return
        out.append((job.reply_to, ChunkResult(job.request, c.stage, c.index, job.attempt,
                                              self.name, payload, job.received, start, end)))

    def receiveMsg_Cancel(self, msg: Cancel, sender):
        keys = set(msg.keys)
        self.queue = collections.deque(
            j for j in self.queue
            if not (j.request == msg.request and (not keys or (j.chunk.stage, j.chunk.index) in keys)))

    # ------------------------------------------------------------ liveness
    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender):
        if msg.payload != "beat" or self.name is None:
            return
        self.seq += 1
        self.send(self.registrar, Heartbeat(self.name, self.seq, self.cpu.available(),
                                            len(self.queue)))
        self.wakeupAfter(self.hb, payload="beat")

    def receiveMsg_ActorExitRequest(self, msg, sender):
        self.queue.clear()

    def receiveUnrecognizedMessage(self, msg, sender):
        log.debug("ignored message", type=type(msg).__name__)
