"""`fruitnet serve` on loopback: the API, every bad request, concurrency, and the page in a real browser."""

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from awkward import bomb_png_bytes
from conftest import DEMO_DATA
from quick_model import CLASSES, make_quick_model

from fruitnet.predictors import TorchPredictor

PHOTOS = sorted((DEMO_DATA / "test").rglob("*.jpg"))  # Fruits-360 (CC BY-SA 4.0), see demo_data/ATTRIBUTION.md
LIMIT_MB = 1  # the test server's --max-upload-mb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_quick_model(tmp_path_factory.mktemp("serve") / "model.safetensors", training={"val_accuracy": 0.875})


@pytest.fixture(scope="module")
def server(model):
    """`fruitnet serve MODEL` as a user starts it, on a free loopback port; yields its base URL."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "fruitnet", "serve", str(model), "--port", str(port),
                             "--max-upload-mb", str(LIMIT_MB)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail("fruitnet serve did not come up:\n" + log.read().decode(errors="replace"))
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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


def test_too_many_files_and_oversized_body(client):
    r = post(client, *[("x.jpg", b"x", "image/jpeg")] * 33)
    assert r.status_code == 400 and "error" in r.json()
    # Content-Length above the request cap (32 files x the limit): refused before it is read
    big = io.BytesIO(b"\0" * ((32 * LIMIT_MB + 2) * 2**20))
    try:
        r = post(client, ("huge.jpg", big, "image/jpeg"))
        assert r.status_code == 413 and "request larger than" in r.json()["error"]
    except httpx.TransportError:  # the server may close the connection while the client still sends
        pass

    def chunked():  # no Content-Length: counted as it arrives, refused once past the cap
        yield b'--XX\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
        for _ in range(32 * LIMIT_MB + 2):
            yield b"\0" * 2**20
        yield b"\r\n--XX--\r\n"

    try:
        r = client.post("/predict", content=chunked(), headers={"content-type": "multipart/form-data; boundary=XX"})
        assert r.status_code == 413 and "request larger than" in r.json()["error"]
    except httpx.TransportError:
        pass
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


# --- the page in a real browser ----------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium or chromedriver is absent: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


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
