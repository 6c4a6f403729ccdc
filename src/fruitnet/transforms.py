"""Transform presets built from a model's preprocessing metadata (never re-typed elsewhere).

preprocessing = {input_size, resize: 'crop'|'squash', crop_pct, interpolation, mean, std}
- 'crop': resize the shorter side to input_size / crop_pct, then centre-crop input_size
  (timm's and torchvision's ImageNet evaluation);
- 'squash': resize to input_size x input_size regardless of aspect (the original project).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from fruitnet.images import MAX_ASPECT

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def resize_size(pre: dict) -> int:
    return round(pre["input_size"] / pre.get("crop_pct", 1.0)) if pre["resize"] == "crop" else pre["input_size"]


def _resize(pre: dict) -> list:
    interp = _INTERPOLATION[pre["interpolation"]]
    size = pre["input_size"]
    if pre["resize"] == "squash":
        return [T.Resize((size, size), interpolation=interp, antialias=True)]
    if pre["resize"] == "crop":
        return [_limit_aspect, T.Resize(resize_size(pre), interpolation=interp, antialias=True), T.CenterCrop(size)]
    raise ValueError(f"unknown resize policy {pre['resize']!r}")


def _limit_aspect(img):
    """Centre-crop the longer side to MAX_ASPECT x the shorter one, so the shorter-side resize
    after it allocates at most MAX_ASPECT x side^2 pixels, whatever the image (a 1x65535 GIF
    would otherwise become 256 x 16.8M).  load_image refuses such images, so for the images it
    returns this never changes a result; it only bounds what a library caller can pass in."""
    h, w = T.functional.get_size(img)
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return img
    return T.functional.center_crop(img, [min(h, MAX_ASPECT * w), min(w, MAX_ASPECT * h)])


def _to_normalised_tensor(pre: dict) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre["mean"], pre["std"])]


def eval_transform(pre: dict) -> T.Compose:
    """PIL RGB image -> normalised float tensor, exactly as the model expects at inference."""
    return T.Compose(_resize(pre) + _to_normalised_tensor(pre))


def train_transform(pre: dict, augment: str = "none") -> T.Compose:
    """'none': the evaluation transform (the original recipe); 'light': random-resized crop and flip."""
    if augment == "none":
        return eval_transform(pre)
    if augment == "light":
        interp = _INTERPOLATION[pre["interpolation"]]
        return T.Compose([T.RandomResizedCrop(pre["input_size"], scale=(0.35, 1.0), interpolation=interp,
                                              antialias=True),
                          T.RandomHorizontalFlip()] + _to_normalised_tensor(pre))
    raise ValueError(f"unknown augmentation {augment!r}")
