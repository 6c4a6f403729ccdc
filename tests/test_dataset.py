import csv
import hashlib
from pathlib import Path

import pytest
import torch
from awkward import make_awkward_folder

from fruitnet.errors import DataError
from fruitnet.dataset import read_split, scan, split, write_split


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in root.rglob("*") if p.is_file()}


def test_scan_awkward_folder_names_every_unusable_file_and_writes_nothing(tmp_path):
    root = tmp_path / "data"
    info = make_awkward_folder(root)
    before = snapshot(root)
    catalog = scan(root, progress=False)
    assert snapshot(root) == before
    assert catalog.classes == ["cherry", "strawberry", "tomato"]  # hidden folders never become classes
    usable = {str(Path(it.path).relative_to(root).as_posix()): it.label for it in catalog.usable}
    assert usable == info["usable"]
    skipped = {Path(s["path"]).relative_to(root).as_posix(): s["reason"] for s in catalog.skipped}
    assert set(skipped) == set(info["unusable"])
    for path, reason in info["unusable"].items():
        assert reason in skipped[path]
    ignored = {Path(i["path"]).relative_to(root).as_posix() for i in catalog.ignored}
    assert {"cherry/notes.txt", "tomato/README.md"} <= ignored
    assert not any(".ipynb_checkpoints" in p or ".DS_Store" in p for p in usable)


def test_report_counts_and_exact_duplicates(tmp_path):
    root = tmp_path / "d"
    make_awkward_folder(root)
    before = scan(root, progress=False).report()
    counts = before["counts"]
    first = root / "cherry" / "cherry_000.jpg"
    (root / "cherry" / "copy of first.jpg").write_bytes(first.read_bytes())
    report = scan(root, progress=False).report()
    assert report["counts"] == {**counts, "cherry": counts["cherry"] + 1}
    groups = [sorted(Path(p).name for p in g) for g in report["duplicates"]]
    assert sorted([first.name, "copy of first.jpg"]) in groups
    assert len(groups) == len(before["duplicates"]) + 1


@pytest.mark.parametrize("layout, message", [
    ({}, "not found"),
    ({"only": 3}, "need at least two"),
    ({"a": 3, "b": 0}, "no usable image"),
])
def test_unusable_data_raises_clear_error(tmp_path, layout, message):
    from awkward import synthetic_image

    root = tmp_path / "data"
    if layout:
        for cls, n in layout.items():
            (root / cls).mkdir(parents=True)
            for i in range(n):
                synthetic_image("cherry", i).save(root / cls / f"{i}.jpg")
    with pytest.raises(DataError, match=message):
        scan(root, progress=False)


def test_split_is_stratified_seeded_and_keeps_duplicates_together(webfruit):
    catalog = scan(webfruit, progress=False)
    train, val = split(catalog, 0.25, seed=0)
    assert len(train) + len(val) == len(catalog.usable)
    for cls, n in catalog.counts().items():
        n_val = sum(it.label == cls for it in val)
        assert abs(n_val - n * 0.25) <= 3  # duplicate groups move whole
    assert not {it.sha256 for it in train} & {it.sha256 for it in val}  # no leak of identical bytes
    again_train, again_val = split(catalog, 0.25, seed=0)
    assert [it.path for it in again_val] == [it.path for it in val]
    other_train, other_val = split(catalog, 0.25, seed=1)
    assert [it.path for it in other_val] != [it.path for it in val]


def test_split_csv_round_trip_resolves_from_any_working_directory(tmp_path, demo_data, monkeypatch):
    monkeypatch.chdir(demo_data.parent)
    catalog = scan("demo_data/train", progress=False)  # relative paths, as a user types them
    train, val = split(catalog, 0.25, seed=0)
    write_split(tmp_path / "split.csv", train, val)
    rows = list(csv.DictReader(open(tmp_path / "split.csv")))
    assert set(rows[0]) == {"path", "class", "split", "sha256"}
    monkeypatch.chdir(tmp_path)
    t2, v2 = read_split(tmp_path / "split.csv")
    assert all(Path(i.path).is_file() for i in t2 + v2)
    assert [(Path(i.path), i.label, i.sha256) for i in t2] == [(demo_data.parent / i.path, i.label, i.sha256)
                                                               for i in train]
    assert [(Path(i.path), i.label) for i in v2] == [(demo_data.parent / i.path, i.label) for i in val]


def test_photos_yield_normalised_tensors_with_or_without_the_cache(demo_data):
    from fruitnet.backbones import get_backbone
    from fruitnet.pipeline import Photos
    from fruitnet.transforms import TensorTransform

    catalog = scan(demo_data / "test", progress=False)
    pre = get_backbone("efficientnet_lite0").preprocessing
    cached, plain = (Photos(catalog.usable, catalog.classes, pre, TensorTransform(pre), cache=c, progress=False)
                     for c in (True, False))
    (x, y), (x2, y2) = cached[0], plain[0]
    assert x.shape == (3, 224, 224) and -1.01 <= x.min() and x.max() <= 1.01
    assert torch.equal(x, x2) and y == y2
    assert y == 0


def test_near_duplicate_aware_split_keeps_every_copy_with_its_original(tmp_path, webfruit):
    """Resized, re-encoded and cropped copies never land on the other side of the split."""
    from corrupted import build_corrupted

    data = tmp_path / "photos"
    truth = build_corrupted(webfruit, data, seed=2, per_class=30, n_mislabelled=0, n_near=12, n_outliers=0)
    catalog = scan(data, progress=False)
    side = {}
    for near in (True, False):
        train, val = split(catalog, 0.25, seed=0, near_duplicates=near)
        side[near] = {Path(it.path).relative_to(data).as_posix(): name
                      for name, items in (("train", train), ("val", val)) for it in items}
    split_apart = {near: sum(side[near][c["path"]] != side[near][c["original"]] for c in truth["near_copies"])
                   for near in side}
    assert split_apart[True] == 0
    assert split_apart[False] >= 1  # without the groups some copies do leak (this data, seed 0)
    report = catalog.report()
    grouped = {Path(p).relative_to(data).as_posix() for g in report["near_duplicates"] for p in g}
    assert sum(c["path"] in grouped for c in truth["near_copies"]) >= 11
    assert report["kept_together"]["groups"] >= len(report["near_duplicates"])
    conflicts = {Path(p).relative_to(data).as_posix() for g in report["label_conflicts"] for p in g}
    assert {c["path"] for c in truth["near_copies"] if c["cross_class"]} - conflicts <= \
        {c["path"] for c in truth["near_copies"] if c["path"] not in grouped}


def test_chains_of_look_alikes_do_not_swallow_a_class(tmp_path):
    """Fruits-360 style: frames of fruit on white chain together at 22 bits; groups are capped."""
    fruits = pytest.importorskip("conftest").shared_folder("fruits360")
    catalog = scan(fruits, progress=False)
    groups = catalog.groups()
    assert max(len(g) for g in groups) <= len(catalog.usable) // 10
    train, val = split(catalog, 0.25, seed=0)
    for cls in ("cherry", "tomato"):
        n_val = sum(it.label == cls for it in val)
        assert 0.15 <= n_val / catalog.counts()[cls] <= 0.35


def test_exclude_list_leaves_photos_out_and_reports_lines_that_match_nothing(tmp_path, demo_data):
    from fruitnet.dataset import apply_exclude

    root = demo_data / "train"
    catalog = scan(root, progress=False)
    first, second = catalog.usable[0], catalog.usable[40]
    listing = tmp_path / "exclude.txt"
    listing.write_text(f"# suspects\n{Path(first.path).relative_to(root)}\n\n{Path(second.path).resolve()}\n"
                       "cherry/no-such-photo.jpg\n")
    before = snapshot(root)
    (kept,), info = apply_exclude([catalog], listing)
    assert snapshot(root) == before
    assert {it.path for it in catalog.usable} - {it.path for it in kept.usable} == {first.path, second.path}
    assert sorted(info["excluded"]) == sorted([first.path, second.path])
    assert info["exclude_unmatched"] == ["cherry/no-such-photo.jpg"]
    everything = tmp_path / "all-cherries.txt"
    everything.write_text("\n".join(it.path for it in catalog.usable if it.label == "cherry"))
    with pytest.raises(DataError, match="every photo of class"):
        apply_exclude([catalog], everything)
