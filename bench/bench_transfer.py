"""Cross-source benchmark (issue 8): train with fruitnet on one source of photos, test on the others.

    .venv/bin/python bench/bench_transfer.py --tta --scaling      # docs/results.md's table: 3 seeds, TTA, 4,500 photos
    .venv/bin/python bench/bench_transfer.py --variants lite1-fast lite1-fast-nowise --seeds 0
    .venv/bin/python bench/bench_transfer.py --list                # what each variant is

Each variant is a set of `fruitnet train` options, trained through the library exactly as the
command line trains them (the run folders go to a temporary folder).  Per variant and seed:
- train on webfruit (its own 3:1 split, seeded) -> validation accuracy on the held-out quarter
  (in-source), accuracy on all of fruits360, the recall of "tomato" on grocery/tomato, accuracy on
  comp309-sample;
- train on fruits360 -> accuracy on all of webfruit.
Accuracy counts the best class (the "unknown" verdict is measured by bench_trust.py).  Nothing is
tuned on grocery/: it stands for a user's unseen photos.  Prints a markdown table (mean ± spread
over the seeds) and writes bench/results/transfer.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, machine, mean_spread, stamp, table  # noqa: E402

from fruitnet.config import InferenceOptions, TrainConfig  # noqa: E402
from fruitnet.dataset import scan  # noqa: E402

VARIANTS = {  # fruitnet train options; {} is the defaults
    "default": {},
    "lite0": {"backbone": "efficientnet_lite0"},
    "lite2": {"backbone": "efficientnet_lite2"},
    "lite1-fast-freeze": {"recipe": "fast", "mode": "freeze"},
    "lite1-fast": {"mode": "unfreeze"},  # the fast recipe saves the WiSE-FT mix 0.5
    "lite1-fast-nowise": {"mode": "unfreeze", "wise": 1.0},
    "lite0-fast-nowise": {"backbone": "efficientnet_lite0", "mode": "unfreeze", "wise": 1.0},  # the default before
    "original": {"backbone": "efficientnet_lite0", "recipe": "seed", "mode": "freeze", "epochs": 10},
}


def sources() -> dict[str, list[str]]:
    grocery = scan(SHARED / "grocery", progress=False).usable
    out = {name: [it.path for it in scan(SHARED / name, progress=False).usable]
           for name in ("webfruit", "fruits360", "comp309-sample")}
    out["grocery-tomato"] = [it.path for it in grocery if it.label == "tomato"]
    return out


def accuracy(model: Path, paths: list[str], only: str | None = None, tta: bool = False) -> float:
    """Share of paths whose best class is the parent folder's name (or `only`, for a recall)."""
    from fruitnet.predictors import load_predictor

    results = load_predictor(model, InferenceOptions(tta=tta)).predict_paths(paths, batch_size=64)
    right = [r.get("best_guess", r.get("label")) == (only or Path(r["path"]).parent.name) for r in results]
    return sum(right) / len(right)


def run(variant: str, seed: int, data: dict[str, list[str]], work: Path, tta: bool, options: dict | None = None) -> dict:
    """One variant's row; `options` (fruitnet train options) default to VARIANTS[variant]'s."""
    from fruitnet.training import train

    options = VARIANTS[variant] if options is None else options
    row = {}
    t = time.perf_counter()
    summary = train(TrainConfig(data=str(SHARED / "webfruit"), out=str(work / f"{variant}-web-{seed}"), seed=seed,
                                **options), log=lambda *a: None)
    row["train_seconds"] = time.perf_counter() - t
    model = Path(summary["model"])
    row["webfruit_val"] = summary["best_val_accuracy"]
    row["fruits360"] = accuracy(model, data["fruits360"])
    row["grocery_tomato_recall"] = accuracy(model, data["grocery-tomato"], only="tomato")
    row["comp309"] = accuracy(model, data["comp309-sample"])
    if tta:
        row["fruits360_tta"] = accuracy(model, data["fruits360"], tta=True)
        row["grocery_tomato_recall_tta"] = accuracy(model, data["grocery-tomato"], only="tomato", tta=True)
    summary = train(TrainConfig(data=str(SHARED / "fruits360"), out=str(work / f"{variant}-f360-{seed}"), seed=seed,
                                **options), log=lambda *a: None)
    row["f360_to_webfruit"] = accuracy(Path(summary["model"]), data["webfruit"])
    if tta:
        row["f360_to_webfruit_tta"] = accuracy(Path(summary["model"]), data["webfruit"], tta=True)
    return row


def scaling_folder(folder: Path, photos: list[str], copies: int = 5, seed: int = 0) -> int:
    """A 4,500-photo training folder: `copies` re-encoded random crops (50-90% of the area,
    300-600 px, JPEG quality 80-95) of each webfruit photo, by class."""
    import random

    from PIL import Image

    from fruitnet.images import load_image

    rng = random.Random(seed)
    n = 0
    for path in photos:
        img = load_image(path)
        for k in range(copies):
            share = rng.uniform(0.5, 0.9) ** 0.5
            w, h = int(img.width * share), int(img.height * share)
            x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
            side = rng.randint(300, 600)
            crop = img.crop((x, y, x + w, y + h)).resize((side, max(1, round(side * h / w))), Image.BICUBIC)
            out = folder / Path(path).parent.name / f"{Path(path).stem}-{k}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            crop.save(out, quality=rng.randint(80, 95))
            n += 1
    return n


def scaling(work: Path, webfruit: list[str]) -> str:
    """The default training on 892 and on ~4,500 photos: time per photo should stay flat."""
    from fruitnet.training import train

    folder = work / "scaling-data"
    n = scaling_folder(folder, webfruit)
    rows = []
    for name, data in (("webfruit", SHARED / "webfruit"), (f"{n} re-encoded crops of webfruit", folder)):
        t = time.perf_counter()
        summary = train(TrainConfig(data=str(data), out=str(work / f"scaling-{len(rows)}")), log=lambda *a: None)
        seconds = time.perf_counter() - t
        photos = sum(1 for _ in open(Path(summary["run"]) / "split.csv")) - 1
        rows.append([name, photos, f"{seconds:.0f}", f"{1000 * seconds / photos:.0f}", f"{summary['best_val_accuracy']:.3f}"])
    return "Default training (`fruitnet train DATA`), wall-clock from the scan to the finished run:\n\n" + table(
        ["data", "photos", "seconds", "ms per photo", "val accuracy"], rows)


COLUMNS = [("webfruit_val", "webfruit val (in-source)"), ("fruits360", "webfruit -> fruits360"),
           ("grocery_tomato_recall", "webfruit -> grocery/tomato recall"), ("comp309", "webfruit -> comp309"),
           ("f360_to_webfruit", "fruits360 -> webfruit"), ("train_seconds", "training on webfruit, s")]
TTA_COLUMNS = [("fruits360_tta", "--tta: webfruit -> fruits360"), ("grocery_tomato_recall_tta", "--tta: grocery/tomato"),
               ("f360_to_webfruit_tta", "--tta: fruits360 -> webfruit")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["default", "lite0"], choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "transfer.md")
    ap.add_argument("--tta", action="store_true", help="also measure each model with --tta (mirror averaging)")
    ap.add_argument("--scaling", action="store_true",
                    help="also time the default training on webfruit and on a 4,500-photo folder made from it")
    ap.add_argument("--list", action="store_true", help="print the variants' training options and stop")
    args = ap.parse_args()
    if args.list:
        for name, options in VARIANTS.items():
            print(f"{name:>18}: fruitnet train DATA " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items()))
        return
    if not (SHARED / "webfruit").is_dir():
        sys.exit(f"{SHARED}: the shared data folders are needed (webfruit, fruits360, grocery, comp309-sample)")
    header = machine()
    data = sources()
    rows = []
    columns = COLUMNS + (TTA_COLUMNS if args.tta else [])
    with tempfile.TemporaryDirectory(prefix="fruitnet-transfer-") as tmp:
        for variant in args.variants:
            results = []
            for seed in args.seeds:
                results.append(run(variant, seed, data, Path(tmp), args.tta))
                print(variant, seed, {k: round(v, 3) for k, v in results[-1].items()}, file=sys.stderr, flush=True)
            options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in VARIANTS[variant].items()) or "(defaults)"
            rows.append([variant, f"`{options}`"] + [mean_spread([r[k] for r in results], ".0f" if k == "train_seconds"
                                                                 else ".3f") for k, _ in columns])
        scaled = scaling(Path(tmp), data["webfruit"]) if args.scaling else None
    text = "\n\n".join([f"Machine: {header}.", stamp(), f"Seeds: {args.seeds} (mean ± standard deviation).",
                        table(["variant", "options"] + [c for _, c in columns], rows)] + ([scaled] if scaled else []))
    print(text)
    args.out.write_text("# Cross-source accuracy (bench/bench_transfer.py)\n\n" + text + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
