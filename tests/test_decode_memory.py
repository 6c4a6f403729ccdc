"""Issue 19 item 8: small files that decode into gigabytes.

A 359 kB deflate TIFF of 7999x7999 floats passed the 64-megapixel limit and took ~1 GB in
load_image; eight of them at once took the server from 0.83 to 3.28 GB.  Now decoding memory is
estimated from the header by mode (images.decode_bytes), high-bit-depth images are converted in
strips, and the server decodes within a shared budget of bytes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from quick_model import CLASSES, make_quick_model, serving

from fruitnet.errors import ImageError
from fruitnet.images import MAX_DECODE_BYTES, decode_cost, load_image

# ru_maxrss would carry the peak of the process that started this one (across fork and exec):
# VmHWM, reset through clear_refs, is this process's own
PEAK = """
import json, re, sys
from fruitnet.images import load_image
def kb(name):
    return int(re.search(name + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1])
open("/proc/self/clear_refs", "w").write("5")
before = kb("VmRSS")
load_image(sys.argv[1])
print(json.dumps((kb("VmHWM") - before) * 1024))
"""


def peak_bytes(path: Path) -> int:
    """What load_image(path) adds to the peak resident memory of a process that has just started."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """4000x4000 images (16 megapixels) in the modes that cost most, each file under 100 kB."""
    tmp = tmp_path_factory.mktemp("decode")
    made = {"F": (Image.new("F", (4000, 4000), 0.5), "f.tif", {"compression": "tiff_adobe_deflate"}),
            "I;16": (Image.fromarray(np.full((4000, 4000), 40000, np.uint16)), "g.png", {}),
            "RGB": (Image.new("RGB", (4000, 4000), (200, 10, 10)), "c.png", {}),
            "RGBA": (Image.new("RGBA", (4000, 4000), (200, 10, 10, 128)), "a.png", {})}
    for image, name, options in made.values():
        image.save(tmp / name, **options)
    return {mode: tmp / name for mode, (_, name, _) in made.items()}


@pytest.mark.parametrize("mode", ["F", "I;16", "RGB", "RGBA"])
def test_the_header_estimate_bounds_what_decoding_takes(files, mode):
    peak, estimate = peak_bytes(files[mode]), decode_cost(files[mode])
    assert peak <= estimate, f"{mode}: {peak / 1e6:.0f} MB taken, {estimate / 1e6:.0f} MB estimated"
    if mode in ("F", "I;16"):  # once 15.6 bytes per pixel: float32 copies of the whole image
        assert peak / 16e6 < 7, f"{mode}: {peak / 16e6:.1f} bytes per pixel"


def _png_header(width: int, height: int, colour_type: int, bit_depth: int = 8) -> bytes:
    """A PNG whose header declares the size (its pixel data is empty: only the header is read)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_file_whose_decoding_costs_more_than_the_limit_is_refused_from_its_header(tmp_path):
    rgba = tmp_path / "rgba.png"  # 42 megapixels, under the pixel limit; RGBA, flattened on white: 676 MB
    rgba.write_bytes(_png_header(6500, 6500, colour_type=6))
    assert decode_cost(rgba) > MAX_DECODE_BYTES
    with pytest.raises(ImageError, match=r"6500x6500 RGBA pixels would take 676 MB, over the 576 MB limit"):
        load_image(rgba)
    grey = tmp_path / "grey.png"
    grey.write_bytes(_png_header(6500, 6500, colour_type=0))  # the same size in 8-bit grey: 253 MB, allowed
    assert decode_cost(grey) < MAX_DECODE_BYTES


def test_concurrent_float_tiffs_are_decoded_within_the_servers_memory_budget(tmp_path):
    model = make_quick_model(tmp_path / "model.safetensors")
    tiff = tmp_path / "float.tif"
    Image.new("F", (7999, 7999), 0.5).save(tiff, compression="tiff_adobe_deflate")
    upload = ("float.tif", tiff.read_bytes(), "image/tiff")
    assert len(upload[1]) < 1_000_000

    with serving(model) as served:
        def one(_):
            with httpx.Client(base_url=served.url, timeout=300) as c:
                return c.post("/predict", files=[("files", upload)])

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(one, range(8)))
        for r in responses:
            assert r.status_code == 200 and r.json()[0]["label"] in CLASSES, r.text
        assert served.peak_rss_mb() < 1536, f"the service peaked at {served.peak_rss_mb():.0f} MB (was 3,280)"
