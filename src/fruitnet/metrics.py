"""Classification metrics: confusion matrix, per-class report, CSV and text output.

Precision, recall and F1 come from scikit-learn (imported when a report is made); no torch.
Every ratio that would be undefined (a class with no images, or no predictions) is reported
as 0.0 so that reports stay valid JSON.
"""

from __future__ import annotations

import csv
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fruitnet.outputs import spreadsheet_row

__all__ = [
    "confusion_matrix",
    "normalize_rows",
    "classification_report",
    "write_confusion_csv",
    "format_classification_report",
]


def _as_labels(values: Sequence[int], name: str) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must contain integer class indices")
    return arr.astype(np.int64, copy=False)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Return an ``(n_classes, n_classes)`` int64 matrix; rows = true class, cols = predicted."""
    n_classes = int(n_classes)
    if n_classes < 1:
        raise ValueError("n_classes must be >= 1")
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{name} has labels outside 0..{n_classes - 1}")
    flat = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def normalize_rows(matrix: Any) -> np.ndarray:
    """Row-normalise a confusion matrix (each true class sums to 1); empty rows stay 0.0."""
    m = np.asarray(matrix, dtype=np.float64)
    return _safe_div(m, m.sum(axis=1, keepdims=True))


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: list[str]) -> dict:
    """Overall accuracy, per-class accuracy/precision/recall/f1/support and confusion matrices.

    Per-class "accuracy" is the fraction of that class's images predicted correctly
    (i.e. equal to recall). All values are plain Python types (JSON-serialisable).
    """
    from sklearn.metrics import precision_recall_fscore_support

    classes = [str(c) for c in classes]
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)  # validates the labels
    n = int(cm.sum())
    if n:
        precision, recall, f1, support = precision_recall_fscore_support(
            _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred"), labels=list(range(k)), zero_division=0.0)
    else:
        precision = recall = f1 = np.zeros(k)
        support = np.zeros(k, dtype=np.int64)
    accuracy = float(np.trace(cm) / n) if n else 0.0

    per_class = {
        cls: {
            "accuracy": float(recall[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, cls in enumerate(classes)
    }
    return {
        "accuracy": accuracy,
        "n": n,
        "classes": list(classes),
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "confusion_matrix_normalized": [[float(v) for v in row] for row in normalize_rows(cm)],
    }


def write_confusion_csv(
    path: str | PathLike[str],
    matrix: Any,
    classes: list[str],
    normalized: bool = False,
) -> Path:
    """Write ``matrix`` as CSV: header ``true\\pred,<classes...>``, one row per true class.

    With ``normalized=True`` the matrix is row-normalised (if it holds counts) and written
    as floats with 6 decimals; otherwise values are written as integers.
    """
    path = Path(path)
    m = np.asarray(matrix)
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"matrix shape {m.shape} does not match {k} classes")
    if normalized:
        mf = m.astype(np.float64)
        row_sums = mf.sum(axis=1)
        already = np.all((np.isclose(row_sums, 1.0)) | (row_sums == 0)) and np.all(mf <= 1.0)
        if not already:
            mf = normalize_rows(mf)
        cells = [[f"{v:.6f}" for v in row] for row in mf]
    else:
        cells = [[str(int(round(float(v)))) for v in row] for row in m]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(spreadsheet_row(["true\\pred", *classes]))
        for cls, row in zip(classes, cells):
            w.writerow(spreadsheet_row([cls, *row]))
    return path


def format_classification_report(report: dict) -> str:
    """Human-readable text table of a :func:`classification_report` result."""
    classes = [str(c) for c in report.get("classes", list(report.get("per_class", {})))]
    per_class = report.get("per_class", {})
    lines: list[str] = []
    n = int(report.get("n", 0))
    acc = float(report.get("accuracy", 0.0))
    correct = int(round(acc * n))
    lines.append(f"Overall accuracy: {acc * 100:.2f}% ({correct}/{n} images)")
    lines.append("")

    name_w = max([len("class")] + [len(c) for c in classes])
    cols = ["accuracy", "precision", "recall", "f1", "support"]
    header = f"{'class':<{name_w}}  " + "  ".join(f"{c:>9}" for c in cols)
    lines.append(header)
    lines.append("-" * len(header))
    for cls in classes:
        pc = per_class.get(cls, {})
        absent = not int(pc.get("support", 0))  # no photos of the class: its recall is not measured
        vals = [f"{'-':>9}" if absent and c != "precision" else f"{float(pc.get(c, 0.0)):>9.4f}" for c in cols[:-1]]
        vals.append(f"{int(pc.get('support', 0)):>9d}")
        lines.append(f"{cls:<{name_w}}  " + "  ".join(vals))

    cm = report.get("confusion_matrix")
    if cm is not None and len(classes):
        lines.append("")
        lines.append("Confusion matrix (rows = true, columns = predicted):")
        cm = [[int(v) for v in row] for row in cm]
        cell_w = max([len(c) for c in classes] + [len(str(v)) for row in cm for v in row] + [1])
        label = "true\\pred"
        first_w = max(name_w, len(label))
        lines.append(f"{label:<{first_w}}  " + "  ".join(f"{c:>{cell_w}}" for c in classes))
        for cls, row in zip(classes, cm):
            lines.append(f"{cls:<{first_w}}  " + "  ".join(f"{v:>{cell_w}d}" for v in row))
    if report.get("warnings"):
        lines.append("")
        lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"
