"""docs/extending.md, followed step by step: a backbone, a recipe, a predict writer and an export
format, each registered for this module only (the registries are restored afterwards), trained and
used through the library and the command line.  Tiny bodies and the bundled demo photos: seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA
from torch import nn

from fruitnet import backbones, cli, config, formats
from fruitnet.backbones import Backbone, _read_state_dict
from fruitnet.config import Recipe, TrainConfig
from fruitnet.errors import UsageError
from fruitnet.formats import Exporter, Writer
from fruitnet.outputs import check_outputs
from fruitnet.predictors import load_predictor
from fruitnet.training import train

TRAIN, TEST = DEMO_DATA / "train", DEMO_DATA / "test"


# --- 1. a backbone (docs/extending.md, "Add a backbone") ------------------------------------------

def tiny_body() -> nn.Module:
    """A randomly initialised body: a normalised batch (N, 3, H, W) -> pooled features (N, 16)."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_preprocessing() -> dict:
    return {"input_size": 64, "resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "jpeg_draft": True}


def load_tiny(body: nn.Module, weights: str) -> str:
    """weights: 'imagenet' or a file ('none' never gets here: create_body keeps the random body)."""
    if weights == "imagenet":
        from fruitnet.errors import WeightsUnavailable
        raise WeightsUnavailable("tiny has no pretrained weights: pass --weights FILE (a state dict) or --weights none")
    body.load_state_dict(_read_state_dict(Path(weights)))
    return str(Path(weights).resolve())


TINY = Backbone(name="tiny", feature_dim=16, describe_preprocessing=tiny_preprocessing, build_body=tiny_body,
                load_pretrained=load_tiny)


# --- 2. a recipe ----------------------------------------------------------------------------------

STRONG_PROBE = Recipe(description="the probe with a ten times stronger L2 penalty", strategy="probe",
                      optimizer="lbfgs", lr=1.0, weight_decay=0.01, epochs=1, mode="freeze")


# --- 3. a predict writer --------------------------------------------------------------------------

def write_markdown(results: list[dict], classes: list[str], path: Path, overlays: dict) -> None:
    """One table row per photo: path, answer, the probability of the best class."""
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| photo | answer | probability |", "|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {cell(r['path'])} | error: {cell(r['error'])} | |")
        else:
            best = r.get("best_guess", r["label"])
            lines.append(f"| {cell(r['path'])} | {cell(r['label'])} | {r['probabilities'][best]:.1%} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


MARKDOWN = Writer(write_markdown, "FILE.md", "also write the predictions as a Markdown table")


# --- 4. an export format ----------------------------------------------------------------------------

def export_metadata(model_path, out=None, options=None, check=None, int8=False, log=print) -> dict:
    """The model file's metadata (classes, preprocessing, trust, ...) as one JSON file."""
    from fruitnet.modelpath import peek_metadata

    if int8:
        raise UsageError("--int8 is for ONNX files; the metadata has no weights to quantise")
    out = Path(out) if out else Path(model_path).with_suffix(".json")
    check_outputs({"--out": out}, model=model_path)
    out.write_text(json.dumps(peek_metadata(model_path), indent=2), encoding="utf-8")
    log(f"wrote {out}")
    return {"json": str(out)}


# --- the tests ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registered():
    """The four registry entries, as docs/extending.md adds them, for this module's tests only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(backbones.BACKBONES, "tiny", TINY)
        mp.setitem(config.RECIPES, "strong-probe", STRONG_PROBE)
        mp.setitem(formats.WRITERS, "markdown", MARKDOWN)
        mp.setitem(formats.EXPORTERS, "metadata", Exporter(__name__, "export_metadata",
                                                           "the model file's metadata as JSON"))
        yield


@pytest.fixture(scope="module")
def tiny_model(registered, tmp_path_factory) -> Path:
    """Step 1's backbone trained by the library, from random weights, with the default recipe."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    summary = train(TrainConfig(data=str(TRAIN), out=str(out), backbone="tiny", weights="none"), log=lambda *a: None)
    return Path(summary["model"])


def test_a_registered_backbone_trains_and_predicts(tiny_model):
    meta = json.loads((tiny_model.parent / "config.json").read_text())
    assert meta["train"]["backbone"] == "tiny" and meta["weights_source"] == "none (random initialisation)"
    predictor = load_predictor(tiny_model)
    assert predictor.preprocessing["input_size"] == 64  # the model file carries the backbone's preprocessing
    results = predictor.predict_paths([str(p) for p in sorted(TEST.rglob("*.jpg"))])
    assert len(results) == 30 and all(r["label"] in predictor.classes + ["unknown"] for r in results)


def test_a_registered_backbone_loads_weights_from_a_file(registered, tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_body().state_dict(), weights)
    assert "tiny" in cli.build_parser().parse_args(["train", str(TRAIN), "--backbone", "tiny"]).backbone
    code = cli.main(["train", str(TRAIN), "--backbone", "tiny", "--weights", str(weights),
                     "--out", str(tmp_path / "run")])
    assert code == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["weights_source"] == str(weights.resolve())
    assert cli.main(["train", str(TRAIN), "--backbone", "tiny", "--out", str(tmp_path / "run2")]) == 2
    assert "tiny has no pretrained weights" in capsys.readouterr().err


def test_a_registered_recipe_trains_from_the_command_line(registered, tmp_path):
    assert cli.build_parser().parse_args(["train", str(TRAIN), "--recipe", "strong-probe"]).recipe == "strong-probe"
    code = cli.main(["train", str(TRAIN), "--recipe", "strong-probe", "--backbone", "tiny", "--weights", "none",
                     "--out", str(tmp_path / "run")])
    assert code == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["recipe"] == "strong-probe" and saved["train"]["weight_decay"] == 0.01
    assert saved["train"]["mode"] == "freeze"


def test_a_registered_writer_is_a_predict_option(tiny_model, tmp_path):
    table = tmp_path / "predictions.md"
    assert cli.main(["predict", str(tiny_model), str(TEST), "--markdown", str(table)]) == 0
    lines = table.read_text().splitlines()
    assert lines[0] == "| photo | answer | probability |" and len(lines) == 2 + 30
    # the output guard covers the new option: never the model file, never inside a PATH folder
    assert cli.main(["predict", str(tiny_model), str(TEST), "--markdown", str(tiny_model)]) == 2
    assert cli.main(["predict", str(tiny_model), str(TEST), "--markdown", str(TEST / "cherry" / "x.md")]) == 2


def test_a_registered_exporter_is_an_export_format(tiny_model, tmp_path):
    out = tmp_path / "tiny.json"
    assert cli.main(["export", str(tiny_model), "--format", "metadata", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["backbone"] == "tiny"
    assert cli.main(["export", str(tiny_model), "--format", "metadata", "--out", str(out)]) == 2  # never overwritten
