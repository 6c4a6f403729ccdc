"""Accuracy per minute on a paper's benchmark (issue 21): GroceryStore's 81 fine-grained and 43
coarse-grained classes, against the published line, with bench_transfer's webfruit columns beside them.

    .venv/bin/python bench/bench_accuracy.py                          # the docs' table: defaults and variants, 3 seeds
    .venv/bin/python bench/bench_accuracy.py --variants probe default --seeds 0
    .venv/bin/python bench/bench_accuracy.py --sizes                  # what the default's choice by data size rests on
    .venv/bin/python bench/bench_accuracy.py --list                   # what each variant is

Per variant and seed, trained through the library exactly as `fruitnet train` trains (run folders
in a temporary folder):
- `grocerystore/train` (fine, 81 classes) and its coarse view (43 classes, built by the data's own
  make_coarse.py) -> accuracy of the best class on the matching `test/`, and the training's
  wall-clock (scan, decoding and every feature pass included).  fruitnet's own 3:1 split of
  train/ is the validation (GroceryStore's val/ lacks 21 of the 81 classes); nothing is tuned on test/;
- with --transfer (on by default), bench_transfer's columns for the same options: webfruit val,
  webfruit -> fruits360, webfruit -> grocery/tomato recall, fruits360 -> webfruit, and the
  training time on webfruit, so that no variant wins one table and quietly loses the other.
Every finished run is appended to a JSON-lines file (--log), so an interrupted benchmark goes on
where it stopped (--resume) and the table can be printed again from it (--table-only).
Writes bench/results/accuracy.md (machine, commit, command, the published line beside the table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transfer import run as transfer_run  # noqa: E402
from bench_transfer import sources  # noqa: E402
from common import REPO, SHARED, machine, mean_spread, stamp, table  # noqa: E402

from fruitnet.config import InferenceOptions, TrainConfig  # noqa: E402
from fruitnet.dataset import scan  # noqa: E402

PUBLISHED = {"fine": 0.8604, "coarse": 0.9199}  # fine-tuned CNNs on GroceryStore's test split (Antioquia, PCSC 2021)
VARIANTS = {  # fruitnet train options; {} is the defaults
    "probe": {"recipe": "probe"},  # the default before issue 21
    "default": {},
    "partial-1": {"mode": "partial", "unfreeze_last": 1},
    "partial-2": {"mode": "partial", "unfreeze_last": 2},
    "partial-3": {"mode": "partial", "unfreeze_last": 3},
    "partial-2-12ep": {"mode": "partial", "unfreeze_last": 2, "epochs": 12},
    "lite2-probe": {"backbone": "efficientnet_lite2", "recipe": "probe"},
    "lite2-partial-2": {"backbone": "efficientnet_lite2", "mode": "partial", "unfreeze_last": 2},
}
SIZES = [250, 500, 1000, 1500, 2640]  # --sizes: photos drawn from grocerystore/train (its 3:1 split inside)


def coarse_view(work: Path) -> Path:
    """GroceryStore's coarse view (43 classes), built by the data's own make_coarse.py as symlinks."""
    out = work / "grocerystore-coarse"
    if not out.is_dir():
        subprocess.run([sys.executable, str(SHARED / "grocerystore" / "make_coarse.py"), str(out)], check=True,
                       capture_output=True)
    return out


def test_accuracy(model: Path, folder: Path) -> float:
    """Share of the photos under folder/<class>/ whose best class is their folder's name."""
    from fruitnet.predictors import load_predictor

    paths = [it.path for it in scan(folder, progress=False).usable]
    results = load_predictor(model, InferenceOptions()).predict_paths(paths, batch_size=64)
    return sum(r.get("best_guess", r.get("label")) == Path(r["path"]).parent.name for r in results) / len(results)


def grocery_run(options: dict, seed: int, views: dict[str, Path], work: Path, tag: str) -> dict:
    """Train on each view's train/ (fine, coarse), test on its test/."""
    from fruitnet.training import train

    row = {}
    for name, root in views.items():
        t = time.perf_counter()
        summary = train(TrainConfig(data=str(root / "train"), out=str(work / f"{tag}-{name}-{seed}"), seed=seed,
                                    **options), log=lambda *a: None)
        row[f"{name}_seconds"] = time.perf_counter() - t
        row[f"{name}_val"] = summary["best_val_accuracy"]
        row[f"{name}_test"] = test_accuracy(Path(summary["model"]), root / "test")
        row[f"{name}_recipe"] = json.loads((Path(summary["run"]) / "config.json").read_text())["train"]["recipe"]
    return row


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


COLUMNS = [("fine_test", "GroceryStore fine (81) test"), ("fine_seconds", "fine: training, s"),
           ("coarse_test", "coarse (43) test"), ("coarse_seconds", "coarse: training, s"),
           ("webfruit_val", "webfruit val"), ("fruits360", "webfruit -> fruits360"),
           ("grocery_tomato_recall", "webfruit -> grocery/tomato recall"), ("f360_to_webfruit", "fruits360 -> webfruit"),
           ("train_seconds", "training on webfruit, s")]


def results_table(entries: list[dict], variants: list[str]) -> str:
    rows = [["published line (fine-tuned CNNs, Antioquia, PCSC 2021)", "-", f"{PUBLISHED['fine']:.3f}", "-",
             f"{PUBLISHED['coarse']:.3f}"] + ["-"] * (len(COLUMNS) - 3)]
    for variant in variants:
        by_seed: dict[int, dict] = {}  # a seed's columns may come from several invocations (--views, --no-transfer)
        for e in entries:
            if e["variant"] == variant:
                by_seed.setdefault(e["seed"], {}).update(e["row"])
        runs = list(by_seed.values())
        if not runs:
            continue
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in runs[0]["options"].items()) or "(defaults)"
        cells = []
        for key, _ in COLUMNS:
            values = [r[key] for r in runs if key in r]
            cells.append(mean_spread(values, ".0f" if key.endswith("seconds") else ".3f") if values else "not run")
        recipes = sorted({r[k] for r in runs for k in ("fine_recipe", "coarse_recipe") if k in r})
        on_grocery = f"; GroceryStore trained by {', '.join(recipes)}" if recipes else ""
        rows.append([f"{variant} ({len(runs)} seed{'s' * (len(runs) > 1)}{on_grocery})",
                     f"`{options}`"] + cells)
    return table(["variant", "options"] + [c for _, c in COLUMNS], rows)


def sizes_table(work: Path, sizes: list[int], seeds: list[int], log: Path, train_missing: bool = True) -> str:
    """Probe against partial on growing shares of grocerystore/train (fine): accuracy on test/
    and training time, the measurement behind config.PARTIAL_FROM_PHOTOS.  train_missing=False
    (--table-only): only what the log holds."""
    import random

    done = {(e["size"], e["recipe"], e["seed"]): e for e in read_log(log) if "size" in e}
    everything = sorted(str(p) for p in (SHARED / "grocerystore" / "train").glob("*/*.jpg"))
    for size in sizes if train_missing else []:
        for seed in seeds:
            folder = work / f"sizes-{size}-{seed}"
            for photo in random.Random(seed).sample(everything, min(size, len(everything))):
                link = folder / Path(photo).parent.name / Path(photo).name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.exists() or link.symlink_to(photo)
            for recipe in ("probe", "partial"):
                if (size, recipe, seed) in done:
                    continue
                from fruitnet.training import train

                t = time.perf_counter()
                summary = train(TrainConfig(data=str(folder), out=str(work / f"sizes-{size}-{recipe}-{seed}"), seed=seed,
                                            recipe=recipe), log=lambda *a: None)
                entry = {"size": size, "recipe": recipe, "seed": seed, "seconds": time.perf_counter() - t,
                         "test": test_accuracy(Path(summary["model"]), SHARED / "grocerystore" / "test")}
                done[(size, recipe, seed)] = entry
                with open(log, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                print(entry, file=sys.stderr, flush=True)
    rows = []
    for size in sizes:
        cells = []
        for recipe in ("probe", "partial"):
            got = [done[(size, recipe, s)] for s in seeds if (size, recipe, s) in done]
            cells += [mean_spread([e["test"] for e in got]) if got else "-",
                      mean_spread([e["seconds"] for e in got], ".0f") if got else "-"]
        rows.append([size, round(size * 0.75)] + cells)
    return ("The default's choice by data size: probe against partial on a random share of grocerystore/train "
            "(fine), test accuracy on all of test/:\n\n" + table(
                ["photos", "about as many training photos (3:1 split)", "probe: test", "probe: s", "partial: test",
                 "partial: s"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["probe", "default"], choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--views", nargs="*", default=["fine", "coarse"], choices=["fine", "coarse"],
                    help="which GroceryStore views to train (a row misses the others' columns)")
    ap.add_argument("--no-transfer", dest="transfer", action="store_false",
                    help="leave out bench_transfer's webfruit columns")
    ap.add_argument("--sizes", nargs="*", type=int, metavar="PHOTOS",
                    help=f"also measure probe against partial on this many photos of grocerystore/train "
                         f"(none given: {' '.join(map(str, SIZES))})")
    ap.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "fruitnet-accuracy.jsonl",
                    help="finished runs, one JSON a line (appended; with --resume, runs in it are not run again)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --log")
    ap.add_argument("--table-only", action="store_true", help="print the table from --log, train nothing")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accuracy.md")
    ap.add_argument("--list", action="store_true", help="print the variants' training options and stop")
    args = ap.parse_args()
    if args.list:
        for name, options in VARIANTS.items():
            print(f"{name:>16}: fruitnet train DATA " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items()))
        return
    if not (SHARED / "grocerystore" / "train").is_dir():
        sys.exit(f"skipped: {SHARED / 'grocerystore'} is needed (set FRUITNET_SHARED_DATA)")
    if not (args.resume or args.table_only) and args.log.exists():
        args.log.unlink()
    header, started, entries = machine(), stamp(), read_log(args.log)  # the commit that runs, not the one at the end
    with tempfile.TemporaryDirectory(prefix="fruitnet-accuracy-") as tmp:
        work = Path(tmp)
        views = {name: SHARED / "grocerystore" if name == "fine" else coarse_view(work) for name in args.views}
        data = sources() if args.transfer and not args.table_only else None
        for variant in [] if args.table_only else args.variants:
            for seed in args.seeds:
                if any(e.get("variant") == variant and e["seed"] == seed and e.get("views", ["fine", "coarse"]) ==
                       args.views and ("webfruit_val" in e["row"]) == args.transfer for e in entries):
                    continue
                options = VARIANTS[variant]
                row = {"options": options, **grocery_run(options, seed, views, work, variant)}
                if data is not None:
                    row.update(transfer_run(variant, seed, data, work, False, options))
                entries.append({"variant": variant, "seed": seed, "views": args.views, "row": row})
                with open(args.log, "a") as f:
                    f.write(json.dumps(entries[-1]) + "\n")
                print(variant, seed, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)},
                      file=sys.stderr, flush=True)
        sized = (sizes_table(work, args.sizes or SIZES, args.seeds, args.log, not args.table_only)
                 if args.sizes is not None else None)
    seeds = sorted({e["seed"] for e in entries if "variant" in e})
    text = "\n\n".join([f"Machine: {header}.", started, f"Seeds: {seeds} (mean ± standard deviation).",
                        results_table([e for e in entries if "variant" in e], list(VARIANTS))]
                       + ([sized] if sized else []))
    print(text)
    args.out.write_text("# Accuracy per minute: GroceryStore and the webfruit columns (bench/bench_accuracy.py)\n\n"
                        + text + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
