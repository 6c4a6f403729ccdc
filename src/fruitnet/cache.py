"""Decoded-image cache: decode, orient and resize each image once per run, keep it as uint8.

Every later epoch crops, flips and normalises tensors instead of re-decoding JPEGs.  The
stored image is exactly what the evaluation transform has after its resize step (same PIL
resize), so a centre crop of it gives the evaluation input (to float rounding, ~1e-7).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.transforms import v2 as T
from tqdm import tqdm

from fruitnet.dataset import Item
from fruitnet.images import load_image
from fruitnet.transforms import _INTERPOLATION, resize_size

DEFAULT_MAX_BYTES = 4 << 30  # above this, decode per access instead (a huge folder must not fill memory)


def estimated_bytes(n_images: int, pre: dict) -> int:
    side = resize_size(pre)
    return int(n_images * side * side * 3 * 1.4)  # non-square photos are up to ~1.4x larger on average


class DecodedImages(torch.utils.data.Dataset):
    """(normalised tensor, class index); augment 'none' gives the evaluation input exactly."""

    def __init__(self, items: list[Item], classes: list[str], pre: dict, augment: str = "none",
                 progress: bool = True, threads: int = 4, desc: str = "decoding"):
        self.pre, self.augment = pre, augment
        self.size = pre["input_size"]
        index = {c: i for i, c in enumerate(classes)}
        self.targets = [index[it.label] for it in items]
        interp = _INTERPOLATION[pre["interpolation"]]
        side = resize_size(pre)
        resize = (T.Resize((side, side), interpolation=interp, antialias=True) if pre["resize"] == "squash"
                  else T.Resize(side, interpolation=interp, antialias=True))
        # PIL resize, then a plain contiguous uint8 CHW tensor (tv_tensor wrappers slow every op down)
        self._decode = T.Compose([resize, T.PILToTensor(), lambda t: t.as_subclass(torch.Tensor).contiguous()])
        with ThreadPoolExecutor(threads) as pool:  # PIL decodes and resizes without the GIL
            jobs = pool.map(lambda it: self._decode(load_image(it.path)), items)
            self.images = list(tqdm(jobs, total=len(items), desc=desc, unit="img", disable=not progress,
                                    leave=False))
        self._mean = torch.tensor(pre["mean"]).view(3, 1, 1) * 255
        self._std = torch.tensor(pre["std"]).view(3, 1, 1) * 255
        self.interp = interp

    def with_augment(self, augment: str) -> "DecodedImages":
        """The same decoded images under another augmentation (nothing decoded again)."""
        other = copy.copy(self)
        other.augment = augment
        return other

    def set_resolution(self, size: int) -> None:
        """Training resolution for augmented crops (progressive resizing); evaluation stays at input_size."""
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        if self.augment == "none":
            img = T.functional.center_crop(img, [self.pre["input_size"]] * 2)
        elif self.augment == "light":
            img = T.RandomResizedCrop(self.size, scale=(0.35, 1.0), interpolation=self.interp, antialias=True)(img)
            if torch.rand(()) < 0.5:
                img = T.functional.horizontal_flip(img)
        else:
            raise ValueError(f"unknown augmentation {self.augment!r}")
        return (img.float() - self._mean) / self._std, self.targets[i]  # = ToDtype(scale) + Normalize
