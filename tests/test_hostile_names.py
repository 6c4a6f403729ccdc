"""Issue 19 items 3, 7 and 9: names that are code somewhere else, in class folders and file names.

matplotlib reads '$...$' as mathtext, a spreadsheet runs a cell that begins with '=', '+', '-' or
'@', a terminal obeys escape sequences.  fruitnet draws, writes and prints every name as text."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from quick_model import make_quick_model, with_metadata

from fruitnet import cli, plots
from fruitnet.explain import caption, side_by_side
from fruitnet.outputs import FORMULA_STARTS

HOSTILE = ["tomato $2_$3", "a_b^c $x^$", "back\\slash $\\frac{1}{0}$", "🍅 emoji", "طماطم", "n" * 300]
# Every label is a formula to a spreadsheet; the last is also mathtext to matplotlib.
CLASSES = ['=HYPERLINK("evil.example","x")', "@SUM(1)", "-tomato $2_$3"]
ESCAPES = "\x1b]0;OWNED\x07\x1b[2J"


def assert_spreadsheet_safe(path: Path) -> str:
    """No cell of the CSV file would run as a formula (numbers aside); returns the text."""
    text = path.read_text(encoding="utf-8")
    for row in csv.reader(text.splitlines()):
        for cell in row:
            if cell.startswith(FORMULA_STARTS):
                float(cell)  # only a number may begin with '-' or '+'
    return text


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("model")
    return with_metadata(make_quick_model(tmp / "plain.safetensors"), tmp / "hostile.safetensors",
                         lambda m: {**m, "classes": CLASSES})


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_data) -> Path:
    """One class folder per hostile class name, 4 photos each."""
    root = tmp_path_factory.mktemp("hostile") / "data"
    for cls, source in zip(CLASSES, ("cherry", "strawberry", "tomato")):
        (root / cls).mkdir(parents=True)
        for src in sorted((demo_data / "train" / source).glob("*.jpg"))[:4]:
            shutil.copy(src, root / cls / src.name)
    return root


# --- item 3: every picture draws names literally -----------------------------------------------

@pytest.mark.parametrize("name", HOSTILE)
def test_every_picture_draws_any_name(tmp_path, name):
    from PIL import Image

    img = Image.new("RGB", (64, 48), "white")
    plots.plot_prediction_grid([img], [f"{name} 97.0%"], tmp_path / "grid.png", names=[f"{name}.jpg"])
    plots.plot_mistakes([img], [name], ["b"], [0.9], tmp_path / "mistakes.png", names=[f"{name}.jpg"])
    plots.plot_confusion([[1, 0], [0, 1]], [name, "b"], tmp_path / "confusion.png", normalized_matrix=[[1, 0], [0, 1]])
    plots.plot_curves([{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5}], tmp_path / "curves.png", note=name)
    rows = [{"lo": 0.0, "hi": 1.0, "n": 1, "confidence": 0.5, "accuracy": 1.0}]
    plots.plot_reliability(rows, rows, tmp_path / "calibration.png", 0.1, 0.05, 1.5)
    side_by_side(img, img, caption({"label": name, "probabilities": {name: 0.5}}))  # heat maps: PIL text
    for png in ("grid", "mistakes", "confusion", "curves", "calibration"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000


def test_predict_grid_and_csv_with_a_dollar_file_name_and_formula_classes(model, tmp_path, demo_data, monkeypatch):
    photos = tmp_path / "t"
    photos.mkdir()
    src = sorted((demo_data / "test" / "tomato").glob("*.jpg"))[0]
    for name in ("tomato $2_$3.jpg", "=cmd|'calc'!A0.jpg"):
        shutil.copy(src, photos / name)
    monkeypatch.chdir(photos)  # bare file names, as the shell gives them
    assert cli.main(["predict", str(model), "tomato $2_$3.jpg", "=cmd|'calc'!A0.jpg", "--grid",
                     str(tmp_path / "g.png"), "--csv", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000
    text = assert_spreadsheet_safe(tmp_path / "p.csv")
    assert """'=HYPERLINK(""evil.example"",""x"")""" in text and "'=cmd|'calc'!A0.jpg" in text


def test_evaluate_draws_and_writes_formula_and_dollar_class_names(model, data, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(model), str(data), "--out", str(out)]) == 0
    for png in ("confusion.png", "calibration.png", "mistakes.png"):
        assert (out / png).stat().st_size > 1000
    for name in ("predictions.csv", "confusion.csv", "confusion_normalized.csv"):
        assert "'-tomato $2_$3" in assert_spreadsheet_safe(out / name)


def test_check_deep_photos_csv_is_spreadsheet_safe(data, tmp_path):
    result = run_cli("check", data, "--deep", "--folds", "2", "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert "'@SUM(1)" in assert_spreadsheet_safe(tmp_path / "report" / "photos.csv")


# --- item 9: names are printed, never obeyed ----------------------------------------------------

def test_check_predict_and_train_print_escape_codes_in_names_escaped(model, data, tmp_path, demo_data):
    photos = tmp_path / "data"
    shutil.copytree(data, photos)
    bad = photos / CLASSES[0] / f"{ESCAPES}.jpg"
    bad.write_bytes(b"not a photo")  # listed as unusable, by name
    good = photos / CLASSES[1] / f"{ESCAPES}good.jpg"
    shutil.copy(sorted((demo_data / "test" / "cherry").glob("*.jpg"))[0], good)
    runs = {"check": run_cli("check", photos),
            "predict": run_cli("predict", model, good, bad),
            "train": run_cli("train", photos, "--backbone", "efficientnet_lite0", "--mode", "freeze", "--epochs", "1",
                             "--recipe", "fast", "--out", tmp_path / "run")}
    for command, result in runs.items():
        assert result.returncode == 1, (command, result.stderr)  # the unusable file
        shown = result.stdout + result.stderr
        assert "\x1b" not in shown and "\x07" not in shown, command
        assert "\\x1b]0;OWNED\\x07\\x1b[2J" in shown, command
