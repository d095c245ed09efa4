"""API tests of the gateway (decolla.gateway) with Starlette's in-process test client."""
from __future__ import annotations

import asyncio
import io
import json
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from decolla.gateway import preprocess as pp  # noqa: E402
from decolla.gateway import service  # noqa: E402
from decolla.gateway.access import TOKEN_ENV, resolve_token  # noqa: E402
from decolla.gateway.app import create_app  # noqa: E402
from decolla.gateway.backends import BackendUnavailable, LocalReferenceBackend  # noqa: E402
from decolla.gateway.catalog import (default_catalog, digits_model_path,  # noqa: E402
                                     entry_from_spec)
from decolla.gateway.labels import imagenet_labels, labels_for  # noqa: E402
from decolla.gateway.server import _is_loopback  # noqa: E402
from decolla.gateway.service import Gateway, GatewayError, top_k  # noqa: E402
from decolla.model import mobilenet_v2  # noqa: E402
from decolla.reference import forward as reference_forward  # noqa: E402
from tests.images import one_colour_png  # noqa: E402

SMALL_SPEC = "mobilenet_v2:seed=1,width=0.35,input_size=32,num_classes=1000"


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def photo(seed: int = 0, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def catalog():
    return default_catalog(seeded_spec=SMALL_SPEC, include_digits=False)


@pytest.fixture()
def client(catalog):
    gw = Gateway(catalog, max_bytes=200_000, status_interval=0.2)
    with TestClient(create_app(gw)) as c:
        yield c


# ----------------------------------------------------------------------------- labels, ranking

def test_imagenet_labels_are_the_1000_classes_in_order():
    labels = imagenet_labels()
    assert len(labels) == 1000 == len(set(labels))
    assert labels[0] == "tench" and labels[388] == "giant panda" and labels[999] == "toilet tissue"


def test_labels_for_prefers_the_models_own_labels():
    assert labels_for({"labels": list("abc")}, 3) == ["a", "b", "c"]
    assert labels_for({}, 1000)[1] == "goldfish"
    assert labels_for({"labels": ["x"]}, 2) == ["class 0", "class 1"]


def test_top_k_is_sorted_softmax():
    logits = np.array([0.0, 3.0, 1.0, 2.0])
    top = top_k(logits, ["a", "b", "c", "d"], 3)
    assert [t["label"] for t in top] == ["b", "d", "c"]
    p = np.exp(logits) / np.exp(logits).sum()
    assert top[0]["prob"] == pytest.approx(p[1], abs=1e-6)


# ----------------------------------------------------------------------------- preprocessing

def test_imagenet_input_normalises_and_crops():
    mean_rgb = tuple(int(round(m * 255)) for m in pp.IMAGENET_MEAN)
    x = pp.imagenet_input(Image.new("RGB", (300, 200), mean_rgb), 64)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert np.abs(x).max() < 0.02  # the mean colour maps to ~0 in every channel
    # a wide image is centre-cropped: its left quarter (black) disappears
    img = Image.new("RGB", (400, 100), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 100, 100))
    x = pp.imagenet_input(img, 32)
    assert x[..., 0].min() > 2.0  # only white remains


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=30 * 30, max_size=30 * 30), st.booleans())
def test_digit_photo_reduces_to_the_block_counts(cells, dark_on_light):
    """A 32x32 bitmap drawn large is reduced to exactly its 4x4 block counts (sklearn's recipe)."""
    bitmap = np.zeros((32, 32), dtype=bool)
    bitmap[1:31, 1:31] = np.array(cells).reshape(30, 30)
    bitmap[[0, 31], :] = True  # ink touches every edge, so the crop is the whole bitmap
    bitmap[:, [0, 31]] = True
    big = np.pad(np.kron(bitmap, np.ones((8, 8), dtype=bool)), 16)  # a paper margin around it
    ink, paper = (0, 255) if dark_on_light else (255, 0)
    img = Image.fromarray(np.where(big, ink, paper).astype(np.uint8)).convert("RGB")
    grid = pp.photo_to_digit_grid(img)
    assert np.array_equal(grid, bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3)))


def test_digits_input_range_and_blank_image():
    assert np.array_equal(pp.photo_to_digit_grid(Image.new("RGB", (50, 50), "white")),
                          np.zeros((8, 8)))
    x = pp.digits_input(np.full((8, 8), 16.0), 32)
    assert x.shape == (32, 32, 3) and np.allclose(x, 1.0)


def test_decode_applies_transparency_as_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert pp.decode(png_bytes(img)).getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_reduces_to_the_working_side_and_probe_reads_the_header(fmt):
    data = png_bytes(Image.new("RGB", (5000, 1000), (200, 10, 10)), fmt)
    assert pp.probe(data) == (5000, 1000)
    img = pp.decode(data)
    assert img.size == (pp.WORKING_SIDE, round(pp.WORKING_SIDE / 5)) and img.mode == "RGB"


@pytest.mark.parametrize("size", [(7000, 7000), (20000, 20000)])
def test_pixel_limit_is_checked_from_the_header(size):
    """Over the limit (7000² px: ours; 20000² px: Pillow's own guard too), refused before a
    pixel is decoded: quickly, whatever the image would take decoded."""
    data = one_colour_png(*size, bit_depth=1, colour_type=0)
    t0 = time.perf_counter()
    for fn in (pp.probe, pp.decode):
        with pytest.raises(pp.ImageTooLarge, match="pixels"):
            fn(data)
    assert time.perf_counter() - t0 < 1.0
    assert Image.MAX_IMAGE_PIXELS == pp.MAX_PIXELS


def test_truncated_and_foreign_bytes_are_bad_images():
    buf = io.BytesIO()
    photo(1, (400, 300)).save(buf, "JPEG")
    with pytest.raises(pp.BadImage, match="truncated"):
        pp.decode(buf.getvalue()[:2000])
    with pytest.raises(pp.BadImage, match="not an image"):
        pp.probe(b"%PDF-1.4 not a picture")


# ----------------------------------------------------------------------------- the API

def test_models_and_backend_are_labelled(client):
    info = client.get("/api/models").json()
    assert info["backend"]["kind"] == "local-reference"
    assert "no cluster" in info["backend"]["label"].lower()
    (m,) = info["models"]
    assert m["key"] == "mobilenet_v2" and m["trained"] is False and m["input_size"] == 32


def test_pages_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'capture="environment"' in page.text
    assert client.get("/cluster").status_code == 200
    assert "drawTimeline" in client.get("/static/timeline.js").text


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_infer_multipart_matches_the_reference_forward(client, catalog, fmt):
    data = png_bytes(photo(3), fmt)
    r = client.post("/api/infer?model=mobilenet_v2&k=5",
                    files={"image": (f"x.{fmt.lower()}", data, f"image/{fmt.lower()}")})
    assert r.status_code == 200, r.text
    res = r.json()
    entry = catalog["mobilenet_v2"]
    expected = reference_forward(entry.model, pp.preprocess(pp.decode(data), "imagenet", 32))
    top = res["top"]
    assert len(top) == 5
    assert top[0]["index"] == int(np.argmax(expected))
    assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
    assert top[0]["label"] == imagenet_labels()[top[0]["index"]]
    assert res["warning"] and res["backend"]["kind"] == "local-reference"
    chunks = res["trace"]["chunks"]
    assert len(chunks) == len(entry.model.layers)
    assert all(0 <= c["start"] <= c["end"] <= res["latency_ms"] + 1e-6 for c in chunks)
    assert res["latency_ms"] > 0 and res["image"] == {"width": 80, "height": 60}


def test_infer_raw_body_and_trace_json(client):
    r = client.post("/api/infer", content=png_bytes(photo(4)), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    trace = client.get(r.json()["trace_url"])
    assert trace.status_code == 200
    computes = [e for e in trace.json()["traceEvents"]
                if e["ph"] == "X" and e["name"].endswith(" compute")]
    assert len(computes) == len(r.json()["trace"]["chunks"])
    recent = client.get("/api/requests").json()["requests"]
    assert recent[-1]["id"] == r.json()["id"]


@pytest.mark.parametrize("kwargs, status, code", [
    (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "wrong_type"),
    (dict(content=b"{}", headers={"content-type": "application/json"}), 415, "wrong_type"),
    (dict(files={"image": ("a.txt", b"hello", "text/plain")}), 415, "wrong_type"),
    (dict(content=b"not really a png", headers={"content-type": "image/png"}), 400, "not_an_image"),
    (dict(files={"image": ("a.png", b"\x89PNG\r\n\x1a\n broken", "image/png")}), 400,
     "not_an_image"),
    (dict(content=b"", headers={"content-type": "image/png"}), 400, "not_an_image"),
    (dict(content=png_bytes(photo(2), "JPEG")[:300], headers={"content-type": "image/jpeg"}), 400,
     "not_an_image"),
    (dict(content=one_colour_png(20000, 20000, 1, 0), headers={"content-type": "image/png"}), 413,
     "too_large"),
    (dict(data={"note": "no file"}, files={"other": ("", b"", "")}), 400, None),
    (dict(content=b"x" * 400_000, headers={"content-type": "image/png"}), 413, "too_large"),
    (dict(files={"image": ("big.png", b"x" * 400_000, "image/png")}), 413, "too_large"),
])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client, kwargs, status, code):
    r = client.post("/api/infer", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and body["message"]
    if code:
        assert body["error"] == code
    ok = client.post("/api/infer", files={"image": ("ok.png", png_bytes(photo(5)), "image/png")})
    assert ok.status_code == 200


def test_unknown_model_and_bad_k_and_unknown_path(client):
    files = {"image": ("ok.png", png_bytes(photo(5)), "image/png")}
    r = client.post("/api/infer?model=nope", files=files)
    assert r.status_code == 404 and r.json()["error"] == "unknown_model"
    assert client.post("/api/infer?k=-1", files=files).status_code == 400
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json()["status"] == 404
    assert client.get("/api/requests/r999999/trace.json").status_code == 404


def test_too_many_pixels_is_413(client, monkeypatch):
    monkeypatch.setattr(pp, "MAX_PIXELS", 1000)
    r = client.post("/api/infer", files={"image": ("p.png", png_bytes(photo(1)), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["message"]


def test_admission_comes_before_reading_and_decoding(catalog, monkeypatch):
    """With every slot taken, a request is refused 503 busy without its upload read or
    decoded; the admitted decode one at a time."""
    decoding, most, reads = [0], [0], []

    def counting_decode(data, *a, **kw):
        decoding[0] += 1
        most[0] = max(most[0], decoding[0])
        time.sleep(0.05)
        decoding[0] -= 1
        return pp.decode(data, *a, **kw)
    monkeypatch.setattr(service, "decode", counting_decode)
    gw = Gateway(catalog, max_active=3, decode_slots=1)
    data = png_bytes(photo(5))

    async def main():
        release = asyncio.Event()

        async def slow_read():
            reads.append("slow")
            await release.wait()
            return data

        async def read():
            reads.append("fast")
            return data
        held = [asyncio.create_task(gw.infer(slow_read)) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(GatewayError) as refused:
            await gw.infer(read)
        release.set()
        answers = await asyncio.gather(*held)
        after = await gw.infer(read)  # slots are given back
        await gw.stop()
        return refused.value, answers, after
    refused, answers, after = asyncio.run(main())
    assert refused.status == 503 and refused.code == "busy" and refused.retry_after
    assert reads == ["slow"] * 3 + ["fast"]  # the refused request's upload was never read
    assert [a["image"] for a in answers] == [{"width": 80, "height": 60}] * 3
    assert after["top"] == answers[0]["top"]
    assert most[0] == 1


def test_unknown_model_is_refused_before_admission(catalog):
    gw = Gateway(catalog, max_active=0)  # any admission would be refused as busy

    async def read():
        raise AssertionError("the upload must not be read")
    with pytest.raises(GatewayError) as err:
        asyncio.run(gw.infer(read, "nope"))
    assert err.value.status == 404


def test_busy_answer_over_http_comes_before_the_body_is_read(catalog):
    gw = Gateway(catalog, max_active=0)
    with TestClient(create_app(gw)) as c:
        r = c.post("/api/infer", content=png_bytes(photo(1)), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["retry-after"]
        # the cheap refusals from the headers still come first
        assert c.post("/api/infer", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        r = c.post("/api/infer", content=b"x" * 10, headers={"content-type": "image/png",
                                                             "content-length": str(10**9)})
        assert r.status_code == 413


def test_an_upload_that_stalls_is_408_and_frees_its_slot(catalog):
    """A sender that stops halfway is cut off after upload_timeout; its slot is given back."""
    gw = Gateway(catalog, max_active=1, upload_timeout=0.3)
    app = create_app(gw)
    sent: list[dict] = []

    async def main():
        chunks = [{"type": "http.request", "body": png_bytes(photo(1))[:100], "more_body": True}]

        async def receive():
            if chunks:
                return chunks.pop()
            await asyncio.sleep(3600)  # the rest never comes

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/api/infer", "raw_path": b"/api/infer",
                 "query_string": b"", "root_path": "", "server": ("127.0.0.1", 80),
                 "client": ("127.0.0.1", 1), "headers": [(b"content-type", b"image/png")]}
        t0 = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), 10)
        return time.monotonic() - t0
    took = asyncio.run(main())
    assert sent[0]["status"] == 408 and took < 5
    assert json.loads(sent[1]["body"])["error"] == "upload_timeout"
    with TestClient(app) as c:  # the slot it held is free again
        ok = c.post("/api/infer", files={"image": ("ok.png", png_bytes(photo(5)), "image/png")})
        assert ok.status_code == 200


# ----------------------------------------------------------------------------- access token

def test_token_guards_pages_and_api_but_not_static(catalog):
    gw = Gateway(catalog)
    with TestClient(create_app(gw, token="t0k")) as c:
        for path in ("/", "/cluster", "/api/models", "/api/status", "/api/requests"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer t0k"}).status_code == 200
            assert c.get(path + "?token=t0k").status_code == 200
        r = c.post("/api/infer", files={"image": ("ok.png", png_bytes(photo(5)), "image/png")})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = c.post("/api/infer", files={"image": ("ok.png", png_bytes(photo(5)), "image/png")},
                   headers={"Authorization": "Bearer t0k"})
        assert r.status_code == 200
        assert "text/plain" in c.get("/").headers["content-type"]  # a page gets words, not JSON
        assert c.get("/static/access.js").status_code == 200 and c.get("/healthz").status_code == 200


def test_live_views_are_capped(catalog, monkeypatch):
    from decolla.gateway import app as app_module
    monkeypatch.setattr(app_module, "MAX_EVENT_STREAMS", 0)
    with TestClient(create_app(Gateway(catalog))) as c:
        r = c.get("/api/events")
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["retry-after"]
        assert 'name="referrer" content="no-referrer"' in c.get("/").text


def test_token_from_the_environment_and_loopback_hosts(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token(None) is None and resolve_token("a") == "a"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert resolve_token(None) == "from-env" and resolve_token("a") == "a"
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.0.0.2")
    assert not _is_loopback("myhost.lan")


class _DownBackend:
    """A cluster that refuses every request (as ClusterBackend does when it is down)."""
    kind, label = "cluster", "test cluster that is down"

    def infer(self, image, request_id):
        raise BackendUnavailable("no live device answered")

    def status(self):
        return {"backend": self.kind, "healthy": False, "devices": []}

    def close(self):
        pass


def test_cluster_down_is_503_with_retry_after(catalog):
    gw = Gateway(catalog)
    gw.backends["mobilenet_v2"] = _DownBackend()
    with TestClient(create_app(gw)) as c:
        files = {"image": ("ok.png", png_bytes(photo(5)), "image/png")}
        for _ in range(2):
            r = c.post("/api/infer", files=files)
            assert r.status_code == 503 and r.json()["error"] == "cluster_unavailable"
            assert r.headers["retry-after"]
        assert c.get("/api/models").status_code == 200
        failed = [e for e in gw.hub.requests if e["type"] == "request_failed"]
        assert len(failed) == 2


def test_cluster_backend_without_a_reachable_cluster_is_unavailable(catalog, monkeypatch):
    """The real backend maps a cluster that cannot start/connect to 503, not to a crash."""
    from decolla.api import ClusterError
    from decolla.gateway import backends

    def cannot_start(**kwargs):
        raise ClusterError("node dev1 exited with 1")
    monkeypatch.setattr(backends, "LocalCluster", cannot_start)
    gw = Gateway(catalog, backend="local-cluster")
    with TestClient(create_app(gw)) as c:
        r = c.post("/api/infer", files={"image": ("ok.png", png_bytes(photo(5)), "image/png")})
        assert r.status_code == 503 and "cannot reach the cluster" in r.json()["message"]
        assert "dev1 exited" in r.json()["message"]
        st = c.get("/api/status").json()["backends"][0]
        assert st["healthy"] is False and "dev1 exited" in st["detail"]


def test_cluster_leader_not_listening_is_503_fast(catalog):
    from decolla.actors.system import free_port
    gw = Gateway(catalog, backend="cluster", leader=f"127.0.0.1:{free_port()}")
    with TestClient(create_app(gw)) as c:
        files = {"image": ("ok.png", png_bytes(photo(5)), "image/png")}
        for _ in range(2):
            r = c.post("/api/infer", files=files)
            assert r.status_code == 503 and "nothing answers" in r.json()["message"]
        st = c.get("/api/status").json()["backends"][0]
        assert st["healthy"] is False and "nothing answers" in st["detail"]


@pytest.mark.integration
@pytest.mark.slow
def test_local_cluster_serves_then_reports_dead_devices_as_503(catalog):
    """Real device processes: chunks spread over both devices (the paper's plan: auto, the
    default, runs a model this small on one); with every device killed, 503."""
    gw = Gateway(catalog, backend="local-cluster", devices=2, request_timeout=5.0, plan="layer")
    with TestClient(create_app(gw)) as c:
        files = {"image": ("ok.png", png_bytes(photo(6)), "image/png")}
        r = c.post("/api/infer", files=files)
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["backend"]["kind"] == "local-cluster"
        assert set(res["trace"]["devices"]) == {"dev1", "dev2"}
        # chunk events were published live, one start and one done per chunk computed
        assert gw.hub.counters["chunk"] >= 2 * len(res["trace"]["chunks"]) > 0
        expected = reference_forward(catalog["mobilenet_v2"].model,
                                     pp.preprocess(pp.decode(files["image"][1]), "imagenet", 32))
        assert res["top"][0]["index"] == int(np.argmax(expected))
        st = c.get("/api/status").json()["backends"][0]
        assert {d["name"] for d in st["devices"] if d["alive"]} == {"dev1", "dev2"}
        cluster = gw.backends["mobilenet_v2"]._client
        for name in ("dev1", "dev2"):
            cluster.kill(name)
        t0 = time.monotonic()
        r = c.post("/api/infer", files=files)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "cluster_unavailable"
        print(f"503 after the devices died: {time.monotonic() - t0:.1f} s: {r.json()['message']}")
        assert c.get("/api/models").status_code == 200


def test_the_gateway_runs_auto_unless_told(catalog):
    import argparse

    from decolla.gateway.backends import make_backend
    from decolla.gateway.events import EventHub
    from decolla.gateway.server import add_arguments
    entry = next(iter(catalog.values()))
    assert make_backend("local-cluster", entry, EventHub()).plan == "auto"
    assert make_backend("cluster", entry, EventHub(), leader="h:1", plan="layer").plan == "layer"
    assert add_arguments(argparse.ArgumentParser()).parse_args([]).plan == "auto"


def test_runtime_trace_is_normalised_with_reassignments():
    from decolla.gateway.timeline import timeline
    from decolla.runtime.trace import ChunkRecord, Trace
    t0 = 1000.0
    recs = [ChunkRecord("r", 0, 0, 0, "dev1", "stem", 10, sent=t0, bytes_in=100, returned=t0 + 0.010,
                        received=t0 + 0.001, start=t0 + 0.002, end=t0 + 0.008, status="won"),
            ChunkRecord("r", 0, 1, 0, "dev2", "stem", 10, sent=t0, bytes_in=100, status="lost"),
            ChunkRecord("r", 0, 1, 1, "dev1", "stem", 10, sent=t0 + 0.02, bytes_in=100,
                        returned=t0 + 0.03, received=t0 + 0.021, start=t0 + 0.022, end=t0 + 0.029,
                        status="won", reason="deadline")]
    view = timeline(Trace("r", t0, t0 + 0.03, recs))
    chunks = view["chunks"]
    assert view["devices"] == ["dev1", "dev2"]
    assert [c["status"] for c in chunks] == ["ok", "failed", "reassigned"]
    # worker times are moved onto the requester's clock by the record's offset estimate
    assert chunks[0]["start"] == pytest.approx((recs[0].start - recs[0].offset() - t0) * 1e3,
                                               abs=1e-3)
    assert chunks[0]["receive"] == pytest.approx(10.0)
    assert chunks[2]["retries"] == 1 and chunks[2]["device"] == "dev1"
    assert chunks[1]["start"] == chunks[1]["end"] == chunks[1]["receive"] == 0.0  # never answered


# ----------------------------------------------------------------------------- live view (SSE)

def test_events_stream_reports_requests_and_chunks(catalog):
    import httpx

    from decolla.gateway.server import ServerThread
    gw = Gateway(catalog, status_interval=0.2)
    with ServerThread(gw) as srv, httpx.Client(base_url=srv.url, timeout=20) as http:
        with http.stream("GET", "/api/events") as stream:
            lines = stream.iter_lines()
            seen: list[dict] = []

            def next_event():
                for line in lines:
                    if line.startswith("data: "):
                        return json.loads(line[6:])
            seen.append(next_event())
            assert seen[0]["type"] == "snapshot"
            r = http.post("/api/infer", files={"image": ("p.png", png_bytes(photo(2)), "image/png")})
            assert r.status_code == 200
            while not any(e["type"] == "request_done" for e in seen):
                seen.append(next_event())
        types = [e["type"] for e in seen]
        assert "request_start" in types and "chunk" in types
        done = [e for e in seen if e["type"] == "request_done"][0]
        assert done["id"] == r.json()["id"] and done["trace"]["chunks"]
        assert "chrome_trace" not in done  # kept server-side, served by trace.json
        status = http.get("/api/status").json()
        assert status["backends"][0]["devices"][0]["alive"] is True


# ----------------------------------------------------------------------------- the demo model

def test_seeded_backend_runs_every_layer():
    entry = entry_from_spec("m", SMALL_SPEC)
    from decolla.gateway.events import EventHub
    b = LocalReferenceBackend(entry, EventHub())
    x = pp.imagenet_input(photo(9), 32)
    res = b.infer(x, "r1")
    np.testing.assert_allclose(res.logits, reference_forward(entry.model, x), rtol=1e-3, atol=1e-3)
    assert entry.model.layers[0].weight.shape == mobilenet_v2(0.35, 32, 1000, 1).layers[0].weight.shape


@pytest.mark.skipif(not os.path.exists(digits_model_path()), reason="digits model not shipped")
def test_shipped_digits_model_recognises_held_out_digits():
    """Accuracy on the held-out split, recomputed with DeColla's forward (not read from meta)."""
    pytest.importorskip("sklearn")
    from decolla.gateway.train_digits import decolla_accuracy, load_split
    entry = default_catalog(seeded_spec="")["digits"]
    assert entry.preprocess == "digits" and entry.labels == [str(i) for i in range(10)]
    _, x_te, _, y_te = load_split(entry.model.meta.get("split_seed", 0))
    acc = decolla_accuracy(entry.model, x_te, y_te)
    assert acc >= 0.95
    assert acc == pytest.approx(entry.model.meta["heldout_accuracy"], abs=0.01)
