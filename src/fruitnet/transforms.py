"""One transform path, built from a model's preprocessing metadata (never re-typed elsewhere).

preprocessing = {input_size, resize: 'crop'|'squash', crop_pct, interpolation, mean, std}
- 'crop': resize the shorter side to input_size / crop_pct, then centre-crop input_size
  (timm's and torchvision's ImageNet evaluation);
- 'squash': resize to input_size x input_size regardless of aspect (the original project).

Every image goes through two steps, whoever uses it:
1. `Decode(pre)`: PIL RGB -> the resized uint8 tensor (the only step that touches PIL; the
   decoded-image cache stores its output);
2. `TensorTransform(pre, ...)`: uint8 tensor -> normalised float tensor: a centre crop for
   evaluation, or a random-resized crop and flip for training, at `size` (progressive resizing
   changes it between epochs).
`eval_transform` is the two in a row, so training's validation, evaluate, predict, serve and
export all see exactly the same inputs.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from fruitnet.images import MAX_ASPECT

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}
AUGMENTS = ("none", "light")


def resize_size(pre: dict) -> int:
    return round(pre["input_size"] / pre.get("crop_pct", 1.0)) if pre["resize"] == "crop" else pre["input_size"]


def _limit_aspect(img):
    """Centre-crop the longer side to MAX_ASPECT x the shorter one, so the shorter-side resize
    after it allocates at most MAX_ASPECT x side^2 pixels, whatever the image (a 1x65535 GIF
    would otherwise become 256 x 16.8M).  load_image refuses such images, so for the images it
    returns this never changes a result; it only bounds what a library caller can pass in."""
    h, w = T.functional.get_size(img)
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return img
    return T.functional.center_crop(img, [min(h, MAX_ASPECT * w), min(w, MAX_ASPECT * h)])


class Decode:
    """PIL RGB image -> uint8 CHW tensor after the resize step (a plain tensor: tv_tensor wrappers
    slow every later op down)."""

    def __init__(self, pre: dict):
        interp = _INTERPOLATION[pre["interpolation"]]
        side = resize_size(pre)
        if pre["resize"] == "squash":
            self.resize = T.Resize((side, side), interpolation=interp, antialias=True)
        elif pre["resize"] == "crop":
            self.resize = T.Compose([_limit_aspect, T.Resize(side, interpolation=interp, antialias=True)])
        else:
            raise ValueError(f"unknown resize policy {pre['resize']!r}")

    def __call__(self, image) -> torch.Tensor:
        return T.functional.pil_to_tensor(self.resize(image)).contiguous()

    def __repr__(self) -> str:
        return f"Decode({self.resize})"


class TensorTransform:
    """uint8 tensor from Decode -> normalised float tensor.

    augment 'none': centre crop at input_size (evaluation, and the original recipe's training);
    'light': random-resized crop (crop_scale of the area) at `size`, and a horizontal flip.
    """

    def __init__(self, pre: dict, augment: str = "none", crop_scale: tuple[float, float] = (0.35, 1.0)):
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augmentation {augment!r}")
        self.input_size = pre["input_size"]
        self.size = self.input_size  # training resolution; set between epochs for progressive resizing
        self.augment, self.crop_scale = augment, tuple(crop_scale)
        self.interp = _INTERPOLATION[pre["interpolation"]]
        self.mean = torch.tensor(pre["mean"]).view(3, 1, 1) * 255
        self.std = torch.tensor(pre["std"]).view(3, 1, 1) * 255

    def __repr__(self) -> str:
        return (f"TensorTransform(input_size={self.input_size}, size={self.size}, augment={self.augment!r}, "
                f"crop_scale={self.crop_scale}, interpolation={self.interp}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()})")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.augment == "none":
            img = T.functional.center_crop(img, [self.input_size] * 2)
        else:
            img = T.RandomResizedCrop(self.size, scale=self.crop_scale, interpolation=self.interp,
                                      antialias=True)(img)
            if torch.rand(()) < 0.5:
                img = T.functional.horizontal_flip(img)
        return (img.float() - self.mean) / self.std  # = ToDtype(scale=True) then Normalize(mean, std)


def eval_transform(pre: dict) -> T.Compose:
    """PIL RGB image -> normalised float tensor, exactly as the model expects at inference."""
    return T.Compose([Decode(pre), TensorTransform(pre)])
