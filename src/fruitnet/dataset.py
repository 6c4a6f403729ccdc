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
from dataclasses import dataclass, field
from pathlib import Path

from fruitnet.errors import DataError, ImageError
from fruitnet.images import load_image, looks_like_image
from fruitnet.progress import bar as progress_bar


@dataclass
class Item:
    path: str
    label: str
    sha256: str = ""
    problem: str | None = None  # why the file cannot be used, None if it can


@dataclass
class Catalog:
    root: str
    classes: list[str]
    items: list[Item]  # usable and unusable image files, sorted by path
    ignored: list[dict] = field(default_factory=list)  # {path, reason}: not images, or outside any class

    @property
    def usable(self) -> list[Item]:
        return [it for it in self.items if it.problem is None]

    @property
    def skipped(self) -> list[dict]:
        return [{"path": it.path, "reason": it.problem} for it in self.items if it.problem is not None]

    def duplicates(self) -> list[list[str]]:
        """Groups of usable files with identical bytes."""
        groups = defaultdict(list)
        for it in self.usable:
            groups[it.sha256].append(it.path)
        return [paths for paths in groups.values() if len(paths) > 1]

    def counts(self) -> dict[str, int]:
        c = Counter(it.label for it in self.usable)
        return {cls: c.get(cls, 0) for cls in self.classes}

    def report(self) -> dict:
        return {"root": self.root, "classes": self.classes, "counts": self.counts(),
                "usable": len(self.usable), "skipped": self.skipped, "ignored": self.ignored,
                "duplicates": self.duplicates()}


LOOSE = "not inside a class folder"
SHOWN = 5  # the report names this many duplicate groups and ignored files, then says how many more


def _first(entries: list[str], what: str) -> list[str]:
    more = [f"    and {len(entries) - SHOWN} more {what} (--json lists them all)"] if len(entries) > SHOWN else []
    return [f"    {e}" for e in entries[:SHOWN]] + more


def _check_file(path: Path, label: str, draft_size: int) -> Item:
    item = Item(str(path), label)
    try:
        with open(path, "rb") as f:
            item.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        load_image(path, draft_size=draft_size)  # full decode: truncation shows up here, not mid-training
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


def scan(root: str | Path, progress: bool = True, workers: int = 4, draft_size: int = 256) -> Catalog:
    """Read DATA/<class>/<image...>; class names are the sorted folder names.

    Decodes every candidate once to find unusable files, one at a time per worker and with a
    bounded queue of jobs, so memory stays flat however large the folder is (only the catalog
    grows, a few hundred bytes per file).  The progress bar counts the files checked.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    classes, candidates, ignored = [], [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):  # .DS_Store, .ipynb_checkpoints: never a class
            continue
        if not entry.is_dir():
            ignored.append({"path": str(entry), "reason": LOOSE})
            continue
        classes.append(entry.name)
        for dirpath, dirnames, filenames in os.walk(entry):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith("."):
                    continue
                if looks_like_image(path):
                    candidates.append((path, entry.name))
                else:
                    ignored.append({"path": str(path), "reason": "not an image file"})
    loose = [i for i in ignored if i["reason"] == LOOSE and looks_like_image(i["path"])]
    if len(classes) < 2 and loose:
        raise DataError(f"{root}: found {len(loose)} image(s) directly in {root}; put them in one folder per class: "
                        f"{root}/<class>/<image>")
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s) {classes}; need at least two "
                        "(layout: DATA/<class>/<image>)")
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        jobs = _ordered_map(pool, lambda pc: _check_file(pc[0], pc[1], draft_size), candidates, 8 * workers)
        items = list(progress_bar(jobs, total=len(candidates), desc=f"checking {root.name}", unit="img",
                                  disable=not progress))
    catalog = Catalog(str(root), classes, items, ignored)
    empty = [cls for cls, n in catalog.counts().items() if n == 0]
    if empty:
        raise DataError(f"{root}: class folder(s) with no usable image: {', '.join(empty)}")
    return catalog


def format_report(report: dict) -> str:
    lines = [f"data: {report['root']}",
             f"  {len(report['classes'])} classes, {report['usable']} usable images"]
    width = max(len(c) for c in report["classes"])
    lines += [f"    {cls:<{width}}  {n}" for cls, n in report["counts"].items()]
    if report["duplicates"]:
        n = sum(len(g) for g in report["duplicates"])
        lines.append(f"  {len(report['duplicates'])} group(s) of exact duplicates ({n} files), kept on one side "
                     "of the split:")
        lines += _first([" = ".join(g) for g in report["duplicates"]], "groups")
    if report["skipped"]:
        lines.append(f"  {len(report['skipped'])} image file(s) skipped, unusable (exit code 1):")
        lines += [f"    {s['path']}: {s['reason']}" for s in report["skipped"]]
    if report["ignored"]:
        lines.append(f"  {len(report['ignored'])} other file(s) ignored (not a failure):")
        lines += _first([f"{i['path']}: {i['reason']}" for i in report["ignored"]], "files")
    return "\n".join(lines)


def write_report(report: dict, folder: Path) -> None:
    (folder / "data_report.json").write_text(json.dumps(report, indent=2))
    warnings = "".join(f"warning: {w}\n" for w in report.get("warnings", []))
    (folder / "data_report.txt").write_text(format_report(report) + "\n" + warnings)


def split(catalog: Catalog, val_fraction: float = 0.25, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """Stratified per class, seeded; files with identical bytes stay on the same side."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val fraction must be between 0 and 1, not {val_fraction}")
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in catalog.usable:
        groups[it.sha256].append(it)
    by_class: dict[str, list[list[Item]]] = defaultdict(list)
    for members in groups.values():
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
        for g in class_groups:
            (val if taken < target else train).extend(g)
            if taken < target:
                taken += len(g)
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


def write_split(path: Path, train: list[Item], val: list[Item]) -> None:
    """Absolute paths, so that a run resumes from any working directory."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "split", "sha256"])
        for name, items in (("train", train), ("val", val)):
            for it in items:
                w.writerow([os.path.abspath(it.path), it.label, name, it.sha256])


def read_split(path: Path) -> tuple[list[Item], list[Item]]:
    train, val = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not {"path", "class", "split"} <= set(row):
                raise DataError(f"{path}: not a fruitnet split.csv (columns path, class, split)")
            item = Item(row["path"], row["class"], row.get("sha256") or "")
            (train if row["split"] == "train" else val).append(item)
    return train, val
