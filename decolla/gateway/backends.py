"""Where the gateway's inferences run, behind one small protocol.

- `LocalReferenceBackend`: the gateway computes the model itself, layer by layer, with
  decolla.ops. For API tests and for a gateway started without a cluster; every answer
  says so (`backend.kind == "local-reference"`).
- `ClusterBackend`: a client of the runtime's embedding API (decolla.api): a `LocalCluster`
  of device processes it starts, or a `Client` of a running cluster's leader.

Both answer with `decolla.api.Result` (logits, latency and the per-chunk trace) and the
same status dicts, and publish live events to an `EventHub`.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Protocol

import numpy as np

from decolla.api import Client, LocalCluster, Result, Watcher, top_k
from decolla.gateway.catalog import ModelEntry
from decolla.gateway.events import EventHub
from decolla.log import get_logger
from decolla.ops import run_layer
from decolla.runtime.trace import ChunkRecord, Trace

log = get_logger("gateway.backend")


class BackendUnavailable(RuntimeError):
    """The cluster cannot serve the request (down, unreachable, no live device)."""


class Backend(Protocol):
    kind: str          # 'local-reference' | 'local-cluster' | 'cluster'
    label: str         # one line for people: where the computation happens

    def infer(self, image: np.ndarray, request_id: str) -> Result:
        """Logits and trace for one preprocessed image (H, W, 3) float32."""
        ...

    def status(self) -> dict:
        """{'healthy': bool, 'devices': [{'name','alive','cpu','bandwidth','in_flight',...}], ...}"""
        ...

    def close(self) -> None:
        ...


class _ProcessCpuShare:
    """CPU time of this process (all threads) per wall-clock second between two calls:
    the gateway's own load, shown as its device's CPU when it computes locally."""

    def __init__(self):
        self._last = (time.perf_counter(), time.process_time())

    def sample(self) -> float:
        now = (time.perf_counter(), time.process_time())
        wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return round(cpu / wall, 3) if wall > 0 else 0.0


class LocalReferenceBackend:
    """Runs the model in the gateway process; one chunk per layer on device 'gateway'."""

    kind = "local-reference"
    label = "Local reference, no cluster: the gateway process computes every layer itself"
    device = "gateway (local)"

    def __init__(self, entry: ModelEntry, hub: EventHub):
        self.entry, self.hub = entry, hub
        self._cpu = _ProcessCpuShare()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._done = 0

    def infer(self, image: np.ndarray, request_id: str) -> Result:
        model = self.entry.model
        with self._lock:
            started = time.time()          # the trace's clock (requester and worker are one here)
            tensors = {"input": np.asarray(image, dtype=np.float32)}
            x = tensors["input"]
            records = []
            for i, layer in enumerate(model.layers):
                where = {"type": "chunk", "request": request_id, "stage": i, "chunk": 0,
                         "device": self.device, "name": layer.name}
                self._in_flight = 1
                self.hub.publish({**where, "state": "start"})
                start = time.time()
                y = run_layer(layer, x, tensors[layer.residual] if layer.residual else None)
                end = time.time()
                records.append(ChunkRecord(
                    request_id, i, 0, 0, self.device, layer.name, layer.macs, sent=start,
                    bytes_in=x.nbytes, returned=end, received=start, start=start, end=end,
                    bytes_out=y.nbytes, status="won", reason="first"))
                self.hub.publish({**where, "state": "done"})
                self._in_flight = 0
                self._done += 1
                tensors[layer.name] = x = y
            finished = time.time()
        logits = np.asarray(x, dtype=np.float32).reshape(-1)
        return Result(request_id, logits, top_k(logits), finished - started,
                      Trace(request_id, started, finished, records))

    def status(self) -> dict:
        return {"backend": self.kind, "label": self.label, "model": self.entry.key,
                "digest": self.entry.digest, "healthy": True,
                "devices": [{"name": self.device, "alive": True, "cpu": self._cpu.sample(),
                             "bandwidth": None, "in_flight": self._in_flight,
                             "chunks_done": self._done}]}

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- cluster client

def cluster_model(leader: str, timeout: float) -> tuple[str, str]:
    """(model spec, digest) the cluster led by `leader` runs, as its registrar says."""
    _check_reachable(leader, min(timeout, 3.0))
    with Watcher(leader, timeout=timeout) as watcher:     # no requester: nothing to plan
        st = watcher.status(timeout)
    return st["model"], st["digest"]


class ClusterBackend:
    """Client of decolla.api: `LocalCluster(devices=n, model=spec)` or `Client(leader=...)`."""

    RETRY_CONNECT_S = 5.0     # after a failed connect, refuse fast for this long

    def __init__(self, entry: ModelEntry, hub: EventHub, leader: str | None = None,
                 devices: int = 3, connect_timeout: float = 15.0, request_timeout: float = 20.0,
                 plan: str = "auto"):
        self.entry, self.hub, self.leader, self.n_devices = entry, hub, leader, devices
        self.plan = plan
        self.connect_timeout, self.request_timeout = connect_timeout, request_timeout
        self.kind = "cluster" if leader else "local-cluster"
        self.label = (f"DeColla cluster led by {leader}" if leader else
                      f"DeColla local cluster: {devices} device processes on this machine")
        self._lock = threading.Lock()        # one connect at a time
        self._client: Client | LocalCluster | None = None
        self._failed_at = -1e9
        self._failure = ""
        self._done: dict[str, int] = {}
        self._bandwidth: dict[str, float] = {}

    def _connect(self) -> Client | LocalCluster:
        """Start or reach the cluster once, lazily, so the gateway starts even if it is down."""
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() - self._failed_at < self.RETRY_CONNECT_S:
                raise BackendUnavailable(self._failure)
            try:
                if self.leader:
                    _check_reachable(self.leader, min(self.connect_timeout, 3.0))
                    client = Client(leader=self.leader, connect_timeout=self.connect_timeout,
                                    request_timeout=self.request_timeout, plan=self.plan)
                else:
                    client = LocalCluster(devices=self.n_devices, model=self.entry.spec,
                                          request_timeout=self.request_timeout, plan=self.plan)
            except Exception as exc:  # any start/connect failure means: cluster down
                self._failed_at, self._failure = time.monotonic(), f"cannot reach the cluster: {exc}"
                raise BackendUnavailable(self._failure) from exc
            if client.digest != self.entry.digest:
                client.close()
                self._failed_at = time.monotonic()
                self._failure = (f"the cluster runs another model (digest {client.digest[:12]}), "
                                 f"not {self.entry.key} ({self.entry.digest[:12]})")
                raise BackendUnavailable(self._failure)
            log.info("cluster connected", kind=self.kind, leader=self.leader, model=self.entry.key)
            self._client = client
            return client

    def infer(self, image: np.ndarray, request_id: str) -> Result:
        client = self._connect()
        try:
            res = client.infer(image, on_event=self._live_events(request_id))
        except (TypeError, ValueError):
            raise                  # a bad input is the gateway's bug: 500, not "cluster down"
        except Exception as exc:   # InferenceError, ClusterError, a dead actor system: cluster failed
            raise BackendUnavailable(f"the cluster could not complete the request: {exc}") from exc
        self._account(res.trace)
        return res

    def _live_events(self, request_id: str):
        """Callback turning the runtime's chunk events into live-view events as they happen."""
        attempts: dict = {}

        def on_event(e: dict) -> None:
            where = {"request": request_id, "stage": e["stage"], "chunk": e["chunk"],
                     "device": e["device"]}
            kind = e["kind"]
            if kind in ("sent", "reassigned"):
                n = attempts[(e["stage"], e["chunk"])] = attempts.get((e["stage"], e["chunk"]), -1) + 1
                if kind == "reassigned":
                    self.hub.publish({"type": "reassignment", **where, "retries": n,
                                      "reason": e["reason"]})
                self.hub.publish({"type": "chunk", **where, "state": "start"})
            elif kind == "won":
                self.hub.publish({"type": "chunk", **where, "state": "done"})
            elif kind == "failed":
                self.hub.publish({"type": "chunk", **where, "state": "done"})
                self.hub.publish({"type": "failure", **where, "status": "failed",
                                  "reason": e["reason"]})
        return on_event

    def _account(self, trace: Trace) -> None:
        """Chunks won per device, and a bandwidth estimate from the round trips' bytes/time."""
        moved: dict[str, list[float]] = {}
        for r in trace.records:
            if r.status == "won":
                self._done[r.device] = self._done.get(r.device, 0) + 1
                comm = (r.returned - r.sent) - (r.end - r.start)
                acc = moved.setdefault(r.device, [0.0, 0.0])
                acc[0] += r.bytes_in + r.bytes_out
                acc[1] += max(comm, 0.0)
        for dev, (nbytes, seconds) in moved.items():
            if seconds > 0 and nbytes > 0:
                self._bandwidth[dev] = nbytes / seconds

    def status(self) -> dict:
        base = {"backend": self.kind, "label": self.label, "model": self.entry.key,
                "digest": self.entry.digest}
        if self._client is None:
            return {**base, "healthy": False, "devices": [],
                    "detail": self._failure or "not connected yet (connects on the first request)"}
        try:
            st = self._client.status()
        except Exception as exc:
            return {**base, "healthy": False, "devices": [], "detail": f"status failed: {exc}"}
        devices = [{"name": d["name"], "alive": d["status"] == "ready", "state": d["status"],
                    "cpu": round(1.0 - d["available"], 3), "speed_gmacs": d["speed_gmacs"],
                    "bandwidth": self._bandwidth.get(d["name"]), "in_flight": d["queue"],
                    "chunks_done": self._done.get(d["name"], 0), "host": d["host"]}
                   for d in st["devices"]]
        return {**base, "healthy": any(d["alive"] for d in devices), "devices": devices,
                "cluster_model": st["model"], "refused": st["refused"]}

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _check_reachable(hostport: str, timeout: float) -> None:
    """Fail fast when nothing listens at the leader's address (a Client would wait far longer)."""
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {hostport}: {exc}") from exc


def make_backend(kind: str, entry: ModelEntry, hub: EventHub, leader: str | None = None,
                 devices: int = 3, **cluster_options) -> Backend:
    """Backend of the given kind ('reference', 'local-cluster' or 'cluster') for one model;
    `cluster_options` (connect_timeout, request_timeout, plan) go to ClusterBackend."""
    if kind == "reference":
        return LocalReferenceBackend(entry, hub)
    if kind == "local-cluster":
        return ClusterBackend(entry, hub, devices=devices, **cluster_options)
    if kind == "cluster":
        if not leader:
            raise ValueError("a 'cluster' backend needs leader='host:port'")
        return ClusterBackend(entry, hub, leader=leader, **cluster_options)
    raise ValueError(f"unknown backend kind {kind!r} (reference, local-cluster, cluster)")
