"""Probe against partial fine-tuning on photos from elsewhere, by how much training data there is:
the measurement behind config.PARTIAL_FROM_PHOTOS beside bench_accuracy's GroceryStore sizes.

    .venv/bin/python bench/bench_crossover.py [--seeds 0 1 2]

Trains both recipes on webfruit alone (892 photos), on webfruit + a random half of each fruits360
class (1,520 photos) and on webfruit + fruits360 merged class by class (`fruitnet train A/ B/`,
2,149 photos), and measures each model on photos from sources it never saw: grocery/tomato (235
shop tomatoes, recall) and comp309-sample (15).  Writes --out (default bench/results/crossover.md)
with the machine, the commit and the command.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transfer import accuracy, sources  # noqa: E402
from common import REPO, SHARED, machine, mean_spread, stamp, table  # noqa: E402

DATA = {"webfruit": ("webfruit",), "webfruit + half of fruits360": ("webfruit", "fruits360/2"),
        "webfruit + fruits360": ("webfruit", "fruits360")}


def folder(name: str, work: Path) -> Path:
    """A shared data folder; "NAME/2": a copy of a random half (seed 0) of each of its classes."""
    if not name.endswith("/2"):
        return SHARED / name
    source, half = SHARED / name[:-2], work / (name[:-2] + "-half")
    if not half.exists():
        for cls in sorted(p for p in source.iterdir() if p.is_dir()):
            photos = sorted(cls.iterdir())
            (half / cls.name).mkdir(parents=True)
            for photo in random.Random(0).sample(photos, len(photos) // 2):
                shutil.copy2(photo, half / cls.name / photo.name)
    return half


def one_run(folders: tuple[str, ...], recipe: str, seed: int, work: Path, data: dict) -> dict:
    from fruitnet.training import TrainConfig, train

    t = time.perf_counter()
    summary = train(TrainConfig(data=tuple(str(folder(f, work)) for f in folders),
                                out=str(work / f"{'+'.join(folders).replace('/', '-')}-{recipe}-{seed}"),
                                recipe=recipe, seed=seed), log=lambda *a: None)
    model = Path(summary["model"])
    with open(Path(summary["run"]) / "split.csv", newline="") as f:
        training = sum(row["split"] == "train" for row in csv.DictReader(f))
    return {"seconds": time.perf_counter() - t, "val": summary["best_val_accuracy"], "training": training,
            "tomato": accuracy(model, data["grocery-tomato"], only="tomato"), "comp309": accuracy(model, data["comp309-sample"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--sets", nargs="+", choices=list(DATA), default=list(DATA), help="training sets (default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "crossover.md")
    args = ap.parse_args()
    header, started, data, rows = machine(), stamp(), sources(), []
    with tempfile.TemporaryDirectory(prefix="fruitnet-crossover-") as tmp:
        for name, folders in ((n, DATA[n]) for n in args.sets):
            for recipe in ("probe", "partial"):
                runs = [one_run(folders, recipe, seed, Path(tmp), data) for seed in args.seeds]
                print(name, recipe, runs, file=sys.stderr, flush=True)
                cells = [mean_spread([r[k] for r in runs], ".0f" if k == "seconds" else ".3f")
                         for k in ("val", "tomato", "comp309", "seconds")]
                rows.append([f"{name} ({runs[0]['training']:,})", recipe] + cells)
    text = "\n\n".join([f"Machine: {header}.", started, f"Seeds: {args.seeds}.", table(
        ["training data (training photos)", "recipe", "own validation", "grocery/tomato recall", "comp309-sample", "training, s"], rows)])
    print(text)
    args.out.write_text("# Probe against partial on photos from elsewhere (bench/bench_crossover.py)\n\n" + text + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
