"""Tests for fruitnet.images: every awkward file either loads as 8-bit RGB or raises ImageError."""

from __future__ import annotations

import io
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from awkward import (  # noqa: E402
    MARKER,
    MARKER_SIZE,
    bomb_png_bytes,
    lying_jpeg_bytes,
    make_awkward_folder,
    tall_gif_bytes,
    wide_png_bytes,
)
from conftest import tree_state  # noqa: E402

from fruitnet.images import (  # noqa: E402
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageError,
    is_hidden,
    load_image,
    looks_like_image,
    sniff_format,
)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward")
    return root, make_awkward_folder(root)


def save(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


def assert_rgb(img: Image.Image, size) -> np.ndarray:
    assert img.mode == "RGB"
    assert img.size == tuple(size)
    a = np.asarray(img)
    assert a.dtype == np.uint8 and a.shape == (size[1], size[0], 3)
    return a


# --- the factory's folder -------------------------------------------------------------------


def test_constants():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    assert MAX_PIXELS == 64_000_000


def test_factory_structure(awkward):
    root, info = awkward
    assert info["classes"] == ["cherry", "strawberry", "tomato"]
    for rel, cls in info["usable"].items():
        assert (root / rel).is_file() and rel.split("/")[0] == cls
    assert set(info["sizes"]) == set(info["usable"])
    for cls in info["classes"]:
        assert sum(1 for c in info["usable"].values() if c == cls) >= 6 + 4
    for rel in [*info["unusable"], *info["ignored"]]:
        assert (root / rel).is_file()
    assert info["rotated"][0] in info["usable"]


def test_every_usable_file_loads_to_rgb(awkward):
    root, info = awkward
    for rel in info["usable"]:
        assert_rgb(load_image(root / rel), info["sizes"][rel])


def test_every_unusable_file_raises_with_path_and_reason(awkward):
    root, info = awkward
    for rel, reason in info["unusable"].items():
        path = root / rel
        with pytest.raises(ImageError) as exc:
            load_image(path)
        assert exc.value.path == str(path)
        assert reason in exc.value.reason
        assert str(exc.value) == f"{path}: {exc.value.reason}"


def test_scanner_rules_on_factory_folder(awkward):
    """The folder scanner's rule: try a file iff it is not hidden and looks like an image."""
    root, info = awkward
    for rel in [*info["usable"], *info["unusable"]]:
        assert not is_hidden(rel) and looks_like_image(root / rel), rel
    for rel in info["ignored"]:
        assert is_hidden(rel) or not looks_like_image(root / rel), rel


def test_factory_uses_base_images(tmp_path):
    base = {c: [Image.new("RGB", (50, 30), col)] * 2 for c, col in
            [("cherry", "red"), ("strawberry", "pink"), ("tomato", "orange")]}
    info = make_awkward_folder(tmp_path, base)
    plain = [r for r in info["usable"] if "awkward" not in r]
    assert len(plain) == 6
    for rel in plain:
        assert info["sizes"][rel] == (50, 30)
        assert_rgb(load_image(tmp_path / rel), (50, 30))


# --- orientation and colour conversion ------------------------------------------------------


def test_exif_rotated_comes_out_upright(awkward):
    root, info = awkward
    rel, (w, h) = info["rotated"]
    with Image.open(root / rel) as raw:
        assert raw.size == (h, w)  # stored sideways
    a = assert_rgb(load_image(root / rel), (w, h))
    m = MARKER_SIZE // 2
    assert np.abs(a[m, m].astype(int) - MARKER).max() < 40  # marker in the top-left corner
    for y, x in [(m, w - m), (h - m, m), (h - m, w - m)]:
        assert np.abs(a[y, x].astype(int) - MARKER).max() > 60  # and in no other corner


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientations(tmp_path, orientation):
    upright = Image.new("RGB", (60, 30), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 10, 10))
    stored = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = save(tmp_path / "o.jpg", upright.transpose(stored[orientation]), exif=exif, quality=95)
    a = assert_rgb(load_image(p), (60, 30))
    assert a[4, 4, 0] > 200 and a[4, 4, 2] < 60


def test_rgba_transparent_becomes_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent *black*
    img.putpixel((1, 1), (255, 0, 0, 255))
    img.putpixel((2, 2), (0, 0, 0, 128))
    a = assert_rgb(load_image(save(tmp_path / "t.png", img)), (4, 4))
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert tuple(a[1, 1]) == (255, 0, 0)
    assert 120 <= a[2, 2, 0] <= 135  # half-transparent black over white: mid grey


def test_palette_and_la_transparency_become_white(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0])
    pal.putpixel((1, 1), 1)
    a = assert_rgb(load_image(save(tmp_path / "p.png", pal, transparency=0)), (4, 4))
    assert tuple(a[0, 0]) == (255, 255, 255) and tuple(a[1, 1]) == (0, 255, 0)
    la = Image.new("LA", (4, 4), (0, 0))
    a = assert_rgb(load_image(save(tmp_path / "la.png", la)), (4, 4))
    assert tuple(a[0, 0]) == (255, 255, 255)
    gif = Image.new("P", (4, 4), 0)
    gif.putpalette([0, 0, 0, 255, 0, 0])
    a = assert_rgb(load_image(save(tmp_path / "t.gif", gif, transparency=0)), (4, 4))
    assert tuple(a[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_16bit_greyscale_scaled_not_clipped(tmp_path, mode, fmt):
    values = np.array([[65535, 32768], [0, 257]], np.uint16)
    if mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    else:
        img = Image.frombytes(mode, (2, 2), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    p = save(tmp_path / f"g.{fmt.lower()}", img, format=fmt)
    with Image.open(p) as raw:
        assert raw.mode == mode
    a = assert_rgb(load_image(p), (2, 2))
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert 127 <= a[0, 1, 0] <= 129
    assert a[1, 0, 0] == 0 and a[1, 1, 0] == 1


def test_float_greyscale(tmp_path):
    img = Image.fromarray(np.array([[1.0, 0.5], [0.0, 0.25]], np.float32))
    a = assert_rgb(load_image(save(tmp_path / "f.tif", img)), (2, 2))
    assert a[0, 0, 0] == 255 and 127 <= a[0, 1, 0] <= 128 and a[1, 0, 0] == 0


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_cyan_ink(tmp_path, fmt):
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    a = assert_rgb(load_image(save(tmp_path / f"c.{fmt.lower()}", img, format=fmt)), (16, 16))
    r, g, b = a[8, 8].astype(int)
    assert r < 60 and g > 200 and b > 200


@pytest.mark.parametrize("mode,colour,fmt,expected", [
    ("1", 1, "PNG", (255, 255, 255)),
    ("1", 0, "BMP", (0, 0, 0)),
    ("L", 100, "JPEG", (100, 100, 100)),
    ("YCbCr", (76, 85, 255), "TIFF", (254, 0, 0)),
    ("P", 0, "BMP", (0, 0, 0)),
])
def test_other_modes(tmp_path, mode, colour, fmt, expected):
    p = save(tmp_path / f"m.{fmt.lower()}", Image.new(mode, (8, 8), colour), format=fmt)
    a = assert_rgb(load_image(p), (8, 8))
    assert np.abs(a[4, 4].astype(int) - expected).max() <= 3


def test_gif_and_mpo_give_first_frame(tmp_path):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    for name, fmt in [("a.gif", "GIF"), ("a.mpo", "MPO")]:
        p = save(tmp_path / name, red, format=fmt, save_all=True, append_images=[blue])
        a = assert_rgb(load_image(p), (8, 8))
        assert a[4, 4, 0] > 200 and a[4, 4, 2] < 60, name
    assert sniff_format(tmp_path / "a.mpo") == "JPEG"


def test_judged_by_content_not_extension(tmp_path):
    img = Image.new("RGB", (10, 6), (1, 2, 3))
    for name, fmt in [("png.jpg", "PNG"), ("jpeg.png", "JPEG"), ("webp.bmp", "WEBP"), ("noext", "PNG")]:
        p = save(tmp_path / name, img, format=fmt)
        assert sniff_format(p) == fmt
        assert looks_like_image(p)
        assert_rgb(load_image(p), (10, 6))


# --- refusals -----------------------------------------------------------------------------------


def _raises(path, reason: str, **kw) -> ImageError:
    with pytest.raises(ImageError) as exc:
        load_image(path, **kw)
    assert exc.value.path == str(path) and str(path) in str(exc.value)
    assert reason in exc.value.reason, exc.value.reason
    return exc.value


def test_unreadable_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _raises(tmp_path / "empty.jpg", "empty file")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    _raises(tmp_path / "text.jpg", "not an image")
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(5000))
    _raises(tmp_path / "random.png", "not an image (unrecognised content)")
    _raises(tmp_path / "missing.jpg", "cannot read file")
    _raises(tmp_path, "not a regular file (folder)")  # a directory


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_images_are_refused(tmp_path, fmt):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format=fmt)
    data = buf.getvalue()
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    _raises(p, "truncated or corrupt")


def test_unsupported_format_is_named(tmp_path):
    p = save(tmp_path / "icon.jpg", Image.new("RGB", (16, 16)), format="ICO")
    _raises(p, "unsupported format ICO")
    p = save(tmp_path / "x.png", Image.new("RGB", (16, 16)), format="PPM")
    _raises(p, "unsupported format PPM")


def test_bomb_refused_from_header_without_decoding(tmp_path):
    resource = pytest.importorskip("resource")
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png_bytes((20000, 20000)))
    assert p.stat().st_size < 200_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape
        _raises(p, "decompression bomb")
    assert time.monotonic() - start < 2
    # 20000x20000 would need >= 400 MB decoded; peak RSS (KiB on Linux) must not jump like that
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000


def test_bomb_between_pillow_warning_and_error(tmp_path):
    # 10000x10000 only makes Pillow *warn*; our explicit check must still refuse it, silently.
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png_bytes((10000, 10000)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = _raises(p, "decompression bomb: 10000x10000 pixels exceeds the 64,000,000-pixel limit")
    assert "decompression bomb" in str(err)


def test_max_pixels_parameter(tmp_path):
    p = save(tmp_path / "a.png", Image.new("RGB", (100, 80)))
    _raises(p, "decompression bomb: 100x80 pixels exceeds the 7,999-pixel limit", max_pixels=7999)
    assert_rgb(load_image(p, max_pixels=8000), (100, 80))


# --- tiny files that would allocate gigabytes, special files (issue 11) ------------------------------


def test_extreme_aspect_ratios_are_refused_from_the_header(tmp_path):
    (tmp_path / "tall.gif").write_bytes(tall_gif_bytes())
    (tmp_path / "wide.png").write_bytes(wide_png_bytes())
    assert (tmp_path / "tall.gif").stat().st_size < 1000 and (tmp_path / "wide.png").stat().st_size < 1000
    _raises(tmp_path / "tall.gif", "extreme aspect ratio: 1x65535 pixels is more than 50:1")
    _raises(tmp_path / "wide.png", "extreme aspect ratio: 20000x10 pixels is more than 50:1")
    for size in [(500, 10), (10, 500), (1, 1)]:  # 50:1 exactly, and a single pixel, still load
        assert_rgb(load_image(save(tmp_path / "ok.png", Image.new("L", size))), size)


def test_eval_transform_bounds_what_its_resize_allocates():
    """Images that did not come through load_image (a library caller's own) are cropped to 50:1
    before the shorter-side resize, so it makes at most 50 x 256 x 256 pixels, not 256 x 512,000;
    within 50:1 the result is exactly the plain resize-and-centre-crop."""
    import torch
    from torchvision.transforms import v2 as T

    from fruitnet.backbones import get_backbone
    from fruitnet.transforms import eval_transform

    pre = get_backbone("efficientnet_lite0").preprocessing
    tf = eval_transform(pre)
    for size in [(1, 2000), (2000, 1), (3, 7), (640, 480)]:
        img, largest = Image.new("RGB", size, (200, 30, 30)), 0
        for step in tf.transforms:  # watch every intermediate image
            img = step(img)
            largest = max(largest, int(np.prod(img.shape[-2:])) if hasattr(img, "shape") else img.width * img.height)
        assert tuple(img.shape) == (3, 224, 224)
        assert largest <= 50 * 256 * 256, (size, largest)
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(224),
                           T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre["mean"], pre["std"])])
    stripes = Image.fromarray(np.tile((np.arange(400) % 7 * 30).astype(np.uint8)[None, :, None], (10, 1, 3)))  # 40:1
    assert torch.allclose(tf(stripes), reference(stripes), atol=1e-6)


def test_jpeg_with_far_too_few_bytes_for_its_size_is_truncated(tmp_path):
    p = tmp_path / "liar.jpg"
    p.write_bytes(lying_jpeg_bytes((7000, 7000)))
    start = time.monotonic()
    _raises(p, f"truncated image data: {p.stat().st_size:,} bytes cannot hold a 7000x7000 JPEG")
    assert time.monotonic() - start < 1  # refused from the header, not after decoding 49 MP of grey
    # the smallest honest JPEG of a size: flat grey, optimised Huffman tables (~256 pixels per byte)
    flat = save(tmp_path / "flat.jpg", Image.new("L", (2000, 2000), 128), optimize=True)
    assert 2000 * 2000 / flat.stat().st_size > 100
    assert_rgb(load_image(flat), (2000, 2000))


class _Deadline:
    """Fail instead of hanging: SIGALRM interrupts a blocking open() or read() in the main thread."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def fail(*_):
            raise TimeoutError(f"still blocked after {self.seconds}s")

        self.old = signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_special_files_are_refused_without_reading_them(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would block until a writer comes
    (tmp_path / "noise.png").symlink_to("/dev/urandom")  # reading it would never end
    for name, kind in [("pipe.jpg", "named pipe"), ("noise.png", "character device")]:
        with _Deadline(10):
            start = time.monotonic()
            _raises(tmp_path / name, f"not a regular file ({kind})")
            assert sniff_format(tmp_path / name) is None and not looks_like_image(tmp_path / "pipe")
            assert time.monotonic() - start < 2
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    _raises(tmp_path / "gone.jpg", "cannot read file (No such file or directory)")


def test_image_error_pickles():
    err = pickle.loads(pickle.dumps(ImageError("/x/y.jpg", "empty file")))
    assert (err.path, err.reason, str(err)) == ("/x/y.jpg", "empty file", "/x/y.jpg: empty file")
    assert isinstance(err, Exception)


# --- names and sniffing ---------------------------------------------------------------------------


def test_is_hidden():
    for p in [".DS_Store", "cherry/.DS_Store", ".ipynb_checkpoints/a.jpg", "tomato/.ipynb_checkpoints/a.jpg",
              Path(".git") / "x.png", "._photo.jpg"]:
        assert is_hidden(p), p
    for p in ["cherry/a.jpg", "a.jpg", "./cherry/a.jpg", "../data/cherry/a.jpg", Path("cherry") / "a.b.jpg"]:
        assert not is_hidden(p), p


def test_sniff_format(awkward, tmp_path):
    root, _ = awkward
    expected = {
        "strawberry/awkward_mislabelled.JPG": "PNG",
        "strawberry/awkward_odd_case.Jpeg": "JPEG",
        "tomato/awkward_photo.webp": "WEBP",
        "tomato/awkward_scan.TIF": "TIFF",
        "tomato/awkward_bitmap.bmp": "BMP",
        "tomato/awkward_anim.gif": "GIF",
        "cherry/awkward_cmyk.jpg": "JPEG",
        "cherry/huge_bomb.png": "PNG",
        "cherry/empty.jpg": None,
        "tomato/not_really.png": None,
        "cherry/notes.txt": None,
        ".DS_Store": None,
    }
    for rel, fmt in expected.items():
        assert sniff_format(root / rel) == fmt, rel
    assert sniff_format(tmp_path / "does-not-exist") is None
    assert sniff_format(tmp_path) is None  # a directory


def test_looks_like_image(tmp_path):
    for name in ["a.JPG", "b.jpeg", "c.Png", "d.TIFF", "e.webp"]:
        (tmp_path / name).write_bytes(b"")  # extension alone is enough to be *tried*
        assert looks_like_image(tmp_path / name), name
    (tmp_path / "notes.txt").write_text("hi")
    assert not looks_like_image(tmp_path / "notes.txt")
    save(tmp_path / "photo.dat", Image.new("RGB", (4, 4)), format="JPEG")
    assert looks_like_image(tmp_path / "photo.dat")


# --- hygiene: read-only, no leaked handles ------------------------------------------------------


def test_load_never_writes_and_closes_files(awkward):
    root, info = awkward
    before = tree_state(root)
    fd_dir = Path("/proc/self/fd")
    fds_before = len(list(fd_dir.iterdir())) if fd_dir.is_dir() else None
    for rel in [*info["usable"], *info["unusable"], *info["ignored"]]:
        for draft in (None, 32):
            try:
                load_image(root / rel, draft_size=draft)
            except ImageError:
                pass
        sniff_format(root / rel)
        looks_like_image(root / rel)
    assert tree_state(root) == before
    if fds_before is not None:
        assert len(list(fd_dir.iterdir())) == fds_before


# --- draft_size -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg_bytes():
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (96, 128, 3), np.uint8)  # upscale noise: realistic JPEG size
    img = Image.fromarray(small).resize((1024, 768), Image.Resampling.BILINEAR)
    img.paste((255, 0, 0), (0, 0, 96, 96))  # marker top-left
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    img.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_draft_size_downsamples_but_keeps_min_side(tmp_path, big_jpeg_bytes):
    p = tmp_path / "big.jpg"
    p.write_bytes(big_jpeg_bytes)
    full = assert_rgb(load_image(p), (1024, 768))
    assert full[20, 20, 0] > 200 and full[20, 20, 1] < 60
    for draft in (200, 300, 384, 768):
        img = load_image(p, draft_size=draft)
        assert img.mode == "RGB"
        assert min(img.size) >= draft
        assert img.width * 3 == img.height * 4  # still upright (landscape), aspect kept
        a = np.asarray(img)
        assert a[4, 4, 0] > 200 and a[4, 4, 1] < 60  # marker still top-left after EXIF rotation
    assert load_image(p, draft_size=200).size == (512, 384)


def test_draft_size_still_detects_truncation(tmp_path, big_jpeg_bytes):
    p = tmp_path / "cut.jpg"
    p.write_bytes(big_jpeg_bytes[: len(big_jpeg_bytes) // 2])
    _raises(p, "truncated", draft_size=200)
    _raises(p, "truncated", draft_size=64)


def test_draft_size_ignored_for_non_jpeg(tmp_path):
    p = save(tmp_path / "a.png", Image.new("RGB", (400, 300)))
    assert load_image(p, draft_size=100).size == (400, 300)
