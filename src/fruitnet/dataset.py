"""Scanning a class-folder tree, the data report, the stratified seeded split, split.csv.

Nothing here ever writes into the dataset folder, and nothing here needs torch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from fruitnet.errors import DataError, ImageError
from fruitnet.images import IMAGE_EXTENSIONS, load_image, looks_like_image, open_regular, special_file_kind
from fruitnet.outputs import printable
from fruitnet.progress import bar as progress_bar

RUN_MARKER = "fruitnet-run.json"  # written into every run folder; config.json + metrics.csv for older runs
# The answer for a photo of none of the classes, and the name of the folder of such photos
# (DATA/unknown/: negatives, never a class; teach copies "none of these" there)
UNKNOWN = "unknown"


@dataclass
class Item:
    path: str
    label: str
    sha256: str = ""
    problem: str | None = None  # why the file cannot be used, None if it can
    phash: str = ""  # perceptual hash (pHash + dHash, 128 bits as hex) for near-duplicates
    source: str = ""  # the data folder it was found in (train A/ B/)


@dataclass
class Catalog:
    root: str
    classes: list[str]
    items: list[Item]  # usable and unusable image files, sorted by path
    ignored: list[dict] = field(default_factory=list)  # {path, reason}: not images, outside any class, run folders
    unlisted: list[dict] = field(default_factory=list)  # {path, reason}: folders that could not be listed

    @property
    def usable(self) -> list[Item]:
        """The usable photos of the classes."""
        return [it for it in self.items if it.problem is None and it.label != UNKNOWN]

    @property
    def negatives(self) -> list[Item]:
        """The usable photos in DATA/unknown/: photos of none of the classes."""
        return [it for it in self.items if it.problem is None and it.label == UNKNOWN]

    @property
    def skipped(self) -> list[dict]:
        """Files (and folders) that could have held training images but could not be used."""
        return [{"path": it.path, "reason": it.problem} for it in self.items if it.problem is not None] + self.unlisted

    @property
    def run_folders(self) -> list[str]:
        return [i["path"] for i in self.ignored if i["reason"] == RUN_FOLDER_REASON]

    def duplicates(self) -> list[list[str]]:
        """Groups of usable files with identical bytes."""
        groups = defaultdict(list)
        for it in self.usable:
            groups[it.sha256].append(it.path)
        return [paths for paths in groups.values() if len(paths) > 1]

    def groups(self, near_duplicates: bool = True) -> list[list[Item]]:
        """Every usable item in exactly one group: identical bytes, and (by default) perceptual-hash
        near-duplicates (resized, re-encoded, lightly cropped copies) joined transitively."""
        usable = self.usable
        hashes = [it.phash for it in usable] if near_duplicates else None
        return [[usable[i] for i in members]
                for members in hash_groups(len(usable), _indices_by(usable, "sha256"), hashes)]

    def near_duplicates(self, groups: list[list[Item]] | None = None) -> list[list[str]]:
        """Groups joined by the perceptual hash that are not just identical bytes."""
        return [[it.path for it in g] for g in (groups or self.groups()) if len({it.sha256 for it in g}) > 1]

    def exclude(self, paths: list[str]) -> tuple["Catalog", list[str], list[str]]:
        """A catalog without the listed photos: (catalog, excluded paths, lines that matched nothing).

        A line matches a photo by its path as given, relative to the current folder, or relative
        to the data folder; the files themselves are never touched."""
        root = Path(self.root)
        wanted: dict[str, str] = {}
        for line in paths:
            for candidate in {os.path.abspath(line), os.path.abspath(root / line)}:
                wanted[candidate] = line
        kept, excluded, matched = [], [], set()
        for it in self.items:
            line = wanted.get(os.path.abspath(it.path))
            if line is None:
                kept.append(it)
            else:
                excluded.append(it.path)
                matched.add(line)
        unmatched = [line for line in dict.fromkeys(paths) if line not in matched]
        return replace(self, items=kept), excluded, unmatched

    def counts(self) -> dict[str, int]:
        c = Counter(it.label for it in self.usable)
        return {cls: c.get(cls, 0) for cls in self.classes}

    def report(self) -> dict:
        groups = [g for g in self.groups() if len(g) > 1]
        return {"root": self.root, "classes": self.classes, "counts": self.counts(),
                "usable": len(self.usable), "negatives": len(self.negatives), "skipped": self.skipped,
                "ignored": self.ignored,
                "run_folders": self.run_folders, "duplicates": self.duplicates(),
                "near_duplicates": self.near_duplicates(groups),
                "label_conflicts": [[it.path for it in g] for g in groups if len({it.label for it in g}) > 1],
                "kept_together": {"groups": len(groups), "files": sum(len(g) for g in groups)}}


# Near-duplicates: pHash (low frequencies of the DCT of a 32x32 grey thumbnail) and dHash (signs of
# horizontal gradients of a 9x8 one), 64 bits each, compared together.  Measured on webfruit
# (bench/bench_check.py, notes/doctor-readme.md): copies resized to 60-90% or re-encoded at JPEG
# quality 50-80 stay within 6 bits, copies cropped by 2-5% per side are within 22 bits in 95% of
# cases, and every pair of distinct webfruit photos within 22 bits is a real near-copy.  The same
# bits as the imagehash package's phash + dhash, 5x faster: PIL's reducing_gap shrinks by whole
# factors first.
NEAR_DUPLICATE_BITS = 22
_DCT = np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * np.arange(8)[:, None] / 64)  # DCT-II rows 0..7


def perceptual_hash(img: Image.Image) -> str:
    grey = img.convert("L")
    small = np.asarray(grey.resize((32, 32), Image.LANCZOS, reducing_gap=2.0), dtype=np.float32)
    dct = (_DCT @ small @ _DCT.T).ravel()
    tiny = np.asarray(grey.resize((9, 8), Image.LANCZOS, reducing_gap=2.0), dtype=np.int16)
    bits = np.concatenate([dct > np.median(dct), (tiny[:, 1:] > tiny[:, :-1]).ravel()])
    return np.packbits(bits).tobytes().hex()


def _hash_words(hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """hex hashes -> (n, 2) uint64 words, and which images have a hash at all."""
    words = np.zeros((len(hashes), 2), dtype=np.uint64)
    for i, h in enumerate(hashes):
        if h:
            words[i] = [int(h[:16], 16), int(h[16:32], 16)]
    return words, np.array([bool(h) for h in hashes], dtype=bool)


_BLOCK = 1 << 20  # distances compared at once: under 100 MB of temporaries, whatever the number of photos


def _close_pairs(hashes: list[str], max_bits: int):
    """The index pairs (i < j) whose hashes differ in at most max_bits bits, as arrays (i, j, bits),
    one block of rows at a time: all pairs are compared, and none is kept by this generator."""
    words, has = _hash_words(hashes)
    block = max(1, _BLOCK // max(1, len(words)))
    for start in range(0, len(words), block):
        a, b = words[start:start + block], words[start:]  # the pairs of these rows with later rows
        dist = (np.bitwise_count(a[:, None, 0] ^ b[None, :, 0]).astype(np.int16)
                + np.bitwise_count(a[:, None, 1] ^ b[None, :, 1]))
        i, j = np.nonzero(dist <= max_bits)
        keep = (i < j) & has[i + start] & has[j + start]
        i, j = i[keep].astype(np.int32), j[keep].astype(np.int32)  # half the memory of int64
        yield i + start, j + start, dist[i, j]


def near_duplicate_pairs(hashes: list[str], max_bits: int = NEAR_DUPLICATE_BITS,
                         with_distance: bool = False) -> list[tuple]:
    """Index pairs (i < j) whose 128-bit hashes differ in at most max_bits bits (and the distance).

    A list: it grows with the number of pairs, up to n^2/2 for look-alike photos (hash_groups and
    any_close_pair keep none)."""
    return [pair for i, j, d in _close_pairs(hashes, max_bits)
            for pair in zip(i.tolist(), j.tolist(), *([d.tolist()] if with_distance else []))]


def any_close_pair(hashes: list[str], max_bits: int = NEAR_DUPLICATE_BITS) -> bool:
    """Whether some two of the hashes are within max_bits bits (a repeated hash at once)."""
    distinct = {h for h in hashes if h}
    return len(distinct) < sum(map(bool, hashes)) or any(len(i) for i, _, _ in _close_pairs(list(distinct), max_bits))


class _Forest:
    """Connected components as pairs stream in: every node's root, merged a block of pairs at a
    time in NumPy (roots point to smaller indices), so memory is O(nodes) however many pairs."""

    def __init__(self, n: int):
        self.root = np.arange(n)

    def join(self, i: np.ndarray, j: np.ndarray) -> None:
        a, b = self.root[i], self.root[j]
        while (apart := a != b).any():  # a few rounds: each hooks roots onto smaller ones
            a, b = a[apart], b[apart]
            np.minimum.at(self.root, np.maximum(a, b), np.minimum(a, b))
            while not np.array_equal(deeper := self.root[self.root], self.root):
                self.root = deeper
            a, b = self.root[a], self.root[b]


def hash_groups(n: int, same: list[list[int]] = (), hashes: list[str] | None = None, max_share: float = 0.1,
                min_bits: int = 4) -> list[list[int]]:
    """Groups of n photos joined by identical bytes (the index lists in `same`) and, with hashes,
    by hashes within NEAR_DUPLICATE_BITS bits, where a group larger than max_share of all photos
    is split again at a stricter distance (2 bits less each time), down to min_bits.

    Such a group is a chain of look-alikes rather than copies: on Fruits-360 (studio frames of
    fruit turning on white) 22 bits chain 940 of 1,257 photos across classes; at 12 bits the
    groups are single fruits (at most 82 frames).  The components at every distance are found in
    one pass over the pairs, and no pair is kept: memory grows with n, not with the pairs (20,000
    near-identical photos have 200 million).  Photos with the same hash are joined first, so
    only distinct hashes are compared: far fewer for copies and near-identical frames."""
    cap = max(3, int(n * max_share))
    levels = list(range(NEAR_DUPLICATE_BITS, min_bits - 2, -2))  # 22, 20, ..., 4
    forests = [_Forest(n) for _ in levels]
    by_hash: dict[str, list[int]] = defaultdict(list)
    for k, h in enumerate(hashes or ()):
        if h:  # an image without a hash matches nothing
            by_hash[h].append(k)
    joined = [*same, *by_hash.values()]  # at every distance
    i = np.array([m for members in joined for m in members[:-1]], dtype=np.int64)
    j = np.array([m for members in joined for m in members[1:]], dtype=np.int64)
    for forest in forests:
        forest.join(i, j)
    first = np.array([members[0] for members in by_hash.values()], dtype=np.int64)
    for i, j, d in _close_pairs(list(by_hash), NEAR_DUPLICATE_BITS):
        for bits, forest in zip(levels, forests):
            close = d <= bits
            forest.join(first[i[close]], first[j[close]])

    def refine(members: np.ndarray, level: int) -> list[np.ndarray]:
        roots = forests[level].root[members]
        order = np.argsort(roots, kind="stable")
        parts = np.split(members[order], np.flatnonzero(np.diff(roots[order])) + 1)
        if level + 1 == len(levels):
            return parts
        return [g for part in parts for g in (refine(part, level + 1) if len(part) > cap else [part])]

    groups = refine(np.arange(n), 0) if n else []
    return sorted((sorted(g.tolist()) for g in groups), key=lambda g: g[0])


def connected_groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of n nodes joined by pairs, each sorted, in order of their first member."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _indices_by(items: list[Item], attr: str) -> list[list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[getattr(it, attr)].append(i)
    return list(groups.values())


def apply_exclude(catalogs: list[Catalog], path: str | Path | None) -> tuple[list[Catalog], dict]:
    """Leave the photos listed in the file at `path` out of every catalog (train --exclude FILE).

    Returns the catalogs and {"excluded": paths, "exclude_unmatched": lines matching no photo};
    a class left without photos is a DataError, as for any empty class."""
    if not path:
        return catalogs, {}
    lines = read_exclude(path)
    results = [c.exclude(lines) for c in catalogs]
    unmatched = set.intersection(*(set(r[2]) for r in results))
    info = {"exclude_file": str(path), "excluded": [p for r in results for p in r[1]],
            "exclude_unmatched": [line for line in lines if line in unmatched]}
    for catalog, _, _ in results:
        empty = [cls for cls, n in catalog.counts().items() if n == 0]
        if empty:
            raise DataError(f"{path}: excludes every photo of class(es) {', '.join(empty)} in {catalog.root}")
    return [r[0] for r in results], info


def read_exclude(path: str | Path) -> list[str]:
    """Paths to leave out, one per line; blank lines and lines starting with '#' are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the exclude list ({exc})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


RUN_FOLDER_REASON = "a fruitnet run folder (outputs, not data)"


def is_run_folder(path: Path) -> bool:
    """A folder that holds a fruitnet run (its marker, or config.json + metrics.csv): never data."""
    isfile = os.path.isfile  # False, not PermissionError, inside a folder that cannot be read
    return isfile(path / RUN_MARKER) or (isfile(path / "config.json") and isfile(path / "metrics.csv"))


LOOSE = "not inside a class folder"
SHOWN = 5  # the report names this many duplicate groups and ignored files, then says how many more


def _names(group: list[str], shown: int = 3) -> str:
    """'a = b = c and 2,002 more': a group's first few names, on one line."""
    more = f" and {len(group) - shown:,} more" if len(group) > shown else ""
    return " = ".join(group[:shown]) + more


def _first(entries: list[str], what: str) -> list[str]:
    more = [f"    and {len(entries) - SHOWN} more {what} (--json lists them all)"] if len(entries) > SHOWN else []
    return [f"    {e}" for e in entries[:SHOWN]] + more


def _check_file(path: Path, label: str, draft_size: int) -> Item:
    item = Item(str(path), label)
    try:
        with open_regular(path) as f:  # a named pipe or a device is refused before a byte is read
            item.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        img = load_image(path, draft_size=draft_size)  # full decode: truncation shows up here, not mid-training
        item.phash = perceptual_hash(img)
    except ImageError as exc:
        item.problem = exc.reason
    except OSError as exc:
        item.problem = f"cannot read file ({exc.strerror or exc})"
    return item


def _ordered_map(pool: ThreadPoolExecutor, fn, args: list, window: int):
    """pool.map with at most `window` jobs in flight (pool.map queues one future per item at once)."""
    pending: deque = deque()
    for a in args:
        pending.append(pool.submit(fn, a))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _walk_class(folder: Path, candidates: list, ignored: list, unlistable) -> None:
    """The image files under one class folder, as (path, class, problem) candidates; everything
    else (run folders, special files, other files) into `ignored` with the reason."""
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):
        runs = {d for d in dirnames if is_run_folder(Path(dirpath) / d)}
        ignored += [{"path": str(Path(dirpath) / d), "reason": RUN_FOLDER_REASON} for d in sorted(runs)]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in runs)
        for name in sorted(n for n in filenames if not n.startswith(".")):
            path = Path(dirpath) / name
            kind = special_file_kind(path)  # checked before anything opens it: a FIFO would block
            if kind and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                candidates.append((path, folder.name, f"not a regular file ({kind})"))
            elif kind:
                ignored.append({"path": str(path), "reason": f"not a regular file ({kind})"})
            elif looks_like_image(path):
                candidates.append((path, folder.name, None))
            else:
                ignored.append({"path": str(path), "reason": "not an image file"})


def scan(root: str | Path, progress: bool = True, workers: int = 4, draft_size: int = 256,
         min_classes: int = 2) -> Catalog:
    """Read DATA/<class>/<image...>; class names are the sorted folder names, except DATA/unknown/,
    whose photos are negatives (Catalog.negatives): photos of none of the classes.

    Decodes every candidate once to find unusable files, one at a time per worker and with a
    bounded queue of jobs, so memory stays flat however large the folder is (only the catalog
    grows, a few hundred bytes per file).  The progress bar counts the files checked.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise DataError(f"{root}: cannot list the data folder ({exc.strerror or exc})") from None
    classes, candidates, ignored, unlisted = [], [], [], []

    def unlistable(exc: OSError) -> None:
        unlisted.append({"path": str(exc.filename), "reason": f"folder cannot be listed ({exc.strerror or exc})"})

    for entry in entries:
        if entry.name.startswith("."):  # .DS_Store, .ipynb_checkpoints: never a class
            continue
        if not entry.is_dir():
            ignored.append({"path": str(entry), "reason": LOOSE})
            continue
        if is_run_folder(entry):
            ignored.append({"path": str(entry), "reason": RUN_FOLDER_REASON})
            continue
        if entry.name != UNKNOWN:
            classes.append(entry.name)
        _walk_class(entry, candidates, ignored, unlistable)
    loose = [i for i in ignored if i["reason"] == LOOSE and looks_like_image(i["path"])]
    if len(classes) < min_classes and loose:
        raise DataError(f"{root}: found {len(loose)} image(s) directly in {root}; put them in one folder per class: "
                        f"{root}/<class>/<image>")
    if len(classes) < min_classes:
        negatives = f" ({UNKNOWN}/ holds photos of none of the classes, not a class)" \
            if (root / UNKNOWN).is_dir() else ""
        raise DataError(f"{root}: found {len(classes)} class folder(s) {classes}{negatives}; need at least "
                        f"{'two' if min_classes == 2 else min_classes} (layout: DATA/<class>/<image>)")

    def check(candidate) -> Item:
        path, label, problem = candidate
        item = Item(str(path), label, problem=problem) if problem else _check_file(path, label, draft_size)
        item.source = str(root)
        return item

    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        jobs = _ordered_map(pool, check, candidates, 8 * workers)
        items = list(progress_bar(jobs, total=len(candidates), desc=f"checking {root.name}", unit="img",
                                  disable=not progress))
    catalog = Catalog(str(root), classes, items, ignored, unlisted)
    empty = [cls for cls, n in catalog.counts().items() if n == 0]
    if empty:
        why = {u["path"]: u["reason"] for u in unlisted}
        raise DataError(f"{root}: class folder(s) with no usable image: "
                        + ", ".join(f"{c} ({why[str(root / c)]})" if str(root / c) in why else c for c in empty))
    return catalog


def format_data_report(report: dict) -> str:
    lines = [f"data: {report['root']}",
             f"  {len(report['classes'])} classes, {report['usable']} usable images"]
    width = max(len(c) for c in report["classes"])
    lines += [f"    {cls:<{width}}  {n}" for cls, n in report["counts"].items()]
    kept = report.get("kept_together") or {"groups": 0, "files": 0}
    if kept["groups"]:  # the same counts as check --deep's before its feature-space copies
        near = len(report.get("near_duplicates", []))
        lines.append(f"  {kept['groups']} duplicate groups ({kept['files']} files), each kept on one side of the split: "
                     f"{kept['groups'] - near} of identical files only, {near} with near-copies (resized, re-encoded "
                     "or cropped)")
        lines += _first([_names(g) for g in report["duplicates"]], "groups of identical files")
    if report.get("negatives"):
        lines.append(f"  {report['negatives']} photo(s) of none of the classes in unknown/: no class; the 'unknown' "
                     "verdict is fitted against them")
    if report.get("label_conflicts"):
        lines.append(f"  {len(report['label_conflicts'])} duplicate group(s) span two classes (label conflicts):")
        lines += _first([_names(g) for g in report["label_conflicts"]], "groups")
    if report.get("excluded"):
        lines.append(f"  {len(report['excluded'])} photo(s) left out by the exclude list")
    if report.get("exclude_unmatched"):
        lines.append(f"  {len(report['exclude_unmatched'])} exclude line(s) match no photo:")
        lines += [f"    {line}" for line in report["exclude_unmatched"]]
    if report["skipped"]:
        lines.append(f"  {len(report['skipped'])} image file(s) or folder(s) skipped, unusable (exit code 1):")
        lines += [f"    {s['path']}: {s['reason']}" for s in report["skipped"]]
    runs = report.get("run_folders", [])
    if runs:
        lines.append(f"  {len(runs)} fruitnet run folder(s) skipped (outputs, not data):")
        lines += [f"    {r}" for r in runs]
    others = [i for i in report["ignored"] if i["path"] not in runs]
    if others:
        lines.append(f"  {len(others)} other file(s) ignored (not a failure):")
        lines += _first([f"{i['path']}: {i['reason']}" for i in others], "files")
    return "\n".join(map(printable, lines))


def write_report(report: dict, folder: Path) -> None:
    (folder / "data_report.json").write_text(json.dumps(report, indent=2))
    warnings = "".join(f"warning: {w}\n" for w in report.get("warnings", []))
    (folder / "data_report.txt").write_text(format_data_report(report) + "\n" + warnings)


def split(catalog: Catalog, val_fraction: float = 0.25, seed: int = 0,
          near_duplicates: bool = True) -> tuple[list[Item], list[Item]]:
    """Stratified per class, seeded; identical files and (by default) near-duplicates stay on the
    same side, so validation never sees a copy of a training photo.  A group that spans two
    classes is placed with the class of its first member."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val fraction must be between 0 and 1, not {val_fraction}")
    by_class: dict[str, list[list[Item]]] = defaultdict(list)
    for members in catalog.groups(near_duplicates):
        by_class[members[0].label].append(members)
    rng = random.Random(seed)
    train, val = [], []
    for cls in catalog.classes:
        class_groups = sorted(by_class[cls], key=lambda g: g[0].path)
        rng.shuffle(class_groups)
        total = sum(len(g) for g in class_groups)
        target = round(total * val_fraction)
        if total >= 2:
            target = min(max(target, 1), total - 1)
        taken = 0
        for g in class_groups:  # a group goes to validation if that brings the count nearer the target
            if taken + len(g) <= target or target - taken > taken + len(g) - target:
                val.extend(g)
                taken += len(g)
            else:
                train.extend(g)
    return sorted(train, key=lambda it: it.path), sorted(val, key=lambda it: it.path)


MIN_PHOTOS_PER_CLASS = 10  # below this, a class's accuracy rests on a handful of photos


def split_warnings(classes: list[str], train: list[Item], val: list[Item]) -> list[str]:
    """What makes the split's numbers untrustworthy: tiny classes, a class absent from a side."""
    n_train, n_val = Counter(it.label for it in train), Counter(it.label for it in val)
    warnings = []
    for cls in classes:
        total = n_train[cls] + n_val[cls]
        if total < MIN_PHOTOS_PER_CLASS:
            warnings.append(f"class {cls!r} has only {total} photo(s); at least {MIN_PHOTOS_PER_CLASS} are "
                            "needed for its accuracy to mean much")
        if n_val[cls] == 0:
            warnings.append(f"class {cls!r} has no validation photo: validation accuracy says nothing about it")
        if n_train[cls] == 0:
            warnings.append(f"class {cls!r} has no training photo: the model cannot learn it")
    return warnings


def write_split(path: Path, train: list[Item], val: list[Item], negatives: list[Item] = ()) -> None:
    """Absolute paths, so that a run resumes from any working directory, and each photo's data
    folder (source).  Written exactly (no spreadsheet escaping, unlike every other CSV fruitnet
    writes): --resume and teach read it back, and it is not meant for a spreadsheet."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "split", "sha256", "source"])
        for name, items in (("train", train), ("val", val), ("negative", negatives)):
            for it in items:
                w.writerow([os.path.abspath(it.path), it.label, name, it.sha256,
                            os.path.abspath(it.source) if it.source else ""])


def read_split(path: Path) -> tuple[list[Item], list[Item], list[Item]]:
    """(train, val, negatives) as write_split wrote them."""
    parts: dict[str, list[Item]] = {"train": [], "val": [], "negative": []}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not {"path", "class", "split"} <= set(row):
                raise DataError(f"{path}: not a fruitnet split.csv (columns path, class, split)")
            item = Item(row["path"], row["class"], row.get("sha256") or "", source=row.get("source") or "")
            parts["negative" if row["split"] == "negative" or row["class"] == UNKNOWN
                  else "train" if row["split"] == "train" else "val"].append(item)
    return parts["train"], parts["val"], parts["negative"]


def scan_folders(roots: list[str | Path], progress: bool = True) -> Catalog:
    """Several data folders as one (train A/ B/): class folders of the same name merge, each
    photo keeps its folder as its source; the classes are all the folders' classes."""
    catalogs = [scan(root, progress=progress, min_classes=0 if len(roots) > 1 else 2) for root in roots]
    if len(catalogs) == 1:
        return catalogs[0]
    classes = sorted({c for cat in catalogs for c in cat.classes})
    if len(classes) < 2:
        raise DataError(f"{', '.join(map(str, roots))}: found {len(classes)} class(es) {classes} in all; need at least two")
    return Catalog(" + ".join(str(r) for r in roots), classes, sorted((it for cat in catalogs for it in cat.items),
                                                                    key=lambda it: it.path),
                   [i for cat in catalogs for i in cat.ignored], [u for cat in catalogs for u in cat.unlisted])
