"""--balance and --exclude in training: the weights, the sampler, what config.json and the data report say."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter

import pytest
import torch

from fruitnet.balance import class_weights, resolve_balance, sample_weights
from fruitnet.errors import UsageError
from fruitnet.training import TrainConfig, train


def quiet(*_a, **_k):
    pass


def test_auto_weights_the_loss_above_one_and_a_half_times():
    assert resolve_balance("auto", {"a": 150, "b": 100}).mode == "none"
    b = resolve_balance("auto", {"a": 151, "b": 100, "c": 120})
    assert b.mode == "weights" and "1.51x" in b.reason
    n = 371
    assert b.class_weights == pytest.approx([n / (3 * 151), n / (3 * 100), n / (3 * 120)])
    assert resolve_balance("none", {"a": 500, "b": 10}).class_weights == [1.0, 1.0]
    assert resolve_balance("weights", {"a": 10, "b": 10}).mode == "weights"
    with pytest.raises(UsageError):
        resolve_balance("sometimes", {"a": 1, "b": 1})


def test_weighted_classes_contribute_equally_and_the_sampler_draws_them_equally():
    counts = {"a": 300, "b": 100}
    w = class_weights(counts)
    assert w[0] * 300 == pytest.approx(w[1] * 100)
    targets = [0] * 300 + [1] * 100
    draws = torch.multinomial(torch.tensor(sample_weights(targets, counts)), 40000, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    share = (torch.tensor(targets)[draws] == 1).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.02)


@pytest.fixture
def lopsided(tmp_path, demo_data):
    """The demo photos with cherry cut to 10 (30 strawberry, 30 tomato): 3x imbalance."""
    data = tmp_path / "photos"
    for cls_dir in sorted((demo_data / "train").iterdir()):
        (data / cls_dir.name).mkdir(parents=True)
        for p in sorted(cls_dir.iterdir())[: 10 if cls_dir.name == "cherry" else None]:
            os.symlink(p, data / cls_dir.name / p.name)
    return data


@pytest.mark.parametrize("balance, mode", [("auto", "weights"), ("none", "none"), ("sampler", "sampler")])
def test_training_records_and_applies_the_balance(lopsided, tmp_path, balance, mode, monkeypatch):
    seen = {}
    real_ce = torch.nn.CrossEntropyLoss

    def spy(*args, **kw):  # the real loss; remembers the weight it was built with
        seen.setdefault("weights", []).append(kw.get("weight"))
        return real_ce(*args, **kw)

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", spy)
    lines = []
    train(TrainConfig(data=str(lopsided), out=str(tmp_path / "run"), backbone="efficientnet_lite0", mode="freeze",
                      recipe="fast", epochs=1, batch_size=16, workers=0, balance=balance), log=lambda *a: lines.append(" ".join(map(str, a))))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["balance"] == balance and config["balance"]["mode"] == mode
    assert any(line.startswith("balance: ") and config["balance"]["reason"] in line for line in lines)
    weights = [w for w in seen["weights"] if w is not None]
    if mode == "weights":
        assert weights and weights[0].tolist() == pytest.approx(config["balance"]["class_weights"])
        assert weights[0][0] > 2 * weights[0][1]  # cherry, the small class, counts most
    else:
        assert not weights


def test_training_leaves_out_the_excluded_photos(lopsided, tmp_path):
    listing = tmp_path / "exclude.txt"
    gone = sorted(p.name for p in (lopsided / "tomato").iterdir())[:4]
    listing.write_text("\n".join(f"tomato/{name}" for name in gone) + "\nstrawberry/not-there.jpg\n")
    lines = []
    train(TrainConfig(data=str(lopsided), out=str(tmp_path / "run"), backbone="efficientnet_lite0", mode="freeze",
                      epochs=1, batch_size=16, workers=0, exclude=str(listing)), log=lambda *a: lines.append(" ".join(map(str, a))))
    rows = list(csv.DictReader(open(tmp_path / "run" / "split.csv")))
    assert not {name for name in gone} & {os.path.basename(r["path"]) for r in rows if r["class"] == "tomato"}
    assert Counter(r["class"] for r in rows)["tomato"] == 26
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert len(report["excluded"]) == 4 and report["exclude_unmatched"] == ["strawberry/not-there.jpg"]
    assert any("strawberry/not-there.jpg" in line for line in lines)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["excluded"] == 4


def test_the_probe_recipe_weights_its_full_batch_loss_and_refuses_the_sampler(lopsided, tmp_path):
    """The probe fits on every photo at once: class weights enter its loss; a sampler cannot."""
    summary = train(TrainConfig(data=str(lopsided), out=str(tmp_path / "run"), backbone="efficientnet_lite0",
                                workers=0), log=lambda *a: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["recipe"] == "probe" and config["balance"]["mode"] == "weights"
    assert summary["best_val_accuracy"] > 0.5
    with pytest.raises(UsageError, match="--balance weights"):
        train(TrainConfig(data=str(lopsided), out=str(tmp_path / "run2"), backbone="efficientnet_lite0",
                          balance="sampler"), log=lambda *a: None)
    assert not (tmp_path / "run2").exists()  # refused before anything was written
