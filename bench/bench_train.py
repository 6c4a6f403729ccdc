"""Training and inference speed/accuracy benchmark (issue: fast training on a laptop CPU).

    .venv/bin/python bench/bench_train.py              # all four parts, ~30-40 min on 2 CPU cores
    .venv/bin/python bench/bench_train.py --repeats 3  # parts 1-3 over seeds 0, 1, 2: mean ± spread
    .venv/bin/python bench/bench_train.py --parts 1 4
    .venv/bin/python bench/bench_train.py --parts 4 --baseline main --repeats 3  # predict: this commit vs main
    .venv/bin/python bench/bench_train.py --parts 1 --baseline 076ce8e --repeats 2  # training: this commit vs 076ce8e
    .venv/bin/python bench/bench_train.py --quick      # about a minute, bundled demo photos only

Prints markdown tables and writes them to bench/results/train.md.  Everything in one run, on
one machine, side by side: quote the ratios, not the absolute seconds (shared machines are noisy).
1. per-epoch time: a faithful re-creation of the original loop (bench/original_loop.py) against
   `fruitnet train`, ResNet18 (random weights: timing only), webfruit 3:1 split, both modes;
2. validation accuracy against wall-clock time, efficientnet_lite0, seed recipe vs fast recipe;
3. both recipes trained on fruits360 (studio shots), evaluated on all of webfruit (real photos);
4. `fruitnet predict` end-to-end images per second on webfruit, and peak memory.
With --baseline REF, parts 1 and 4 also run REF's code, interleaved run by run (compare like with
like on a loaded machine); part 1 then times `fruitnet train` only, this commit against REF.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEMO_DATA, REPO, SHARED, machine, mean_spread, stamp, table  # noqa: E402
from original_loop import original_epochs  # noqa: E402

from fruitnet.config import TrainConfig  # noqa: E402
from fruitnet.dataset import scan, split  # noqa: E402
from fruitnet.training import train  # noqa: E402


def quiet(*_args, **_kw):
    pass


@dataclass
class Setup:
    """Which photos each part uses, how long it trains and over how many seeds."""

    inside: Path  # parts 1-2: 3:1 split of one folder (webfruit)
    studio: Path  # part 3: trained on this (fruits360) ...
    real: Path  # ... evaluated on this (webfruit)
    seed_epochs: int
    fast_epochs: int | None  # None: the recipe's
    unfrozen_epochs: int  # part 1
    seeds: list[int]


def run_train(tmp: Path, name: str, **kw) -> tuple[dict, list[dict], float]:
    t0 = time.perf_counter()
    summary = train(TrainConfig(out=str(tmp / name), **kw), log=quiet)
    wall = time.perf_counter() - t0
    import csv

    rows = list(csv.DictReader(open(tmp / name / "metrics.csv")))
    return summary, rows, wall


def part1(tmp: Path, setup: Setup) -> str:
    """Seconds per epoch, original loop vs fruitnet, each measured once per seed, side by side."""
    catalog = scan(setup.inside, progress=False)
    tr, va = split(catalog, 0.25, 0)
    tr_items, va_items = [(i.path, i.label) for i in tr], [(i.path, i.label) for i in va]
    m = {k: [] for k in ("orig_frozen", "orig_unfrozen", "later_f", "total_f", "first_u", "later_u")}
    for seed in setup.seeds:
        print(f"part 1 (seed {seed}): original loop, frozen and unfrozen epoch ...", flush=True)
        m["orig_frozen"].append(original_epochs(tr_items, va_items, catalog.classes, frozen=True, seed=seed)[0]["seconds"])
        m["orig_unfrozen"].append(original_epochs(tr_items, va_items, catalog.classes, frozen=False, seed=seed)[0]["seconds"])
        print(f"part 1 (seed {seed}): fruitnet frozen 10 epochs, unfrozen {setup.unfrozen_epochs} ...", flush=True)
        common = dict(data=str(setup.inside), backbone="resnet18", weights="none", recipe="seed", seed=seed)
        _, rows_f, _ = run_train(tmp, f"p1-frozen-{seed}", mode="freeze", epochs=10, **common)
        m["later_f"].append(sum(float(r["seconds"]) for r in rows_f[1:]) / (len(rows_f) - 1))
        m["total_f"].append(sum(float(r["seconds"]) for r in rows_f))
        _, rows_u, _ = run_train(tmp, f"p1-unfrozen-{seed}", mode="unfreeze", epochs=setup.unfrozen_epochs, **common)
        m["first_u"].append(float(rows_u[0]["seconds"]))
        m["later_u"].append(sum(float(r["seconds"]) for r in rows_u[1:]) / (len(rows_u) - 1))
    ratio = lambda a, b: mean_spread([x / y for x, y in zip(m[a], m[b])], ",.1f") + "x"  # noqa: E731
    return table(
        [f"ResNet18, {setup.inside.name} {len(tr)} train / {len(va)} val", "original loop", "fruitnet", "speed-up"],
        [["frozen: one epoch (after fruitnet's first)", mean_spread(m["orig_frozen"], ".1f") + " s",
          mean_spread([x * 1000 for x in m["later_f"]], ".1f") + " ms", ratio("orig_frozen", "later_f")],
         ["frozen: whole 10-epoch run (feature pass included)", mean_spread([10 * x for x in m["orig_frozen"]], ".0f")
          + " s (10 x 1 epoch)", mean_spread(m["total_f"], ".1f") + " s",
          mean_spread([10 * x / y for x, y in zip(m["orig_frozen"], m["total_f"])], ".1f") + "x"],
         ["unfrozen: first epoch (fruitnet decodes and caches images)", mean_spread(m["orig_unfrozen"], ".1f") + " s",
          mean_spread(m["first_u"], ".1f") + " s", ratio("orig_unfrozen", "first_u")],
         ["unfrozen: later epoch", mean_spread(m["orig_unfrozen"], ".1f") + " s", mean_spread(m["later_u"], ".1f") + " s",
          ratio("orig_unfrozen", "later_u")]])


def cli_rows(src: Path, out: Path, data: Path, mode: str, epochs: int, seed: int) -> list[dict]:
    """`fruitnet train` as a user runs it, from the code in src/ (ResNet18, random weights, seed
    recipe); its metrics.csv rows."""
    import csv
    import os

    subprocess.run([sys.executable, "-m", "fruitnet", "train", str(data), "--out", str(out), "--backbone", "resnet18",
                    "--weights", "none", "--recipe", "seed", "--mode", mode, "--epochs", str(epochs), "--seed", str(seed)],
                   capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(src)})
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def part1_baseline(tmp: Path, setup: Setup, baseline: str) -> str:
    """Part 1's fruitnet side, this commit against git ref `baseline`, run by run interleaved
    (the original loop is left out: it is the same code on both sides)."""
    trees = [("this commit", REPO / "src"), (f"baseline {baseline}", baseline_tree(tmp, baseline))]
    m: dict[tuple, list[float]] = {}
    for seed in setup.seeds:
        for name, src in trees:
            print(f"part 1 (seed {seed}): {name}, frozen 10 epochs, unfrozen {setup.unfrozen_epochs} ...", flush=True)
            tag = name.split()[0]
            rows_f = cli_rows(src, tmp / f"p1b-{tag}-f-{seed}", setup.inside, "freeze", 10, seed)
            rows_u = cli_rows(src, tmp / f"p1b-{tag}-u-{seed}", setup.inside, "unfreeze", setup.unfrozen_epochs, seed)
            secs = lambda rows: [float(r["seconds"]) for r in rows]  # noqa: E731
            for key, value in (("frozen: one epoch (after the first), ms", 1000 * sum(secs(rows_f)[1:]) / 9),
                               ("frozen: whole 10-epoch run, s", sum(secs(rows_f))),
                               ("unfrozen: first epoch, s", secs(rows_u)[0]),
                               ("unfrozen: later epoch, s", sum(secs(rows_u)[1:]) / (len(rows_u) - 1))):
                m.setdefault((key, name), []).append(value)
    keys = list(dict.fromkeys(k for k, _ in m))
    this, base = trees[0][0], trees[1][0]
    return table([f"ResNet18, {setup.inside.name}, `fruitnet train` (CLI)", this, base, f"{this} / {base}"],
                 [[k, mean_spread(m[(k, this)], ".1f"), mean_spread(m[(k, base)], ".1f"),
                   mean_spread([a / b for a, b in zip(m[(k, this)], m[(k, base)])], ".2f") + "x"] for k in keys])


def time_to(rows: list[dict], threshold: float) -> float | None:
    total = 0.0
    for r in rows:
        total += float(r["seconds"])
        if float(r["val_accuracy"]) >= threshold:
            return total
    return None


def seconds_or_not(values: list[float | None]) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    return mean_spread(reached, ".0f") + " s" + (f" ({len(reached)} of {len(values)} seeds)" if len(reached) < len(values) else "")


def part2(tmp: Path, setup: Setup) -> str:
    out_rows = []
    for recipe, epochs in (("seed", setup.seed_epochs), ("fast", setup.fast_epochs)):
        best, final, t95, t98, walls = [], [], [], [], []
        for seed in setup.seeds:
            print(f"part 2 (seed {seed}): efficientnet_lite0, recipe {recipe} ...", flush=True)
            kw = dict(epochs=epochs) if epochs else {}
            summary, rows, wall = run_train(tmp, f"p2-{recipe}-{seed}", data=str(setup.inside),
                                            backbone="efficientnet_lite0", recipe=recipe, mode="unfreeze", seed=seed, **kw)
            best.append(summary["best_val_accuracy"])
            final.append(float(rows[-1]["val_accuracy"]))
            t95.append(time_to(rows, 0.95))
            t98.append(time_to(rows, 0.98))
            walls.append(wall)
        out_rows.append([recipe, len(rows), mean_spread(best, ".4f"), mean_spread(final, ".4f"), seconds_or_not(t95),
                         seconds_or_not(t98), mean_spread(walls, ".0f") + " s"])
    return table([f"efficientnet_lite0, {setup.inside.name} 3:1, unfrozen", "epochs", "best val acc", "final val acc",
                  "time to 0.95", "time to 0.98", "wall-clock (scan and setup included)"], out_rows)


def part3(tmp: Path, setup: Setup) -> str:
    from fruitnet.evaluate import evaluate

    rows = []
    for recipe, epochs in (("seed", setup.seed_epochs), ("fast", setup.fast_epochs)):
        for mode in ("unfreeze", "freeze"):
            val, acc, per, walls = [], [], {}, []
            for seed in setup.seeds:
                print(f"part 3 (seed {seed}): {setup.studio.name} -> {setup.real.name}, recipe {recipe}, {mode} ...",
                      flush=True)
                kw = dict(epochs=epochs) if epochs else {}
                name = f"p3-{recipe}-{mode}-{seed}"
                summary, _, wall = run_train(tmp, name, data=str(setup.studio), backbone="efficientnet_lite0",
                                             recipe=recipe, mode=mode, seed=seed, **kw)
                report = evaluate(summary["model"], setup.real, tmp / f"{name}-eval", progress=False)
                val.append(summary["best_val_accuracy"])
                acc.append(report["accuracy"])
                for c, v in report["per_class"].items():
                    per.setdefault(c, []).append(v["accuracy"])
                walls.append(wall)
            classes = ", ".join(f"{c} {statistics.mean(v):.2f}" for c, v in per.items())
            rows.append([recipe, mode, mean_spread(val, ".4f"), f"{mean_spread(acc, '.4f')} ({classes})",
                         mean_spread(walls, ".0f") + " s"])
    return table([f"efficientnet_lite0 trained on {setup.studio.name} only: recipe", "mode",
                  f"val acc ({setup.studio.name})", f"accuracy on all of {setup.real.name} (per class, mean)",
                  "training wall-clock"], rows)


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


def baseline_tree(tmp: Path, ref: str) -> Path:
    """The src/ folder of git ref `ref`, exported (git archive) into tmp: no worktree is touched."""
    dest = tmp / "baseline"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def part4(tmp: Path, setup: Setup, baseline: str | None = None) -> str:
    """`fruitnet predict` as a user runs it; with a baseline ref, that ref's code too, the runs
    interleaved (round-robin, --repeats rounds) so both see the same machine load."""
    import os

    # A trained model, not an untrained head: under bf16 fruitnet runs near-ties again in fp32, and
    # an untrained head makes nearly every photo a near-tie.
    from fruitnet.config import DEFAULT_BACKBONE

    print(f"part 4: training the model to predict with (the defaults: {DEFAULT_BACKBONE}, probe) ...", flush=True)
    summary, _, _ = run_train(tmp, "p4-model", data=str(setup.inside))
    path = Path(summary["model"])
    trees = [("this commit", REPO / "src")] + ([(f"baseline {baseline}", baseline_tree(tmp, baseline))] if baseline else [])
    walls: dict[tuple, list[float]] = {}
    counts: dict[tuple, int] = {}
    for round_ in range(len(setup.seeds)):
        for precision in ("fp32", "auto"):
            for name, src in trees:
                print(f"part 4 (round {round_ + 1}): fruitnet predict, {name}, precision {precision} ...", flush=True)
                env = {**os.environ, "PYTHONPATH": str(src)}
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "fruitnet", "predict", str(path), str(setup.real), "--json",
                                       "--precision", precision], capture_output=True, text=True, env=env)
                walls.setdefault((precision, name), []).append(time.perf_counter() - t0)
                counts[(precision, name)] = sum("label" in r for r in json.loads(proc.stdout))
    rows = []
    for (precision, name), wall in walls.items():
        env = {**os.environ, "PYTHONPATH": str(dict(trees)[name])}
        child = json.loads(subprocess.run([sys.executable, "-c", PREDICT_CHILD, str(path), str(setup.real), precision],
                                          capture_output=True, text=True, check=True, env=env).stdout)
        ok, best = counts[(precision, name)], min(wall)
        rows.append([precision, name, ok, f"{best:.1f} s", f"{ok / best:.0f} img/s",
                     f"{child['ok'] / child['steady']:.0f} img/s", f"{child['peak_mib']:.0f} MiB"])
    text = table([f"`fruitnet predict` on all of {setup.real.name}", "code", "images",
                  f"whole command (Python start-up included; best of {len(setup.seeds)})", "whole command",
                  "steady state (decode included, start-up and warm-up excluded)", "peak memory (RSS)"], rows)
    if baseline:
        ratios = [f"{precision}: {min(walls[(precision, trees[1][0])]) / min(walls[(precision, trees[0][0])]):.2f}x"
                  for precision in ("fp32", "auto")]
        text += f"\n\nWhole-command speed-up of this commit over {baseline}, side by side: " + ", ".join(ratios)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--repeats", type=int, default=1, help="seeds 0..N-1 for parts 1-3: mean ± spread")
    ap.add_argument("--seed-epochs", type=int, default=10, help="epochs for the seed recipe in parts 2 and 3")
    ap.add_argument("--quick", action="store_true",
                    help="about a minute on the bundled demo photos (checks the script, not the claims)")
    ap.add_argument("--out", help="default bench/results/train.md (train-quick.md with --quick)")
    ap.add_argument("--baseline", metavar="REF",
                    help="parts 1 and 4: this commit's `fruitnet train` (part 1, instead of the original loop) or "
                         "`fruitnet predict` (part 4) against git ref REF's, interleaved run by run")
    args = ap.parse_args()
    if args.quick:
        setup = Setup(DEMO_DATA / "train", DEMO_DATA / "train", DEMO_DATA / "test", 2, 2, 2, list(range(args.repeats)))
    else:
        webfruit, fruits360 = SHARED / "webfruit", SHARED / "fruits360"
        if not webfruit.is_dir() or not fruits360.is_dir():
            sys.exit(f"skipped: the benchmark needs {webfruit} and {fruits360} (set FRUITNET_SHARED_DATA)")
        setup = Setup(webfruit, fruits360, webfruit, args.seed_epochs, None, 2, list(range(args.repeats)))
    out = Path(args.out or REPO / "bench" / "results" / ("train-quick.md" if args.quick else "train.md"))
    sections = [f"# Training and inference benchmark\n\nMachine: {machine()}\n\n{stamp()} "
                f"Seeds: {setup.seeds} (mean ± standard deviation where more than one).\n"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = {1: part1, 2: part2, 3: part3, 4: part4}
        for p in args.parts:
            t0 = time.perf_counter()
            if args.baseline and p in (1, 4):
                result = (part1_baseline if p == 1 else part4)(tmp, setup, args.baseline)
            else:
                result = parts[p](tmp, setup)
            sections.append(f"## Part {p}\n\n{result}\n\n(part took {time.perf_counter() - t0:.0f} s)\n")
            print(sections[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(sections))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
