"""Answers a user can trust (issue 9): calibration and the "unknown" verdict, measured.

    .venv/bin/python bench/bench_trust.py [--backbone NAME] [--run RUN] [--data ../shared/data]

1. Trains with the defaults (fruitnet.training.train; --backbone to try another) on webfruit, or reuses --run RUN (a finished run folder).
   Training itself fits the temperature, the in-distribution statistics and the threshold into
   the model files, from the training and validation split alone.
2. Calibration: ECE (15 bins) and NLL on the webfruit validation split and on fruits360 (a shifted
   set), with the raw logits and with the model file's temperature.
3. Unknown detection, for every score tried (see fruitnet.unknown), each fitted on the training
   split and thresholded on the validation split alone (accept --unknown-recall of it); the
   row marked "shipped" is the score the model file carries (unknown.choose_score):
   AUROC webfruit-val vs grocery/other and (webfruit-val + grocery/tomato) vs grocery/other; at
   the threshold, the share of grocery/other rejected and of each known set accepted. Nothing is
   tuned on grocery/; the settings (k = 10 for kNN, Ledoit-Wolf shrinkage) were fixed beforehand.
4. The shipped path: fruitnet's Predictor (what predict, evaluate and serve run) on the same
   photos, fp32, and its unknown verdicts; plus solid-colour squares, which should be unknown.
5. The int8 export: agreement of its labels and unknown verdicts with PyTorch, per check set.
6. Cost: forward time per image of the fine-tuned body, and of a second (pretrained) body.

Prints markdown tables and writes bench/results/trust.md with the git commit and the command.
Features are cached under /tmp/trust-bench/ (keyed by the model file).
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fruitnet import unknown
from fruitnet.calibration import expected_calibration_error, nll
from fruitnet.dataset import read_split
from fruitnet.images import load_image
from fruitnet.model import create_classifier, load_model
from fruitnet.predictors import UNKNOWN, TorchPredictor, expand_paths
from fruitnet.transforms import eval_transform

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path("/tmp/trust-bench")
COLOURS = {"green": (40, 160, 60), "red": (200, 30, 30), "grey": (128, 128, 128), "black": (0, 0, 0),
           "white": (255, 255, 255), "yellow": (230, 200, 40), "blue": (30, 60, 200), "brown": (110, 70, 40)}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def train_run(data: Path, backbone: str, out: Path) -> Path:
    from fruitnet.training import TrainConfig, train

    summary = train(TrainConfig(data=str(data / "webfruit"), out=str(out), **({"backbone": backbone} if backbone else {})))
    return Path(summary["run"])


@torch.inference_mode()
def extract(model, pretrained_body, paths: list[str], pre: dict) -> dict:
    """fp32: fine-tuned features, logits, pretrained features; and the time of each body."""
    tf = eval_transform(pre)
    with ThreadPoolExecutor(2) as pool:
        xs = list(pool.map(lambda p: tf(load_image(p)), paths))
    feats, logits, pfeats, t_ft, t_pre = [], [], [], 0.0, 0.0
    for i in range(0, len(xs), 32):
        x = torch.stack(xs[i:i + 32])
        t = time.perf_counter()
        f = model.body(x)
        t_ft += time.perf_counter() - t
        feats.append(f)
        logits.append(model.head(f))
        t = time.perf_counter()
        pfeats.append(pretrained_body(x))
        t_pre += time.perf_counter() - t
    return {"feat": torch.cat(feats), "logits": torch.cat(logits), "pfeat": torch.cat(pfeats),
            "seconds_ft": t_ft, "seconds_pre": t_pre}


def sets(run: Path, data: Path, classes: list[str]) -> dict[str, tuple[list[str], list[int]]]:
    train_items, val_items, _ = read_split(run / "split.csv")
    out = {"train": ([it.path for it in train_items], [classes.index(it.label) for it in train_items]),
           "val": ([it.path for it in val_items], [classes.index(it.label) for it in val_items])}
    for name, folder in (("fruits360", data / "fruits360"), ("grocery/tomato", data / "grocery" / "tomato"),
                         ("grocery/other", data / "grocery" / "other")):
        paths, _ = expand_paths([str(folder)])
        out[name] = (paths, [classes.index(Path(p).parent.name) if Path(p).parent.name in classes else -1
                             for p in paths])
    out["squares"] = (square_files(), [-1] * len(COLOURS))
    return out


def square_files() -> list[str]:
    """The solid-colour squares as PNG files (what a user trying the model on a blank picture sends)."""
    from PIL import Image

    folder = CACHE / "squares"
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        Image.new("RGB", (300, 300), colour).save(folder / f"{name}.png")
    return [str(folder / f"{name}.png") for name in COLOURS]


def features(run: Path, model_file: Path, data: Path) -> dict:
    model, meta = load_model(model_file)
    digest = hashlib.sha256()  # keyed by the weights, not the trust metadata fitted into the file
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith("trust."):
            digest.update(name.encode() + tensor.numpy().tobytes())
    cached = CACHE / f"{digest.hexdigest()[:16]}-squares.pt"  # the sets below, squares included
    if cached.is_file():
        return torch.load(cached, weights_only=True)
    model.trust = None  # the raw body and head; the bench computes every score itself
    pretrained, _ = create_classifier(meta["backbone"], len(meta["classes"]), "imagenet")
    pretrained.eval()
    out = {}
    for name, (paths, targets) in sets(run, data, meta["classes"]).items():
        print(f"features: {name} ({len(paths)} photos)", flush=True)
        out[name] = {**extract(model, pretrained.body, paths, meta["preprocessing"]),
                     "y": torch.tensor(targets), "paths": paths}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, cached)
    return out


def scores(f: dict, temperature: float, shipped: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every candidate score on every set: {score name: {set name: scores}} (higher = more in-distribution)."""
    tr = f["train"]
    n_classes = f["val"]["logits"].shape[1]
    means, prec = unknown.class_gaussian(tr["feat"], tr["y"], n_classes)
    pmeans, pprec = unknown.class_gaussian(tr["pfeat"], tr["y"], n_classes)
    bank, pbank = unknown.knn_bank(tr["feat"]), unknown.knn_bank(tr["pfeat"])  # as shipped: at most unknown.MAX_BANK photos
    mark = lambda score: " (shipped)" if shipped == score else ""  # noqa: E731
    energy_name, maha_name = "energy" + mark("energy"), "Mahalanobis, the model's body"
    fns = {
        "MSP (max softmax probability)": lambda s: unknown.msp(s["logits"]),
        "MSP, temperature-scaled": lambda s: unknown.msp(s["logits"], temperature),
        energy_name: lambda s: unknown.energy(s["logits"]),
        maha_name: lambda s: unknown.mahalanobis(s["feat"], means, prec),
        f"kNN (k={unknown.KNN_K}), the model's body" + mark("knn"): lambda s: unknown.knn(s["feat"], bank),
        "Mahalanobis, pretrained body": lambda s: unknown.mahalanobis(s["pfeat"], pmeans, pprec),
        f"kNN (k={unknown.KNN_K}), pretrained body": lambda s: unknown.knn(s["pfeat"], pbank),
    }
    out = {name: {k: fn(v) for k, v in f.items() if k != "train"} for name, fn in fns.items()}
    # both must find the photo typical: the lower of its two validation ranks (a blank photo can sit
    # near the feature clusters' middle, but gives weak logits)
    maha, en = unknown.UnknownVerdict(out[maha_name]["val"]), unknown.UnknownVerdict(out[energy_name]["val"])  # ranks among val
    out["lower rank of Mahalanobis and energy"] = {
        k: torch.minimum(maha.in_distribution(out[maha_name][k]), en.in_distribution(out[energy_name][k]))
        for k in out[maha_name]}
    return out


def threshold(val_scores: torch.Tensor, recall: float) -> float:
    """The same rule as unknown.UnknownVerdict: accept a photo when the share of validation photos scoring
    no higher than it is at least 1 - recall."""
    s = val_scores.sort().values
    n = len(s)
    k = int(np.ceil((1 - recall) * n - 1e-9))  # at least k validation scores <= accepted score
    return float(s[max(k - 1, 0)]) if k > 0 else -float("inf")


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def ood_table(all_scores: dict, recall: float) -> list[str]:
    rows = ["| score | AUROC val vs other | AUROC val+grocery/tomato vs other | grocery/other rejected | "
            "webfruit val accepted | grocery/tomato accepted | known (val + grocery/tomato) accepted | "
            f"solid-colour squares rejected (of {len(COLOURS)}) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in all_scores.items():
        thr = threshold(s["val"], recall)
        known = torch.cat([s["val"], s["grocery/tomato"]])
        acc = {k: float((v >= thr).float().mean()) for k, v in s.items()}
        rows.append(f"| {name} | {unknown.auroc(s['val'], s['grocery/other']):.3f} | "
                    f"{unknown.auroc(known, s['grocery/other']):.3f} | {pct(1 - acc['grocery/other'])} | "
                    f"{pct(acc['val'])} | {pct(acc['grocery/tomato'])} | {pct(float((known >= thr).float().mean()))} | "
                    f"{int((s['squares'] < thr).sum())} |")
    return rows


def calibration_table(f: dict, temperature: float) -> list[str]:
    rows = [f"| set | photos | accuracy | ECE before | ECE after (T = {temperature:.3f}) | NLL before | NLL after |",
            "|---|---|---|---|---|---|---|"]
    for name in ("val", "fruits360", "grocery/tomato"):
        logits, y = f[name]["logits"].double(), f[name]["y"].numpy()
        before, after = logits.softmax(1).numpy(), (logits / temperature).softmax(1).numpy()
        label = {"val": "webfruit validation split (T fitted here)"}.get(name, name)
        rows.append(f"| {label} | {len(y)} | {(before.argmax(1) == y).mean():.3f} | "
                    f"{expected_calibration_error(before, y):.4f} | {expected_calibration_error(after, y):.4f} | "
                    f"{nll(before, y):.4f} | {nll(after, y):.4f} |")
    return rows


def shipped_table(model_file: Path, f: dict) -> list[str]:
    """fruitnet's own Predictor (fp32), as predict/evaluate/serve run it, with its unknown verdicts."""
    predictor = TorchPredictor(model_file, device="cpu", precision="fp32")
    rows = ["| set | photos | answered (not unknown) | accuracy of the best class | accuracy on answered photos |",
            "|---|---|---|---|---|"]
    labels = {"val": "webfruit validation split", "grocery/tomato": "grocery/tomato", "grocery/other": "grocery/other",
              "squares": f"solid-colour squares ({', '.join(COLOURS)})"}
    for name, label in labels.items():
        results = [r for r in predictor.predict_paths(f[name]["paths"]) if "error" not in r]
        answered = [r for r in results if r["label"] != UNKNOWN]
        truth = dict(zip(f[name]["paths"], f[name]["y"].tolist()))
        right = lambda r: predictor.classes.index(r["best_guess"]) == truth[r["path"]]  # noqa: E731
        known = name in ("val", "grocery/tomato")  # the others have no true class
        best_acc = f"{np.mean([right(r) for r in results]):.3f}" if known else "-"
        ans_acc = f"{np.mean([right(r) for r in answered]):.3f}" if answered and known else "-"
        rows.append(f"| {label} | {len(results)} | {pct(len(answered) / len(results))} | {best_acc} | {ans_acc} |")
    return rows


def int8_table(model_file: Path, f: dict) -> list[str]:
    """`fruitnet export --int8` of the model, checked on each set: how often the int8 file's labels
    and unknown verdicts agree with PyTorch's (fp32) on the half of the check photos not used to
    calibrate the quantisation."""
    import tempfile

    from fruitnet.export import export_onnx

    rows = ["| check set (`--check`) | held-out photos | labels agree | unknown verdicts agree |", "|---|---|---|---|"]
    for name in ("val", "grocery/other"):
        with tempfile.TemporaryDirectory() as tmp:
            int8 = export_onnx(model_file, Path(tmp) / "m.onnx", check=f[name]["paths"], int8=True,
                               log=lambda *a: None)["int8"]["parity"]
        label = {"val": "webfruit validation split"}.get(name, name)
        rows.append(f"| {label} | {int8['n']} | {int8['agree']} | {int8.get('verdicts_agree', '-')} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=None, help="default: fruitnet's default backbone")
    parser.add_argument("--run", type=Path, help="a finished run folder to measure instead of training anew")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("/tmp/trust-bench/run"),
                        help="run folder for the training (must not exist)")
    parser.add_argument("--unknown-recall", type=float, default=unknown.DEFAULT_RECALL)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "trust.md",
                        help="where the tables go (default: bench/results/trust.md, the default model's)")
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    run = args.run or train_run(args.data, args.backbone, args.out)
    train_seconds = time.perf_counter() - t0
    model_file = run / "best.safetensors"
    _, meta = load_model(model_file)
    trust = meta.get("trust") or {}
    if trust.get("recall") not in (None, args.unknown_recall):
        print(f"note: the model file was fitted for recall {trust['recall']}; the tables use {args.unknown_recall}")
    temperature = float(trust.get("temperature", 1.0))
    f = features(run, model_file, args.data)
    all_scores = scores(f, temperature, trust.get("score", "energy"))
    n = sum(len(v["y"]) for v in f.values())
    ms_ft = 1000 * sum(v["seconds_ft"] for v in f.values()) / n
    ms_pre = 1000 * sum(v["seconds_pre"] for v in f.values()) / n

    lines = [
        "# Trust benchmark: calibration and the unknown verdict (issue 9)", "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Commit: {git_commit()}  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()} (shared machine: times are noisy)  ",
        f"Model: {model_file} ({meta['backbone']}, {'recipe defaults; ' if not args.run else ''}training summary {meta.get('training')}); "
        + (f"trained in this run in {train_seconds:.0f} s" if not args.run else "reused run folder"),
        f"Stored in the model file: temperature {temperature:.4f}, score {trust.get('score')}, threshold "
        f"in_distribution >= {trust.get('threshold')} (recall {trust.get('recall')}), "
        f"{(model_file.stat().st_size / 1e6):.1f} MB file",
        "",
        "## Calibration (ECE with 15 equal-width bins)", "", *calibration_table(f, temperature), "",
        f"## Unknown detection: each score fitted on the training split, threshold from the validation split "
        f"(accept {pct(args.unknown_recall)}), nothing tuned on grocery/", "",
        *ood_table(all_scores, args.unknown_recall), "",
        "## The shipped path: fruitnet's Predictor (fp32) with the model file's temperature and threshold", "",
        *shipped_table(model_file, f), "",
        "## The int8 ONNX file (`fruitnet export --int8`): its trust arithmetic is fp32, its features int8", "",
        *int8_table(model_file, f), "",
        "## Cost of the features (forward pass only, fp32, batch 32)", "",
        "| body | ms per image |", "|---|---|",
        f"| the model's body (needed anyway for the prediction) | {ms_ft:.1f} |",
        f"| a second, pretrained body (what pretrained-feature scores add) | {ms_pre:.1f} |",
        "",
        "Targets: AUROC >= 0.95 (webfruit val vs grocery/other); >= 80% of grocery/other rejected while >= 93% "
        "of webfruit val keep their label; ECE <= 0.03 on webfruit val.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
