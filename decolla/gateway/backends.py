"""Where the gateway's inferences run, behind one small protocol.

- `LocalReferenceBackend`: the gateway computes the model itself, layer by layer, with
  decolla.ops (reference numpy until the kernels land). For API tests and for a gateway
  started without a cluster; every answer says so (`backend.kind == "local-reference"`).
- `ClusterBackend`: adapter to the runtime's embedding API (decolla.api): a `LocalCluster`
  of device processes it starts, or a `Client` of a running cluster's leader.

Both return the same normalised result (see `InferResult`) and status dicts, and publish
events to an `EventHub`.
"""
from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from decolla.gateway.catalog import ModelEntry
from decolla.gateway.events import EventHub
from decolla.log import get_logger

log = get_logger("gateway.backend")


class BackendUnavailable(RuntimeError):
    """The cluster cannot serve the request (down, unreachable, no live device)."""


@dataclass
class Chunk:
    """One chunk of one request as the timeline shows it; times in ms since the request began."""
    stage: int
    chunk: int
    device: str
    send: float
    start: float
    end: float
    receive: float
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0
    name: str = ""
    status: str = "ok"        # ok | reassigned (won on a retry) | late | failed | cancelled | pending

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class InferResult:
    """What every backend returns for one image."""
    logits: np.ndarray
    latency_ms: float
    chunks: list[Chunk] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    chrome_trace: dict | None = None


class Backend(Protocol):
    kind: str          # 'local-reference' | 'local-cluster' | 'cluster'
    label: str         # one line for people: where the computation happens

    def infer(self, image: np.ndarray, request_id: str) -> InferResult:
        """Logits and trace for one preprocessed image (H, W, 3) float32."""
        ...

    def status(self) -> dict:
        """{'healthy': bool, 'devices': [{'name','alive','cpu','bandwidth','in_flight',...}], ...}"""
        ...

    def close(self) -> None:
        ...


def chrome_trace(chunks: list[Chunk], t0_us: float = 0.0) -> dict:
    """Chrome trace JSON (chrome://tracing, Perfetto): one row per device, one slice per chunk."""
    devices = sorted({c.device for c in chunks})
    tid = {d: i + 1 for i, d in enumerate(devices)}
    events = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid[d], "args": {"name": d}}
              for d in devices]
    for c in chunks:
        events.append({"name": c.name or f"stage {c.stage} chunk {c.chunk}", "ph": "X", "pid": 1,
                       "tid": tid[c.device], "ts": t0_us + c.start * 1e3,
                       "dur": max(0.0, (c.end - c.start) * 1e3),
                       "args": {"stage": c.stage, "chunk": c.chunk, "retries": c.retries,
                                "bytes_in": c.bytes_in, "bytes_out": c.bytes_out,
                                "status": c.status}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


class _CpuMeter:
    """CPU use of this process (all threads) between two calls, as a fraction of one core."""

    def __init__(self):
        self._last = (time.perf_counter(), time.process_time())

    def sample(self) -> float:
        now = (time.perf_counter(), time.process_time())
        wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return round(cpu / wall, 3) if wall > 0 else 0.0


def _layer_runner():
    """ops.run_layer (kernels when built) or the numpy reference."""
    try:
        from decolla.ops import run_layer
        return lambda layer, x, res: run_layer(layer, x, res)
    except ImportError:  # pragma: no cover - ops is part of the package
        from decolla.reference import layer_forward
        return layer_forward


class LocalReferenceBackend:
    """Runs the model in the gateway process; one chunk per layer on device 'gateway'."""

    kind = "local-reference"
    label = "Local reference, no cluster: the gateway process computes every layer itself"
    device = "gateway (local)"

    def __init__(self, entry: ModelEntry, hub: EventHub):
        self.entry, self.hub = entry, hub
        self._run = _layer_runner()
        self._cpu = _CpuMeter()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._done = 0

    def infer(self, image: np.ndarray, request_id: str) -> InferResult:
        model = self.entry.model
        with self._lock:
            t0 = time.perf_counter()
            tensors = {"input": np.asarray(image, dtype=np.float32)}
            x = tensors["input"]
            chunks = []
            for i, layer in enumerate(model.layers):
                start = (time.perf_counter() - t0) * 1e3
                self._in_flight = 1
                self.hub.publish({"type": "chunk", "request": request_id, "stage": i, "chunk": 0,
                                  "device": self.device, "state": "start", "name": layer.name})
                res = tensors[layer.residual] if layer.residual else None
                y = self._run(layer, x, res)
                end = (time.perf_counter() - t0) * 1e3
                chunks.append(Chunk(stage=i, chunk=0, device=self.device, send=start, start=start,
                                    end=end, receive=end, bytes_in=x.nbytes, bytes_out=y.nbytes,
                                    name=layer.name))
                self.hub.publish({"type": "chunk", "request": request_id, "stage": i, "chunk": 0,
                                  "device": self.device, "state": "done", "name": layer.name})
                self._in_flight = 0
                self._done += 1
                tensors[layer.name] = x = y
            latency = (time.perf_counter() - t0) * 1e3
        return InferResult(logits=np.asarray(x, dtype=np.float32).reshape(-1), latency_ms=latency,
                           chunks=chunks, devices=[self.device], chrome_trace=chrome_trace(chunks))

    def status(self) -> dict:
        return {"backend": self.kind, "label": self.label, "model": self.entry.key,
                "digest": self.entry.digest, "healthy": True,
                "devices": [{"name": self.device, "alive": True, "cpu": self._cpu.sample(),
                             "bandwidth": None, "in_flight": self._in_flight,
                             "chunks_done": self._done}]}

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- cluster adapter

def _get(obj, *names, default=None):
    """First attribute or key of `obj` among `names` (the runtime's names may vary)."""
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if not isinstance(obj, dict) and hasattr(obj, n):
            return getattr(obj, n)
    return default


def _chunks_from_trace(trace) -> list[Chunk]:
    """Normalise the runtime's trace (decolla.runtime.trace.Trace: one record per chunk attempt).

    Times become ms since the request started on the requester's clock; worker times are
    shifted by the record's clock-offset estimate when it has one.
    """
    records = list(_get(trace, "records", "chunks", default=trace) or [])
    if not records:
        return []
    t0 = _get(trace, "started", default=None)
    if t0 is None:
        t0 = min(float(_get(r, "sent", default=0.0) or 0.0) for r in records)
    chunks = []
    for r in records:
        sent = float(_get(r, "sent", default=t0) or t0)
        off_fn = _get(r, "offset", default=None)
        off = float(off_fn()) if callable(off_fn) else 0.0
        returned = _get(r, "returned", default=None)
        start, end = _get(r, "start", default=None), _get(r, "end", default=None)
        start = sent if start is None else float(start) - off
        end = (returned if returned is not None else start) if end is None else float(end) - off
        returned = end if returned is None else float(returned)
        attempt = int(_get(r, "attempt", "retries", default=0) or 0)
        status = str(_get(r, "status", default="won"))
        chunks.append(Chunk(
            stage=int(_get(r, "stage", default=0)), chunk=int(_get(r, "chunk", default=0)),
            device=str(_get(r, "device", default="?")),
            send=(sent - t0) * 1e3, start=(start - t0) * 1e3, end=(end - t0) * 1e3,
            receive=(returned - t0) * 1e3,
            bytes_in=int(_get(r, "bytes_in", default=0) or 0),
            bytes_out=int(_get(r, "bytes_out", default=0) or 0),
            retries=attempt, name=str(_get(r, "layers", "name", default="") or ""),
            status=_STATUS.get(status, status) if not (attempt and status == "won") else "reassigned"))
    return chunks


# runtime attempt status -> timeline status
_STATUS = {"won": "ok", "late": "late", "lost": "failed", "failed": "failed",
           "cancelled": "cancelled", "pending": "pending"}


class ClusterBackend:
    """Adapter to decolla.api: `LocalCluster(devices=n, model=spec)` or `Client(leader=...)`."""

    RETRY_CONNECT_S = 5.0     # after a failed connect, refuse fast for this long

    def __init__(self, entry: ModelEntry, hub: EventHub, leader: str | None = None,
                 devices: int = 3, connect_timeout: float = 15.0, request_timeout: float = 20.0):
        self.entry, self.hub, self.leader, self.n_devices = entry, hub, leader, devices
        self.connect_timeout, self.request_timeout = connect_timeout, request_timeout
        self.kind = "cluster" if leader else "local-cluster"
        self.label = (f"DeColla cluster led by {leader}" if leader else
                      f"DeColla local cluster: {devices} device processes on this machine")
        self._lock = threading.Lock()        # one connect at a time
        self._client = None                  # decolla.api.Client or LocalCluster (same calls)
        self._failed_at = -1e9
        self._failure = ""
        self._in_flight: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._bandwidth: dict[str, float] = {}

    def _connect(self):
        """Start or reach the cluster once, lazily, so the gateway starts even if it is down."""
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() - self._failed_at < self.RETRY_CONNECT_S:
                raise BackendUnavailable(self._failure)
            try:
                api = importlib.import_module("decolla.api")
            except ImportError as exc:
                raise BackendUnavailable(f"the DeColla runtime API is not available: {exc}") from exc
            try:
                if self.leader:
                    _check_reachable(self.leader, min(self.connect_timeout, 3.0))
                    client = api.Client(leader=self.leader, connect_timeout=self.connect_timeout,
                                        request_timeout=self.request_timeout)
                else:
                    client = api.LocalCluster(devices=self.n_devices, model=self.entry.spec,
                                              request_timeout=self.request_timeout)
                digest = getattr(client, "digest", None) or client.status().get("digest")
            except Exception as exc:  # any start/connect failure means: cluster down
                self._failed_at, self._failure = time.monotonic(), f"cannot reach the cluster: {exc}"
                raise BackendUnavailable(self._failure) from exc
            if digest != self.entry.digest:
                client.close()
                self._failed_at = time.monotonic()
                self._failure = (f"the cluster runs another model (digest {str(digest)[:12]}), not "
                                 f"{self.entry.key} ({self.entry.digest[:12]})")
                raise BackendUnavailable(self._failure)
            log.info("cluster connected", kind=self.kind, leader=self.leader, model=self.entry.key)
            self._client = client
            return client

    def infer(self, image: np.ndarray, request_id: str) -> InferResult:
        client = self._connect()
        try:
            res = client.infer(image, on_event=self._live_events(request_id))
        except (TypeError, ValueError):
            raise                  # a bad input is the gateway's bug: 500, not "cluster down"
        except Exception as exc:   # InferenceError, ClusterError, timeouts: the cluster failed
            raise BackendUnavailable(f"the cluster could not complete the request: {exc}") from exc
        trace = _get(res, "trace")
        chunks = _chunks_from_trace(trace) if trace is not None else []
        self._account(chunks)
        exporter = getattr(trace, "to_chrome", None)
        try:
            ctrace = exporter() if callable(exporter) else chrome_trace(chunks)
        except Exception:  # a broken export must not lose the answer
            ctrace = chrome_trace(chunks)
        return InferResult(logits=np.asarray(_get(res, "logits"), dtype=np.float32).reshape(-1),
                           latency_ms=float(_get(res, "latency", default=0.0)) * 1e3,
                           chunks=chunks, devices=sorted({c.device for c in chunks}),
                           chrome_trace=ctrace)

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

    def _account(self, chunks: list[Chunk]) -> None:
        """Chunks done per device, and a bandwidth estimate from the round trips' bytes/time."""
        moved: dict[str, list[float]] = {}
        for c in chunks:
            if c.status in ("ok", "reassigned"):
                self._done[c.device] = self._done.get(c.device, 0) + 1
                comm = (c.receive - c.send) - (c.end - c.start)
                acc = moved.setdefault(c.device, [0.0, 0.0])
                acc[0] += c.bytes_in + c.bytes_out
                acc[1] += max(comm, 0.0)
        for dev, (nbytes, ms) in moved.items():
            if ms > 0 and nbytes > 0:
                self._bandwidth[dev] = nbytes / (ms / 1e3)

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
        devices = []
        for d in st.get("devices", []):
            name = str(d.get("name"))
            avail = d.get("available")
            devices.append({
                "name": name, "alive": d.get("status") == "ready", "state": d.get("status"),
                "cpu": None if avail is None else round(1.0 - float(avail), 3),
                "speed_gmacs": d.get("speed_gmacs"),
                "bandwidth": self._bandwidth.get(name),
                "in_flight": d.get("queue"), "chunks_done": self._done.get(name, 0),
                "host": d.get("host")})
        return {**base, "healthy": any(d["alive"] for d in devices), "devices": devices,
                "cluster_model": st.get("model"), "refused": st.get("refused")}

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _check_reachable(hostport: str, timeout: float) -> None:
    """Fail fast when nothing listens at the leader's address (a Client would wait far longer)."""
    import socket
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {hostport}: {exc}") from exc


def make_backend(kind: str, entry: ModelEntry, hub: EventHub, leader: str | None = None,
                 devices: int = 3, **cluster_options) -> Backend:
    """Backend of the given kind ('reference', 'local-cluster' or 'cluster') for one model;
    `cluster_options` (connect_timeout, request_timeout) go to ClusterBackend."""
    if kind == "reference":
        return LocalReferenceBackend(entry, hub)
    if kind == "local-cluster":
        return ClusterBackend(entry, hub, devices=devices, **cluster_options)
    if kind == "cluster":
        if not leader:
            raise ValueError("a 'cluster' backend needs leader='host:port'")
        return ClusterBackend(entry, hub, leader=leader, **cluster_options)
    raise ValueError(f"unknown backend kind {kind!r} (reference, local-cluster, cluster)")
