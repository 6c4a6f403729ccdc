import csv
import ctypes
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from awkward import make_awkward_folder, synthetic_image
from conftest import run_cli

from fruitnet.errors import DataError
from fruitnet.dataset import format_data_report, read_split, scan, split, write_split


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
    assert set(rows[0]) == {"path", "class", "split", "sha256", "source"}
    monkeypatch.chdir(tmp_path)
    t2, v2, negatives = read_split(tmp_path / "split.csv")
    assert negatives == [] and {Path(r["source"]) for r in rows} == {(demo_data / "train").resolve()}
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


# --- what a data folder can hold besides photos (issue 11) --------------------------------------

def small_folder(root: Path) -> Path:
    for cls in ("cherry", "tomato"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            synthetic_image(cls, i).save(root / cls / f"{cls}_{i}.jpg")
    return root


def test_run_folders_inside_the_data_are_skipped_and_reported(tmp_path):
    root = small_folder(tmp_path / "data")
    runtop = root / "runtop"  # `train DATA --out DATA/runtop` (an older run: config.json + metrics.csv)
    runtop.mkdir()
    (runtop / "config.json").write_text("{}")
    (runtop / "metrics.csv").write_text("epoch\n")
    synthetic_image("cherry", 9).save(runtop / "curves.png")
    nested = root / "cherry" / "run2"  # a run marked by the file fruitnet writes into every run folder
    nested.mkdir()
    (nested / "fruitnet-run.json").write_text("{}")
    synthetic_image("cherry", 8).save(nested / "curves.png")
    lookalike = root / "tomato" / "more"  # a config.json alone does not make a run folder
    lookalike.mkdir()
    (lookalike / "config.json").write_text("{}")
    synthetic_image("tomato", 7).save(lookalike / "t.jpg")

    catalog = scan(root, progress=False)
    assert catalog.classes == ["cherry", "tomato"]
    paths = {Path(it.path).relative_to(root).as_posix() for it in catalog.items}
    assert not any(p.startswith(("runtop/", "cherry/run2/")) for p in paths) and "tomato/more/t.jpg" in paths
    report = catalog.report()
    assert report["run_folders"] == [str(nested), str(runtop)]
    text = format_data_report(report)
    assert "2 fruitnet run folder(s) skipped (outputs, not data)" in text and str(runtop) in text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_special_files_are_listed_not_read(tmp_path):
    root = small_folder(tmp_path / "data")
    os.mkfifo(root / "cherry" / "pipe.jpg")  # opening it would wait for a writer: check hung forever
    os.mkfifo(root / "tomato" / "pipe")  # no image extension: sniffing its content would hang too
    (root / "tomato" / "noise.png").symlink_to("/dev/urandom")  # hashing it would burn a core forever
    result = run_cli("check", root, "--json", timeout=120)  # a hang fails here instead of hanging the suite
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["counts"] == {"cherry": 3, "tomato": 3}
    skipped = {Path(s["path"]).relative_to(root).as_posix(): s["reason"] for s in report["skipped"]}
    assert skipped == {"cherry/pipe.jpg": "not a regular file (named pipe)",
                       "tomato/noise.png": "not a regular file (character device)"}
    ignored = {Path(i["path"]).relative_to(root).as_posix(): i["reason"] for i in report["ignored"]}
    assert ignored["tomato/pipe"] == "not a regular file (named pipe)"


def _drop_file_capabilities() -> None:
    """preexec_fn: the child (and what it execs) cannot read what permissions forbid, even as root.

    Tests run as root, whom mode bits do not stop (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).  With
    those two dropped from the child's capability bounding set before exec, the kernel applies the
    mode bits to it as to any user; root-owned files with the usual modes stay readable."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path):
    root = small_folder(tmp_path / "data")
    locked = root / "tomato" / "locked"
    locked.mkdir()
    synthetic_image("tomato", 5).save(locked / "unseen.jpg")
    locked.chmod(0)
    unprivileged = _drop_file_capabilities if os.geteuid() == 0 else None
    try:
        try:  # first show that the child really cannot list it
            probe = subprocess.run([sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])", str(locked)],
                                   preexec_fn=unprivileged, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot run a child without root's file capabilities here ({exc})")
        assert "PermissionError" in probe.stderr, "the child could list a mode-000 folder: the test would prove nothing"
        result = subprocess.run([sys.executable, "-m", "fruitnet", "check", str(root), "--json"], capture_output=True,
                                text=True, timeout=120, preexec_fn=unprivileged)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["counts"] == {"cherry": 3, "tomato": 3}
    assert {"path": str(locked), "reason": "folder cannot be listed (Permission denied)"} in report["skipped"]


# --- issue 19 item 2: look-alike photos cost memory in proportion to their number ---------------

def _catalog(hashes: list[str], shas: list[str] | None = None):
    """A catalog of photos known only by their hashes: what scan records, without the files."""
    from fruitnet.dataset import Catalog, Item

    shas = shas or [f"sha{k}" for k in range(len(hashes))]
    items = [Item(f"/photos/a/{k:05d}.png", "a", sha, phash=h) for k, (h, sha) in enumerate(zip(hashes, shas))]
    return Catalog("/photos", ["a", "b"], items)


def _flips(base: int, bits) -> str:
    for b in bits:
        base ^= 1 << int(b)
    return f"{base:032x}"


def test_groups_of_look_alikes_need_memory_in_proportion_to_the_photos():
    """3,000 distinct hashes within 6 bits of each other: 4.5 million near-duplicate pairs, which
    the old code kept as Python tuples (over a gigabyte); the groups need a few arrays of n."""
    import tracemalloc

    import numpy as np

    rng = np.random.default_rng(0)
    base = int.from_bytes(rng.bytes(16), "big")
    hashes = list(dict.fromkeys(_flips(base, rng.choice(128, 3, replace=False)) for _ in range(3100)))[:3000]
    catalog = _catalog(hashes)
    tracemalloc.start()
    try:
        groups = catalog.groups()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [len(g) for g in groups] == [3000]  # within 6 bits at every distance: one group, too close to split
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MB"


def test_chains_are_split_at_stricter_distances_and_copies_stay_together():
    """Six clusters of five look-alikes (within 2 bits), each cluster 21 bits from the next: one
    chain at 22 bits, larger than a tenth of the photos, so split again: into the clusters."""
    base = 0
    clusters = [[_flips(base, [*range(21 * k), 110 + m]) for m in range(5)] for k in range(6)]
    hashes = [h for c in clusters for h in c] + [clusters[0][0], ""]  # a same-hash copy; a photo without hash
    shas = [f"sha{k}" for k in range(len(hashes))]
    shas[-1] = shas[7]  # the hashless photo has the bytes of cluster 1's third photo
    groups = _catalog(hashes, shas).groups()
    paths = [[int(Path(it.path).stem) for it in g] for g in groups]
    assert sorted(paths) == [[0, 1, 2, 3, 4, 30], [5, 6, 7, 8, 9, 31], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19],
                             [20, 21, 22, 23, 24], [25, 26, 27, 28, 29]]
    assert [len(g) for g in _catalog(hashes, shas).groups(near_duplicates=False)].count(2) == 1


def test_a_huge_label_conflict_group_is_printed_as_its_first_names_and_a_count():
    from fruitnet.dataset import format_data_report

    group = [f"photos/{'cherry' if i % 2 else 'tomato'}/frame{i:04d}.jpg" for i in range(2005)]
    report = {"root": "photos", "classes": ["cherry", "tomato"], "counts": {"cherry": 1002, "tomato": 1003},
              "usable": 2005, "duplicates": [], "near_duplicates": [group],
              "kept_together": {"groups": 1, "files": 2005}, "label_conflicts": [group], "skipped": [], "ignored": []}
    text = format_data_report(report)
    line = next(line for line in text.splitlines() if "frame0000" in line and "label" not in line)
    assert line.endswith("and 2,002 more") and len(line) < 200
    assert "1 duplicate groups (2005 files), each kept on one side of the split: 0 of identical files only, 1 with " \
           "near-copies" in text
