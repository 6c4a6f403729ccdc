"""The data check on a small corrupted copy of webfruit: each finding, the outputs, the data left alone.

The copy (40 photos per class, symlinks) gets 6 photos moved to a wrong class, 6 near-copies (2
resized, 2 re-encoded, 2 cropped; 3 of them into another class) and 5 grocery photos of other things.
`fruitnet check --deep` runs once, as a user runs it, for the whole module.  The full-size figures
are in bench/bench_check.py.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, shared_folder, tree_state
from corrupted import build_corrupted


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    webfruit, grocery = shared_folder("webfruit"), shared_folder("grocery")
    tmp = tmp_path_factory.mktemp("doctor")
    data = tmp / "photos"
    truth = build_corrupted(webfruit, data, seed=1, per_class=40, n_mislabelled=6, n_near=6, n_outliers=5,
                            outlier_source=grocery / "other")
    before = tree_state(data)
    out, exclude = tmp / "report", tmp / "suspects.txt"
    proc = run_cli("check", data, "--deep", "--out", out, "--write-exclude", exclude)
    return {"data": data, "truth": truth, "before": before, "out": out, "exclude": exclude, "proc": proc,
            "report": json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None}


def rel(checked, path: str) -> str:
    return Path(path).relative_to(checked["data"]).as_posix()


def test_check_deep_writes_its_outputs_and_nothing_into_the_data(checked):
    assert checked["proc"].returncode == 0, checked["proc"].stderr
    assert tree_state(checked["data"]) == checked["before"]
    assert {p.name for p in checked["out"].iterdir()} == {"report.json", "report.html", "photos.csv",
                                                         "fruitnet-run.json"}
    assert "likely mislabelled" in checked["proc"].stdout and str(checked["out"]) in checked["proc"].stdout


def test_moved_photos_are_the_top_suspects(checked):
    rows = list(csv.DictReader(open(checked["out"] / "photos.csv")))
    ranking = [rel(checked, r["path"]) for r in sorted(rows, key=lambda r: float(r["label_score"]))]
    moved = set(checked["truth"]["mislabelled"])
    assert len(moved & set(ranking[:12])) >= 5
    flagged = {rel(checked, e["path"]): e for e in checked["report"]["label_issues"]}
    assert len(moved & set(flagged)) >= 4
    for path in moved & set(flagged):  # the class the data suggests is the photo's true class
        assert flagged[path]["suggested"] != flagged[path]["label"]
        assert 0 <= flagged[path]["score"] < 0.5


def test_near_copies_are_grouped_and_cross_class_ones_are_label_conflicts(checked):
    groups = checked["report"]["duplicate_groups"]
    group_of = {rel(checked, p): g for g in groups for p in g["paths"]}
    copies = checked["truth"]["near_copies"]
    together = [c for c in copies if c["path"] in group_of and c["original"] in
                [rel(checked, p) for p in group_of[c["path"]]["paths"]]]
    assert len(together) >= 5
    for c in together:
        assert group_of[c["path"]]["label_conflict"] == c["cross_class"]


def test_grocery_photos_are_the_top_outliers_by_the_unknown_verdicts_score(checked):
    rows = list(csv.DictReader(open(checked["out"] / "photos.csv")))
    ranking = [rel(checked, r["path"]) for r in sorted(rows, key=lambda r: -float(r["outlier_distance"]))]
    planted = set(checked["truth"]["outliers"])
    assert len(planted & set(ranking[:10])) >= 4
    flagged = {rel(checked, e["path"]) for e in checked["report"]["outliers"]}
    assert len(planted & flagged) >= 4 and len(flagged - planted) <= 3


def test_class_counts_and_imbalance(checked):
    report = checked["report"]
    on_disk = {c: len(list((checked["data"] / c).iterdir())) for c in report["classes"]}
    assert report["counts"] == on_disk
    assert report["imbalance"]["ratio"] == pytest.approx(max(on_disk.values()) / min(on_disk.values()), abs=1e-3)
    assert report["imbalance"]["imbalanced"] is False


def test_report_html_is_self_contained_and_shows_every_finding(checked):
    page = (checked["out"] / "report.html").read_text()
    assert not re.search(r"<(script|link|iframe)\b", page, re.I)
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert sources and all(re.fullmatch(r"data:image/jpeg;base64,[A-Za-z0-9+/]+=*", s) for s in sources)
    text = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/]+=*", "", page)
    assert not re.search(r"url\(|https?:|//[a-z]|@import|\shref=\"(?!#)", text, re.I)
    assert not re.search(r"\ssrc=\"(?!data:)", page)
    report = checked["report"]
    for entry in report["label_issues"] + report["outliers"]:
        assert html.escape(entry["path"]) in page
    for group in report["duplicate_groups"]:
        for path in group["paths"]:
            assert html.escape(path) in page
    for section in ("Likely mislabelled", "Outliers", "Label conflicts", "Near-duplicate", "Class counts"):
        assert section in page


def test_exclude_list_holds_the_suspects_relative_to_the_data(checked):
    lines = [l for l in checked["exclude"].read_text().splitlines() if l and not l.startswith("#")]
    report = checked["report"]
    expected = [rel(checked, e["path"]) for e in report["label_issues"] + report["outliers"]]
    assert lines == list(dict.fromkeys(expected))
    assert all((checked["data"] / line).exists() for line in lines)


def test_out_inside_the_data_folder_is_refused(tmp_path, demo_data):
    data = tmp_path / "photos"
    for cls in ("cherry", "tomato"):
        (data / cls).mkdir(parents=True)
        for p in sorted((demo_data / "test" / cls).iterdir())[:3]:
            os.symlink(p, data / cls / p.name)
    before = tree_state(data)
    for args in (["--out", data / "report"], ["--out", data], ["--deep", "--out", data / "cherry" / "r"],
                 ["--deep", "--out", tmp_path / "ok", "--write-exclude", data / "x.txt"]):
        proc = run_cli("check", data, *args)
        assert proc.returncode == 2, proc.stderr
        assert "inside the data folder" in proc.stderr
    assert tree_state(data) == before
    assert not (tmp_path / "ok").exists()
    proc = run_cli("check", data, "--write-exclude", tmp_path / "x.txt")
    assert proc.returncode == 2 and "--deep" in proc.stderr


def test_report_html_opens_offline_in_a_real_browser(checked, tmp_path):
    """Copied alone to another folder, the page shows every thumbnail and asks for nothing else."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver_path)):
        pytest.skip("chromium or chromedriver is absent: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    page = tmp_path / "alone" / "report.html"
    page.parent.mkdir()
    shutil.copy(checked["out"] / "report.html", page)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.get(page.as_uri())
        shown = driver.execute_script(
            "return [...document.images].map(i => i.complete && i.naturalWidth > 0)")
        requested = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
        sections = driver.execute_script("return [...document.querySelectorAll('h2')].map(h => h.id)")
    finally:
        driver.quit()
    assert shown and all(shown)
    assert len(shown) == page.read_text().count("<img ")
    assert requested == []
    assert {"balance", "conflicts", "duplicates", "mislabelled", "outliers"} <= set(sections)


def test_quick_check_groups_match_the_split_and_studio_frames_do_not_chain_across_classes():
    """Fruits-360's frames of fruit turning on white look alike across classes: no giant group."""
    from fruitnet.dataset import scan
    from fruitnet.datacheck import quick_findings

    catalog = scan(shared_folder("fruits360"), progress=False)
    findings = quick_findings(catalog)
    split_groups = sorted(sorted(it.path for it in g) for g in catalog.groups() if len(g) > 1)
    assert sorted(sorted(g["paths"]) for g in findings["duplicate_groups"]) == split_groups
    assert max(len(g["paths"]) for g in findings["duplicate_groups"]) <= findings["usable"] // 10
    assert not any(g["label_conflict"] for g in findings["duplicate_groups"])
    assert findings["imbalance"]["imbalanced"] and findings["imbalance"]["smallest"] == "strawberry"


def test_report_html_puts_what_to_act_on_first_and_says_outliers_are_often_fine(checked):
    page = (checked["out"] / "report.html").read_text()
    order = [page.index(f'<h2 id="{anchor}">') for anchor in ("mislabelled", "outliers", "conflicts", "duplicates")]
    assert order == sorted(order)
    assert "Often they are fine photos" in page and "Nothing to do: each group is kept on one side" in page
