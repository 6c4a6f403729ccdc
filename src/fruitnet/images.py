"""The one place that opens image files: safely, by content, always to 8-bit RGB.

Everything that reads a photo (training, evaluation, prediction, serving) goes
through :func:`load_image`, so one awkward file never crashes a run: it either
comes back as a plain RGB image or raises :class:`ImageError` saying why not.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fruitnet.errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_PIXELS = 64_000_000

# Pillow plugins we let parse a file at all. MPO (multi-picture JPEG from phones) needs no
# entry: the JPEG plugin opens it (as format "MPO"), and "MPO" is not a registered opener.
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")

# Magic bytes of the accepted formats: sniffing reads 16 bytes and decodes nothing,
# so it is cheap and cannot trip over bombs or broken data.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)


def is_hidden(path) -> bool:
    """True if any component of ``path`` starts with '.' (.DS_Store, .ipynb_checkpoints/...).

    Pass the path relative to the dataset root, so a root that itself lives in
    a hidden directory (~/.cache/...) does not hide everything.
    """
    return any(p.startswith(".") and p not in (".", "..") for p in PurePath(path).parts)


def sniff_format(path) -> str | None:
    """The accepted format ('JPEG', 'PNG', ...) that the file's first bytes announce, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def looks_like_image(path) -> bool:
    """Worth trying to load: an image extension (any case) or image content."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS or sniff_format(path) is not None


def load_image(path, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open, fully decode, EXIF-orient and convert ``path`` to an 8-bit RGB image.

    Raises ImageError (never anything else for bad data) when the file is empty,
    not an image, an unsupported format, truncated/corrupt, or larger than
    ``max_pixels`` (checked from the header, before any pixel is decoded).
    ``draft_size`` lets the JPEG decoder downscale by a power of two while
    keeping both sides >= draft_size: much faster for big photos.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(path, "empty file")
        # Warnings (bomb, odd EXIF, ...) become errors or are dropped: a data loader must not spam.
        with warnings.catch_warnings(), open(path, "rb") as f:
            warnings.simplefilter("ignore")
            try:
                img = Image.open(f, formats=_PIL_FORMATS)
            except UnidentifiedImageError:
                raise ImageError(path, _why_unidentified(path, f)) from None
            with img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(path, _bomb_reason(f"{w}x{h}", max_pixels))
                if draft_size and img.format in ("JPEG", "MPO"):
                    img.draft("RGB", (draft_size, draft_size))
                img.load()  # decode everything now: truncated data raises here, not later
                img = _upright(img)  # a new image, independent of the file we are about to close
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own (2x MAX_IMAGE_PIXELS) check in open()
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageError(path, _bomb_reason(f"{int(m[1]):,}" if m else "too many", max_pixels)) from None
    except OSError as e:
        if e.filename is not None:  # the file itself could not be read (permissions, vanished, ...)
            raise ImageError(path, f"cannot read file ({e.strerror or e})") from None
        raise ImageError(path, f"truncated or corrupt image data ({e})") from None
    except Exception as e:  # Pillow's parsers raise a zoo of types on malformed data
        raise ImageError(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
    try:
        return _to_rgb(img)
    except ValueError:
        raise ImageError(path, f"unsupported colour mode {img.mode}") from None


def _bomb_reason(size: str, max_pixels: int) -> str:
    return f"decompression bomb: {size} pixels exceeds the {max_pixels:,}-pixel limit"


def _why_unidentified(path, f) -> str:
    if sniff_format(path):  # right magic bytes, but Pillow could not even parse the header
        return "truncated or corrupt image data (unreadable header)"
    try:  # name the format if Pillow knows it, to give a more useful message
        f.seek(0)
        with Image.open(f) as other:
            return f"unsupported format {other.format}"
    except Exception:
        return "not an image (unrecognised content)"


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not make an otherwise fine photo unusable
        return img.copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(img), "L").convert("RGB")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        # Flatten on white: transparent areas of product shots / logos are meant as paper, not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, P, 1, CMYK, YCbCr: Pillow's conversions are right


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """Map high-bit-depth greyscale onto 0..255 by its nominal range (not by clipping)."""
    a = np.asarray(img).astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0  # 16-bit samples (Pillow opens some as 32-bit 'I')
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    # otherwise: an unusual range; stretch what is there
    return np.clip(np.round((a - lo) * (255.0 / max(hi - lo, 1e-12))), 0, 255).astype(np.uint8)


def expand_paths(patterns: list[str]) -> tuple[list[str], list[dict]]:
    """Files, folders (recursively, skipping hidden entries and non-images) and globs.

    Returns (paths, problems) where problems are {path, error} for patterns that matched nothing.
    """
    paths, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).rglob("*")
                           if p.is_file() and not is_hidden(p.relative_to(pattern)) and looks_like_image(p))
        elif os.path.exists(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            problems.append({"path": pattern, "error": "no such file, or no images there"})
        paths.extend(found)
    return paths, problems
