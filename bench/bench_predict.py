"""`fruitnet predict` at 100 photos a second (issue 21): where the whole command's time goes, and
the command against a baseline commit, interleaved, with the answers checked against fp32.

    .venv/bin/python bench/bench_predict.py                       # trains the default model on webfruit
    .venv/bin/python bench/bench_predict.py --model RUN/best.safetensors --baseline d292862 --rounds 3

1. Profile of one `fruitnet predict MODEL webfruit --json` (this commit, bf16 auto), stage by
   stage, each timed alone in a fresh process: Python start-up and imports, loading the model,
   decoding and resizing every photo (threads, no model), the body on the decoded batches, the
   unknown verdict's score, and writing the output; then the whole command under cProfile (its
   main thread: the top functions by their own time).
2. The whole command, this commit and --baseline's code (git archive of src/), in turn, --rounds
   rounds, precision auto: photos a second, best and median.
3. The answers: labels and unknown verdicts of this commit's bf16 auto run against fp32 PyTorch
   (`--precision fp32`) on the same photos: they must be equal.
Writes bench/results/predict-100.md with the machine, the commit and the command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import baseline_tree  # noqa: E402
from common import REPO, SHARED, machine, stamp, table  # noqa: E402

STAGES = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, fruitnet.predictors as P
from fruitnet.config import InferenceOptions
from fruitnet.images import expand_paths
from fruitnet.preprocess import DecodeAhead
from fruitnet.transforms import input_batches
t1 = time.perf_counter()
model, folder = sys.argv[1:3]
predictor = P.load_predictor(model, InferenceOptions())
t2 = time.perf_counter()
paths, _ = expand_paths([folder])
batches = [x for _, x in input_batches(paths, predictor.preprocessing, 32)]
t3 = time.perf_counter()
m, arith = predictor.net, predictor.arith  # what predict runs (bf16: BatchNorm folded)
with torch.inference_mode(), arith.autocast(predictor.device):
    m.logits_and_features(arith.prepare_input(batches[0]))  # kernels built once, as in the command
    t4 = time.perf_counter()
    outs = [[t.float() for t in m.logits_and_features(arith.prepare_input(x))] for x in batches]
t5 = time.perf_counter()
with torch.inference_mode():
    for logits, features in outs:
        if m.trust is not None:
            m.trust(logits, features)
t6 = time.perf_counter()
results = predictor.predict_paths(paths)
t7 = time.perf_counter()
text = json.dumps(results, indent=2)
t8 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "decode": t3 - t2, "first batch (kernels)": t4 - t3,
                  "body": t5 - t4, "score": t6 - t5, "predict_paths (all of it)": t7 - t6, "json": t8 - t7,
                  "n": len(paths)}))
"""


def command(src: Path, model: Path, folder: Path, *options: str) -> tuple[float, list[dict]]:
    """`fruitnet predict MODEL FOLDER --json OPTIONS` with src/ on the path: (seconds, answers)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fruitnet", "predict", str(model), str(folder), "--json", *options],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src)})
    seconds = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stderr[-2000:])
    return seconds, json.loads(proc.stdout)


def profile(model: Path, folder: Path) -> str:
    stages = json.loads(subprocess.run([sys.executable, "-c", STAGES, str(model), str(folder)], capture_output=True,
                                       text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout)
    n = stages.pop("n")
    rows = [[k, f"{v:.2f} s", f"{n / v:.0f} photos/s" if k in ("decode", "body", "predict_paths (all of it)") else ""]
            for k, v in stages.items()]
    out = io.StringIO()
    with tempfile.NamedTemporaryFile(suffix=".prof") as prof:
        subprocess.run([sys.executable, "-m", "cProfile", "-o", prof.name, "-m", "fruitnet", "predict", str(model),
                        str(folder), "--json"], capture_output=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        pstats.Stats(prof.name, stream=out).sort_stats("tottime").print_stats(15)
    top = "\n".join(line for line in out.getvalue().splitlines() if line.strip())
    return (f"Stages, each timed once in one process ({n} photos; the command overlaps decoding with the "
            "body, so the stages add up to more than the command):\n\n"
            + table(["stage", "seconds", "rate"], rows) + "\n\ncProfile of the whole command (main thread; decoding "
            "threads show as waits), top 15 by own time:\n\n```\n" + top + "\n```")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model file (default: train the defaults on webfruit)")
    ap.add_argument("--baseline", default="d292862", help="git ref of the code before (default: issue 21's start)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict-100.md")
    args = ap.parse_args()
    folder = SHARED / "webfruit"
    if not folder.is_dir():
        sys.exit(f"skipped: {folder} is needed (set FRUITNET_SHARED_DATA)")
    with tempfile.TemporaryDirectory(prefix="fruitnet-predict-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from fruitnet.config import TrainConfig
            from fruitnet.training import train

            model = Path(train(TrainConfig(data=str(folder), out=str(tmp / "run")), log=lambda *a: None)["model"])
        header, profiled = machine(), profile(model, folder)
        trees = [("this commit", REPO / "src"), (f"baseline {args.baseline}", baseline_tree(tmp, args.baseline))]
        walls: dict[str, list[float]] = {name: [] for name, _ in trees}
        answers = {}
        for _ in range(args.rounds):
            for name, src in trees:
                seconds, answers[name] = command(src, model, folder)
                walls[name].append(seconds)
        _, fp32 = command(REPO / "src", model, folder, "--precision", "fp32")
    n = sum("label" in r for r in answers["this commit"])
    rows = [[name, n, f"{min(w):.1f} s", f"{n / min(w):.0f}", f"{n / statistics.median(w):.0f}"] for name, w in walls.items()]
    same = lambda a, b: sum(x.get("label") == y.get("label") and x.get("best_guess") == y.get("best_guess")  # noqa: E731
                            for x, y in zip(a, b))
    text = "\n\n".join([
        f"Machine: {header}.", stamp(), f"Model: {model} (the default model: `fruitnet train webfruit`).",
        "## Whole command: `fruitnet predict MODEL webfruit --json` (bf16 auto), interleaved",
        table(["code", "photos", "best", "photos/s (best)", f"photos/s (median of {args.rounds})"], rows),
        "## Answers against fp32 PyTorch (`--precision fp32`, this commit)",
        f"this commit, bf16 auto: {same(answers['this commit'], fp32)} of {n} labels (unknown verdicts included) "
        f"and best classes equal; baseline: {same(answers[trees[1][0]], fp32)} of {n}.",
        "## Profile (this commit)", profiled])
    print(text)
    args.out.write_text("# `fruitnet predict` speed (bench/bench_predict.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
