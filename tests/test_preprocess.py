"""The PIL half of the transform path: torchvision's arithmetic exactly, the JPEG draft decode,
decoding ahead in threads, small-image warnings."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from fruitnet.backbones import BACKBONES
from fruitnet.images import MAX_ASPECT, load_image
from fruitnet.model import LEGACY_PREPROCESSING
from fruitnet.preprocess import (
    DecodeAhead,
    draft_size,
    is_valid,
    load,
    model_input,
    resize,
    resize_size,
    small_image_warning,
)
from fruitnet.transforms import Decode, TensorTransform, eval_transform, hwc_to_tensor

PREPROCESSINGS = {name: b.preprocessing for name, b in BACKBONES.items()} | {"legacy": LEGACY_PREPROCESSING}
TORCHVISION_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("name", sorted(PREPROCESSINGS))
@pytest.mark.parametrize("size", [(100, 100), (640, 480), (333, 517), (257, 256), (17, 29), (1200, 31), (3000, 20)])
def test_resize_is_torchvisions_resize_exactly(name, size):
    """Models trained before the resize moved into preprocess.py must see the same pixels; beyond
    MAX_ASPECT:1 the longer side is centre-cropped first (what a library caller may pass in)."""
    pre = PREPROCESSINGS[name]
    side = resize_size(pre)
    torchvision_resize = T.Resize((side, side) if pre["resize"] == "squash" else side,
                                   interpolation=TORCHVISION_INTERPOLATION[pre["interpolation"]], antialias=True)
    image = photo(*size)
    w, h = size
    expected = T.functional.center_crop(image, [min(h, MAX_ASPECT * w), min(w, MAX_ASPECT * h)]) \
        if pre["resize"] == "crop" else image
    assert np.array_equal(np.asarray(resize(image, pre)), np.asarray(torchvision_resize(expected)))


@pytest.mark.parametrize("name", sorted(PREPROCESSINGS))
@pytest.mark.parametrize("size", [(640, 480), (333, 517), (224, 224), (17, 29)])
def test_model_input_is_the_eval_transforms_uint8_stage(name, size):
    """The predictors' path (uint8 model input, then TensorTransform) equals eval_transform."""
    pre = PREPROCESSINGS[name]
    image = photo(*size, seed=1)
    a = TensorTransform(pre)(hwc_to_tensor(model_input(image, pre)))
    b = eval_transform(pre)(image)
    assert torch.equal(a, b)
    assert torch.equal(T.functional.center_crop(Decode(pre)(image), [pre["input_size"]] * 2),
                       hwc_to_tensor(model_input(image, pre)))
    # a batch, as the predictors normalise it, gives each image's own result
    batch = np.stack([model_input(image, pre), model_input(photo(*size, seed=2), pre)])
    assert torch.equal(TensorTransform(pre)(hwc_to_tensor(batch))[0], b)


def test_jpeg_draft_decodes_big_photos_smaller_but_never_below_the_resize(tmp_path):
    pre = BACKBONES["efficientnet_lite0"].preprocessing
    assert pre["jpeg_draft"] and draft_size(pre) == resize_size(pre) == 256
    for w, h in ((4000, 3000), (1024, 2100), (600, 512), (511, 400)):
        path = tmp_path / f"{w}x{h}.jpg"
        photo(w, h).save(path, quality=90)
        decoded = load(path, pre)
        assert min(decoded.size) >= 256  # what the resize needs is always there
        if min(w, h) >= 512:
            assert decoded.size[0] < w  # decoded at 1/2, 1/4 or 1/8 scale
        # training's cache (Decode.load) and the predictors decode the same way
        assert torch.equal(Decode(pre).load(path), Decode(pre)(decoded))
    assert load(tmp_path / "4000x3000.jpg", pre).size == (500, 375)
    # a model without the key (older files, the original model.pth) is fed full decodes, as it was trained
    assert draft_size(LEGACY_PREPROCESSING) is None
    assert load(tmp_path / "4000x3000.jpg", LEGACY_PREPROCESSING).size == (4000, 3000)


def test_decode_ahead_keeps_order_reports_errors_and_stays_bounded(tmp_path):
    pre = BACKBONES["efficientnet_lite0"].preprocessing
    paths = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.png"
        photo(200 + 10 * i, 300).save(path)
        paths.append(str(path))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    paths.insert(5, str(tmp_path / "broken.jpg"))
    ahead = DecodeAhead(paths, pre, window=3, threads=2)
    time.sleep(0.5)
    assert ahead.next == 3 and len(ahead.pending) == 3  # never more than the window in flight
    got = list(ahead)
    assert len(got) == len(paths)
    assert "truncated or corrupt" in got[5]
    for path, g in zip(paths, got):
        if path.endswith(".png"):
            array, size = g
            assert size == load_image(path).size and array.shape == (224, 224, 3)
            assert np.array_equal(array, model_input(load_image(path), pre))


def test_small_image_warning_flags_thumbnails_not_studio_shots():
    pre = BACKBONES["efficientnet_lite0"].preprocessing
    assert "16x16 pixels" in small_image_warning((16, 16), pre)
    assert "29x17" in small_image_warning((29, 17), pre)
    assert small_image_warning((100, 100), pre) is None  # Fruits-360 and the demo photos
    assert small_image_warning((4000, 3000), pre) is None


def test_is_valid_accepts_every_backbone_and_refuses_nonsense():
    assert all(is_valid(pre) for pre in PREPROCESSINGS.values())
    for bad in (None, {}, {"resize": "crop"}, {**PREPROCESSINGS["resnet18"], "interpolation": "lanczos9"},
                {**PREPROCESSINGS["resnet18"], "input_size": "224"}):
        assert not is_valid(bad)
