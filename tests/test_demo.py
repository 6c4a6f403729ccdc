"""The README's first command: `fruitnet demo`, end to end, offline."""

import json

from conftest import run_cli


def test_demo_trains_evaluates_and_draws_offline(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "the same as: fruitnet train " in result.stdout and "efficientnet_lite1 (ImageNet weights, offline; " \
        "freeze, recipe probe)" in result.stdout  # the defaults, as `fruitnet train DATA` uses them
    for name in ("run/best.safetensors", "run/curves.png", "evaluation/confusion.png", "evaluation/mistakes.png",
                 "predictions.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["n"] == 30 and report["accuracy"] >= 0.8  # held-out studio shots
    assert f"demo outputs in {out}" in result.stdout
