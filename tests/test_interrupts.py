"""Ctrl-C at every point of training: exit 130, one line saying what is kept and how to go on,
and a run that --resume finishes.  Each point is hit deliberately (SIGINT raised from inside
the step), not by timing."""

from __future__ import annotations

import csv
import json
import signal

import pytest
from conftest import DEMO_DATA

from fruitnet import cli

ARGS = ["--backbone", "efficientnet_lite0", "--workers", "0"]


@pytest.fixture(autouse=True)
def ctrl_c_is_keyboard_interrupt():
    """Python's own SIGINT handler, as in a terminal: a suite started in the background (`&`,
    nohup) inherits SIGINT ignored, and a Ctrl-C raised there would never arrive."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)  # delivered to this (main) thread, as a terminal's Ctrl-C is


def interrupt_once(monkeypatch, owner, name: str, convert: type[Exception] | None = None) -> None:
    """Replace owner.name by a wrapper that presses Ctrl-C on its first call.  convert: re-raise
    the KeyboardInterrupt as that error, as a library does when an import is interrupted."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            try:
                ctrl_c()
            except KeyboardInterrupt:
                if convert is None:
                    raise
                raise convert("initialization failed") from None
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def train_cli(capsys, *args) -> tuple[int, str]:
    code = cli.main(["train", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def points():
    from fruitnet import unknown, pipeline, plots, runfolder, training

    return {  # name: (what to patch, recipe arguments)
        "feature pass": (lambda: (pipeline, "from_dataset"), []),
        "epoch": (lambda: (training, "fit_epoch"), ["--recipe", "original", "--mode", "freeze", "--epochs", "2"]),
        "probe fit": (lambda: (training, "_scores"), []),
        "end of epoch": (lambda: (runfolder.RunFolder, "end_epoch"), []),
        "drawing curves (an import turned into ImportError)": (lambda: (plots, "plot_curves"), []),
        "calibration": (lambda: (unknown, "fit_trust"), []),
        "final writes": (lambda: (runfolder.RunFolder, "finish"), []),
    }


@pytest.mark.parametrize("point", list(points()))
def test_ctrl_c_at_each_point_of_training_exits_130_and_the_run_resumes(point, demo_data, tmp_path, monkeypatch,
                                                                        capsys):
    where, recipe = points()[point]
    owner, name = where()
    interrupt_once(monkeypatch, owner, name, ImportError if "ImportError" in point else None)
    run = tmp_path / "run"
    code, out = train_cli(capsys, demo_data / "test", *ARGS, *recipe, "--out", run)
    assert code == 130, out
    assert "interrupted: " in out and f"continue with: fruitnet train --resume {run}" in out
    assert "Traceback" not in out
    monkeypatch.undo()
    code, out = train_cli(capsys, "--resume", run)
    assert code == 0, out
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    epochs = 2 if recipe else 1
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == epochs and (run / "best.safetensors").is_file()


def test_ctrl_c_during_the_scan_exits_130_and_leaves_nothing(demo_data, tmp_path, monkeypatch, capsys):
    from fruitnet import training

    interrupt_once(monkeypatch, training, "scan_folders")
    run = tmp_path / "run"
    code, out = train_cli(capsys, demo_data / "test", *ARGS, "--out", run)
    assert code == 130 and "interrupted before the run folder was made: nothing was written" in out, out
    assert not run.exists()


def test_ctrl_c_during_predict_is_one_line_and_exit_130(trained_model, monkeypatch, capsys):
    from fruitnet import predictors

    interrupt_once(monkeypatch, predictors.Predictor, "predict_paths")
    code = cli.main(["predict", str(trained_model), str(DEMO_DATA / "test")])
    err = capsys.readouterr().err
    assert code == 130 and err.strip().splitlines()[-1] == "fruitnet predict: interrupted" and "Traceback" not in err
