"""The gateway as an attacker meets it: a real `python -m decolla.gateway` process on loopback,
real HTTP (httpx, and http.client for paths httpx would normalise). Every hostile request
gets a clear 4xx (or 503 busy), the process keeps serving and answers a good image as the
reference forward does, and its peak memory stays bounded."""
from __future__ import annotations

import http.client
import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from decolla.actors.system import free_port  # noqa: E402
from decolla.gateway import preprocess as pp  # noqa: E402
from decolla.loader import load_model  # noqa: E402
from decolla.reference import forward as reference_forward  # noqa: E402
from tests.images import one_colour_png  # noqa: E402

pytestmark = pytest.mark.integration

SMALL_SPEC = "mobilenet_v2:seed=1,width=0.35,input_size=32,num_classes=1000"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 2**20


def good_image() -> bytes:
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size=(640, 480)) -> bytes:
    buf = io.BytesIO()
    Image.effect_mandelbrot(size, (-2, -1.5, 1, 1.5), 100).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


class GatewayProcess:
    """`python -m decolla.gateway` on a free loopback port, stopped when the test ends."""

    def __init__(self, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "decolla.gateway", "--port", str(self.port), "--no-digits",
             "--seeded-spec", SMALL_SPEC, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the gateway did not start within 60 s")
            time.sleep(0.1)

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory (VmHWM) in MiB."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server():
    srv = GatewayProcess("--token", TOKEN)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected_top():
    """The class the reference forward gives good_image(), preprocessed as the gateway does."""
    x = pp.preprocess(pp.decode(good_image()), "imagenet", 32)
    return int(np.argmax(reference_forward(load_model(SMALL_SPEC), x)))


def assert_still_serving(url: str, expected_top: int, headers=AUTH) -> None:
    r = httpx.post(url + "/api/infer?model=mobilenet_v2", content=good_image(),
                   headers={"content-type": "image/png", **headers}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["top"][0]["index"] == expected_top


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["status"] == status and body["error"] == code and body["message"]
    return body


# ----------------------------------------------------------------------------- bad uploads

def _post(url: str, **kw) -> httpx.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    return httpx.post(url + "/api/infer", headers=headers, timeout=60, **kw)


def test_not_an_image_is_400(server, expected_top):
    r = _post(server.url, files={"image": ("notes.png", b"these are my notes\n" * 50, "image/png")})
    assert "not an image" in assert_error(r, 400, "not_an_image")["message"]
    assert_still_serving(server.url, expected_top)


def test_truncated_jpeg_is_400(server, expected_top):
    data = jpeg()
    r = _post(server.url, content=data[: len(data) // 2], headers={"content-type": "image/jpeg"})
    assert "truncated" in assert_error(r, 400, "not_an_image")["message"]
    assert_still_serving(server.url, expected_top)


@pytest.mark.parametrize("ctype", ["text/plain", "application/json", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(server, expected_top, ctype):
    r = _post(server.url, content=good_image(), headers={"content-type": ctype})
    assert_error(r, 415, "wrong_type")
    assert_still_serving(server.url, expected_top)


def test_form_file_declared_as_text_is_415(server, expected_top):
    r = _post(server.url, files={"image": ("a.txt", good_image(), "text/plain")})
    assert_error(r, 415, "wrong_type")
    assert_still_serving(server.url, expected_top)


def test_decompression_bomb_is_413_from_its_header(server, expected_top):
    bomb = one_colour_png(20000, 20000, bit_depth=1, colour_type=0)  # 400 Mpixel, 1.2 GB as RGB
    assert len(bomb) < 100_000
    t0 = time.monotonic()
    r = _post(server.url, content=bomb, headers={"content-type": "image/png"})
    assert "pixels" in assert_error(r, 413, "too_large")["message"]
    assert time.monotonic() - t0 < 5  # refused from the header, never decoded
    r = _post(server.url, files={"image": ("bomb.png", bomb, "image/png")})
    assert_error(r, 413, "too_large")
    assert_still_serving(server.url, expected_top)


def test_50mb_upload_is_413(server, expected_top):
    big = b"\0" * (50 * MB)
    r = _post(server.url, content=big, headers={"content-type": "image/png"})
    assert "limit" in assert_error(r, 413, "too_large")["message"]

    def chunks():  # no Content-Length: the limit is found while the body streams in
        for i in range(0, len(big), MB):
            yield big[i:i + MB]
    r = _post(server.url, content=chunks(), headers={"content-type": "image/png"})
    assert_error(r, 413, "too_large")
    r = _post(server.url, files={"image": ("big.png", big, "image/png")})
    assert_error(r, 413, "too_large")
    assert_still_serving(server.url, expected_top)


# ----------------------------------------------------------------------------- static files

@pytest.mark.parametrize("path", [
    "/static/../app.py", "/static/%2e%2e/app.py", "/static/%2E%2E/%2e%2e/gateway/app.py",
    "/static/..%2fapp.py", "/static/../../../../../../etc/passwd",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static//etc/passwd",
])
def test_no_file_outside_the_static_folder(server, expected_top, path):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)  # sent as written: httpx would resolve the '..' itself
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 404, (path, resp.status, body[:200])
    assert b"import" not in body and b"root:" not in body
    assert httpx.get(server.url + "/static/app.js").status_code == 200  # the folder itself serves
    assert_still_serving(server.url, expected_top)


# ----------------------------------------------------------------------------- access token

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_without_the_token_everything_but_static_is_401(server, expected_top, headers):
    with httpx.Client(base_url=server.url, headers=headers, timeout=20) as c:
        for path in ("/", "/cluster", "/api/models", "/api/status", "/api/requests",
                     "/api/events", "/?token=wrong", "/api/models?token="):
            r = c.get(path)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/api/infer", content=good_image(), headers={"content-type": "image/png"})
        assert_error(r, 401, "unauthorized")
        assert c.get("/static/app.js").status_code == 200
        assert c.get("/healthz").status_code == 200
    assert_still_serving(server.url, expected_top)


def test_the_token_opens_the_page_and_the_api(server, expected_top):
    page = httpx.get(server.url + f"/?token={TOKEN}", timeout=20)
    assert page.status_code == 200 and "/static/access.js" in page.text
    assert httpx.get(server.url + f"/cluster?token={TOKEN}").status_code == 200
    assert httpx.get(server.url + "/api/models", headers=AUTH).status_code == 200
    # the page's event stream presents the token in its query (EventSource sets no headers)
    with httpx.stream("GET", server.url + f"/api/events?token={TOKEN}", timeout=20) as s:
        assert s.status_code == 200
        assert any(line.startswith("data: ") for line in s.iter_lines())
    assert_still_serving(server.url, expected_top)


def test_the_page_passes_the_token_to_its_own_calls(server):
    """Every call the page's scripts make goes through access.js (header or query)."""
    get = lambda name: httpx.get(server.url + f"/static/{name}").text  # noqa: E731
    app, cluster = get("app.js"), get("cluster.js")
    for src in (app, cluster):
        assert "fetch(" not in src.replace("apiFetch(", "")
    assert "apiFetch(url, {method: \"POST\"" in app and "withToken(res.trace_url)" in app
    assert "new EventSource(withToken(" in cluster


# ----------------------------------------------------------------------------- cluster key

@pytest.mark.parametrize("command", [["decolla.gateway"], ["decolla.cli", "serve"]])
def test_a_bad_key_file_stops_the_gateway_with_one_line(tmp_path, command):
    missing = subprocess.run([sys.executable, "-m", *command, "--no-digits",
                              "--seeded-spec", SMALL_SPEC, "--key-file", str(tmp_path / "no.key"),
                              "--port", str(free_port())],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_key_file_is_installed_before_serving(tmp_path):
    """`--key-file` reaches the process's cluster key before the server (and any backend)
    starts."""
    from decolla.runtime import keys
    path = str(tmp_path / "cluster.key")
    keys.write_key(path)
    srv = GatewayProcess("--key-file", path, "--log-json")
    srv.stop()
    lines = [json.loads(line) for line in srv.proc.stdout.read().splitlines() if line.startswith("{")]
    serving = [e for e in lines if e.get("event") == "serving"]
    assert serving and serving[0]["cluster_key"] is True and serving[0]["token"] is False


# ----------------------------------------------------------------------------- load

def test_uploads_are_refused_before_they_are_buffered(expected_top):
    """A 50 MB body, declared or streamed, leaves the server's peak memory where it was."""
    srv = GatewayProcess()
    try:
        assert_still_serving(srv.url, expected_top, headers={})  # warm: model, threads
        before = srv.peak_rss_mb()
        big = b"\0" * (50 * MB)
        r = httpx.post(srv.url + "/api/infer", content=big, headers={"content-type": "image/png"},
                       timeout=60)
        assert r.status_code == 413
        r = httpx.post(srv.url + "/api/infer", content=(big[i:i + MB] for i in range(0, len(big), MB)),
                       headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 413
        grown = srv.peak_rss_mb() - before
        print(f"peak RSS {before:.0f} MiB before the 50 MB uploads, +{grown:.0f} MiB after")
        assert grown < 30
    finally:
        srv.stop()


def test_30_concurrent_large_uploads_are_admitted_before_decoding(expected_top):
    """30 clients at once, each a 6300x6300 PNG (under the pixel limit, about 120 MB decoded):
    each is answered or refused 503 busy; the gateway's peak memory stays bounded because it
    admits before it decodes and decodes one at a time."""
    srv = GatewayProcess()
    image = one_colour_png(6300, 6300)
    n = 30
    barrier = threading.Barrier(n)
    answers: list = [None] * n

    def upload(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = httpx.post(srv.url + "/api/infer?model=mobilenet_v2", content=image,
                                    headers={"content-type": "image/png"}, timeout=120)
        except httpx.HTTPError as exc:
            answers[i] = exc
    try:
        start_rss = srv.peak_rss_mb()
        threads = [threading.Thread(target=upload, args=(i,)) for i in range(n)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        took = time.monotonic() - t0
        statuses = [a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers]
        peak = srv.peak_rss_mb()
        print(f"30 uploads of {len(image) / 1e3:.0f} KB ({6300 * 6300 / 1e6:.1f} Mpixel) in "
              f"{took:.1f} s: {statuses.count(200)} answered, {statuses.count(503)} busy; "
              f"peak RSS {start_rss:.0f} -> {peak:.0f} MiB")
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 1
        for a in answers:
            if a.status_code == 503:
                assert a.json()["error"] == "busy" and a.headers["retry-after"]
            else:
                assert a.json()["image"] == {"width": 6300, "height": 6300}
        assert peak < 1024, f"peak RSS {peak:.0f} MiB"
        assert_still_serving(srv.url, expected_top, headers={})
    finally:
        srv.stop()
