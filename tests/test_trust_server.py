"""Issue 9 in the live service: the unknown verdict in the JSON and on the page, and "show where it
looked" (a heat map for PyTorch models; the reason it is unavailable for ONNX ones).

Real `fruitnet serve` processes on loopback, the page in Debian's Chromium."""

import io
from pathlib import Path

import httpx
import pytest
from conftest import DEMO_DATA, shared_folder
from PIL import Image
from quick_model import serving

from fruitnet.export import export_onnx
from fruitnet.predictors import TorchPredictor, expand_paths

KNOWN = sorted((DEMO_DATA / "test").rglob("*.jpg"))  # Fruits-360, CC BY-SA 4.0


@pytest.fixture(scope="module")
def server(trained_model):
    with serving(trained_model) as s:
        yield s.url


@pytest.fixture(scope="module")
def onnx_server(trained_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("trust-serve") / "model.onnx"
    export_onnx(trained_model, path, check=[str(DEMO_DATA / "test" / "cherry")], log=lambda *a: None)
    with serving(path) as s:
        yield s.url


@pytest.fixture(scope="module")
def other() -> Path:
    """A shop photo of something else (the first of ../shared/data/grocery/other)."""
    return Path(expand_paths([str(shared_folder("grocery") / "other")])[0][0])


def test_api_gives_unknown_with_the_closest_class(server, trained_model, other):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in (other, KNOWN[0])]
    got = httpx.post(server + "/predict", files=files, timeout=120).json()
    # the service runs --precision auto, as predict does by default
    want = TorchPredictor(trained_model, device="cpu", precision="auto").predict_paths([str(other), str(KNOWN[0])])
    assert got[0]["label"] == "unknown" and got[0]["best_guess"] == want[0]["best_guess"]
    assert got[1]["label"] == want[1]["label"] != "unknown"
    for g, w in zip(got, want):
        assert set(g) == {"filename", "label", "best_guess", "probabilities", "in_distribution"}
        assert abs(g["in_distribution"] - w["in_distribution"]) < 1e-6
    info = httpx.get(server + "/model").json()
    assert info["trust"]["unknown_verdict"] and info["trust"]["threshold"] == pytest.approx(0.05)
    assert info["explain"] == {"available": True, "reason": None}


def test_explain_endpoint_returns_the_heat_map(server):
    r = httpx.post(server + "/explain", files={"file": (KNOWN[0].name, KNOWN[0].read_bytes(), "image/jpeg")},
                   timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (224, 224)
    bad = httpx.post(server + "/explain", files={"file": ("notes.txt", b"hello", "text/plain")}, timeout=60)
    assert bad.status_code == 415 and "not an image" in bad.json()["error"]
    assert httpx.post(server + "/explain", timeout=60).status_code == 422


def test_onnx_service_gives_the_same_verdicts_and_says_why_no_heat_map(onnx_server, server, other):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in (other, KNOWN[0])]
    got = httpx.post(onnx_server + "/predict", files=files, timeout=120).json()
    assert [g["label"] for g in got][0] == "unknown" and got[1]["label"] != "unknown"
    r = httpx.post(onnx_server + "/explain", files={"file": (KNOWN[0].name, KNOWN[0].read_bytes(), "image/jpeg")})
    assert r.status_code == 501 and "PyTorch model file" in r.json()["error"]
    assert httpx.get(onnx_server + "/model").json()["explain"]["available"] is False


def test_page_says_none_of_these_and_shows_where_it_looked(browser, server, other):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: "efficientnet_lite0" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "files").send_keys(f"{other}\n{KNOWN[0]}")
    WebDriverWait(browser, 90).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-label]")) == 2)
    unknown = browser.find_element(By.CSS_SELECTOR, ".card[data-label='unknown']")
    assert "none of these" in unknown.text and "closest:" in unknown.text
    known = browser.find_element(By.CSS_SELECTOR, ".card[data-label]:not([data-label='unknown'])")
    assert "none of these" not in known.text
    photo = known.find_element(By.CSS_SELECTOR, ".photo img").get_attribute("src")
    toggle = known.find_element(By.CSS_SELECTOR, ".looked button")
    assert toggle.text == "Show where it looked"
    toggle.click()
    WebDriverWait(browser, 90).until(lambda d: known.get_attribute("data-looked") == "yes")
    img = known.find_element(By.CSS_SELECTOR, ".photo img")
    assert img.get_attribute("src") != photo
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return arguments[0].naturalWidth", img) == 224)
    toggle.click()
    assert known.get_attribute("data-looked") == "no" and img.get_attribute("src") == photo


def test_page_with_an_onnx_model_says_why_it_cannot_show_where_it_looked(browser, onnx_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(onnx_server + "/")
    WebDriverWait(browser, 30).until(lambda d: "efficientnet_lite0" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "files").send_keys(str(KNOWN[0]))
    card = WebDriverWait(browser, 90).until(lambda d: d.find_element(By.CSS_SELECTOR, ".card[data-label]"))
    toggle = card.find_element(By.CSS_SELECTOR, ".looked button")
    assert not toggle.is_enabled() and "unavailable" in toggle.text
    assert "PyTorch model file" in card.find_element(By.CSS_SELECTOR, ".looked .why").text
