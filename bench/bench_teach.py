"""Teaching benchmark (issue 18): a simulated user teaches the default model photos from a new source.

    .venv/bin/python bench/bench_teach.py                  # docs/results.md's table: 3 seeds, K = 15, 30, 60
    .venv/bin/python bench/bench_teach.py --seeds 0 --k 15  # a quick look
    .venv/bin/python bench/bench_teach.py --page-only        # the page alone: key to next photo, in Chromium

The model: `fruitnet train webfruit` with the defaults (seed 0), trained once.  The new source:
fruits360, split at random into halves per seed: the pool the user labels from, and the half the
taught model is measured on.  The user is an oracle (the folder names are the true labels) who
labels in batches of 5, as the page retrains every 5 labels: each batch is the top of the ranking
after the last refit.  The refits and rankings are fruitnet.teach's own (refit, rank), on the
features a teach session caches.  Columns, on the other half of fruits360 unless said: accuracy of
the best class, share answered (not "unknown"), accuracy among the answered, share of
grocery/other answered "unknown", accuracy on webfruit's validation split, refit seconds.  Nothing
is tuned on grocery/: it only measures.  For comparison, the last row retrains the default model on
webfruit and the whole pool, labelled (`fruitnet train webfruit/ pool/`; its webfruit column is left
out: its split of webfruit differs).  The page part drives `fruitnet teach` in headless
Chromium: 25 photos labelled by keyboard (refits every 5), the time from each key to the next
photo on screen (the page records it), and the refits the service reports.  Writes
bench/results/teach.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, machine, mean_spread, stamp, table  # noqa: E402

from fruitnet.config import TrainConfig  # noqa: E402
from fruitnet.dataset import scan  # noqa: E402
from fruitnet.teach import STRATEGIES, Known, Teacher, rank  # noqa: E402

BATCH = 5  # labels between refits, as on the page


def trained_model(work: Path) -> Path:
    from fruitnet.training import train

    summary = train(TrainConfig(data=str(SHARED / "webfruit"), out=str(work / "run")), log=lambda *a: None)
    return Path(summary["model"])


def teach(teacher: Teacher, strategy: str, pool: Known, k: int, seed: int) -> tuple:
    """Label k photos of the pool (true labels) in batches, refitting after each; the last refit."""
    negatives = teacher.parts()[3]
    fit, chosen, seconds = teacher.shipped, [], []
    while len(chosen) < k:
        left = [i for i in range(len(pool)) if i not in set(chosen)]
        order = rank(strategy, pool.x[left], fit, seed=seed + len(chosen))
        chosen += [left[i] for i in order[:min(BATCH, k - len(chosen))]]
        labelled = Known(pool.x[chosen], pool.y[chosen])
        fit = teacher.refit(labelled, negatives)
        seconds.append(fit.seconds)
    return fit, statistics.mean(seconds)


def measure(fit, test: Known, other: np.ndarray, val: Known) -> dict:
    best, _, answered = fit.answers(test.x)
    right = best == test.y
    return {"accuracy": right.mean(), "answered": answered.mean(),
            "answered_accuracy": right[answered].mean() if answered.any() else float("nan"),
            "other_rejected": 1 - fit.answers(other)[2].mean(),
            "webfruit_val": (fit.answers(val.x)[0] == val.y).mean()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, nargs="+", default=[15, 30, 60])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--cache", default=str(REPO / ".bench-cache"), help="feature cache (default: .bench-cache)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "teach.md"))
    ap.add_argument("--page-only", action="store_true", help="measure the page alone (no simulation)")
    args = ap.parse_args()
    for name in ("webfruit", "fruits360", "grocery"):
        if not (SHARED / name).is_dir():
            sys.exit(f"{SHARED / name} is absent: this benchmark needs the real photos")
    header = f"{stamp()}\n\nMachine: {machine()}\n"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model = trained_model(Path(tmp))
        print(f"trained the default model on webfruit in {time.perf_counter() - t:.0f}s", flush=True)
        page = page_latency(model, Path(tmp), args.cache)
        if args.page_only:
            print(page)
            return
        f360 = scan(SHARED / "fruits360", progress=False).usable
        other = [it for it in scan(SHARED / "grocery", progress=False).usable if it.label == "other"]
        teacher = Teacher(model, [str(SHARED / "fruits360")], cache=args.cache, log=lambda *a: None, progress=False)
        teacher.features([(it.path, it.sha256) for it in other], "grocery/other")
        f360 = [it for it in f360 if it.sha256 in teacher.rows]
        source = teacher.known([(it.sha256, it.label) for it in f360])
        other_x = np.stack([teacher.rows[it.sha256] for it in other])
        val = teacher.parts()[1]
        rows = run(teacher, source, [Path(it.path) for it in f360], other_x, val, args, Path(tmp))
    cols = ["strategy", "K labels", "fruits360 half: right", "answered", "right among answered",
            "grocery/other unknown", "webfruit val", "refit s (retrain: train s)"]
    text = (f"# Teaching the default model fruits360 (bench/bench_teach.py)\n\n{header}\n"
            f"{len(source)} fruits360 photos, halves per seed; {len(other_x)} grocery/other photos; "
            f"seeds {args.seeds}; labels in batches of {BATCH}, a refit after each.\n\n" + table(cols, rows) + "\n\n"
            + page + "\n")
    Path(args.out).write_text(text)
    print(text)


def run(teacher: Teacher, source: Known, paths: list, other: np.ndarray, val: Known, args, tmp: Path) -> list[list]:
    results: dict[tuple, list[dict]] = {}
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(source))
        half = len(order) // 2
        pool, test = (Known(source.x[i], source.y[i]) for i in (order[:half], order[half:]))
        results.setdefault(("none (the shipped model)", 0), []).append(measure(teacher.shipped, test, other, val))
        for strategy in args.strategies:
            for k in args.k:
                fit, seconds = teach(teacher, strategy, pool, k, seed)
                results.setdefault((strategy, k), []).append({**measure(fit, test, other, val), "seconds": seconds})
                print(f"seed {seed} {strategy} K={k}: {results[(strategy, k)][-1]}", flush=True)
        fit, seconds = retrain([paths[i] for i in order[:half]], tmp / f"retrain-{seed}")
        results.setdefault((f"retrain: fruitnet train webfruit/ pool/ (all {half} labelled)", -1), []).append(
            {**measure(fit, test, other, val), "webfruit_val": float("nan"), "seconds": seconds})
    rows = []
    for (strategy, k), runs in results.items():
        cells = ["-" if all(np.isnan(r[key]) for r in runs) else mean_spread([r[key] for r in runs]) for key in
                 ("accuracy", "answered", "answered_accuracy", "other_rejected", "webfruit_val")]
        rows.append([strategy, {0: "-", -1: half}.get(k, k), *cells,
                     mean_spread([r["seconds"] for r in runs], ".2f") if k else "-"])
    return rows


def retrain(pool: list[Path], work: Path):
    """`fruitnet train webfruit/ pool/` (the defaults) with the pool's photos in class folders
    (symlinks), as the Refit its model file holds, and the seconds it took."""
    import os

    from fruitnet.model import load_model
    from fruitnet.teach import Refit
    from fruitnet.training import train

    for path in pool:
        (work / "pool" / path.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(path, work / "pool" / path.parent.name / path.name)
    t = time.perf_counter()
    summary = train(TrainConfig(data=(str(SHARED / "webfruit"), str(work / "pool")), out=str(work / "run")),
                    log=lambda *a: None)
    seconds = time.perf_counter() - t
    model, meta = load_model(summary["model"])
    trust = meta["trust"]
    return Refit(model.head.weight.detach(), model.head.bias.detach(), trust["temperature"], model.trust.bank,
                 model.trust.val_scores, trust["threshold"]), seconds


def page_latency(model: Path, tmp: Path, cache: str) -> str:
    """The page in headless Chromium: key to next photo (ms), and the refits (s), over 25 labels."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import CHROMEDRIVER, CHROMIUM
    from quick_model import serving
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / 'chromium'}"):
        options.add_argument(arg)
    switches, classes = [], ["cherry", "strawberry", "tomato"]
    with serving(model, SHARED / "fruits360", "--into", tmp / "labelled", "--out", tmp / "taught", "--cache", cache,
                 command="teach", timeout=900) as served:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            driver.get(served.url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "photo").get_attribute("src"))
            body = driver.find_element(By.TAG_NAME, "body")
            for _ in range(25):
                name = driver.find_element(By.ID, "name").text
                body.send_keys(str(classes.index(Path(name).parent.name) + 1))
                wait.until(lambda d: d.find_element(By.ID, "name").text != name and d.find_element(
                    By.TAG_NAME, "body").get_attribute("data-switch-ms"))
                switches.append(float(driver.find_element(By.TAG_NAME, "body").get_attribute("data-switch-ms")))
                driver.execute_script("delete document.body.dataset.switchMs")
            wait.until(lambda d: "new model:" in d.find_element(By.ID, "retrain-status").text)
        finally:
            driver.quit()
    history = json.loads((tmp / "taught" / "teach.json").read_text())["history"]
    refits = [h["refit_seconds"] for h in history]
    return (f"The page (headless Chromium, 25 fruits360 photos labelled by key as fast as it sends them; the page asks for a refit every 5 labels and skips those that come while one runs): key to the next "
            f"photo on screen median {statistics.median(switches):.0f} ms, slowest {max(switches):.0f} ms; "
            f"{len(refits)} refits, {statistics.mean(refits):.1f} s on average (slowest {max(refits):.1f} s); the "
            f"last one: {history[-1]['new_answered']['before']:.1%} -> {history[-1]['new_answered']['after']:.1%} "
            "of the new photos answered.")


if __name__ == "__main__":
    main()
