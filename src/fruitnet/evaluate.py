"""Evaluate a model on a labelled class-folder tree: the report, confusion matrix and mistakes."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from fruitnet.dataset import scan
from fruitnet.errors import DataError
from fruitnet.images import load_image
from fruitnet.metrics import classification_report, format_report, write_confusion_csv
from fruitnet.predictors import TorchPredictor
from fruitnet.preprocess import small_side
from fruitnet.progress import bar as progress_bar


def _first_few(paths: list[str], n: int = 3) -> str:
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


def evaluation_warnings(meta: dict, items: list, results: list[dict]) -> list[str]:
    """What makes these numbers untrustworthy: photos the model was trained on (the model file's
    `training_photos` fingerprints), photos much smaller than its input."""
    warnings = []
    trained_on = set(meta.get("training_photos") or ())
    seen = [it.path for it in items if it.sha256 and it.sha256[:16] in trained_on]
    if seen:
        warnings.append(f"{len(seen)} of {len(items)} photos were used to train this model (same bytes as its "
                        "training photos): accuracy on them overstates accuracy on new photos; evaluate on photos "
                        f"it has not seen, such as its run's validation split: {_first_few(seen)}")
    small = [r["path"] for r in results if "warning" in r]
    if small:
        pre = meta["preprocessing"]
        warnings.append(f"{len(small)} of {len(items)} photos are much smaller than the model's {pre['input_size']}-"
                        f"pixel input (shorter side under {small_side(pre)} pixels), so their answers rest on "
                        f"upscaled pixels: {_first_few(small)} (sizes in predictions.csv)")
    return warnings


def evaluate(model_path, data, out: Path, batch_size: int = 32, legacy: bool | None = None,
             progress: bool = True, precision: str = "fp32") -> dict:
    """Returns the report dict (accuracy, n, classes, per_class, confusion_matrix, skipped, ...)
    and writes report.json/.txt, confusion.png/.csv, mistakes.png and predictions.csv into out."""
    t0 = time.perf_counter()
    predictor = TorchPredictor(model_path, legacy=legacy, precision=precision)
    catalog = scan(data, progress=progress)
    unknown = [c for c in catalog.classes if c not in predictor.classes]
    if unknown:
        raise DataError(f"{data}: class folder(s) {unknown} unknown to the model, which knows {predictor.classes}")
    items = catalog.usable
    with progress_bar(total=len(items), desc="evaluating", unit="img", disable=not progress) as bar:
        results = predictor.predict_paths([it.path for it in items], batch_size, progress=bar.update)
    skipped = catalog.skipped + [{"path": r["path"], "reason": r["error"]} for r in results if "error" in r]
    scored = [(it, r) for it, r in zip(items, results) if "error" not in r]
    index = {c: i for i, c in enumerate(predictor.classes)}
    y_true = [index[it.label] for it, _ in scored]
    y_pred = [index[r["label"]] for _, r in scored]
    report = classification_report(y_true, y_pred, predictor.classes)
    report.update({"skipped": skipped, "model": str(model_path), "data": str(data),
                   "warnings": evaluation_warnings(predictor.meta, items, results),
                   "seconds": round(time.perf_counter() - t0, 2)})

    out.mkdir(parents=True, exist_ok=True)
    from fruitnet.plots import plot_confusion, plot_mistakes

    write_confusion_csv(out / "confusion.csv", report["confusion_matrix"], predictor.classes)
    write_confusion_csv(out / "confusion_normalized.csv", report["confusion_matrix_normalized"],
                        predictor.classes, normalized=True)
    plot_confusion(report["confusion_matrix"], predictor.classes, out / "confusion.png",
                   normalized_matrix=report["confusion_matrix_normalized"])
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence", "warning"] + [f"p_{c}" for c in predictor.classes])
        for it, r in scored:
            probs = r["probabilities"]
            w.writerow([it.path, it.label, r["label"], probs[r["label"]], r.get("warning", "")]
                       + [probs[c] for c in predictor.classes])
    mistakes = sorted(((r["probabilities"][r["label"]], it, r) for it, r in scored if r["label"] != it.label),
                      key=lambda m: -m[0])[:24]
    plot_mistakes([load_image(it.path) for _, it, _ in mistakes], [it.label for _, it, _ in mistakes],
                  [r["label"] for _, _, r in mistakes], [c for c, _, _ in mistakes], out / "mistakes.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.txt").write_text(format_report(report) + "\n")
    return report
