"""Robust fine-tuning pieces: WiSE-FT interpolation, learning rates per layer, EMA, TTA (and its ONNX
export), augmentations by name, mixup/cutmix."""

import copy

import pytest
import torch
from conftest import DEMO_DATA
from PIL import Image

from fruitnet.backbones import get_backbone
from fruitnet.model import create_classifier
from fruitnet.robust import (AUGMENTATION_PIECES, TTA, Mosaic, _white_background, augmentation, batch_mix, body_layers, ema,
                             interpolate, param_groups)
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


def test_param_groups_give_the_body_a_lower_rate_decaying_towards_the_input():
    model = small_classifier()
    groups = param_groups(model, lr=1e-3, body_lr_scale=0.1, layer_decay=0.5)
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1e-3
    layers = body_layers(model.body)  # conv1, bn1, 8 basic blocks
    assert len(layers) == 10 and len(groups) == 11
    assert groups[1]["name"] == "body.9" and groups[1]["lr"] == pytest.approx(1e-4)
    assert groups[2]["lr"] == pytest.approx(5e-5) and groups[-1]["lr"] == pytest.approx(1e-4 * 0.5 ** 9)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # each parameter exactly once
    flat = param_groups(model, lr=1e-3, body_lr_scale=0.1)
    assert [g["lr"] for g in flat[1:]] == pytest.approx([1e-4] * 10)
    model.set_mode("freeze")
    assert [g["name"] for g in param_groups(model, lr=1e-3, body_lr_scale=0.1)] == ["head"]


def test_ema_follows_the_closed_form_and_averages_batchnorm_statistics():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    averaged = ema(net, decay=0.9)
    values = [1.0, 2.0, 4.0]
    expected = None
    for i, v in enumerate(values):
        with torch.no_grad():
            net[0].weight.fill_(v)
            net[1].running_mean.fill_(10 * v)
            net[1].num_batches_tracked.fill_(i + 1)
        averaged.update_parameters(net)
        expected = v if expected is None else 0.9 * expected + 0.1 * v  # the first update copies
    assert torch.allclose(averaged.module[0].weight, torch.full((2, 2), expected))
    assert torch.allclose(averaged.module[1].running_mean, torch.full((2,), 10 * expected))
    assert averaged.module[1].num_batches_tracked == 3  # a counter is copied, not averaged


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


def test_augmentations_by_name():
    pre = get_backbone("efficientnet_lite0").preprocessing
    img = torch.randint(0, 256, (3, 256, 300), dtype=torch.uint8)
    assert torch.equal(augmentation("none", pre)(img), img[:, 16:240, 38:262])
    for name in ["light"] + [f"light+{p}" for p in AUGMENTATION_PIECES] + ["light+trivial+erasing"]:
        out = augmentation(name, pre)(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8, name
    assert augmentation("light", pre, size=160)(img).shape == (3, 160, 160)
    flips = {augmentation("flip", pre)(img)[0, 0, 0].item() for _ in range(40)}  # the centre crop, or its mirror
    assert flips == {img[0, 16, 38].item(), img[0, 16, 261].item()}
    assert augmentation("flip+tile", pre)(img).shape == (3, 224, 224)
    for bad in ("heavy", "light+sparkles", "trivial"):
        with pytest.raises(ValueError, match="augmentation"):
            augmentation(bad, pre)


def test_tile_piece_repeats_the_image_in_a_grid():
    from fruitnet.robust import _tile

    img = torch.zeros(3, 60, 60, dtype=torch.uint8)
    img[:, :, :30] = 200  # left half bright
    out = _tile(p=1.0, grids=(2,))(img)
    assert out.shape == img.shape and out.dtype == torch.uint8
    for row in (5, 35):  # each tile is the image at half size: bright, dark, bright, dark across
        assert [int(out[0, row, c] > 100) for c in (5, 20, 35, 50)] == [1, 0, 1, 0]


def test_background_piece_replaces_only_the_white_surround():
    img = torch.full((3, 40, 40), 255, dtype=torch.uint8)
    img[:, 10:30, 10:30] = torch.tensor([200, 20, 30], dtype=torch.uint8).view(3, 1, 1)  # a red fruit
    torch.manual_seed(0)
    out = _white_background(p=1.0)(img)
    assert torch.equal(out[:, 10:30, 10:30], img[:, 10:30, 10:30])
    outside = torch.ones(40, 40, dtype=torch.bool)
    outside[10:30, 10:30] = False
    assert (out[:, outside] != 255).any(0).float().mean() > 0.9
    assert torch.equal(_white_background(p=0.0)(img), img)


def test_mixup_and_cutmix_give_soft_labels():
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for name in ("mixup", "cutmix", "mixup/cutmix"):
        torch.manual_seed(1)
        mx, soft = batch_mix(name, 3)(x, y)
        assert mx.shape == x.shape and soft.shape == (8, 3)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        assert (soft.max(1).values < 1).any()  # some labels really are mixed
    assert batch_mix("none", 3) is None
    for bad in ("blend", "mosaic+blend", "mosaics"):
        with pytest.raises(ValueError, match="batch mix"):
            batch_mix(bad, 3)
    mx, soft = batch_mix("mosaic+mixup", 3)(x, y)
    assert soft.shape == (8, 3)


def test_mosaic_tiles_photos_of_the_same_class_and_keeps_labels():
    # each image a flat colour: its class and its own index, so the tiles can be traced back
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    x = torch.stack([torch.full((3, 12, 12), float(10 * c + i)) for i, c in enumerate(y.tolist())])
    torch.manual_seed(0)
    out, labels = Mosaic(p=1.0, grids=(2,))(x, y)
    assert torch.equal(labels, y) and out.shape == x.shape
    for i, c in enumerate(y.tolist()):
        quadrants = {out[i, 0, r, q].item() for r in (1, 10) for q in (1, 10)}
        own_class = {float(10 * c + j) for j in range(6) if y[j] == c}
        assert quadrants <= own_class  # every tile is a photo of the same class
    assert torch.equal(Mosaic(p=0.0)(x, y)[0], x)


@pytest.mark.parametrize("backbone, size", [("resnet18", 64), ("efficientnet_lite0", 96)])
def test_split_body_prefix_then_suffix_is_the_body(backbone, size):
    from fruitnet.robust import split_body

    torch.manual_seed(0)
    model, _ = create_classifier(backbone, 3, "none")
    body = model.body.eval()
    x = torch.randn(2, 3, size, size)
    layers = body_layers(body)
    for tuned in (1, 3, len(layers)):
        prefix, suffix = split_body(body, tuned)
        with torch.no_grad():
            assert torch.equal(suffix(prefix(x)), body(x))
        tuned_params = {id(p) for layer in layers[-tuned:] for p in layer.parameters()}
        assert {id(p) for p in suffix.parameters()} == tuned_params  # the suffix holds exactly the tuned layers
        assert not any(id(p) in tuned_params for p in prefix.parameters())
    with pytest.raises(ValueError, match="tuned_layers"):
        split_body(body, 0)
