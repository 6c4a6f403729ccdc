"""The data check, measured (issue 10): findings on corrupted copies of webfruit, the same figures on
the unmodified webfruit, `check --deep` wall time, --balance on fruits360, near-duplicate-aware split.

    .venv/bin/python bench/bench_check.py                      # all parts, ~25 min on 2 CPU cores
    .venv/bin/python bench/bench_check.py --parts corrupted clean

Writes markdown tables to bench/results/check.md (stamped with the git commit and the command).
Corrupted copies are symlink trees plus new near-copy files in a temporary folder; ../shared/data is
only read.  grocery/other is used to measure outliers only (no threshold is tuned on it).
Features are cached under /tmp/doctor-bench (per photo, by sha256) except in the timing part.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
SHARED = Path(os.environ.get("FRUITNET_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path("/tmp/doctor-bench")

from common import machine  # noqa: E402
from corrupted import build_corrupted  # noqa: E402

from fruitnet.dataset import near_duplicate_pairs, scan, split  # noqa: E402
from fruitnet.datacheck import deep_findings  # noqa: E402


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def quiet(*_a, **_k):
    pass


def corrupted_part(tmp: Path) -> str:
    root = tmp / "webfruit-corrupted"
    truth = build_corrupted(SHARED / "webfruit", root, seed=0, outlier_source=SHARED / "grocery" / "other")
    catalog = scan(root, progress=False)
    f = deep_findings(catalog, cache_dir=CACHE, progress=False, log=quiet)
    rel = lambda p: Path(p).relative_to(root).as_posix()  # noqa: E731
    ranking = [rel(r["path"]) for r in sorted(f["photos"], key=lambda r: r["label_score"])]
    flagged = {rel(e["path"]) for e in f["label_issues"]}
    top60 = set(ranking[:60])
    mis = truth["mislabelled"]
    outlier_rank = [rel(r["path"]) for r in sorted(f["photos"], key=lambda r: -r["outlier_distance"])]
    top40 = set(outlier_rank[:40])
    flagged_out = {rel(e["path"]) for e in f["outliers"]}
    deep_group = {rel(p): k for k, g in enumerate(f["duplicate_groups"]) for p in g["paths"]}
    conflict = {rel(p) for g in f["duplicate_groups"] if g["label_conflict"] for p in g["paths"]}
    hash_group = {rel(it.path): k for k, g in enumerate(catalog.groups()) for it in g}
    near = truth["near_copies"]

    def together(groups, c):
        return c["path"] in groups and groups.get(c["path"]) == groups.get(c["original"])

    rows = [
        ["mislabelled (30 moved to a wrong class)", f"**{len(top60 & set(mis))}/30** in the top 60 suspects",
         ">= 24/30", f"{len(flagged & set(mis))}/30 among the {len(flagged)} flagged"],
        ["near-copies (30: 10 resized, 10 re-encoded, 10 cropped)",
         f"**{sum(together(deep_group, c) for c in near)}/30** in a group with their original", ">= 27/30",
         f"perceptual hash alone (the training split): {sum(together(hash_group, c) for c in near)}/30; "
         + ", ".join(f"{k} {sum(together(hash_group, c) for c in near if c['kind'] == k)}/10"
                     for k in ("resize", "quality", "crop"))],
        ["cross-class near-copies (15) reported as label conflicts",
         f"**{sum(c['path'] in conflict and together(deep_group, c) for c in near if c['cross_class'])}/15**",
         "all", f"{sum(g['label_conflict'] for g in f['duplicate_groups'])} conflict groups in all"],
        ["outliers (20 from grocery/other)", f"**{len(flagged_out & set(truth['outliers']))}/20** flagged, with "
         f"{len(flagged_out - set(truth['outliers']))} other photos", ">= 15/20, <= 10 others",
         f"{len(top40 & set(truth['outliers']))}/20 in the top 40 by distance"],
    ]
    d = f["deep"]
    return ("## Findings on a corrupted copy of webfruit (seed 0: 892 + 30 near-copies + 20 grocery photos; "
            "30 photos moved)\n\n" + table(["planted", "found", "target", "also"], rows)
            + f"\n\nOut-of-fold accuracy of the linear head: {d['out_of_fold_accuracy']:.3f} "
              f"({d['folds']} folds, {d['backbone']}, cleanlab {d['cleanlab']}).\n")


def clean_part() -> str:
    catalog = scan(SHARED / "webfruit", progress=False)
    report = catalog.report()
    f = deep_findings(catalog, cache_dir=CACHE, progress=False, log=quiet)
    groups = f["duplicate_groups"]
    rows = [[len(f["photos"]), len(report["duplicates"]), len(report["near_duplicates"]),
             f"{len(groups)} ({sum(len(g['paths']) for g in groups)} files)",
             sum(g["label_conflict"] for g in groups), len(f["label_issues"]), len(f["outliers"]),
             f"{f['deep']['out_of_fold_accuracy']:.3f}"]]
    ranked = sorted(f["photos"], key=lambda r: r["label_score"])[:5]
    top = "\n".join(f"- `{Path(r['path']).relative_to(SHARED / 'webfruit')}`: {r['label']} -> {r['suggested']} "
                    f"(label score {r['label_score']:.3f})" for r in ranked)
    odd = "\n".join(f"- `{Path(e['path']).relative_to(SHARED / 'webfruit')}` [{e['label']}] ({e['score']:.3f})"
                     for e in f["outliers"][:7])
    return ("## Unmodified webfruit\n\n" + table(
        ["photos", "exact-duplicate groups", "near-duplicate groups (hash)", "all duplicate groups (deep)",
         "label conflicts", "likely mislabelled", "outliers", "out-of-fold accuracy"], rows)
        + f"\n\nLowest label scores ({len(f['label_issues'])} flagged):\n{top}\n\nFlagged outliers:\n{odd}\n")


def timing_part(tmp: Path) -> str:
    out = tmp / "timing-out"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fruitnet", "check", str(SHARED / "webfruit"), "--deep",
                           "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stderr)
    seconds = json.loads((out / "report.json").read_text())["deep"]["seconds"]
    return ("## `fruitnet check webfruit --deep` wall time (no feature cache)\n\n" + table(
        ["whole command", "features", "cross-validation", "cleanlab", "target"],
        [[f"**{wall:.0f} s**", f"{seconds['features']:.0f} s", f"{seconds['cross_validation']:.1f} s",
          f"{seconds['cleanlab']:.1f} s", "< 120 s"]])
        + f"\n\n{os.cpu_count()} CPU cores, shared with other jobs while measured: times are noisy.\n")


MODE = "unfreeze"  # --mode: the default recipe trains all layers; freeze is ~50x cheaper on a busy CPU
RECIPE = "fast"  # --recipe


def _train(data, out, log_to, **kw) -> dict:
    from fruitnet.training import TrainConfig, train

    with open(log_to, "w") as f:
        return train(TrainConfig(data=str(data), out=str(out), backbone="efficientnet_lite0", mode=MODE,
                                 recipe=RECIPE, **kw),
                     log=lambda *a: print(*a, file=f))


def _val_report(run: Path, tmp: Path) -> dict:
    """Per-class report of the best model on the run's own validation photos (a symlink tree)."""
    from fruitnet.evaluate import evaluate

    folder = tmp / f"{run.name}-val"
    with open(run / "split.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "val":
                (folder / row["class"]).mkdir(parents=True, exist_ok=True)
                os.symlink(Path(row["path"]).resolve(), folder / row["class"] / Path(row["path"]).name)
    return evaluate(run / "best.safetensors", folder, tmp / f"{run.name}-eval", progress=False)


def balance_part(tmp: Path) -> str:
    rows = []
    for balance in ("none", "auto"):
        run = tmp / f"balance-{balance}"
        _train(SHARED / "fruits360", run, tmp / f"balance-{balance}.log", balance=balance)
        rep = _val_report(run, tmp)
        cfg = json.loads((run / "config.json").read_text())
        per = rep["per_class"]
        train_counts = {c: 0 for c in rep["classes"]}
        with open(run / "split.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["split"] == "train":
                    train_counts[row["class"]] += 1
        smallest = min(train_counts, key=train_counts.get)
        macro_f1 = sum(p["f1"] for p in per.values()) / len(per)
        rows.append([f"`--balance {balance}`", cfg["balance"]["mode"], f"{rep['accuracy']:.4f}",
                     f"{per[smallest]['recall']:.4f} ({smallest}, {per[smallest]['support']} val photos)",
                     f"{macro_f1:.4f}", " / ".join(f"{c} {w:.2f}" for c, w in zip(rep["classes"],
                                                                                cfg["balance"]["class_weights"]))])
    return (f"## `--balance` on fruits360 (317 / 164 / 776), recipe {RECIPE}, --mode {MODE}, efficientnet_lite0, "
            "the same (near-duplicate-aware) split\n\n"
            + table(["run", "mode used", "val accuracy", "smallest class recall", "macro F1", "class weights"], rows)
            + "\n")


def split_part(tmp: Path) -> str:
    catalog = scan(SHARED / "webfruit", progress=False)
    rows = []
    for name, near in (("today's split (identical files kept together)", False),
                       ("near-duplicate-aware split (default now)", True)):
        tr, va = split(catalog, 0.25, 0, near_duplicates=near)
        folder = tmp / f"split-{int(near)}"
        for part, items in (("train", tr), ("val", va)):
            for it in items:
                (folder / part / it.label).mkdir(parents=True, exist_ok=True)
                os.symlink(Path(it.path).resolve(), folder / part / it.label / Path(it.path).name)
        leaks = sum(1 for i, j in near_duplicate_pairs([it.phash for it in tr + va]) if (i < len(tr)) != (j < len(tr)))
        summary = _train(folder / "train", tmp / f"split-run-{int(near)}", tmp / f"split-{int(near)}.log",
                         val_dir=str(folder / "val"))
        rows.append([name, len(tr), len(va), leaks, f"**{summary['best_val_accuracy']:.4f}**"])
    return ("## Validation accuracy on webfruit: today's split against the near-duplicate-aware split\n\n"
            f"Recipe {RECIPE}, --mode {MODE}, efficientnet_lite0, seed 0; the same 3:1 stratified split rule, with "
            "near-duplicate groups kept on one side or not.\n\n"
            + table(["split", "train", "val", "near-duplicate pairs across train/val", "best val accuracy"], rows)
            + "\n")


PARTS = {"corrupted": corrupted_part, "clean": clean_part, "timing": timing_part, "balance": balance_part,
         "split": split_part}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "check.md"))
    parser.add_argument("--mode", default="unfreeze", choices=["unfreeze", "freeze"],
                        help="training mode for the balance and split parts (default: the default recipe's)")
    parser.add_argument("--recipe", default="fast", choices=["fast", "seed"],
                        help="training recipe for the balance and split parts (default: fast, the default)")
    args = parser.parse_args()
    global MODE, RECIPE
    MODE, RECIPE = args.mode, args.recipe
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    sections = [f"# Data check benchmark\n\ncommit {commit}{' (with uncommitted changes)' if dirty else ''}, "
                f"{datetime.now().isoformat(timespec='minutes')}, command: "
                f"`python bench/bench_check.py {' '.join(sys.argv[1:])}`\n\nMachine: {machine()}\n"]
    with tempfile.TemporaryDirectory(prefix="doctor-bench-") as tmp:
        for name in args.parts:
            t = time.perf_counter()
            text = PARTS[name](Path(tmp)) if name in ("corrupted", "timing", "balance", "split") else PARTS[name]()
            sections.append(text + f"\n({name}: {time.perf_counter() - t:.0f} s)\n")
            print(sections[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
