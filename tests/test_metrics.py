import csv
import json
import math

import numpy as np
import pytest

from fruitnet.metrics import (
    classification_report,
    confusion_matrix,
    format_classification_report,
    write_confusion_csv,
)

# Hand example, 3 classes (0=apple, 1=banana, 2=cherry), 10 images.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
CLASSES = ["apple", "banana", "cherry"]
# rows = true, cols = predicted
EXPECTED_CM = [
    [2, 1, 1],
    [1, 2, 0],
    [0, 1, 2],
]


def test_confusion_matrix_counts():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.dtype == np.int64
    assert cm.shape == (3, 3)
    assert cm.tolist() == EXPECTED_CM
    assert cm.sum() == len(Y_TRUE)


def test_confusion_matrix_numpy_input_and_unused_class():
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([1, 1, 0]), 4)
    assert cm.shape == (4, 4)
    assert cm.tolist() == [[0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_confusion_matrix_empty_and_bad_labels():
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 3)


def test_classification_report_by_hand():
    r = classification_report(Y_TRUE, Y_PRED, CLASSES)
    assert set(r) == {
        "accuracy", "n", "classes", "per_class", "confusion_matrix", "confusion_matrix_normalized",
    }
    assert r["n"] == 10
    assert r["accuracy"] == pytest.approx(6 / 10, abs=1e-9)
    assert r["classes"] == CLASSES
    assert r["confusion_matrix"] == EXPECTED_CM

    # apple: tp=2, support=4, predicted=3
    # banana: tp=2, support=3, predicted=4
    # cherry: tp=2, support=3, predicted=3
    expected = {
        "apple": (2 / 4, 2 / 3, 4),
        "banana": (2 / 3, 2 / 4, 3),
        "cherry": (2 / 3, 2 / 3, 3),
    }
    for cls, (rec, prec, sup) in expected.items():
        pc = r["per_class"][cls]
        assert set(pc) == {"accuracy", "precision", "recall", "f1", "support"}
        assert pc["recall"] == pytest.approx(rec, abs=1e-9)
        assert pc["accuracy"] == pytest.approx(rec, abs=1e-9)  # per-class accuracy == recall
        assert pc["precision"] == pytest.approx(prec, abs=1e-9)
        assert pc["f1"] == pytest.approx(2 * prec * rec / (prec + rec), abs=1e-9)
        assert pc["support"] == sup
        assert isinstance(pc["support"], int)
    # concrete f1 values: apple 2*(2/3)(1/2)/(7/6) = 4/7
    assert r["per_class"]["apple"]["f1"] == pytest.approx(4 / 7, abs=1e-9)
    assert r["per_class"]["banana"]["f1"] == pytest.approx(4 / 7, abs=1e-9)
    assert r["per_class"]["cherry"]["f1"] == pytest.approx(2 / 3, abs=1e-9)

    norm = r["confusion_matrix_normalized"]
    assert norm[0] == pytest.approx([0.5, 0.25, 0.25], abs=1e-12)
    assert norm[1] == pytest.approx([1 / 3, 2 / 3, 0.0], abs=1e-12)
    for row in norm:
        assert sum(row) == pytest.approx(1.0)


def test_report_types_are_plain_python():
    r = classification_report(Y_TRUE, Y_PRED, CLASSES)
    assert type(r["accuracy"]) is float
    assert type(r["n"]) is int
    assert all(type(v) is int for row in r["confusion_matrix"] for v in row)
    assert all(type(v) is float for row in r["confusion_matrix_normalized"] for v in row)
    for pc in r["per_class"].values():
        assert all(type(pc[k]) is float for k in ("accuracy", "precision", "recall", "f1"))


def test_zero_support_and_never_predicted_give_zero_not_nan():
    # class "durian" (3) never appears and is never predicted;
    # class "cherry" (2) is never predicted but has support.
    y_true = [0, 1, 2, 2]
    y_pred = [0, 1, 1, 1]
    r = classification_report(y_true, y_pred, CLASSES + ["durian"])
    d = r["per_class"]["durian"]
    assert d == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    c = r["per_class"]["cherry"]
    assert c["precision"] == 0.0 and c["recall"] == 0.0 and c["f1"] == 0.0
    assert c["support"] == 2
    assert r["confusion_matrix_normalized"][3] == [0.0, 0.0, 0.0, 0.0]
    values = [v for pc in r["per_class"].values() for v in pc.values()]
    values += [v for row in r["confusion_matrix_normalized"] for v in row]
    assert not any(isinstance(v, float) and math.isnan(v) for v in values)
    text = json.dumps(r, allow_nan=False)  # raises if any NaN/inf slipped in
    assert json.loads(text)["per_class"]["durian"]["f1"] == 0.0


def test_empty_report_is_valid_json():
    r = classification_report([], [], ["a", "b"])
    assert r["accuracy"] == 0.0 and r["n"] == 0
    json.dumps(r, allow_nan=False)


def test_confusion_csv_round_trip_counts(tmp_path):
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    out = write_confusion_csv(tmp_path / "sub" / "cm.csv", cm, CLASSES)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\pred", "apple", "banana", "cherry"]
    assert len(rows) == 4
    assert [r[0] for r in rows[1:]] == CLASSES
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == EXPECTED_CM


def test_confusion_csv_round_trip_normalized(tmp_path):
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    path = tmp_path / "cm_norm.csv"
    write_confusion_csv(path, cm, CLASSES, normalized=True)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\pred", *CLASSES]
    got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(got, [[0.5, 0.25, 0.25], [1 / 3, 2 / 3, 0], [0, 1 / 3, 2 / 3]], atol=1e-6)

    # an already-normalised matrix is written as-is
    r = classification_report(Y_TRUE, Y_PRED, CLASSES)
    path2 = tmp_path / "cm_norm2.csv"
    write_confusion_csv(path2, r["confusion_matrix_normalized"], CLASSES, normalized=True)
    with open(path2, newline="") as f:
        rows2 = list(csv.reader(f))
    got2 = np.array([[float(v) for v in r[1:]] for r in rows2[1:]])
    np.testing.assert_allclose(got2, got, atol=1e-9)


def test_confusion_csv_shape_mismatch(tmp_path):
    with pytest.raises(ValueError):
        write_confusion_csv(tmp_path / "x.csv", np.zeros((2, 2)), CLASSES)


def test_format_report_contents():
    r = classification_report(Y_TRUE, Y_PRED, CLASSES)
    text = format_classification_report(r)
    assert isinstance(text, str)
    for cls in CLASSES:
        assert cls in text
    assert "60.00%" in text
    assert "6/10" in text
    for word in ("accuracy", "precision", "recall", "f1", "support"):
        assert word in text
    assert "0.6667" in text  # banana/cherry recall
    assert "Confusion matrix" in text
    # aligned table: every per-class line has the same length
    lines = text.splitlines()
    per_class_lines = [ln for ln in lines if ln.split() and ln.split()[0] in CLASSES]
    assert len(per_class_lines) == 6  # 3 in the metric table + 3 in the matrix
    assert len({len(ln) for ln in per_class_lines[:3]}) == 1
    # matrix rows show the counts
    assert per_class_lines[3].split()[1:] == ["2", "1", "1"]
