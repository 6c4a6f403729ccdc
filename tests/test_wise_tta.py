"""Robust fine-tuning pieces: WiSE-FT interpolation, TTA (and its ONNX export)."""

import copy

import pytest
import torch
from conftest import DEMO_DATA
from PIL import Image

from fruitnet.backbones import get_backbone
from fruitnet.model import create_classifier
from fruitnet.tta import TTA
from fruitnet.wise import interpolate
from fruitnet.transforms import eval_transform


def small_classifier(seed=0):
    torch.manual_seed(seed)
    model, _ = create_classifier("resnet18", 3, "none")
    return model


def fine_tune_one_step(model):
    """A copy after one SGD step in training mode: weights and BatchNorm statistics both move."""
    tuned = copy.deepcopy(model).train()
    opt = torch.optim.SGD(tuned.parameters(), lr=0.1)
    loss = tuned(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    return tuned.eval()


def test_wise_ft_endpoints_are_exact_and_the_middle_is_the_mean():
    head_only = small_classifier().eval()
    tuned = fine_tune_one_step(head_only)
    start, end = head_only.state_dict(), tuned.state_dict()
    assert not torch.equal(start["body.bn1.running_mean"], end["body.bn1.running_mean"])
    x = torch.randn(2, 3, 64, 64)
    mixed = small_classifier(seed=1).eval()
    for alpha, reference in ((0.0, head_only), (1.0, tuned)):
        mixed.load_state_dict(interpolate(start, end, alpha))
        with torch.no_grad():
            assert torch.equal(mixed(x), reference(x))
    half = interpolate(start, end, 0.5)
    for name in ("body.conv1.weight", "head.bias", "body.bn1.running_var"):
        assert torch.allclose(half[name], (start[name] + end[name]) / 2, atol=1e-7, rtol=0)
    # the BatchNorm counter: interpolated and rounded (0 and 1 training steps -> 0 at 0.25, 1 at 0.75)
    assert start["body.bn1.num_batches_tracked"] == 0 and end["body.bn1.num_batches_tracked"] == 1
    assert interpolate(start, end, 0.25)["body.bn1.num_batches_tracked"] == 0
    assert interpolate(start, end, 0.75)["body.bn1.num_batches_tracked"] == 1
    assert half["body.bn1.num_batches_tracked"].dtype == torch.int64


def test_wise_ft_refuses_models_that_do_not_line_up():
    a = small_classifier().state_dict()
    with pytest.raises(ValueError, match="state dicts differ"):
        interpolate(a, {k: v for k, v in a.items() if k != "head.bias"}, 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        interpolate(a, {**a, "head.bias": torch.zeros(4)}, 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        interpolate(a, a, 1.5)


def test_tta_averages_the_photo_and_its_mirror():
    model = small_classifier().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(TTA(model)(x), (model(x) + model(x.flip(3))) / 2, atol=1e-5)
        symmetric = torch.cat([x[..., :32], x[..., :32].flip(3)], dim=3)
        assert torch.allclose(TTA(model)(symmetric), model(symmetric), atol=1e-5)
        scaled = TTA(model, flip=False, scales=(1.25,))(x)
        zoomed = torch.nn.functional.interpolate(x, size=(80, 80), mode="bilinear", align_corners=False)
        assert torch.allclose(scaled, (model(x) + model(zoomed)) / 2, atol=1e-5)
        assert TTA(model, scales=(0.8,))(x).shape == (3, 3)


def test_tta_exports_to_onnx_with_parity(tmp_path):
    from fruitnet.export import MAX_PROB_DIFF, compare, write_onnx
    from fruitnet.predictors import OnnxPredictor, Predictor

    pre = get_backbone("efficientnet_lite0").preprocessing
    torch.manual_seed(0)
    model, _ = create_classifier("efficientnet_lite0", 3, "imagenet")
    wrapped = TTA(model.eval(), scales=(1.15,))
    from fruitnet.model import FORMAT_VERSION

    meta = {"format": "fruitnet", "format_version": FORMAT_VERSION, "classes": ["cherry", "strawberry", "tomato"],
            "backbone": "efficientnet_lite0", "preprocessing": pre}
    write_onnx(wrapped, meta, tmp_path / "tta.onnx")

    class Reference(Predictor):
        def forward(self, x):
            with torch.no_grad():
                return wrapped(x), None, None

    images = [Image.open(p).convert("RGB") for p in sorted((DEMO_DATA / "test").rglob("*.jpg"))[:12]]
    parity = compare(Reference(meta), OnnxPredictor(tmp_path / "tta.onnx"), images)
    assert parity["top1_agreement"] == 1.0 and parity["max_prob_diff"] <= MAX_PROB_DIFF
    with torch.no_grad():  # and the file really averages views: it differs from the plain model
        x = torch.stack([eval_transform(pre)(im) for im in images[:4]])
        assert not torch.allclose(wrapped(x), model(x), atol=1e-3)
