"""What a worker computes: the jobs in a StageWork, and how one job runs (a chunk alone, or
the strips of an exchange stage swapping halo rows with strips on other devices).

No actor here: the worker queues the jobs and sends what a run returns.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

from decolla.log import get_logger
from decolla.plans.compute import compute_chunk
from decolla.plans.exchange import HaloBox, HaloMissing, StripExchange, run_lockstep
from decolla.runtime import wire
from decolla.runtime.messages import Cancel, ChunkFailed, ChunkResult, Halo, StageWork

log = get_logger("worker")


@dataclasses.dataclass(slots=True)
class Job:
    """One chunk to compute alone."""
    request: str
    stage: object
    chunk: object
    attempt: int
    inputs: dict
    reply_to: object
    received: float
    dtype: str
    compress: bool
    checksum: bool              # results go back on a channel that does not authenticate

    def keys(self) -> set:
        return {self.chunk.key}


@dataclasses.dataclass(slots=True)
class SwapJob:
    """The strips of one exchange stage this device computes together (StageWork.swap)."""
    request: str
    stage: object
    strips: list                  # (chunk, attempt, inputs)
    swap: dict
    wait_s: float
    reply_to: object
    received: float
    dtype: str
    compress: bool
    checksum: bool              # results go back on a channel that does not authenticate

    def keys(self) -> set:
        return {c.key for c, _, _ in self.strips}


def cancelled(job, msg: Cancel) -> bool:
    """Whether `msg` drops queued `job` (a group of strips only once all of them are dropped)."""
    return job.request == msg.request and (not msg.keys or job.keys() <= set(msg.keys))


def jobs_of(msg: StageWork, reply_to, device: str,
            sealed: bool = False) -> tuple[list, list[ChunkFailed]]:
    """The jobs of `msg`, inputs decoded, and a failure for each chunk whose input is damaged;
    `sealed`: results go back on a channel that authenticates them (no crc needed)."""
    now = time.time()
    decoded: dict = {}
    strips, jobs, failed = [], [], []
    for job in msg.jobs:
        inputs = {}
        needs = job.chunk.run_as(msg.swap is not None)[0]
        try:
            for need, key in zip(needs, job.blob_keys):
                if key not in decoded:
                    decoded[key] = wire.decode(msg.blobs[key])
                inputs[need] = decoded[key]
        except (wire.WireError, KeyError) as exc:
            failed.append(ChunkFailed(msg.request, job.chunk.stage, job.chunk.index,
                                      job.attempt, device, f"bad input: {exc}"))
            continue
        if msg.swap:
            strips.append((job.chunk, job.attempt, inputs))
        else:
            jobs.append(Job(msg.request, msg.stage, job.chunk, job.attempt, inputs,
                            reply_to, now, msg.wire_dtype, msg.compress, not sealed))
    if strips:
        jobs.append(SwapJob(msg.request, msg.stage, strips, msg.swap, msg.wait_s,
                            reply_to, now, msg.wire_dtype, msg.compress, not sealed))
    return jobs, failed


def run_alone(job: Job, layers: dict, cache: dict, device: str) -> ChunkResult | ChunkFailed:
    """Compute one chunk."""
    c = job.chunk
    try:
        start = time.time()
        y = compute_chunk(layers, job.stage, c, job.inputs, cache=cache)
        end = time.time()
        payload = wire.encode(y, job.dtype, job.compress, job.checksum)
    except Exception as exc:
        log.warning("chunk failed", request=job.request, stage=c.stage, chunk=c.index,
                    error=repr(exc))
        return ChunkFailed(job.request, c.stage, c.index, job.attempt, device, repr(exc))
    return ChunkResult(job.request, c.stage, c.index, job.attempt, device, payload,
                       job.received, start, end)


def run_swap(job: SwapJob, layers: dict, cache: dict, device: str,
             send_halo: Callable[[tuple, Halo], bool], halos: HaloBox) -> list:
    """Compute the strips of an exchange stage, sending halo rows with `send_halo(data
    address, halo)` (False: not sent) and taking the others' from `halos`. Holds the calling
    thread until done or a halo is `wait_s` late: then every strip fails (the requester
    sends each alone elsewhere). A ChunkResult per strip, or a ChunkFailed per strip."""
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
        blob = wire.encode(rows, job.dtype, job.compress, checksum=False)   # on the data plane
        halo = Halo(job.request, job.stage.index, src, dst, layer, blob)
        if not send_halo(addr, halo):
            raise HaloMissing(f"cannot reach strip {dst} on {dev}")

    def take(src, dst, layer):
        nonlocal waited
        if (src, dst, layer) in local:
            return local.pop((src, dst, layer))
        t = time.perf_counter()
        blob = halos.take((job.request, job.stage.index, src, dst, layer), deadline)
        waited += time.perf_counter() - t
        received[dst] += len(blob)
        return wire.decode(blob)

    start = time.time()
    try:
        strips = {c.index: StripExchange(layers, job.stage, c, inputs, cache=cache)
                  for c, _, inputs in job.strips}
        results = run_lockstep(strips, send, take)
        end = time.time()
        payloads = {i: wire.encode(y, job.dtype, job.compress, job.checksum)
                    for i, y in results.items()}
    except Exception as exc:
        log.warning("strips failed", request=job.request, stage=job.stage.index,
                    chunks=sorted(c.index for c, _, _ in job.strips), error=repr(exc))
        halos.forget(job.request)
        return [ChunkFailed(job.request, c.stage, c.index, attempt, device, f"exchange: {exc}")
                for c, attempt, _ in job.strips]
    return [ChunkResult(job.request, c.stage, c.index, attempt, device, payloads[c.index],
                        job.received, start, end, received[c.index], waited)
            for c, attempt, _ in job.strips]
