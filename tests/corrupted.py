"""Seeded corrupted copies of a class-folder tree, for measuring the data check.

Usage::

    from corrupted import build_corrupted          # tests/ is on sys.path under pytest
    truth = build_corrupted(webfruit, tmp_path / "bad", outlier_source=grocery_other)

The copy is made of symlinks to the source photos (nothing is ever written into the source),
plus new JPEG files for the near-copies.  What was done is returned (paths relative to the copy):
- "mislabelled": photos placed in a wrong class folder;
- "near_copies": [{"path", "original", "kind", "cross_class"}]: resized to 60-90%, re-encoded at
  JPEG quality 50-80, or cropped by 2-5% per side; half into the original's class, half into
  another class;
- "outliers": photos from outlier_source placed into the class folders.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from PIL import Image

from fruitnet.images import load_image

NEAR_COPY_KINDS = ("resize", "quality", "crop")


def _near_copy(src: Path, dest: Path, kind: str, rng: random.Random) -> None:
    img = load_image(src)
    w, h = img.size
    quality = 90
    if kind == "resize":
        s = rng.uniform(0.6, 0.9)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    elif kind == "quality":
        quality = rng.randint(50, 80)
    else:
        left, top, right, bottom = (rng.uniform(0.02, 0.05) for _ in range(4))
        img = img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))
    img.save(dest, "JPEG", quality=quality)


def build_corrupted(source: Path, out: Path, *, seed: int = 0, per_class: int | None = None,
                    n_mislabelled: int = 30, n_near: int = 30, n_outliers: int = 20,
                    outlier_source: Path | None = None) -> dict:
    """Build the corrupted copy at `out` (must not exist); returns what was done (see module doc)."""
    rng = random.Random(seed)
    source, out = Path(source).resolve(), Path(out)
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    photos = {c: sorted(p for p in (source / c).iterdir() if p.is_file() and not p.name.startswith("."))
              for c in classes}
    if per_class is not None:
        photos = {c: sorted(rng.sample(ps, per_class)) for c, ps in photos.items()}
    digests: dict[str, list[Path]] = {}
    for ps in photos.values():
        for p in ps:
            digests.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), []).append(p)
    unique = [p for c in classes for p in photos[c] if len(digests[hashlib.sha256(p.read_bytes()).hexdigest()]) == 1]
    chosen = rng.sample(unique, n_mislabelled + n_near)
    mislabel, near = chosen[:n_mislabelled], chosen[n_mislabelled:]
    label = {p: p.parent.name for ps in photos.values() for p in ps}
    for c in classes:
        (out / c).mkdir(parents=True)
    truth: dict = {"mislabelled": [], "near_copies": [], "outliers": []}
    for p in (p for c in classes for p in photos[c]):
        cls = label[p]
        name = p.name
        if p in mislabel:
            cls = rng.choice([c for c in classes if c != label[p]])
            name = f"moved_{p.name}"  # the wrong folder may hold a photo of the same name
            truth["mislabelled"].append(f"{cls}/{name}")
        os.symlink(p, out / cls / name)
    for i, p in enumerate(near):
        kind = NEAR_COPY_KINDS[i % len(NEAR_COPY_KINDS)]
        cross = i % 2 == 1
        cls = rng.choice([c for c in classes if c != label[p]]) if cross else label[p]
        rel = f"{cls}/nearcopy_{i:03d}.jpg"
        _near_copy(p, out / rel, kind, rng)
        truth["near_copies"].append({"path": rel, "original": f"{label[p]}/{p.name}", "kind": kind,
                                     "cross_class": cross})
    if n_outliers:
        others = sorted(p for p in Path(outlier_source).iterdir() if p.is_file() and not p.name.startswith("."))
        for p in rng.sample(others, n_outliers):
            rel = f"{rng.choice(classes)}/outlier_{p.name}"
            os.symlink(p.resolve(), out / rel)
            truth["outliers"].append(rel)
    return truth
