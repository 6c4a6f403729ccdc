"""One transform path, built from a model's preprocessing metadata (never re-typed elsewhere).

Every image goes through two steps, whoever uses it:
1. `Decode(pre)`: a file (`load`) or a PIL RGB image -> the resized uint8 tensor: the PIL half,
   preprocess.py (the resize policies, the JPEG draft decode), then a tensor.  The decoded-image
   cache stores its output;
2. `TensorTransform(pre, ...)`: uint8 tensor -> normalised float tensor: a centre crop for
   evaluation, or a random-resized crop and flip for training, at `size` (progressive resizing
   changes it between epochs).
`eval_transform` is the two in a row, so training's validation, evaluate, predict, serve and
export all see exactly the same inputs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision.transforms import v2 as T

from fruitnet.preprocess import DecodeAhead, load, resize, resize_size  # noqa: F401  (resize_size: part of this module's API)

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}
AUGMENTS = ("none", "light")


class Decode:
    """PIL RGB image -> uint8 CHW tensor after the resize step (a plain tensor: tv_tensor wrappers
    slow every later op down)."""

    def __init__(self, pre: dict):
        if pre["resize"] not in ("crop", "squash"):
            raise ValueError(f"unknown resize policy {pre['resize']!r}")
        self.pre = pre

    def load(self, path) -> torch.Tensor:
        """A file, decoded as the preprocessing says (preprocess.load), then resized."""
        return self(load(path, self.pre))

    def __call__(self, image) -> torch.Tensor:
        return hwc_to_tensor(np.array(resize(image, self.pre)))

    def __repr__(self) -> str:
        return (f"Decode(resize={self.pre['resize']!r}, side={resize_size(self.pre)}, "
                f"interpolation={self.pre['interpolation']!r}, jpeg_draft={bool(self.pre.get('jpeg_draft'))})")


def hwc_to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ([n,] height, width, 3) array -> contiguous uint8 ([n,] 3, height, width) tensor."""
    return torch.from_numpy(array).movedim(-1, -3).contiguous()


class TensorTransform:
    """uint8 tensor from Decode -> normalised float tensor.

    augment 'none': centre crop at input_size (evaluation, and the original recipe's training);
    it also takes a batch (n, 3, h, w), with the same result per image as one at a time;
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


def input_batches(paths: list, pre: dict, batch_size: int, decoded: DecodeAhead | None = None):
    """Files -> model-input batches: per chunk of `batch_size` paths, (prepared, x), where
    prepared[i] is (uint8 input, decoded size) or the reason the file cannot be used, and x
    stacks the usable ones' normalised tensors (None when there are none).

    Files are decoded by threads ahead of the consumer (preprocess.DecodeAhead, a bounded
    window: memory stays flat however many paths there are); `decoded` is such a decoder started
    earlier over the same paths.  The last step (uint8 -> normalised tensor) also runs in
    threads: done in the consumer's thread, OpenMP's spin-waiting made the model itself 1.5x
    slower on a busy machine."""
    decoded = decoded if decoded is not None else DecodeAhead(paths, pre)
    finish = TensorTransform(pre)
    with decoded, ThreadPoolExecutor(2) as finishing:
        for start in range(0, len(paths), batch_size):
            prepared = [next(decoded) for _ in paths[start:start + batch_size]]
            usable = [d[0] for d in prepared if not isinstance(d, str)]
            x = torch.stack(list(finishing.map(lambda a: finish(hwc_to_tensor(a)), usable))) if usable else None
            yield prepared, x
