"""Evaluate a model on a labelled class-folder tree: the report, confusion matrix, calibration,
the unknown verdict and the mistakes (each beside its Grad-CAM heat map).

`accuracy` stays the accuracy of the best class (comparable with earlier runs and other tools);
`coverage` is the share of photos answered (not "unknown") and `answered_accuracy` the accuracy
on those. Photos of none of the classes, in DATA/unknown/ or --unknown DIR, give the AUROC of
the in-distribution score (known against unknown), the share of them rejected and the share of
known photos accepted.

tta=True (`--tta`) averages each photo's logits with its mirror image's (test-time augmentation);
the report records it ("tta" in report.json, a line in report.txt).  The mistakes' heat maps are
the plain model's (for the class the averaged prediction chose).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fruitnet.calibration import calibration_summary, reliability
from fruitnet.dataset import is_run_folder, scan
from fruitnet.errors import DataError
from fruitnet.formats import answer_summary
from fruitnet.images import load_image
from fruitnet.metrics import classification_report, format_classification_report, write_confusion_csv
from fruitnet.unknown import auroc
from fruitnet.config import InferenceOptions
from fruitnet.outputs import spreadsheet_row
from fruitnet.predictors import UNKNOWN, expand_paths, load_predictor
from fruitnet.preprocess import small_side
from fruitnet.progress import bar as progress_bar

MAX_MISTAKES = 24


def _best(r: dict) -> str:
    return r.get("best_guess", r["label"])


def _first_few(paths: list[str], n: int = 3) -> str:
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


def evaluation_warnings(meta: dict, items: list, results: list[dict], classes: list[str]) -> list[str]:
    """What makes these numbers untrustworthy: classes with no photos here, photos the model was
    trained on (the model file's `training_photos` fingerprints), photos much smaller than its input."""
    absent = [c for c in meta["classes"] if c not in classes]
    warnings = [f"no photos of {', '.join(absent)} here: the accuracy is over {', '.join(classes)} alone, and "
                "the other classes' recall is not measured (their precision still counts mistakes into them)"] \
        if absent else []
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


def evaluate(model_path, data, out: Path, options: InferenceOptions = InferenceOptions(),
             unknown_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Returns the report dict (accuracy, n, classes, per_class, confusion_matrix, calibration,
    coverage, unknown, skipped, ...) and writes report.json/.txt, confusion.png/.csv,
    calibration.png, mistakes.png and predictions.csv into out.  The model runs as `options` say."""
    t0 = time.perf_counter()
    predictor = load_predictor(model_path, options)
    catalog, unknown_paths = _photos(data, unknown_dir, predictor.classes, progress)
    items = catalog.usable
    with progress_bar(total=len(items) + len(unknown_paths), desc="evaluating", unit="img",
                      disable=not progress) as bar:
        results = predictor.predict_paths([it.path for it in items], options.batch_size, progress=bar.update, raw=True)
        unknown_results = predictor.predict_paths(unknown_paths, options.batch_size, progress=bar.update, raw=True)
    skipped = catalog.skipped + [{"path": r["path"], "reason": r["error"]} for r in results + unknown_results
                                 if "error" in r]
    scored = [(it, r) for it, r in zip(items, results) if "error" not in r]
    unknown_results = [r for r in unknown_results if "error" not in r]
    index = {c: i for i, c in enumerate(predictor.classes)}
    y_true = [index[it.label] for it, _ in scored]
    report = classification_report(y_true, [index[_best(r)] for _, r in scored], predictor.classes)
    report.update(_trust_report(predictor, scored, unknown_results, y_true))
    report.update({"skipped": skipped, "model": str(model_path), "data": str(data), "tta": predictor.tta,
                   "answers": answer_summary([r for _, r in scored]),
                   "absent_classes": [c for c in predictor.classes if c not in catalog.classes],
                   "warnings": evaluation_warnings(predictor.meta, items, results, catalog.classes),
                   "seconds": round(time.perf_counter() - t0, 2)})
    _write_outputs(out, report, predictor, scored, unknown_results, y_true)
    return report


def _photos(data, unknown_dir, classes: list[str], progress: bool) -> tuple:
    """The labelled photos (a catalog whose classes are some of the model's) and the paths of the
    photos of none of the classes (DATA/unknown/ and --unknown DIR)."""
    catalog = scan(data, progress=progress, min_classes=1)
    if unknown_dir is not None:  # a class folder given as --unknown DIR is that, not a class
        catalog = _without_folder(catalog, Path(unknown_dir))
    foreign = [c for c in catalog.classes if c not in classes]
    if foreign:
        raise DataError(f"{data}: class folder(s) {foreign} are none of the model's classes ({', '.join(classes)}); "
                        f"photos of none of them go in {Path(data) / 'unknown'}/ or --unknown DIR")
    unknown_paths = [it.path for it in catalog.negatives]
    if unknown_dir is not None:
        found, problems = expand_paths([str(unknown_dir)], skip_folder=is_run_folder)  # as scan skips them
        if problems:
            raise DataError(f"--unknown {unknown_dir}: no such folder, or no images there")
        unknown_paths += found
    return catalog, unknown_paths


def _write_outputs(out: Path, report: dict, predictor, scored: list, unknown_results: list, y_true: list) -> None:
    """report.json and .txt, the confusion CSVs and picture, calibration.png, predictions.csv, mistakes.png."""
    from fruitnet.plots import plot_confusion, plot_reliability

    classes = predictor.classes
    out.mkdir(parents=True, exist_ok=True)
    write_confusion_csv(out / "confusion.csv", report["confusion_matrix"], classes)
    write_confusion_csv(out / "confusion_normalized.csv", report["confusion_matrix_normalized"], classes,
                        normalized=True)
    plot_confusion(report["confusion_matrix"], classes, out / "confusion.png",
                   normalized_matrix=report["confusion_matrix_normalized"])
    cal = report["calibration"]
    if scored:
        logits = np.array([r["logits"] for _, r in scored])
        plot_reliability(reliability(_softmax(logits), y_true), reliability(_softmax(logits / cal["temperature"]), y_true),
                         out / "calibration.png", cal["ece_before"], cal["ece_after"], cal["temperature"])
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(spreadsheet_row(["path", "true", "predicted", "confidence", "verdict", "in_distribution",
                                    "warning"] + [f"p_{c}" for c in classes]))
        for it, r in scored + [(None, r) for r in unknown_results]:
            probs = r["probabilities"]
            w.writerow(spreadsheet_row([r["path"], it.label if it else UNKNOWN, _best(r), probs[_best(r)], r["label"],
                                        r.get("in_distribution", ""), r.get("warning", "")]
                                       + [probs[c] for c in classes]))
    mistakes = [{"true": it.label, "predicted": _best(r), "confidence": r["probabilities"][_best(r)], "result": r}
                for it, r in scored if _best(r) != it.label]
    _plot_mistakes(predictor, mistakes, out / "mistakes.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.txt").write_text(format_classification_report(report) + format_trust(report) + "\n")


def _without_folder(catalog, folder: Path):
    """The catalog without the class whose folder is `folder` (DATA/other given as --unknown DATA/other)."""
    inside = [c for c in catalog.classes if (Path(catalog.root) / c).resolve() == folder.resolve()]
    if not inside:
        return catalog
    return replace(catalog, classes=[c for c in catalog.classes if c not in inside],
                   items=[it for it in catalog.items if it.label not in inside])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _trust_report(predictor, scored: list, unknown_results: list, y_true: list[int]) -> dict:
    """calibration (ECE and NLL before/after), coverage and answered accuracy, and the unknown set."""
    logits = np.array([r["logits"] for _, r in scored]).reshape(len(scored), len(predictor.classes))
    answered = [(it, r) for it, r in scored if r["label"] != UNKNOWN]
    report = {
        "calibration": calibration_summary(logits, np.array(y_true, dtype=int), predictor.temperature),
        "unknown_verdict": predictor.trust_info(),
        "coverage": len(answered) / len(scored) if scored else 0.0,
        "answered_accuracy": (sum(r["label"] == it.label for it, r in answered) / len(answered)) if answered else 0.0,
    }
    if unknown_results:
        known_scores = [r["score"] for _, r in scored]
        summary = {"n": len(unknown_results),
                   "rejected": sum(r["label"] == UNKNOWN for r in unknown_results) / len(unknown_results),
                   "known_accepted": report["coverage"],
                   "predicted": {c: sum(_best(r) == c for r in unknown_results) for c in predictor.classes}}
        if known_scores and known_scores[0] is not None:
            summary["auroc"] = auroc(known_scores, [r["score"] for r in unknown_results])
        report["unknown"] = summary
    return report


def _plot_mistakes(predictor, mistakes: list[dict], path: Path) -> None:
    """Up to MAX_MISTAKES of the mistakes, spread across the confusion pairs, most confident first,
    each photo beside its heat map (for the predicted class) and above its file name."""
    from fruitnet.explain import explain_images
    from fruitnet.plots import plot_mistakes, spread_mistakes

    shown, total = spread_mistakes(mistakes, MAX_MISTAKES)
    results = [m["result"] for m in shown]
    images = [load_image(r["path"]) for r in results]
    if images and not predictor.explain_unavailable:
        images = [im for i in range(0, len(images), 8)
                  for im in explain_images(predictor, images[i:i + 8], results[i:i + 8])]
    plot_mistakes(images, [m["true"] for m in shown], [m["predicted"] for m in shown],
                  [m["confidence"] for m in shown], path, names=[r["path"] for r in results], total=total)


def format_trust(report: dict) -> str:
    """The test-time augmentation, calibration and unknown-verdict lines of a report, as text."""
    cal, verdict = report["calibration"], report["unknown_verdict"]
    lines = [("Test-time augmentation (--tta): each photo's prediction averaged with its mirror image's"
              if report.get("tta") else "Test-time augmentation: none"),
             (f"Calibration ({cal['bins']} bins): temperature {cal['temperature']:.3f}; "
              f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}; NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}")]
    if verdict["unknown_verdict"]:
        lines.append(f"Answered (not 'unknown'): {report['coverage']:.2%} of the photos "
                     f"(threshold in_distribution {verdict['threshold']:g}); accuracy on them "
                     f"{report['answered_accuracy']:.2%}")
    elif verdict["threshold"] is None:
        lines.append("No 'unknown' verdict: this model file has no in-distribution statistics (made before them)")
    else:
        lines.append("No 'unknown' verdict: turned off (--no-unknown)")
    u = report.get("unknown")
    if u:
        auc = f"AUROC {u['auroc']:.4f}; " if "auroc" in u else ""
        lines.append(f"Photos of none of the classes: {u['n']}; {auc}rejected {u['rejected']:.2%}; "
                     f"known photos accepted {u['known_accepted']:.2%}; their best guesses: "
                     + ", ".join(f"{c} {n}" for c, n in u["predicted"].items()))
    return "\n".join(lines) + "\n"
