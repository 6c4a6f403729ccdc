"""fruitnet teach: the refit's rules, the rankings, the scripted loop and the page in a real browser.

The model is the suite's small trained Lite0 model (its run folder beside it); the "new" photos
are the bundled demo test photos, copied, so that no test can touch the originals."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, run_cli

from fruitnet.unknown import fit_threshold
from fruitnet.teach import Known, farthest_first, rank


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def new(tmp_path) -> Path:
    folder = tmp_path / "new photos"
    shutil.copytree(DEMO_DATA / "test", folder)
    return folder


def labels_file(path: Path, rows: list[tuple[Path, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((str(p), label) for p, label in rows)
    return path


# --- the rules of a refit ------------------------------------------------------------------------

def test_left_out_scores_a_bank_row_without_itself_and_its_copies():
    from fruitnet.unknown import knn, knn_left_out, normalise

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(30, 8)).astype(np.float32))
    bank = normalise(x)
    inside = knn(x, bank, k=10)
    alone = knn_left_out(x, bank, np.arange(30), np.arange(30), block=7)
    assert (alone < inside).all()  # with itself in the bank a row's k-th neighbour is nearer
    assert torch.allclose(alone[:1], knn(x[:1], bank[1:], k=10), atol=1e-6)  # row 0 against the others alone
    pairs = np.arange(30) // 2  # rows 2i and 2i+1 are copies of each other: both left out
    assert torch.allclose(knn_left_out(x, bank, pairs, pairs)[:1], knn(x[:1], bank[2:], k=10), atol=1e-6)


def test_the_threshold_rises_against_negatives_but_never_past_the_slack():
    known = torch.linspace(0, 1, 101)  # in_distribution of score s is about s
    assert fit_threshold(known, torch.zeros(0), 0.95) == 0.05
    # negatives scoring like the 8th percentile of known photos: raised to reject them
    raised = fit_threshold(known, torch.tensor([0.07, 0.075]), 0.95)
    assert 0.07 < raised <= 0.10
    # negatives as typical as the median known photo: rejecting them would cost half the known photos
    assert fit_threshold(known, torch.tensor([0.5]), 0.95) == 0.05


def test_farthest_first_spreads_its_picks_and_coverage_starts_far_from_the_known():
    rng = np.random.default_rng(1)
    clusters = [rng.normal(loc=c, scale=0.05, size=(20, 2)) for c in ((1, 0), (0, 1), (-1, 0))]
    x = np.concatenate(clusters).astype(np.float32)
    picked, _ = farthest_first(x, None, 3)
    assert sorted(i // 20 for i in picked) == [0, 1, 2]  # one from each cluster, not three look-alikes
    known = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the model knows clusters 0 and 1
    first, _ = farthest_first(x, known, 1)
    assert first[0] // 20 == 2


def test_every_ranking_is_an_order_of_all_the_photos():
    from fruitnet.teach import Refit

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    fit = Refit(torch.randn(3, 16), torch.zeros(3), 1.0, torch.nn.functional.normalize(torch.randn(12, 16), dim=1),
                torch.linspace(-1.5, -0.5, 20), 0.05)
    for strategy in ("coverage", "diverse", "uncertainty", "random"):
        order = rank(strategy, x, fit, seed=0, ordered=10)
        assert sorted(order) == list(range(40)), strategy
    unknown = fit.in_distribution(x) < fit.threshold
    order = rank("uncertainty", x, fit)
    assert all(unknown[i] for i in order[:unknown.sum()])  # "unknown" answers first


def test_known_adds_rows():
    a = Known(np.ones((2, 3), np.float32), np.array([0, 1]))
    b = Known.empty(3) + a
    assert len(b) == 2 and b.x.shape == (2, 3)


# --- the command: rank, label from a CSV, refit --------------------------------------------------------

def test_rank_prints_every_new_photo_once_most_useful_first_and_touches_nothing(trained_model, new, tmp_path):
    before = digest(new)
    result = run_cli("teach", trained_model, new, "--rank", "--json", "--cache", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    ranked = json.loads(result.stdout)
    assert sorted(r["path"] for r in ranked) == sorted(str(p) for p in new.rglob("*.jpg"))
    assert {"path", "sha256", "label", "best_guess", "confidence", "in_distribution"} <= set(ranked[0])
    assert digest(new) == before and not (Path.cwd() / "labelled").exists()


def test_labels_from_a_csv_copy_log_refit_and_write_a_new_model_with_its_lineage(trained_model, new, tmp_path):
    from fruitnet.predictors import TorchPredictor

    before, model_before = digest(new), hashlib.sha256(trained_model.read_bytes()).hexdigest()
    chosen = [(new / "cherry" / sorted(p.name for p in (new / "cherry").iterdir())[0], "cherry"),
              (new / "tomato" / sorted(p.name for p in (new / "tomato").iterdir())[0], "tomato"),
              (new / "strawberry" / sorted(p.name for p in (new / "strawberry").iterdir())[0], "none")]
    into, out = tmp_path / "labelled", tmp_path / "taught"
    result = run_cli("teach", trained_model, new, "--labels", labels_file(tmp_path / "l.csv", chosen),
                     "--into", into, "--out", out, "--cache", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "labelled: cherry 1, strawberry 0, tomato 1; none of these 1" in result.stdout
    assert "new photos answered (not 'unknown')" in result.stdout and f"taught model: {out}" in result.stdout
    # copies, not moves; "none of these" into unknown/; the log
    assert (into / "cherry" / chosen[0][0].name).read_bytes() == chosen[0][0].read_bytes()
    assert (into / "unknown" / chosen[2][0].name).is_file() and not (into / "strawberry").exists()
    rows = list(csv.DictReader(open(into / "labels.csv")))
    assert [(r["path"], r["label"]) for r in rows] == [(str(p), label) for p, label in chosen]
    assert all(len(r["sha256"]) == 64 and r["time"] for r in rows)
    assert digest(new) == before and hashlib.sha256(trained_model.read_bytes()).hexdigest() == model_before
    # the taught model: a new file with its lineage, answering the labelled photos
    predictor = TorchPredictor(out / "best.safetensors", device="cpu")
    taught = predictor.meta["taught"]
    assert taught["from"] == str(trained_model.resolve()) and taught["from_sha256"] == model_before
    assert taught["labels_sha256"] == hashlib.sha256((into / "labels.csv").read_bytes()).hexdigest()
    got = predictor.predict_paths([str(chosen[0][0]), str(chosen[1][0])])
    assert [r["best_guess"] for r in got] == ["cherry", "tomato"]
    split = list(csv.DictReader(open(out / "split.csv")))
    assert {(r["path"], r["class"]) for r in split} >= {(str(into / "cherry" / chosen[0][0].name), "cherry"),
                                                       (str(into / "unknown" / chosen[2][0].name), "unknown")}
    # a second session with the same --into carries the labels on, and teaches the taught model
    again = run_cli("teach", out / "best.safetensors", new, "--rank", "--json", "--cache", tmp_path / "cache")
    assert again.returncode == 0, again.stderr


def test_teach_refuses_what_it_cannot_do_in_one_line(trained_model, new, tmp_path):
    cases = [
        (["--into", new / "cherry"], "inside the data folder"),
        (["--labels", labels_file(tmp_path / "bad.csv", [(tmp_path / "elsewhere.jpg", "cherry")])],
         "not one of the new photos"),
        (["--labels", labels_file(tmp_path / "bad2.csv", [(next((new / "cherry").iterdir()), "banana")])],
         "label 'banana' is none of cherry, strawberry, tomato, none"),
        (["--json"], "--json goes with --rank"),
    ]
    before = digest(new)
    for args, message in cases:
        result = run_cli("teach", trained_model, new, "--into", tmp_path / "into", "--cache", tmp_path / "cache", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert digest(new) == before and not (tmp_path / "into").exists()


def test_a_fine_tuned_model_is_sent_to_train_again(tmp_path, new):
    run = tmp_path / "run"
    trained = run_cli("train", DEMO_DATA / "test", "--backbone", "efficientnet_lite0", "--recipe", "original",
                      "--epochs", "1", "--out", run)
    assert trained.returncode == 0, trained.stderr
    result = run_cli("teach", run / "best.safetensors", new, "--rank")
    assert result.returncode == 2
    assert "body was fine-tuned" in result.stderr and "fruitnet train photos/ labelled/ --mode unfreeze" in result.stderr


# --- the page ----------------------------------------------------------------------------------------------

def test_the_page_teaches_by_keyboard_and_shows_what_changed(browser, trained_model, new, tmp_path):
    from quick_model import serving
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    before = digest(new)
    into, out = tmp_path / "labelled", tmp_path / "taught"
    with serving(trained_model, new, "--into", into, "--out", out, "--cache", tmp_path / "cache",
                 "--retrain-every", "3", command="teach") as served:
        browser.get(served.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "photo").get_attribute("src"))
        first = browser.find_element(By.ID, "name").text
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("1")  # cherry
        wait.until(lambda d: d.find_element(By.ID, "name").text != first)
        second = browser.find_element(By.ID, "name").text
        body.send_keys(Keys.SPACE)  # skip
        wait.until(lambda d: d.find_element(By.ID, "name").text != second)
        body.send_keys("0")  # none of these
        wait.until(lambda d: "labelled none of these" in d.find_element(By.ID, "status").text)
        body.send_keys("u")  # take it back
        wait.until(lambda d: "took back" in d.find_element(By.ID, "status").text)
        body.send_keys("3", "2")  # tomato, strawberry: the third label refits
        wait.until(lambda d: "new model:" in d.find_element(By.ID, "retrain-status").text)
        numbers = browser.find_element(By.ID, "numbers").text
        assert "validation accuracy" in numbers and "→" in numbers and "new photos answered" in numbers
        csp = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert csp == []
    rows = list(csv.DictReader(open(into / "labels.csv")))
    assert [r["label"] for r in rows] == ["cherry", "tomato", "strawberry"]
    assert Path(rows[0]["path"]).name == Path(first).name
    assert all(Path(r["copy"]).is_file() for r in rows) and not (into / "unknown").exists()
    assert (out / "best.safetensors").is_file()
    assert json.loads((out / "teach.json").read_text())["history"][-1]["labelled"] == \
        {"cherry": 1, "strawberry": 1, "tomato": 1}
    assert digest(new) == before
