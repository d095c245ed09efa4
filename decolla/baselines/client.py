"""Client of the baselines: joins a running cluster and runs mobile-only, partition-offloading
and hierarchical inferences on its hosts, with the runtime's kernels and wire format.

    with BaselineClient("10.77.0.13:1900", edge="edge") as bc:
        bc.prepare()                                       # segment workers + per-layer profiles
        r = bc.infer(image, "hierarchical", bandwidth_mbit=20)
        r.logits, r.latency, r.trace, r.stats["route"]

`infer` is thread-safe; concurrent mobile-only / partition requests go to the device with
the fewest requests in flight (ties: the first in name order).
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from decolla.actors import system
from decolla.api import ClusterError, ClusterMember, InferenceError, Result, top_k
from decolla.baselines import partition as part
from decolla.baselines.actors import PipelineRequester
from decolla.baselines.messages import ConfigurePipeline, Prepare, Profiles, RunPipeline
from decolla.forward import check_image
from decolla.runtime.messages import InferError, InferReply
from decolla.runtime.trace import Trace

METHODS = ("mobile", "partition", "hierarchical")


def plan_route(method: str, specs, profiles: dict, devices: list[str], edge: str | None,
               bandwidth_mbit: float, device: str | None = None) -> tuple[list, dict]:
    """The route a baseline uses, and why (split point, predicted times).

    profiles: host -> seconds per layer; devices: ready devices in order; device: the one
    device of mobile-only / partition-offloading (default: the first).
    """
    n = len(specs)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not devices:
        raise part.RouteError("no ready device")
    dev = device or devices[0]
    if method == "mobile":
        return [part.Segment(dev, 0, n)], {"device": dev}
    if method == "partition":
        if edge is None or edge not in profiles:
            raise part.RouteError("partition-offloading needs a profiled edge host")
        cuts = [part.cut_bytes(specs, c) for c in range(n + 1)]
        choice = part.neurosurgeon_split(profiles[dev], profiles[edge], cuts,
                                         bandwidth_mbit * 1e6)
        return part.partition_route(dev, edge, choice.p, n), {
            "device": dev, "split": choice.p, "predicted_s": choice.predicted_s,
            "device_s": choice.device_s, "transfer_s": choice.transfer_s,
            "edge_s": choice.edge_s, "cut_bytes": choice.bytes}
    weights = mean_profile(profiles, devices)
    cuts = [part.cut_bytes(specs, c) for c in range(n + 1)]
    return part.hierarchical_route(devices, weights, cut_sizes=cuts), {
        "weights_s": float(sum(weights))}


def mean_profile(profiles: dict, devices: list[str]) -> list[float]:
    """Per-layer seconds averaged over `devices` (the hierarchical cut balances these)."""
    return list(np.mean([profiles[d] for d in devices if d in profiles], axis=0))


class BaselineClient(ClusterMember):
    """Joins the cluster at `leader` as a requester node and runs the baselines on its hosts."""

    close_linger_s = 0.2         # let the exit requests reach the segment workers

    def __init__(self, leader: str, edge: str | None = None, name: str | None = None,
                 port: int | None = None, bind: str | None = None, connect_timeout: float = 30.0,
                 request_timeout: float = 600.0, data_plane: bool = True):
        self.edge = edge
        self.request_timeout = request_timeout
        self.profiles: dict = {}
        self._inflight: dict[str, int] = {}
        self._join(leader, name or f"baselines-{uuid.uuid4().hex[:8]}", port, bind,
                   connect_timeout)
        try:
            self._requester = self._asys.createActor(
                PipelineRequester, targetActorRequirements={system.CAP_NODE: self.name})
            ready = self._asys.ask(self._requester, ConfigurePipeline(self._registrar, self.name,
                                                                     data_plane),
                                   connect_timeout)
            if ready is None or not getattr(ready, "ok", False):
                raise ClusterError("baseline requester did not start")
            m = self.membership()
            self.model_spec, self.specs = m.model, list(m.specs)
            self.input_shape = tuple(m.input_shape)
        except BaseException:
            self.close()
            raise



    def prepare(self, hosts: list[str] | None = None, reprofile: bool = False,
                timeout: float = 120.0, fresh: bool = False) -> dict:
        """Place a segment worker on every host (devices + edge) and profile it; host -> s/layer.

        fresh: replace existing workers (after a host was cut off and rejoined, its old
        actors may be unreachable; the runtime's registrar likewise restarts its Worker).
        """
        hosts = list(hosts or self.devices() + ([self.edge] if self.edge else []))
        with self._asys.private() as ctx:
            reply = ctx.ask(self._requester, Prepare(hosts, self.model_spec, reprofile, timeout,
                                                     fresh), timeout + 10)
        if not isinstance(reply, Profiles):
            raise ClusterError("no answer while preparing segment workers")
        if reply.missing:
            raise ClusterError(f"segment workers did not start on {reply.missing}")
        self.profiles.update(reply.profiles)
        return reply.profiles

    def _pick(self, devices: list[str]) -> str:
        with self._lock:
            dev = min(devices, key=lambda d: (self._inflight.get(d, 0), devices.index(d)))
            self._inflight[dev] = self._inflight.get(dev, 0) + 1
            return dev

    def _release(self, dev: str | None) -> None:
        if dev is not None:
            with self._lock:
                self._inflight[dev] -= 1

    def infer(self, image, method: str, bandwidth_mbit: float, devices: list[str] | None = None,
              device: str | None = None, t1_slack: float = 4.0, t1_floor: float = 1.0,
              timeout: float | None = None, top: int = 5) -> Result:
        """One inference with a baseline; Result.stats holds the route and the split decision.

        devices: the devices to use (default: the profiled ready devices, in name order);
        bandwidth_mbit: the device link as Neurosurgeon's estimate and for t1.
        """
        image = check_image(image, self.input_shape)
        devices = [d for d in (devices or sorted(self.profiles)) if d != self.edge]
        picked = None
        if method in ("mobile", "partition") and device is None:
            device = picked = self._pick(devices)
        try:
            route, info = plan_route(method, self.specs, self.profiles, devices, self.edge,
                                     bandwidth_mbit, device)
            n = len(self.specs)
            with self._lock:
                rid = f"{self.name}/{method}/{next(self._ids)}"
            msg = RunPipeline(rid, image, route, mean_profile(self.profiles, devices),
                              [part.cut_bytes(self.specs, c) for c in range(n + 1)],
                              bandwidth_mbit * 1e6, t1_slack, t1_floor,
                              replan=method == "hierarchical", candidates=devices,
                              timeout_s=timeout or self.request_timeout)
            wait = (timeout or self.request_timeout) + 15
            t0 = time.perf_counter()
            with self._asys.private() as ctx:
                reply = ctx.ask(self._requester, msg, wait)
            latency = time.perf_counter() - t0
        finally:
            self._release(picked)
        if reply is None:
            raise InferenceError(f"request {rid}: no answer within {wait:.0f} s")
        if isinstance(reply, InferError):
            raise InferenceError(f"request {rid}: {reply.error}")
        if not isinstance(reply, InferReply):
            raise InferenceError(f"request {rid}: unexpected reply {reply!r}")
        trace = Trace(rid, reply.started, reply.finished, list(reply.records))
        stats = {"method": method, **info, **reply.stats}
        return Result(rid, reply.logits, top_k(reply.logits, top), latency, trace, stats)

