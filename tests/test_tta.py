"""--tta (test-time augmentation: each photo averaged with its mirror image) in predict, evaluate,
serve and export, on real models (tests/quick_model.py) and the bundled demo photos."""

import json

import onnx
import pytest
import torch
from conftest import DEMO_DATA, run_cli
from PIL import Image, ImageOps
from quick_model import make_quick_model

from fruitnet.config import InferenceOptions
from fruitnet.errors import UsageError
from fruitnet.export import MAX_PROB_DIFF, export_onnx
from fruitnet.predictors import OnnxPredictor, TorchPredictor, load_predictor

PHOTOS = DEMO_DATA / "test"  # 30 Fruits-360 photos (CC BY-SA 4.0, see demo_data/ATTRIBUTION.md)
PHOTO = min(PHOTOS.rglob("*.jpg"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_quick_model(tmp_path_factory.mktemp("tta") / "model.safetensors")


@pytest.fixture(scope="module")
def exported_tta(model, tmp_path_factory):
    """`fruitnet export --tta`, as a user runs it."""
    out = tmp_path_factory.mktemp("tta-export") / "model-tta.onnx"
    result = run_cli("export", model, "--tta", "--out", out, "--check", PHOTOS)
    return out, result


def photos(n=8):
    return [Image.open(p).convert("RGB") for p in sorted(PHOTOS.rglob("*.jpg"))[:n]]


def test_tta_predictor_averages_the_photo_and_its_mirror(model):
    plain, tta = TorchPredictor(model, device="cpu"), TorchPredictor(model, device="cpu", tta=True)
    images = photos()
    x = torch.stack([plain.transform(im) for im in images])
    mirrored = torch.stack([plain.transform(ImageOps.mirror(im)) for im in images])
    expected = (plain.logits(x) + plain.logits(mirrored)) / 2
    got = tta.logits(x)
    assert torch.allclose(got, expected, atol=1e-4)
    assert (got - plain.logits(x)).abs().max() > 1e-3  # it really averages: not the plain model's answer
    probs = tta.probabilities(images)
    assert torch.allclose(probs, (expected / tta.temperature).softmax(1), atol=1e-5)
    assert tta.runtime()["tta"] is True and plain.runtime()["tta"] is False
    assert tta.net is not tta.model and tta.net.model is tta.model  # Grad-CAM draws the plain model


def test_export_tta_passes_parity_and_the_file_averages(model, exported_tta):
    out, result = exported_tta
    assert result.returncode == 0, result.stderr
    assert "test-time augmentation (mirror) in the graph" in result.stdout
    assert "top-1 agreement 100.0% (30/30)" in result.stdout and "-> OK" in result.stdout
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["fruitnet"])
    assert meta["tta"] is True and meta["exported_from"] == "model.safetensors"
    onnx_tta, torch_tta = load_predictor(out), TorchPredictor(model, device="cpu", tta=True)
    assert isinstance(onnx_tta, OnnxPredictor) and onnx_tta.tta and onnx_tta.runtime()["tta"] is True
    images = photos(30)
    got, want = onnx_tta.probabilities(images), torch_tta.probabilities(images)
    assert (got - want).abs().max() <= MAX_PROB_DIFF
    plain = TorchPredictor(model, device="cpu").probabilities(images)
    assert (got - plain).abs().max() > 10 * MAX_PROB_DIFF  # the mirror is averaged inside the graph
    assert load_predictor(out, InferenceOptions(tta=True)).tta  # --tta with such a file: accepted, the same file


def test_predict_with_tta(model, exported_tta):
    out, _ = exported_tta
    for args in ((model, PHOTO, "--tta"), (out, PHOTO), (out, PHOTO, "--tta")):
        result = run_cli("predict", *args, "--json")
        assert result.returncode == 0, result.stderr
        assert "test-time augmentation: each photo averaged with its mirror image" in result.stderr
    plain = run_cli("predict", model, PHOTO, "--json")
    assert plain.returncode == 0 and "test-time augmentation" not in plain.stderr


def test_tta_with_an_onnx_file_exported_without_it_is_refused(model, tmp_path):
    plain = tmp_path / "plain.onnx"
    export_onnx(model, plain, check=[str(PHOTO)], log=lambda *a: None)
    assert json.loads({p.key: p.value for p in onnx.load(str(plain)).metadata_props}["fruitnet"]).get("tta") is None
    assert load_predictor(plain).runtime()["tta"] is False
    with pytest.raises(UsageError, match="fruitnet export --tta model.safetensors"):
        load_predictor(plain, InferenceOptions(tta=True))
    result = run_cli("predict", plain, PHOTO, "--tta")
    assert result.returncode == 2
    assert "exported without test-time augmentation" in result.stderr
    assert "re-export it with: fruitnet export --tta model.safetensors" in result.stderr
    from fruitnet.server import create_app

    with pytest.raises(UsageError, match="exported without test-time augmentation"):  # serve --tta: exit 2
        create_app(plain, InferenceOptions(tta=True))


def test_evaluate_records_tta(model, tmp_path):
    result = run_cli("evaluate", model, PHOTOS, "--tta", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["tta"] is True
    line = "Test-time augmentation (--tta): each photo's prediction averaged with its mirror image's"
    assert line in (tmp_path / "eval" / "report.txt").read_text() and line in result.stdout
    assert (tmp_path / "eval" / "mistakes.png").is_file()  # heat maps of the plain model still drawn

    from fruitnet.evaluate import evaluate

    plain = evaluate(model, PHOTOS, tmp_path / "plain", progress=False)
    assert plain["tta"] is False
    assert "Test-time augmentation: none" in (tmp_path / "plain" / "report.txt").read_text()


def test_serve_says_whether_it_averages(model, exported_tta):
    from fastapi.testclient import TestClient

    from fruitnet.server import create_app

    out, _ = exported_tta
    for path, tta, expected in ((model, True, True), (model, False, False), (out, False, True), (out, True, True)):
        with TestClient(create_app(path, InferenceOptions(tta=tta))) as c:
            assert c.get("/model").json()["tta"] is expected, (path, tta)
            r = c.post("/predict", files=[("files", (PHOTO.name, PHOTO.read_bytes(), "image/jpeg"))])
            assert r.status_code == 200 and r.json()[0]["label"], r.text
            if path == model and tta:  # heat maps (of the plain model) with --tta
                r = c.post("/explain", files={"file": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")})
                assert r.status_code == 200 and r.headers["content-type"] == "image/png"
