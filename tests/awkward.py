"""A factory of awkward image folders, shared by the image tests and the end-to-end tests.

Usage::

    from awkward import make_awkward_folder      # tests/ is on sys.path under pytest
    info = make_awkward_folder(tmp_path / "data")
"""

from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

CLASSES = ["cherry", "strawberry", "tomato"]
# A distinct disc colour per class, so a tiny model can actually tell them apart.
CLASS_COLOURS = {"cherry": (120, 0, 40), "strawberry": (240, 60, 110), "tomato": (255, 140, 20)}
N_SYNTHETIC = 8
SIZE = 64
ROTATED_UPRIGHT_SIZE = (80, 40)
MARKER = (255, 0, 0)  # pure red square in the top-left corner of the upright rotated image
MARKER_SIZE = 12
BOMB_SIZE = (20000, 20000)


def synthetic_image(cls: str, seed: int, size: int = SIZE) -> Image.Image:
    """A noisy light background with a disc in the class colour at a seed-dependent place."""
    rng = np.random.default_rng([CLASSES.index(cls), seed])
    img = rng.normal(200, 12, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.2, 0.3) * size
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[disc] = np.array(CLASS_COLOURS[cls]) + rng.normal(0, 6, (disc.sum(), 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def bomb_png_bytes(size=BOMB_SIZE) -> bytes:
    """A valid 1-bit greyscale PNG whose header claims ``size``: a few KB, built in well under 1 s."""
    w, h = size

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = bytes(1 + (w + 7) // 8) * 1000  # filter byte + packed bits, 1000 rows at a time
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(rows) for _ in range(h // 1000))
    idat += comp.compress(bytes(1 + (w + 7) // 8) * (h % 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_awkward_folder(root: pathlib.Path, base_images: dict[str, list[Image.Image]] | None = None) -> dict:
    """Create ``root/<class>/<file>`` for cherry, strawberry, tomato with ordinary and awkward files.

    Each class gets ordinary RGB JPEGs (``base_images[cls]`` if given, else
    ``N_SYNTHETIC`` synthetic 64x64 disc images), plus awkward files made from
    the class's first image, spread across the classes. Returns (all paths
    relative to ``root``, posix strings)::

        {
          "classes":  ["cherry", "strawberry", "tomato"],
          "usable":   {path: class},        # must load (ordinary + awkward-but-fine files)
          "sizes":    {path: (w, h)},       # upright size each usable file must load to
          "unusable": {path: reason},       # must be skipped; reason is a substring of the ImageError reason
          "ignored":  [path, ...],          # hidden files/folders and non-image files: not even tried
          "rotated":  (path, (w, h)),       # the EXIF orientation-6 JPEG and its upright size;
                                            # upright it has a MARKER-coloured square top-left
        }
    """
    root = pathlib.Path(root)
    base_images = base_images or {}
    usable: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    unusable: dict[str, str] = {}
    ignored: list[str] = []
    first: dict[str, Image.Image] = {}

    def path(rel: str) -> pathlib.Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def good(rel: str, img: Image.Image, size=None, **save_kw) -> None:
        img.save(path(rel), **save_kw)
        usable[rel] = rel.split("/")[0]
        sizes[rel] = size or img.size

    for cls in CLASSES:
        images = base_images.get(cls) or [synthetic_image(cls, i) for i in range(N_SYNTHETIC)]
        first[cls] = images[0].convert("RGB")
        for i, img in enumerate(images):
            good(f"{cls}/{cls}_{i:03d}.jpg", img.convert("RGB"), format="JPEG", quality=90)

    # --- usable but awkward -------------------------------------------------------------
    c, s, t = first["cherry"], first["strawberry"], first["tomato"]
    good("cherry/awkward_cmyk.jpg", c.convert("CMYK"), format="JPEG", quality=90)
    grey16 = (np.asarray(c.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    good("cherry/awkward_grey16.png", Image.fromarray(grey16), format="PNG")  # mode I;16
    rgba = c.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[: rgba.height // 4] = 0  # top quarter fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    good("cherry/awkward_rgba.png", rgba, format="PNG")
    upright = c.resize(ROTATED_UPRIGHT_SIZE)
    upright.paste(MARKER, (0, 0, MARKER_SIZE, MARKER_SIZE))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored rotated 90 deg counter-clockwise, display rotates it back
    rotated_rel = "cherry/awkward_exif_rotated.jpg"
    good(rotated_rel, upright.transpose(Image.Transpose.ROTATE_90), size=upright.size,
         format="JPEG", quality=95, exif=exif)

    pal = s.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.putpixel((0, 0), 63)  # make sure the transparent index is used
    good("strawberry/awkward_palette.png", pal, format="PNG", transparency=63)
    good("strawberry/awkward_grey.jpg", s.convert("L"), format="JPEG", quality=90)
    good("strawberry/awkward_mislabelled.JPG", s, format="PNG")  # PNG content, JPEG name
    good("strawberry/awkward_odd_case.Jpeg", s, format="JPEG", quality=90)

    good("tomato/awkward_bitmap.bmp", t, format="BMP")
    gif = t.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    good("tomato/awkward_anim.gif", gif, format="GIF", save_all=True,
         append_images=[gif.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], duration=100, loop=0)
    good("tomato/awkward_photo.webp", t, format="WEBP", quality=90)
    good("tomato/awkward_scan.TIF", t, format="TIFF")

    # --- unusable: must be skipped with a reason -----------------------------------------
    path("cherry/empty.jpg").write_bytes(b"")
    unusable["cherry/empty.jpg"] = "empty file"
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    tmp = path("strawberry/truncated.jpg")
    noisy.save(tmp, format="JPEG", quality=95)
    data = tmp.read_bytes()
    tmp.write_bytes(data[: len(data) // 2])
    unusable["strawberry/truncated.jpg"] = "truncated"
    path("tomato/not_really.png").write_text("This is a text file, not a picture.\n" * 5)
    unusable["tomato/not_really.png"] = "not an image"
    path("cherry/huge_bomb.png").write_bytes(bomb_png_bytes())
    unusable["cherry/huge_bomb.png"] = "decompression bomb"

    # --- ignored: hidden entries and non-image files ------------------------------------
    ds_store = b"\x00\x00\x00\x01Bud1" + bytes(64)
    for rel in (".DS_Store", "strawberry/.DS_Store"):
        path(rel).write_bytes(ds_store)
        ignored.append(rel)
    for rel, img in ((".ipynb_checkpoints/cherry_000-checkpoint.jpg", c),
                     ("tomato/.ipynb_checkpoints/tomato_000-checkpoint.jpg", t)):
        img.save(path(rel), format="JPEG")  # a real JPEG: only its hidden folder says to skip it
        ignored.append(rel)
    path("cherry/notes.txt").write_text("picked on Tuesday\n")
    path("tomato/README.md").write_text("# Tomatoes\n")
    ignored += ["cherry/notes.txt", "tomato/README.md"]

    return {
        "classes": list(CLASSES),
        "usable": usable,
        "sizes": sizes,
        "unusable": unusable,
        "ignored": ignored,
        "rotated": (rotated_rel, upright.size),
    }


# --- hostile files: tiny on disk, huge once resized or decoded (issue 11) -------------------

def tall_gif_bytes() -> bytes:
    """457 bytes: a 1x65535 palette GIF. A shorter-side resize to 256 would make it 256 x 16.8M pixels."""
    buf = io.BytesIO()
    Image.new("P", (1, 65535)).save(buf, format="GIF")
    return buf.getvalue()


def wide_png_bytes() -> bytes:
    """About 100 bytes: a 20000x10 1-bit PNG (2000:1)."""
    buf = io.BytesIO()
    Image.new("1", (20000, 10)).save(buf, format="PNG")
    return buf.getvalue()


def lying_jpeg_bytes(size=(7000, 7000)) -> bytes:
    """About 630 bytes: a 16x16 JPEG whose frame header claims ``size``; libjpeg pads the missing
    data with grey instead of failing, so it would decode to a 49-megapixel grey image."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 40)).save(buf, format="JPEG")
    data = buf.getvalue()
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):  # walk the markers to the start of frame
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    w, h = size
    return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]
