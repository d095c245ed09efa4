"""The gateway's work, independent of HTTP: image bytes -> preprocessed tensor -> backend ->
top-k labels + trace, with errors that carry an HTTP status."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import numpy as np

from decolla import api
from decolla.gateway.backends import Backend, BackendUnavailable, make_backend
from decolla.gateway.catalog import ModelEntry
from decolla.gateway.events import EventHub
from decolla.gateway.preprocess import BadImage, ImageTooLarge, decode, preprocess, probe
from decolla.gateway.timeline import timeline
from decolla.log import get_logger

log = get_logger("gateway")

DEFAULT_MAX_BYTES = 10 * 1024 * 1024  # a phone photo is 2-8 MB


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve; `status` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def body(self) -> dict:
        return {"error": self.code, "message": self.message, "status": self.status}


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """The k most probable classes with softmax probabilities, named."""
    return [{"index": i, "label": labels[i], "prob": round(p, 6)} for i, p in api.top_k(logits, k)]


class Gateway:
    """Models, one backend per model (created on first use), the event hub, admission control.

    Admission comes first: at most `max_active` requests are admitted at once (reading their
    upload, decoding, waiting for or running their inference); the next is refused at once
    with 503 busy, before its body is read. The admitted decode in `decode_slots` threads of
    their own, and each keeps only its image reduced to WORKING_SIDE: the memory of uploads
    is bounded by max_active x max_bytes plus decode_slots full decodes (each at most
    MAX_PIXELS), whatever the number of clients. (Threads of their own, not asyncio's shared
    pool: the allocator keeps a freed decode's memory in the arena of the thread that made
    it, so decodes spread over many threads would each leave one behind.)"""

    def __init__(self, catalog: dict[str, ModelEntry], backend: str = "reference",
                 leader: str | None = None, devices: int = 3, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_active: int = 4, decode_slots: int = 1, upload_timeout: float = 60.0,
                 keep_requests: int = 10, status_interval: float = 1.0, **cluster_options):
        make_backend(backend, next(iter(catalog.values())), EventHub(), leader, devices,
                     **cluster_options)  # fail now on a bad backend kind or option
        self.catalog, self.backend_kind, self.leader, self.devices = catalog, backend, leader, devices
        self.cluster_options = cluster_options
        self.max_bytes, self.max_active, self.status_interval = max_bytes, max_active, status_interval
        self.decode_slots, self.upload_timeout = decode_slots, upload_timeout
        self.hub = EventHub(keep_requests)
        self.backends: dict[str, Backend] = {}
        self._ids = itertools.count(1)
        self._active = 0
        self._decoder: ThreadPoolExecutor | None = None
        self._poller: asyncio.Task | None = None

    def backend_for(self, key: str) -> Backend:
        if key not in self.backends:
            self.backends[key] = make_backend(self.backend_kind, self.catalog[key], self.hub,
                                              self.leader, self.devices, **self.cluster_options)
        return self.backends[key]

    def describe(self) -> dict:
        """Models and the backend kind, for the page and /api/models."""
        first = self.backend_for(next(iter(self.catalog)))
        return {"backend": {"kind": first.kind, "label": first.label},
                "models": [e.describe() for e in self.catalog.values()],
                "default": next(iter(self.catalog)), "max_bytes": self.max_bytes}

    def entry(self, model_key: str | None) -> ModelEntry:
        """The catalogue entry of `model_key` (None: the default model); 404 if unknown."""
        key = model_key or next(iter(self.catalog))
        if key not in self.catalog:
            raise GatewayError(404, "unknown_model",
                               f"no model {key!r}; choose one of {', '.join(self.catalog)}")
        return self.catalog[key]

    @contextlib.asynccontextmanager
    async def admitted(self):
        """Hold one of the max_active request slots; 503 busy at once when none is free."""
        if self._active >= self.max_active:
            raise GatewayError(503, "busy", f"{self._active} requests are already being served; "
                                            "try again shortly", retry_after=2)
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    def _prepare(self, data: bytes, entry: ModelEntry) -> tuple[np.ndarray, tuple, dict]:
        """Model input from uploaded bytes (run in a decode thread): the header checked first
        (pixels), then the image decoded and preprocessed. Returns the input, the image's
        (width, height) and the decode/preprocess times in ms."""
        if len(data) > self.max_bytes:
            raise GatewayError(413, "too_large", f"image is {len(data)} bytes; the limit is "
                                                 f"{self.max_bytes}")
        try:
            size = probe(data)
            t0 = time.perf_counter()
            img = decode(data)
            t1 = time.perf_counter()
            x = preprocess(img, entry.preprocess, entry.input_size)
            t2 = time.perf_counter()
        except ImageTooLarge as exc:
            raise GatewayError(413, "too_large", str(exc)) from exc
        except BadImage as exc:
            raise GatewayError(400, "not_an_image", str(exc)) from exc
        return x, size, {"decode": round((t1 - t0) * 1e3, 3), "preprocess": round((t2 - t1) * 1e3, 3)}

    def _decoders(self) -> ThreadPoolExecutor:
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(self.decode_slots, thread_name_prefix="gateway-decode")
        return self._decoder

    async def infer(self, read: Callable[[], Awaitable[bytes]], model_key: str | None = None,
                    k: int = 5) -> dict:
        """Full request: admit, read the upload with `read`, decode, preprocess, run, rank;
        raises GatewayError on refusal."""
        entry = self.entry(model_key)
        k = max(1, min(int(k), entry.model.num_classes))
        async with self.admitted():
            data = await read()
            t0 = time.perf_counter()
            x, (width, height), timings = await asyncio.get_running_loop().run_in_executor(
                self._decoders(), self._prepare, data, entry)
            del data
            t1 = time.perf_counter()
            rid, backend, res = await self._run(entry, x)
        t2 = time.perf_counter()
        out = {"id": rid, "model": entry.describe(),
               "backend": {"kind": backend.kind, "label": backend.label},
               "top": top_k(res.logits, entry.labels, k),
               "latency_ms": round(res.latency * 1e3, 3),
               "timings_ms": {**timings, "inference": round((t2 - t1) * 1e3, 3),
                              "total": round((t2 - t0) * 1e3, 3)},
               "image": {"width": width, "height": height},
               "trace": timeline(res.trace),
               "trace_url": f"/api/requests/{rid}/trace.json"}
        if not entry.trained:
            out["warning"] = entry.note
        self.hub.publish({"type": "request_done", **out, "chrome_trace": res.trace.to_chrome()})
        log.info("request served", request=rid, model=entry.key, backend=backend.kind,
                 top=out["top"][0]["label"], latency_ms=out["latency_ms"])
        return out

    async def _run(self, entry: ModelEntry, x: np.ndarray) -> tuple[str, Backend, api.Result]:
        """One admitted request's input run on its model's backend; failures published and
        raised as GatewayError (503 when the cluster failed, 500 otherwise)."""
        rid = f"r{next(self._ids):06d}"
        backend = self.backend_for(entry.key)
        self.hub.publish({"type": "request_start", "id": rid, "model": entry.key,
                          "backend": backend.kind})
        try:
            return rid, backend, await asyncio.to_thread(backend.infer, x, rid)
        except BackendUnavailable as exc:
            self.hub.publish({"type": "request_failed", "id": rid, "model": entry.key,
                              "error": "cluster_unavailable", "message": str(exc)})
            raise GatewayError(503, "cluster_unavailable", str(exc), retry_after=5) from exc
        except Exception as exc:
            log.exception("inference failed", request=rid)
            self.hub.publish({"type": "request_failed", "id": rid, "model": entry.key,
                              "error": "inference_failed", "message": repr(exc)})
            raise GatewayError(500, "inference_failed", f"inference failed: {exc!r}") from exc

    async def status(self) -> dict:
        """Status of every backend created so far."""
        sts = []
        for b in list(self.backends.values()):
            sts.append(await asyncio.to_thread(b.status))
        return {"type": "status", "backend": self.backend_kind, "backends": sts}

    async def _poll(self) -> None:
        while True:
            try:
                self.hub.publish(await self.status())
            except Exception:  # the live view must survive a bad status call
                log.exception("status poll failed")
            await asyncio.sleep(self.status_interval)

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
        for b in self.backends.values():
            await asyncio.to_thread(b.close)
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._decoder = None
