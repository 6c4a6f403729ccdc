"""Training and inference speed/accuracy benchmark (issue: fast training on a laptop CPU).

    .venv/bin/python bench/bench_train.py            # all four parts, ~30-40 min on 2 CPU cores
    .venv/bin/python bench/bench_train.py --parts 1 4

Prints markdown tables and writes them to bench/results/train.md.  Everything in one run, on
one machine, side by side: quote the ratios, not the absolute seconds (shared machines are noisy).
1. per-epoch time: a faithful re-creation of the original loop (bench/original_loop.py) against
   `fruitnet train`, ResNet18 (random weights: timing only), webfruit 3:1 split, both modes;
2. validation accuracy against wall-clock time, efficientnet_lite0, seed recipe vs fast recipe;
3. both recipes trained on fruits360 (studio shots), evaluated on all of webfruit (real photos);
4. `fruitnet predict` end-to-end images per second on webfruit, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
SHARED = Path(os.environ.get("FRUITNET_SHARED_DATA", REPO.parent / "shared" / "data"))

from original_loop import original_epochs  # noqa: E402

from fruitnet.arithmetic import choose  # noqa: E402
from fruitnet.dataset import scan, split  # noqa: E402
from fruitnet.training import TrainConfig, train  # noqa: E402


def quiet(*_args, **_kw):
    pass


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    arith = choose("auto", torch.device("cpu"))
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}; "
            f"auto arithmetic: {arith.dtype} ({arith.reason})")


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def run_train(tmp: Path, name: str, **kw) -> tuple[dict, list[dict], float]:
    t0 = time.perf_counter()
    summary = train(TrainConfig(out=str(tmp / name), **kw), log=quiet)
    wall = time.perf_counter() - t0
    import csv

    rows = list(csv.DictReader(open(tmp / name / "metrics.csv")))
    return summary, rows, wall


def part1(tmp: Path, webfruit: Path) -> str:
    catalog = scan(webfruit, progress=False)
    tr, va = split(catalog, 0.25, 0)
    tr_items, va_items = [(i.path, i.label) for i in tr], [(i.path, i.label) for i in va]
    print("part 1: original loop, frozen epoch ...", flush=True)
    orig_frozen = original_epochs(tr_items, va_items, catalog.classes, frozen=True)[0]["seconds"]
    print(f"  {orig_frozen:.1f}s\npart 1: original loop, unfrozen epoch ...", flush=True)
    orig_unfrozen = original_epochs(tr_items, va_items, catalog.classes, frozen=False)[0]["seconds"]
    print(f"  {orig_unfrozen:.1f}s\npart 1: fruitnet frozen, 10 epochs ...", flush=True)
    common = dict(data=str(webfruit), backbone="resnet18", weights="none", recipe="seed")
    _, rows_f, wall_f = run_train(tmp, "p1-frozen", mode="freeze", epochs=10, **common)
    later_f = sum(float(r["seconds"]) for r in rows_f[1:]) / (len(rows_f) - 1)
    print("part 1: fruitnet unfrozen, 2 epochs ...", flush=True)
    _, rows_u, wall_u = run_train(tmp, "p1-unfrozen", mode="unfreeze", epochs=2, **common)
    first_u, later_u = float(rows_u[0]["seconds"]), float(rows_u[1]["seconds"])
    return table(
        ["ResNet18, webfruit 670 train / 222 val", "original loop", "fruitnet", "speed-up"],
        [["frozen: one epoch (after fruitnet's first)", f"{orig_frozen:.1f} s", f"{later_f * 1000:.1f} ms",
          f"{orig_frozen / later_f:,.0f}x"],
         ["frozen: whole 10-epoch run (feature pass included)", f"{10 * orig_frozen:.0f} s (10 x 1 epoch)",
          f"{sum(float(r['seconds']) for r in rows_f):.1f} s", f"{10 * orig_frozen / sum(float(r['seconds']) for r in rows_f):.1f}x"],
         ["unfrozen: first epoch (fruitnet decodes and caches images)", f"{orig_unfrozen:.1f} s", f"{first_u:.1f} s",
          f"{orig_unfrozen / first_u:.1f}x"],
         ["unfrozen: later epoch", f"{orig_unfrozen:.1f} s", f"{later_u:.1f} s", f"{orig_unfrozen / later_u:.1f}x"]])


def time_to(rows: list[dict], threshold: float) -> str:
    total = 0.0
    for r in rows:
        total += float(r["seconds"])
        if float(r["val_accuracy"]) >= threshold:
            return f"{total:.0f} s (epoch {r['epoch']})"
    return "not reached"


def part2(tmp: Path, webfruit: Path, seed_epochs: int) -> str:
    out_rows, curves = [], []
    for recipe, epochs in (("seed", seed_epochs), ("fast", None)):
        print(f"part 2: efficientnet_lite0, recipe {recipe} ...", flush=True)
        kw = dict(epochs=epochs) if epochs else {}
        summary, rows, wall = run_train(tmp, f"p2-{recipe}", data=str(webfruit), backbone="efficientnet_lite0",
                                        recipe=recipe, mode="unfreeze", **kw)
        out_rows.append([recipe, len(rows), f"{summary['best_val_accuracy']:.4f}", f"{float(rows[-1]['val_accuracy']):.4f}",
                         time_to(rows, 0.95), time_to(rows, 0.98), f"{wall:.0f} s"])
        cum = 0.0
        for r in rows:
            cum += float(r["seconds"])
            curves.append(f"{recipe}: {cum:.0f}s {float(r['val_accuracy']):.3f}")
    return table(["efficientnet_lite0, webfruit 3:1, unfrozen", "epochs", "best val acc", "final val acc",
                  "time to 0.95", "time to 0.98", "wall-clock (scan and setup included)"], out_rows) + \
        "\n\nval accuracy vs cumulative seconds: " + "; ".join(curves)


def part3(tmp: Path, fruits360: Path, webfruit: Path, seed_epochs: int) -> str:
    from fruitnet.evaluate import evaluate

    rows = []
    for recipe, epochs in (("seed", seed_epochs), ("fast", None)):
        for mode in ("unfreeze", "freeze"):
            print(f"part 3: fruits360 -> webfruit, recipe {recipe}, {mode} ...", flush=True)
            kw = dict(epochs=epochs) if epochs else {}
            name = f"p3-{recipe}-{mode}"
            summary, _, wall = run_train(tmp, name, data=str(fruits360), backbone="efficientnet_lite0",
                                         recipe=recipe, mode=mode, **kw)
            report = evaluate(summary["model"], webfruit, tmp / f"{name}-eval", progress=False)
            per = ", ".join(f"{c} {v['accuracy']:.2f}" for c, v in report["per_class"].items())
            rows.append([recipe, mode, f"{summary['best_val_accuracy']:.4f}", f"{report['accuracy']:.4f} ({per})",
                         f"{wall:.0f} s"])
    return table(["efficientnet_lite0 trained on fruits360 only: recipe", "mode", "val acc (studio shots)",
                  "accuracy on all 892 webfruit photos (per class)", "training wall-clock"], rows)


PREDICT_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from fruitnet.predictors import TorchPredictor, expand_paths
model, folder, precision = sys.argv[1:4]
predictor = TorchPredictor(model, precision=precision)
paths, _ = expand_paths([folder])
predictor.predict_paths(paths[:8])  # warm-up: kernels are built on first use
t1 = time.perf_counter()
results = predictor.predict_paths(paths)
t2 = time.perf_counter()
print(json.dumps({"ok": sum("label" in r for r in results), "steady": t2 - t1, "start": t1 - t0,
                  # VmHWM: this process's own peak (ru_maxrss on Linux keeps the forking parent's)
                  "peak_mib": int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM"))) / 1024}))
"""


def part4(tmp: Path, webfruit: Path) -> str:
    from fruitnet.backbones import get_backbone
    from fruitnet.model import create_classifier, save_model

    model, _ = create_classifier("efficientnet_lite0", 3, "imagenet")
    path = save_model(tmp / "lite0.safetensors", model, {"classes": ["cherry", "strawberry", "tomato"],
                      "backbone": "efficientnet_lite0", "preprocessing": get_backbone("efficientnet_lite0").preprocessing})
    rows = []
    for precision in ("fp32", "auto"):
        print(f"part 4: fruitnet predict, precision {precision} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fruitnet", "predict", str(path), str(webfruit), "--json",
                               "--precision", precision], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ok = sum("label" in r for r in json.loads(proc.stdout))
        child = json.loads(subprocess.run([sys.executable, "-c", PREDICT_CHILD, str(path), str(webfruit), precision],
                                          capture_output=True, text=True, check=True).stdout)
        rows.append([precision, ok, f"{wall:.1f} s", f"{ok / wall:.0f} img/s", f"{child['ok'] / child['steady']:.0f} img/s",
                     f"{child['peak_mib']:.0f} MiB"])
    return table(["`fruitnet predict` on all of webfruit", "images", "whole command (Python start-up included)",
                  "whole command", "steady state (decode included, start-up and warm-up excluded)",
                  "peak memory (RSS)"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--seed-epochs", type=int, default=10, help="epochs for the seed recipe in parts 2 and 3")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train.md"))
    args = ap.parse_args()
    webfruit, fruits360 = SHARED / "webfruit", SHARED / "fruits360"
    if not webfruit.is_dir() or not fruits360.is_dir():
        sys.exit(f"skipped: the benchmark needs {webfruit} and {fruits360} (set FRUITNET_SHARED_DATA)")
    sections = [f"# Training and inference benchmark\n\nMachine: {machine()}\n"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = {1: lambda: part1(tmp, webfruit), 2: lambda: part2(tmp, webfruit, args.seed_epochs),
                 3: lambda: part3(tmp, fruits360, webfruit, args.seed_epochs), 4: lambda: part4(tmp, webfruit)}
        for p in args.parts:
            t0 = time.perf_counter()
            sections.append(f"## Part {p}\n\n{parts[p]()}\n\n(part took {time.perf_counter() - t0:.0f} s)\n")
            print(sections[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
