"""`fruitnet serve` on loopback: the API, every bad request, concurrency, and the page in a real browser."""

import base64
import hashlib
import json
import re
import select
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from awkward import bomb_png_bytes, lying_jpeg_bytes, tall_gif_bytes, wide_png_bytes
from conftest import DEMO_DATA, run_cli
from quick_model import CLASSES, free_port, make_quick_model, serving, with_metadata

from fruitnet.predictors import TorchPredictor

PHOTOS = sorted((DEMO_DATA / "test").rglob("*.jpg"))  # Fruits-360 (CC BY-SA 4.0), see demo_data/ATTRIBUTION.md
LIMIT_MB = 1  # the test server's --max-upload-mb


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_quick_model(tmp_path_factory.mktemp("serve") / "model.safetensors", training={"val_accuracy": 0.875})


def start_server(model, *options, preexec_fn=None):
    """`fruitnet serve MODEL --max-upload-mb 1 OPTIONS` as a user starts it, on a free loopback port."""
    return serving(model, "--max-upload-mb", LIMIT_MB, *options, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def served(model):
    with start_server(model) as s:
        yield s


@pytest.fixture(scope="module")
def server(served) -> str:
    """The base URL of `fruitnet serve MODEL` (module-wide)."""
    return served.url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def photo(i: int = 0) -> tuple[str, bytes, str]:
    return (PHOTOS[i].name, PHOTOS[i].read_bytes(), "image/jpeg")


def post(client, *files, field="files", **kw) -> httpx.Response:
    return client.post("/predict", files=[(field, f) for f in files], **kw)


# --- what works -----------------------------------------------------------------------------

def test_health_and_model_info(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["images"] >= 0 and health["forward_passes"] >= 0
    info = client.get("/model").json()
    assert info["classes"] == CLASSES and info["backbone"] == "efficientnet_lite0"
    assert info["preprocessing"]["input_size"] == 224 and info["validation_accuracy"] == 0.875
    assert info["max_upload_mb"] == LIMIT_MB and info["runtime"] == "pytorch"


def test_page_is_served_and_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'type="file"' in html and 'name="viewport"' in html
    for external in ('src="http', "src='http", 'href="http', "url(http", "@import"):
        assert external not in html, f"the page must work offline, found {external!r}"


def test_predict_matches_the_command_line_predictor(client, model):
    r = post(client, photo(0), photo(11))
    assert r.status_code == 200
    got = r.json()
    # both default to --precision auto (bf16 where the CPU runs it natively)
    expected = TorchPredictor(model, device="cpu", precision="auto").predict_paths([str(PHOTOS[0]), str(PHOTOS[11])])
    assert [g["filename"] for g in got] == [PHOTOS[0].name, PHOTOS[11].name]
    for g, e in zip(got, expected):
        assert set(g) == {"filename", "label", "probabilities"} and g["label"] == e["label"]
        assert list(g["probabilities"]) == CLASSES
        assert max(abs(g["probabilities"][c] - e["probabilities"][c]) for c in CLASSES) < 1e-5


def test_mixed_request_answers_per_file_in_order(client):
    r = post(client, ("notes.txt", b"hello", "text/plain"), photo(3), ("big.jpg", b"\xff" * (LIMIT_MB * 2**20 + 1)))
    assert r.status_code == 200
    a, b, c = r.json()
    assert a == {"filename": "notes.txt", "error": "not an image (unrecognised content)"}
    assert b["filename"] == PHOTOS[3].name and b["label"] in CLASSES
    assert c["filename"] == "big.jpg" and "larger than the 1 MB limit" in c["error"]


def test_concurrent_requests_are_safe_and_consistent(client, server):
    sequential = [post(client, photo(i)).json()[0] for i in range(4)]

    def one(i):
        with httpx.Client(base_url=server, timeout=120) as c:
            return post(c, photo(i % 4))

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        got, want = r.json()[0], sequential[i % 4]
        assert got["label"] == want["label"]
        assert max(abs(got["probabilities"][c] - want["probabilities"][c]) for c in CLASSES) < 1e-4


# --- bad requests: a JSON {error}, the right status, and the server lives on ---------------------

def truncated_jpeg() -> bytes:
    data = PHOTOS[0].read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("files, status, words", [
    ([("big.jpg", b"\xff\xd8\xff" + b"\0" * (LIMIT_MB * 2**20), "image/jpeg")], 413, "larger than the 1 MB limit"),
    ([("notes.txt", b"just some text", "text/plain")], 415, "not an image"),
    ([("empty.jpg", b"", "image/jpeg")], 415, "empty file"),
    ([("half.jpg", truncated_jpeg(), "image/jpeg")], 400, "truncated"),
    ([("bomb.png", bomb_png_bytes(), "image/png")], 400, "decompression bomb"),
    ([("notes.txt", b"text", "text/plain"), ("half.jpg", truncated_jpeg(), "image/jpeg")], 400, "no usable image"),
], ids=["too-large", "not-an-image", "empty", "truncated", "bomb", "all-bad-mixed"])
def test_unusable_files(client, files, status, words):
    r = post(client, *files)
    assert r.status_code == status
    body = r.json()
    assert words in body["error"] and body["error"].startswith("no usable image")
    assert [x["filename"] for x in body["results"]] == [f[0] for f in files]
    assert client.get("/health").status_code == 200


def test_no_file(client):
    for r in (client.post("/predict"), client.post("/predict", json={"files": []}),
              client.post("/predict", files=[("photo", photo(0))]),  # wrong field name
              client.post("/predict", data={"files": "not a file"}, files=[("other", photo(0))])):
        assert r.status_code == 422, r.text
        assert "error" in r.json()


def send_until_answered(port: int, head: bytes, body: bytes = b"", wait: float = 30) -> bytes:
    """Send `head`, then `body` for as long as the server has not answered; return its whole answer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        s.setblocking(False)
        sent, deadline = 0, time.monotonic() + wait
        while sent < len(body) and time.monotonic() < deadline:
            readable, writable, _ = select.select([s], [s], [], 1)
            if readable:
                break  # the server answered before the body ended
            try:
                sent += s.send(body[sent:sent + 65536]) if writable else 0
            except BlockingIOError:
                pass
            except OSError:  # it closed the connection: its answer is waiting
                break
        s.setblocking(True)
        s.settimeout(wait)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def test_too_many_files_and_oversized_body(client, served):
    r = post(client, *[("x.jpg", b"x", "image/jpeg")] * 33)
    assert r.status_code == 400 and "error" in r.json()
    port = served.port
    cap = 32 * LIMIT_MB + 1  # MB: 32 files x the limit, plus the form's own bytes
    # Content-Length above the request cap: refused before a byte of the body is read
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
            f"Content-Length: {(cap + 1) * 2**20}\r\n\r\n").encode()
    answer = send_until_answered(port, head)
    assert answer.startswith(b"HTTP/1.1 413") and "request larger than" in json_body(answer)["error"]
    # no Content-Length: counted as it arrives, refused once past the cap
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    part = b'--XX\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
    body = b"%x\r\n%s\r\n" % (len(part), part) + (b"100000\r\n" + b"\0" * 2**20 + b"\r\n") * (cap + 2)
    answer = send_until_answered(port, head, body)
    assert answer.startswith(b"HTTP/1.1 413") and "request larger than" in json_body(answer)["error"]
    assert client.get("/health").status_code == 200


def test_unknown_route_and_method(client):
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json()
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_onnx_file_is_served_the_same_way(model, tmp_path):
    from fastapi.testclient import TestClient

    from fruitnet.export import export_onnx
    from fruitnet.server import create_app

    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path, check=[str(DEMO_DATA / "test" / "cherry")], log=lambda *a: None)
    with TestClient(create_app(onnx_path, max_upload_mb=LIMIT_MB)) as c:
        assert c.get("/model").json()["runtime"] == "onnxruntime"
        got = c.post("/predict", files=[("files", photo(0))]).json()[0]
    want = TorchPredictor(model, device="cpu").predict_paths([str(PHOTOS[0])])[0]
    assert got["label"] == want["label"]
    assert max(abs(got["probabilities"][k] - want["probabilities"][k]) for k in CLASSES) < 1e-3


# --- hostile uploads, other origins, stalled and flooding clients (issue 11) --------------------------

def test_extreme_files_get_their_own_error_and_memory_stays_bounded(served):
    """Twelve clients at once, each sending a 1x65535 GIF, a 20000x10 PNG and a 633-byte JPEG claiming
    7000x7000 (each used to take gigabytes and answer 500 to everyone) next to a real photo."""
    files = [("tall.gif", tall_gif_bytes(), "image/gif"), ("wide.png", wide_png_bytes(), "image/png"),
             ("liar.jpg", lying_jpeg_bytes(), "image/jpeg"), photo(5)]

    def one(_):
        with httpx.Client(base_url=served.url, timeout=120) as c:
            return post(c, *files)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    for r in responses:
        assert r.status_code == 200, r.text
        tall, wide, liar, good = r.json()
        assert "extreme aspect ratio: 1x65535" in tall["error"] and "extreme aspect ratio: 20000x10" in wide["error"]
        assert "truncated image data" in liar["error"] and good["label"] in CLASSES
    assert served.peak_rss_mb() < 1536, f"the service peaked at {served.peak_rss_mb():.0f} MB"


def test_any_failure_on_one_upload_is_that_files_error(model, monkeypatch):
    """Fault injection in the service's own process: one upload's decoding runs out of memory."""
    from fastapi.testclient import TestClient

    import fruitnet.preprocess as preprocess  # where predictors (and the service) decode a file
    from fruitnet.server import create_app

    real, poison = preprocess.load_image, PHOTOS[1].read_bytes()

    def flaky(path, *args, **kwargs):
        if Path(path).read_bytes() == poison:
            raise MemoryError()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(preprocess, "load_image", flaky)
    with TestClient(create_app(model, max_upload_mb=LIMIT_MB)) as c:
        r = post(c, photo(0), photo(1), photo(2))
        assert r.status_code == 200
        good, bad, other = r.json()
        assert bad == {"filename": PHOTOS[1].name, "error": "not enough memory to process it"}
        assert good["label"] in CLASSES and other["label"] in CLASSES
        r = post(c, photo(1))  # alone: the request fails with that file's error, in JSON
        assert r.status_code == 500 and r.json()["results"][0]["error"] == "not enough memory to process it"


def test_cross_origin_posts_are_refused(client, server):
    for origin in ("http://evil.example", "null", server.replace("127.0.0.1", "localhost")):
        r = post(client, photo(0), headers={"Origin": origin})
        assert r.status_code == 403 and "cross-origin request refused" in r.json()["error"], origin
    assert post(client, photo(0), headers={"Origin": server}).status_code == 200  # the page's own origin
    assert post(client, photo(0)).status_code == 200  # no Origin: curl, scripts


def test_unknown_host_names_are_refused_on_loopback(client, served):
    r = client.get("/model", headers={"Host": f"rebind.evil.example:{served.port}"})  # DNS rebinding
    assert r.status_code == 400 and "unknown Host" in r.json()["error"]
    for host in (f"localhost:{served.port}", f"127.0.0.1:{served.port}", f"[::1]:{served.port}"):
        assert client.get("/model", headers={"Host": host}).status_code == 200, host


def test_security_headers_on_every_answer(client):
    page = client.get("/")
    for r in (page, client.get("/health"), client.get("/nope"), client.post("/predict")):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    # the page's own inline script is the one script allowed
    script = re.search(r"<script>(.*?)</script>", page.text, re.S)[1]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page.headers["content-security-policy"]


def raw_exchange(port: int, data: bytes, drip: float = 0, wait: float = 10) -> tuple[bytes, float]:
    """Send `data` (one byte every `drip` seconds if given), then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait)
        start = time.monotonic()
        try:
            for i in range(0, len(data), 1 if drip else len(data) or 1):
                s.sendall(data[i:i + (1 if drip else len(data))])
                time.sleep(drip)
        except OSError:  # closed by the server while we were still sending
            pass
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            answer += b"<still open>" if not answer else b""
        return answer, time.monotonic() - start


def json_body(answer: bytes) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer
    return json.loads(body)


def test_a_malformed_request_is_answered_in_json(served):
    answer, _ = raw_exchange(served.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon in this header\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and json_body(answer) == {"error": "invalid HTTP request"}


HEADERS = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
UPLOAD_START = (HEADERS + b"Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 100000\r\n\r\n"
                b'--XX\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n' + b"\xff" * 1000)


@pytest.fixture(scope="module")
def guarded(model):
    """A service with short limits: requests must not stall for 1 s, at most 2 at a time."""
    with start_server(model, "--timeout-request", 1, "--timeout-keep-alive", 1, "--limit-concurrency", 2) as s:
        yield s


def test_stalled_requests_are_answered_408_and_closed(guarded):
    answer, took = raw_exchange(guarded.port, HEADERS)  # headers never finished
    assert answer.startswith(b"HTTP/1.1 408 ") and "headers not complete within 1s" in json_body(answer)["error"]
    assert took < 5
    answer, took = raw_exchange(guarded.port, HEADERS, drip=0.25)  # a byte at a time does not reset the deadline
    assert b"408" in answer.split(b"\r\n")[0] and took < len(HEADERS) * 0.25
    answer, took = raw_exchange(guarded.port, UPLOAD_START)  # the upload stops half-way
    assert answer.startswith(b"HTTP/1.1 408 ") and "body stalled for 1s" in json_body(answer)["error"] and took < 5
    answer, took = raw_exchange(guarded.port, b"")  # a connection that never says anything
    assert answer == b"" and took < 5
    # an idle keep-alive connection is closed after --timeout-keep-alive
    answer, took = raw_exchange(guarded.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and 0.5 < took < 5
    assert "Traceback" not in guarded.log()


def test_requests_beyond_the_limit_get_503_in_json(guarded):
    stalled = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(2)]
    try:
        for s in stalled:  # two uploads in progress, the limit
            s.sendall(UPLOAD_START)
        time.sleep(0.3)
        r = httpx.get(guarded.url + "/health", timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy: 2 requests in progress (limit 2)" in r.json()["error"]
        time.sleep(1.5)  # they stall past --timeout-request and are closed
        assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    finally:
        for s in stalled:
            s.close()


def test_a_client_that_disconnects_mid_upload_gives_one_quiet_line(guarded):
    before = guarded.log().splitlines()
    with socket.create_connection(("127.0.0.1", guarded.port)) as s:
        s.sendall(UPLOAD_START)
        time.sleep(0.3)
    time.sleep(0.5)
    new = guarded.log().splitlines()[len(before):]
    assert len(new) == 1 and "disconnected before the upload ended" in new[0], new
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets the child's file-descriptor limit")
def test_a_flood_of_half_open_connections_cannot_starve_the_service(model):
    """300 connections that never finish their headers, against a service limited to 256 open files
    (it used to fail with 'Too many open files' and stop answering): /health still answers at once."""
    import resource

    with start_server(model, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))) as s:
        flood = []
        try:
            for _ in range(300):
                c = socket.create_connection(("127.0.0.1", s.port))
                c.sendall(HEADERS)
                flood.append(c)
            start = time.monotonic()
            r = httpx.get(s.url + "/health", timeout=10)
            assert r.status_code == 200 and time.monotonic() - start < 5
            assert post(httpx.Client(base_url=s.url, timeout=60), photo(0)).status_code == 200  # uploads need files too
        finally:
            for c in flood:
                c.close()
        assert "Too many open files" not in s.log()


def test_serve_refuses_to_start_on_a_bad_model(model, tmp_path):
    bad = with_metadata(model, tmp_path / "std0.safetensors",
                        lambda m: {**m, "preprocessing": {**m["preprocessing"], "std": [0.5, 0.5, 0]}})
    result = run_cli("serve", bad, "--port", free_port(), timeout=120)  # it used to start and answer 500s
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"fruitnet serve: error: {bad}: bad model metadata: preprocessing.std.2: " \
                                    "Input should be greater than 0 (got 0)"


# --- the page in a real browser ----------------------------------------------------------------

def test_page_shows_prediction_and_readable_error(browser, server, model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "shopping list.jpg"
    bad.write_text("apples, pears")
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: "efficientnet_lite0" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "files").send_keys(f"{PHOTOS[0]}\n{bad}")
    done = WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".card[data-label]") and d.find_elements(By.CSS_SELECTOR, ".card.error"))
    expected = TorchPredictor(model, device="cpu").predict_paths([str(PHOTOS[0])])[0]["label"]
    card = browser.find_element(By.CSS_SELECTOR, ".card[data-label]")
    assert card.get_attribute("data-label") == expected
    assert card.find_element(By.CSS_SELECTOR, ".label").text.lower() == expected
    assert len(card.find_elements(By.CSS_SELECTOR, ".bars .track")) == len(CLASSES)
    error = browser.find_element(By.CSS_SELECTOR, ".card.error")
    assert "shopping list.jpg" in error.text and "not an image" in error.text
    assert "2 photos" in browser.find_element(By.ID, "summary").text and done
    # the page did all that under its Content-Security-Policy without a single violation ...
    assert browser.find_element(By.CSS_SELECTOR, ".card[data-label] img").get_attribute("src").startswith("blob:")
    csp_reports = lambda: [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]  # noqa: E731
    assert csp_reports() == []
    # ... and the policy is enforced: a script injected into the page does not run
    injected = browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
        "document.body.append(s); return window.injected === 1;")
    assert injected is False and len(csp_reports()) == 1
