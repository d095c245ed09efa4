"""HTTP layer (Starlette): the requester page, the live cluster view, the JSON API and SSE.

GET  /                          requester page (camera / file upload -> labels, latency, timeline)
GET  /cluster                   live cluster view
GET  /api/models                models and backend
POST /api/infer?model=KEY&k=5   image as multipart field 'image' or as the raw body (image/*)
GET  /api/status                backends' status
GET  /api/requests              last requests (results with traces)
GET  /api/requests/{id}/trace.json   Chrome trace JSON of one recent request
GET  /api/events                server-sent events (snapshot, status, chunk, request_* ...)
GET  /healthz
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from decolla.gateway.access import TokenGate
from decolla.gateway.service import Gateway, GatewayError
from decolla.gateway.uploads import check_declared_size, content_kind, read_image

STATIC = resources.files("decolla.gateway").joinpath("static")
SSE_HEARTBEAT_S = 15.0
MAX_EVENT_STREAMS = 32   # open live views; each holds a queue of up to QUEUE_SIZE events


def _error(exc: GatewayError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(gateway: Gateway, token: str | None = None) -> Starlette:
    """The Starlette application serving `gateway`; with `token`, every page and API call
    must present it (decolla.gateway.access)."""

    async def index(_):
        return FileResponse(str(STATIC.joinpath("index.html")))

    async def cluster(_):
        return FileResponse(str(STATIC.joinpath("cluster.html")))

    async def models(_):
        return JSONResponse(gateway.describe())

    async def infer(request: Request):
        try:
            k = request.query_params.get("k", "5")
            if not k.isdigit():
                raise GatewayError(400, "bad_parameter", f"k must be a positive integer, got {k!r}")
            # Refusals from the headers come first; the body is read only once admitted.
            content_kind(request)
            check_declared_size(request, gateway.max_bytes)
            result = await gateway.infer(lambda: read_image(request, gateway.max_bytes,
                                                            gateway.upload_timeout),
                                         request.query_params.get("model"), int(k))
            return JSONResponse(result)
        except GatewayError as exc:
            return _error(exc)

    async def status(_):
        return JSONResponse(await gateway.status())

    async def requests_(_):
        return JSONResponse({"requests": [{k: v for k, v in ev.items() if k != "chrome_trace"}
                                          for ev in gateway.hub.requests]})

    async def trace_json(request: Request):
        ev = gateway.hub.find_request(request.path_params["rid"])
        if ev is None or not ev.get("chrome_trace"):
            return _error(GatewayError(404, "unknown_request", "no such recent request"))
        return JSONResponse(ev["chrome_trace"], headers={
            "Content-Disposition": f'attachment; filename="{ev["id"]}.trace.json"'})

    async def events(request: Request):
        if gateway.hub.subscribers() >= MAX_EVENT_STREAMS:
            return _error(GatewayError(503, "busy", f"{MAX_EVENT_STREAMS} live views are already "
                                                    "open; try again later", retry_after=10))
        handle = gateway.hub.subscribe()

        async def stream():
            try:
                yield "retry: 2000\n\n"
                yield _sse(gateway.hub.snapshot())
                while True:
                    try:
                        ev = await asyncio.wait_for(handle[1].get(), SSE_HEARTBEAT_S)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if ev.get("type") == "close":
                        return
                    yield _sse({k: v for k, v in ev.items() if k != "chrome_trace"})
            finally:
                gateway.hub.unsubscribe(handle)
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def healthz(_):
        return JSONResponse({"ok": True})

    async def not_found(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "http_error", "message": str(exc.detail),
                                 "status": exc.status_code}, status_code=exc.status_code)
        return Response(str(exc.detail), status_code=exc.status_code, media_type="text/plain")

    async def server_error(request: Request, exc: Exception):
        return JSONResponse({"error": "internal_error", "message": repr(exc), "status": 500},
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route("/", index), Route("/cluster", cluster), Route("/healthz", healthz),
        Route("/api/models", models), Route("/api/infer", infer, methods=["POST"]),
        Route("/api/status", status), Route("/api/requests", requests_),
        Route("/api/requests/{rid}/trace.json", trace_json), Route("/api/events", events),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(TokenGate, token=token)] if token else None,
                    exception_handlers={HTTPException: not_found, 500: server_error})
    app.state.gateway = gateway
    return app


def _sse(event: dict) -> str:
    return f"event: {event.get('type', 'message')}\ndata: {json.dumps(event, default=str)}\n\n"
