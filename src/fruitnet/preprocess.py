"""The PIL half of the transform path (no torch here): a file -> upright RGB at the model's size.

preprocessing = {input_size, resize: 'crop'|'squash', crop_pct, interpolation, mean, std, jpeg_draft}
- 'crop': resize the shorter side to input_size / crop_pct, then centre-crop input_size
  (timm's and torchvision's ImageNet evaluation);
- 'squash': resize to input_size x input_size regardless of aspect (the original project).
- jpeg_draft (recorded by the backbones, so every model trained from now on has it): a JPEG is decoded at a reduced
  scale (1/2, 1/4, 1/8, by libjpeg's scaled IDCT) whenever both sides stay at least the resize
  size, so a 4000x3000 photo is decoded at 500x375 instead of 12 megapixels.  Training and
  inference decode the same way, because both read this key from the same preprocessing; a model
  without the key (older files, the original model.pth) is fed fully decoded images, as it was
  trained.

`resize` is exactly torchvision's Resize on a PIL image (the same output size arithmetic, the same
PIL resampling), so transforms.Decode builds on it, and `model_input` (resize + centre crop, as a
uint8 array) can run in threads before torch is even imported: `fruitnet predict` decodes its
first photos while the model loads.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from fruitnet.errors import ImageError
from fruitnet.images import MAX_ASPECT, load_image

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def resize_size(pre: dict) -> int:
    """The side the resize step produces: the shorter side ('crop') or both sides ('squash')."""
    return round(pre["input_size"] / pre.get("crop_pct", 1.0)) if pre["resize"] == "crop" else pre["input_size"]


def draft_size(pre: dict) -> int | None:
    """The smallest side a reduced-scale JPEG decode may give: never below what the resize needs."""
    return resize_size(pre) if pre.get("jpeg_draft") else None


def load(path, pre: dict) -> Image.Image:
    """Decode a file as the model's preprocessing says (see jpeg_draft); ImageError if unusable."""
    return load_image(path, draft_size=draft_size(pre))


def _limit_aspect(image: Image.Image) -> Image.Image:
    """Centre-crop the longer side to MAX_ASPECT x the shorter one, so the shorter-side resize
    after it allocates at most MAX_ASPECT x side^2 pixels, whatever the image (a 1x65535 GIF
    would otherwise become 256 x 16.8M).  load_image refuses such images, so for the images it
    returns this never changes a result; it only bounds what a library caller can pass in."""
    w, h = image.size
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return image
    cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))  # torchvision's centre crop
    return image.crop((left, top, left + cw, top + ch))


def resize(image: Image.Image, pre: dict) -> Image.Image:
    """The resize step: torchvision's Resize(side) or Resize((side, side)) on a PIL image, exactly
    (for 'crop', after the aspect bound above)."""
    if pre["resize"] not in ("crop", "squash"):
        raise ValueError(f"unknown resize policy {pre['resize']!r}")
    if pre["resize"] == "crop":
        image = _limit_aspect(image)
    side, (w, h) = resize_size(pre), image.size
    if pre["resize"] == "squash":
        size = (side, side)
    else:  # the shorter side becomes `side`; the longer one is truncated as torchvision does
        short, long = (w, h) if w <= h else (h, w)
        size = (side, int(side * long / short)) if w <= h else (int(side * long / short), side)
    if size == (w, h):
        return image
    return image.resize(size, resample=_RESAMPLE[pre["interpolation"]])


def centre_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's center_crop to size x size (inside the image)."""
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def model_input(image: Image.Image, pre: dict) -> np.ndarray:
    """A decoded image -> the model's input as uint8 (input_size, input_size, 3): resize, centre-crop.

    Equal, pixel for pixel, to transforms.eval_transform's uint8 stage (tests/test_training.py)."""
    image = resize(image, pre)
    size = pre["input_size"]
    if image.size != (size, size):
        image = image.crop(centre_crop_box(*image.size, size))
    return np.array(image)  # writable: torch.from_numpy wants it so


# A photo whose shorter side is under a third of the model's input is mostly invented by upscaling
# (16x16 or 29x17 thumbnails); Fruits-360's 100x100 studio shots, the demo's, stay clear of it.
SMALL_FRACTION = 1 / 3


def small_side(pre: dict) -> int:
    """Photos with a shorter side under this many pixels get a warning."""
    return round(pre["input_size"] * SMALL_FRACTION)


def small_image_warning(size: tuple[int, int], pre: dict) -> str | None:
    """A note for a photo much smaller than the model's input (size = (width, height) as decoded)."""
    if min(size) >= small_side(pre):
        return None
    return f"small image: {size[0]}x{size[1]} pixels, upscaled for a {pre['input_size']}-pixel input"


def _decode(path, pre: dict) -> tuple[np.ndarray, tuple[int, int]] | str:
    """(model input, decoded size), or the reason the file cannot be used."""
    try:
        image = load(path, pre)
        return model_input(image, pre), image.size
    except ImageError as exc:
        return exc.reason
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    except MemoryError:
        return "not enough memory to process it"
    except Exception as exc:  # whatever goes wrong with one file is that file's error, not the batch's
        return f"cannot be processed ({exc.__class__.__name__}: {exc})"


class DecodeAhead:
    """model_input for many files, in threads (PIL decodes without the GIL), in order: iterate to
    get, per path, (uint8 input, decoded size) or the reason the file cannot be used.

    At most `window` files are decoded ahead of the consumer, however many paths there are.  It
    needs no torch: `fruitnet predict` starts it before the model loads, so the first photos are
    decoded on the cores that torch's import leaves idle."""

    def __init__(self, paths: list, pre: dict, window: int = 256, threads: int | None = None):
        self.paths, self.pre, self.window = list(paths), pre, window
        self.pool = ThreadPoolExecutor(threads or max(2, os.cpu_count() or 2))
        self.pending: deque = deque()
        self.next = 0
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.window and self.next < len(self.paths):
            self.pending.append(self.pool.submit(_decode, self.paths[self.next], self.pre))
            self.next += 1

    def __iter__(self):
        return self

    def __next__(self):
        if not self.pending:
            self.close()
            raise StopIteration
        result = self.pending.popleft().result()
        self._fill()
        return result

    def close(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_valid(pre) -> bool:
    """Whether `pre` is a preprocessing this module can apply (the model loader checks it fully)."""
    try:
        return (pre["resize"] in ("crop", "squash") and pre["interpolation"] in _RESAMPLE
                and isinstance(pre["input_size"], int) and 16 <= pre["input_size"] <= 4096
                and resize_size(pre) >= pre["input_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return False
