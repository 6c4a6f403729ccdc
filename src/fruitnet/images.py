"""The one place that opens image files: safely, by content, always to 8-bit RGB.

Everything that reads a photo (training, evaluation, prediction, serving) goes
through :func:`load_image`, so one awkward file never crashes a run: it either
comes back as a plain RGB image or raises :class:`ImageError` saying why not.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import stat
import warnings
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fruitnet.errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_PIXELS = 64_000_000
# Longer side over shorter side.  Beyond this a shorter-side resize multiplies the longer side
# (a 1x65535 GIF would become 256 x 16.8M pixels), so such files are refused, and
# transforms.py bounds its resize by the same ratio.
MAX_ASPECT = 50
# A Huffman-coded JPEG spends at least ~1 bit per 8x8 block (a flat grey 7000x7000 JPEG is
# 190 kB: 256 pixels per byte).  libjpeg pads missing data with grey instead of failing, so a
# file claiming 8x more pixels per byte than that is truncated (a 633-byte "7000x7000" JPEG).
MAX_JPEG_PIXELS_PER_BYTE = 2048
# Memory, not only pixels: a small file can declare a float32 or 16-bit image (a 359 kB deflate
# TIFF of 7999x7999 floats is 256 MB decoded).  Bytes per pixel that load_image holds at its peak,
# by the mode the header announces: the decoded pixels (Pillow keeps RGB, RGBA, CMYK in 4 bytes),
# the upright copy, the 8-bit image of a high-bit-depth one (converted in strips, never as a
# full-size float array), the white background under a transparent one, and the RGB result.
# Measured on 4000x4000 images (tests/test_decode_memory.py): F 6.5, I;16 5.2, RGB 8.1, RGBA 12.1.
_PEAK_BYTES = {"1": 6, "L": 6, "P": 6, "I;16": 6, "I;16B": 6, "I;16L": 6, "I;16N": 6, "I": 7, "F": 7}
_PEAK_BYTES_OTHER = 9  # RGB, CMYK, YCbCr
_PEAK_BYTES_ALPHA = 16  # RGBA, LA, PA and transparent palettes, flattened on white
MAX_DECODE_BYTES = MAX_PIXELS * _PEAK_BYTES_OTHER  # the largest RGB photo's: 576 MB
_STRIP = 1 << 20  # pixels of a high-bit-depth image converted at once (4 MB of float32)

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


def special_file_kind(path) -> str | None:
    """'named pipe', 'character device', ... if ``path`` (followed through symlinks) exists and is
    not a regular file; None for a regular file or a missing one."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return _kind(mode)


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def open_regular(path):
    """Open ``path`` for reading in binary, only if it is a regular file (else ImageError).

    Opened non-blocking and checked on the open descriptor, so a named pipe cannot block the
    open and a symlink to /dev/urandom is refused before a byte is read, even if the path is
    swapped between a check and the open.  OSError if it cannot be opened at all.
    """
    kind = special_file_kind(path)  # sockets cannot be opened at all: name them first
    if kind:
        raise ImageError(path, f"not a regular file ({kind})")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    kind = _kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise ImageError(path, f"not a regular file ({kind})")
    return os.fdopen(fd, "rb")


def sniff_format(path) -> str | None:
    """The accepted format ('JPEG', 'PNG', ...) that the file's first bytes announce, else None."""
    try:
        with open_regular(path) as f:
            head = f.read(16)
    except (OSError, ImageError):
        return None
    return format_of(head)


def format_of(head: bytes) -> str | None:
    """The accepted format that these first bytes of a file announce, else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def looks_like_image(path) -> bool:
    """Worth trying to load: an image extension (any case) or image content."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS or sniff_format(path) is not None


def decode_bytes(img: Image.Image) -> int:
    """The memory load_image needs for an opened (not yet decoded) image, from its header."""
    transparent = "A" in img.mode or "a" in img.mode or "transparency" in img.info
    per_pixel = _PEAK_BYTES_ALPHA if transparent else _PEAK_BYTES.get(img.mode, _PEAK_BYTES_OTHER)
    return img.width * img.height * per_pixel


def decode_cost(source, draft_size: int | None = None) -> int:
    """decode_bytes of a file (a path or a binary file object) as load_image would decode it, from
    its header alone; 0 when the header cannot be read (load_image then says why, cheaply)."""
    try:
        with warnings.catch_warnings(), (open_regular(source) if isinstance(source, (str, os.PathLike))
                                         else contextlib.nullcontext(source)) as f:
            warnings.simplefilter("ignore")
            with Image.open(f, formats=_PIL_FORMATS) as img:
                _draft(img, draft_size)
                return decode_bytes(img)
    except Exception:  # anything wrong with the file is load_image's to report
        return 0


def _draft(img: Image.Image, draft_size: int | None) -> None:
    if draft_size and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (draft_size, draft_size))


def load_image(path, max_pixels: int = MAX_PIXELS, draft_size: int | None = None,
               max_bytes: int = MAX_DECODE_BYTES) -> Image.Image:
    """Open, fully decode, EXIF-orient and convert ``path`` to an 8-bit RGB image.

    Raises ImageError (never anything else for bad data) when the file is not a regular file,
    empty, not an image, an unsupported format, truncated/corrupt, larger than ``max_pixels``,
    more than MAX_ASPECT times longer than wide (or the reverse), a JPEG with far too few bytes
    for its declared size, or would take more than ``max_bytes`` to decode (decode_bytes); all but
    the truncation inside the pixel data are decided from the header, before any pixel is decoded.
    ``draft_size`` lets the JPEG decoder downscale by a power of two while
    keeping both sides >= draft_size: much faster for big photos.
    """
    try:
        # Warnings (bomb, odd EXIF, ...) become errors or are dropped: a data loader must not spam.
        with warnings.catch_warnings(), open_regular(path) as f:
            warnings.simplefilter("ignore")
            nbytes = os.fstat(f.fileno()).st_size
            if nbytes == 0:
                raise ImageError(path, "empty file")
            try:
                img = Image.open(f, formats=_PIL_FORMATS)
            except UnidentifiedImageError:
                raise ImageError(path, _why_unidentified(path, f)) from None
            with img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(path, _bomb_reason(f"{w}x{h}", max_pixels))
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise ImageError(path, f"extreme aspect ratio: {w}x{h} pixels is more than {MAX_ASPECT}:1")
                if img.format in ("JPEG", "MPO") and w * h > MAX_JPEG_PIXELS_PER_BYTE * nbytes:
                    raise ImageError(path, f"truncated image data: {nbytes:,} bytes cannot hold a {w}x{h} JPEG")
                _draft(img, draft_size)
                if (cost := decode_bytes(img)) > max_bytes:
                    raise ImageError(path, f"decoding its {img.width}x{img.height} {img.mode} pixels would take "
                                           f"{cost / 1e6:,.0f} MB, over the {max_bytes / 1e6:,.0f} MB limit")
                img.load()  # decode everything now: truncated data raises here, not later
                # a new image, independent of the file we are about to close; 8-bit before it is copied
                img = _upright(_to_8bit(img))
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(path, "not enough memory to decode it") from None
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
    except MemoryError:
        raise ImageError(path, "not enough memory to convert it to RGB") from None


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
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        # Flatten on white: transparent areas of product shots / logos are meant as paper, not black.
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, P, 1, CMYK, YCbCr: Pillow's conversions are right


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth greyscale (16-bit, 32-bit integer, float) as an 8-bit 'L' image; others as they are."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(img), "L")
    return img


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """Map high-bit-depth greyscale onto 0..255 by its nominal range (not by clipping), a strip of
    rows at a time: a float copy of a whole 64-megapixel image would be 256 MB, and each
    arithmetic step another."""
    lo, hi = np.inf, -np.inf  # Pillow's getextrema refuses some of these modes (I;16B)
    for _, strip in _strips(img):
        lo, hi = min(lo, float(strip.min())), max(hi, float(strip.max()))
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0  # 16-bit samples (Pillow opens some as 32-bit 'I')
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    # otherwise: an unusual range; stretch what is there
    scale = 255.0 / max(hi - lo, 1e-12)
    out = np.empty((img.height, img.width), dtype=np.uint8)
    for top, strip in _strips(img):
        out[top:top + len(strip)] = np.clip(np.round((strip - lo) * scale), 0, 255)
    return out


def _strips(img: Image.Image):
    """(first row, float32 rows) of the image, _STRIP pixels at a time."""
    rows = max(1, _STRIP // max(1, img.width))
    for top in range(0, img.height, rows):
        yield top, np.asarray(img.crop((0, top, img.width, min(top + rows, img.height))), dtype=np.float32)


def expand_paths(patterns: list[str], skip_folder=None) -> tuple[list[str], list[dict]]:
    """Files, folders (recursively, skipping hidden entries, non-images and the sub-folders for
    which skip_folder(path) is true) and globs.

    Returns (paths, problems) where problems are {path, error} for patterns that matched nothing.
    """
    paths, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(_images_under(pattern, skip_folder))
        elif os.path.exists(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            problems.append({"path": pattern, "error": "no such file, or no images there"})
        paths.extend(found)
    return paths, problems


def _images_under(folder: str, skip_folder=None) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_hidden(d) and not (skip_folder and skip_folder(Path(dirpath) / d))]
        paths = (Path(dirpath) / name for name in filenames if not is_hidden(name))
        found += [str(p) for p in paths if p.is_file() and looks_like_image(p)]
    return found


def thumbnail_jpeg(path, side: int, quality: int = 80) -> bytes | None:
    """A JPEG of the photo at most `side` pixels on its longer side (for pages and reports), or
    None when the file cannot be used."""
    import io

    try:
        image = load_image(path, draft_size=side)
    except ImageError:
        return None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
