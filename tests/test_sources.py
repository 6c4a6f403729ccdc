"""Photos from more than one place: train A/ B/, DATA/unknown/ negatives, evaluating a folder with
some of the classes, and the answers' summary that says what to do when many are unknown."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from conftest import DEMO_DATA, run_cli
from PIL import Image

from fruitnet.dataset import format_data_report, scan, scan_folders
from fruitnet.formats import spread_over_folders


def grey_squares(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"square{i}.png"
        Image.new("RGB", (200, 200), (30 + 25 * i, 30 + 25 * i, 40 + 20 * i)).save(path)
        paths.append(path)
    return paths


def two_sources(tmp_path: Path) -> tuple[Path, Path]:
    """A/ with cherry and tomato, B/ with strawberry and unknown/ (photos of none of the classes)."""
    a, b = tmp_path / "A", tmp_path / "B"
    for cls in ("cherry", "tomato"):
        shutil.copytree(DEMO_DATA / "train" / cls, a / cls)
    shutil.copytree(DEMO_DATA / "train" / "strawberry", b / "strawberry")
    grey_squares(b / "unknown", 6)
    return a, b


def test_unknown_folder_holds_negatives_not_a_class(tmp_path):
    a, b = two_sources(tmp_path)
    catalog = scan(b, progress=False, min_classes=1)
    assert catalog.classes == ["strawberry"] and len(catalog.negatives) == 6
    assert all(it.label == "strawberry" for it in catalog.usable)
    merged = scan_folders([a, b], progress=False)
    assert merged.classes == ["cherry", "strawberry", "tomato"] and len(merged.negatives) == 6
    assert {Path(it.source) for it in merged.usable} == {a, b}
    assert "6 photo(s) of none of the classes in unknown/" in format_data_report(merged.report())


def test_train_merges_folders_and_fits_the_verdict_against_the_negatives(tmp_path):
    a, b = two_sources(tmp_path)
    run = tmp_path / "run"
    result = run_cli("train", a, b, "--backbone", "efficientnet_lite0", "--out", run)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["cherry", "strawberry", "tomato"] and config["train"]["data"] == [str(a), str(b)]
    rows = list(csv.DictReader(open(run / "split.csv")))
    assert {Path(r["source"]) for r in rows if r["split"] != "negative"} == {a.resolve(), b.resolve()}
    negatives = [r for r in rows if r["split"] == "negative"]
    assert len(negatives) == 6 and {r["class"] for r in negatives} == {"unknown"}
    from fruitnet.predictors import TorchPredictor

    predictor = TorchPredictor(run / "best.safetensors", device="cpu")
    trust = predictor.meta["trust"]
    assert trust["negatives"]["n"] == 6 and trust["threshold"] >= 0.05
    assert "raised against the 6 photos of none of the classes" in result.stdout
    answers = predictor.predict_paths([str(p) for p in sorted((b / "unknown").iterdir())])
    assert sum(r["label"] == "unknown" for r in answers) == round(trust["negatives"]["rejected"] * 6)


def test_evaluate_takes_a_folder_with_some_of_the_classes_and_a_class_folder_given_as_unknown(trained_model, tmp_path):
    data = tmp_path / "shop"
    shutil.copytree(DEMO_DATA / "test" / "tomato", data / "tomato")
    grey_squares(data / "other", 5)
    refused = run_cli("evaluate", trained_model, data, "--out", tmp_path / "refused")
    assert refused.returncode == 2 and "photos of none of them go in" in refused.stderr
    assert not (tmp_path / "refused").exists()  # a refused evaluate leaves no folder behind: the retry works
    result = run_cli("evaluate", trained_model, data, "--unknown", data / "other", "--out", tmp_path / "refused")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "refused" / "report.json").read_text())
    assert report["n"] == 10 and report["absent_classes"] == ["cherry", "strawberry"]
    assert report["unknown"]["n"] == 5
    assert "no photos of cherry, strawberry here" in result.stdout
    assert "10 photo(s): " in result.stdout and " answered (" in result.stdout


def test_predict_says_how_many_answers_are_unknown_and_what_to_do(trained_model, tmp_path):
    squares = grey_squares(tmp_path / "odd", 6)
    result = run_cli("predict", trained_model, *squares)
    assert result.returncode == 0, result.stderr
    assert "6 photo(s): 0 answered (0%), 6 unknown (100%)" in result.stdout
    assert f"Teach it a few of them in a local page, in minutes: fruitnet teach {trained_model}" in result.stdout
    sure = run_cli("predict", trained_model, DEMO_DATA / "test")
    assert "fruitnet teach" not in sure.stdout and "cherry/: 10" in sure.stdout


def test_the_grid_shares_its_photos_among_the_folders():
    results = [{"path": f"f360/{cls}/{i:04d}.jpg"} for cls, n in (("cherry", 317), ("strawberry", 164),
                                                                  ("tomato", 776)) for i in range(n)]
    shown = spread_over_folders(results, 64)
    by_class = {cls: sum(f"/{cls}/" in r["path"] for r in shown) for cls in ("cherry", "strawberry", "tomato")}
    assert len(shown) == 64 and max(by_class.values()) - min(by_class.values()) <= 1
    tomatoes = [int(Path(r["path"]).stem) for r in shown if "/tomato/" in r["path"]]
    assert tomatoes[0] == 0 and tomatoes[-1] > 700  # evenly spaced through the folder, not its first 21
    assert spread_over_folders(results[:5], 64) == results[:5]


def test_the_probe_reports_its_one_fit_in_one_line(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", DEMO_DATA / "test", "--backbone", "efficientnet_lite0", "--out", run)
    assert result.returncode == 0, result.stderr
    probe = [line for line in result.stdout.splitlines() if line.startswith("probe: ")]
    assert len(probe) == 1 and "L-BFGS iterations" in probe[0] and "validation accuracy" in probe[0]
    assert "epoch  seconds" not in result.stdout  # no table of identical epochs
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 1
    png = Image.open(io.BytesIO((run / "curves.png").read_bytes()))
    assert png.size[0] > 500
    assert "so that an answer given with 90% is right about 90% of the time" in result.stdout


def test_several_folders_with_a_separate_validation_folder(tmp_path):
    from fruitnet.config import TrainConfig
    from fruitnet.training import read_data

    a, b = two_sources(tmp_path)
    val = tmp_path / "val"
    for cls in ("cherry", "strawberry", "tomato"):
        shutil.copytree(DEMO_DATA / "test" / cls, val / cls)
    data = read_data(TrainConfig(data=(str(a), str(b)), val_dir=str(val)), log=lambda *_: None)
    assert data.classes == ["cherry", "strawberry", "tomato"]
    assert len(data.train) == 90 and len(data.val) == 30 and len(data.negatives) == 6
    assert {Path(it.source) for it in data.train} == {a, b} and {Path(it.source) for it in data.val} == {val}
