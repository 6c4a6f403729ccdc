"""Issue 19 items 4, 5 and 9: model files, run folders and ONNX graphs that load but cannot answer.

Each is refused when it is loaded, in one line with exit code 2: non-finite, empty or mistyped
tensors, metadata of the wrong type, a class named "unknown", an ONNX graph whose first run fails,
a split.csv row in a class the run does not have.  A model that loads is run once by serve before
it answers anything."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from quick_model import free_port, make_quick_model, with_metadata

from fruitnet import cli

PHOTO_CLASS = "cherry"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def plain(models) -> Path:
    return make_quick_model(models / "plain.safetensors")


@pytest.fixture(scope="module")
def photo(demo_data) -> Path:
    return sorted((demo_data / "test" / PHOTO_CLASS).glob("*.jpg"))[0]


def with_tensors(model: Path, out: Path, change, trust: dict | None = None) -> Path:
    """A copy of `model` with its tensors replaced by change(state dict) and, if given, this trust metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model), framework="pt") as f:
        meta = json.loads(f.metadata()["fruitnet"])
    if trust is not None:
        meta["trust"] = trust
    save_file(change(load_file(str(model))), str(out), metadata={"fruitnet": json.dumps(meta)})
    return out


KNN = {"temperature": 1.0, "threshold": 0.05, "score": "knn"}


def knn_stats(val_scores=None, bank=None):
    """A kNN UnknownVerdict's tensors as fit_trust makes them (20 validation scores, a bank of 16 rows)."""
    generator = torch.Generator().manual_seed(0)
    default_bank = torch.nn.functional.normalize(torch.rand(16, 1280, generator=generator), dim=1)
    return lambda state: {**state,
                          "trust.val_scores": torch.linspace(-1.2, -0.8, 20) if val_scores is None else val_scores,
                          "trust.bank": default_bank if bank is None else bank}


def refused(capsys, argv) -> str:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- item 4: tensors ----------------------------------------------------------------------------

def _nan_head(state):
    state["head.weight"][0, 0] = float("nan")
    return state


def _inf_body(state):
    name = next(k for k in state if k.startswith("body.") and state[k].is_floating_point())
    state[name].view(-1)[0] = float("inf")
    return state


TENSOR_CASES = {
    "nan-in-head": (_nan_head, None, "head.weight holds NaN or infinite values"),
    "inf-in-body": (_inf_body, None, "holds NaN or infinite values"),
    "float64-head": (lambda s: {**s, "head.weight": s["head.weight"].double()}, None, "head.weight is torch.float64"),
    "empty-val-scores": (knn_stats(val_scores=torch.zeros(0)), KNN, "trust.val_scores is empty"),
    "all-nan-val-scores": (knn_stats(val_scores=torch.full((20,), float("nan"))), KNN,
                           "trust.val_scores holds NaN or infinite values"),
    "nan-bank": (knn_stats(bank=torch.full((16, 1280), float("nan"))), KNN, "trust.bank holds NaN or infinite"),
    "int64-val-scores": (knn_stats(val_scores=torch.arange(-20, 0)), KNN, "trust.val_scores is torch.int64"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_non_finite_empty_or_mistyped_tensors_are_refused_at_load(plain, models, photo, capsys, case):
    change, trust, words = TENSOR_CASES[case]
    bad = with_tensors(plain, models / f"{case}.safetensors", change, trust)
    err = refused(capsys, ["predict", bad, photo, "--json"])
    assert words in err and str(bad) in err


def test_a_model_with_sound_statistics_still_answers(plain, models, photo, capsys):
    good = with_tensors(plain, models / "knn.safetensors", knn_stats(), KNN)
    assert cli.main(["predict", str(good), str(photo), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]  # strict JSON: no NaN
    assert answer["in_distribution"] >= 0 and sum(answer["probabilities"].values()) == pytest.approx(1)


def test_every_command_refuses_a_model_that_loads_but_answers_nan_or_infinity(plain, models, photo):
    """NaN weights are refused at load; finite weights whose outputs overflow, by the first pass
    every predictor runs as it loads (predict, evaluate, serve and export alike)."""
    overflow = with_tensors(plain, models / "overflow.safetensors",
                            lambda s: {**s, "head.weight": torch.full_like(s["head.weight"], 3e38)})
    nan = with_tensors(plain, models / "nan-serve.safetensors", _nan_head)
    for model, words in ((overflow, "outputs are NaN or infinite"), (nan, "holds NaN or infinite values")):
        for args in (["serve", model, "--port", free_port()], ["predict", model, photo, "--json"]):
            result = run_cli(*args, timeout=60)
            assert result.returncode == 2, result.stderr
            assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert result.stdout == ""  # never an answer with NaN in it


# --- item 5: metadata types and ONNX graphs ------------------------------------------------------

META_CASES = {
    "training-a-list": (lambda m: {**m, "training": [1, 2]}, "training: Input should be a valid dictionary"),
    "training-accuracy-a-string": (lambda m: {**m, "training": {"val_accuracy": "high"}}, "training.val_accuracy"),
    "training-photos-a-number": (lambda m: {**m, "training_photos": 5},
                                 "training_photos: Input should be a valid list"),
    "tta-a-string": (lambda m: {**m, "tta": "yes"}, "tta: Input should be a valid boolean"),
    "jpeg-draft-a-string": (lambda m: {**m, "preprocessing": {**m["preprocessing"], "jpeg_draft": "no"}},
                            "preprocessing.jpeg_draft"),
    "class-named-unknown": (lambda m: {**m, "classes": ["cherry", "unknown", "tomato"]},  # item 9
                            "a class named 'unknown'"),
}


@pytest.mark.parametrize("case", META_CASES)
def test_metadata_of_the_wrong_type_is_refused_at_load(plain, models, photo, capsys, case):
    change, words = META_CASES[case]
    bad = with_metadata(plain, models / f"{case}.safetensors", change)
    assert words in refused(capsys, ["predict", bad, photo])


def test_evaluate_and_serve_refuse_mistyped_metadata_in_one_line(plain, models, demo_data, capsys):
    photos = models / "data"
    for cls in ("cherry", "tomato"):
        shutil.copytree(demo_data / "test" / cls, photos / cls, dirs_exist_ok=True)
    bad = with_metadata(plain, models / "photos-5.safetensors", lambda m: {**m, "training_photos": 5})
    assert "training_photos" in refused(capsys, ["evaluate", bad, photos, "--out", models / "eval"])
    listed = with_metadata(plain, models / "training-list.safetensors", lambda m: {**m, "training": [1, 2]})
    result = run_cli("serve", listed, "--port", free_port(), timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "training: Input should be a valid dictionary" in result.stderr


def _onnx_asking_for(path: Path, elements: int) -> Path:
    """A valid ONNX graph with fruitnet metadata and the right input and output shapes whose first
    run allocates `elements` floats (ConstantOfShape), added to the mean of each channel."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fruitnet.backbones import get_backbone

    meta = {"format": "fruitnet", "format_version": 1, "classes": ["a", "b", "c"], "backbone": "efficientnet_lite0",
            "preprocessing": get_backbone("efficientnet_lite0").preprocessing}
    size = meta["preprocessing"]["input_size"]
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[2, 3], keepdims=0),
             helper.make_node("ConstantOfShape", ["shape"], ["huge"],
                              value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["huge"], ["total"], keepdims=0),
             helper.make_node("Add", ["mean", "total"], ["logits"])]
    graph = helper.make_graph(
        nodes, "fruitnet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array([elements], dtype=np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"fruitnet": json.dumps(meta)})
    onnx.save(model, str(path))
    return path


def test_an_onnx_graph_whose_first_run_fails_is_refused_at_load(models, photo, capsys):
    small = _onnx_asking_for(models / "small.onnx", 10)
    assert cli.main(["predict", str(small), str(photo), "--json"]) == 0  # the same graph, runnable
    capsys.readouterr()
    huge = _onnx_asking_for(models / "huge.onnx", 4 * 10**12)  # 16 TB: fails on any machine
    err = refused(capsys, ["predict", huge, photo, "--json"])
    assert "the model does not run" in err and "ConstantOfShape" in err


# --- item 9: a split.csv edited to a class the run does not have ---------------------------------

def test_resume_refuses_a_split_row_in_a_class_the_run_does_not_have(tmp_path, demo_data):
    run = tmp_path / "run"
    args = ["--backbone", "efficientnet_lite0", "--mode", "freeze", "--recipe", "seed", "--epochs", "1"]
    assert run_cli("train", demo_data / "test", *args, "--out", run).returncode == 0
    for name in ("checkpoint.pt", "best.safetensors", "last.safetensors", "summary.json", "curves.png"):
        (run / name).unlink()  # as a kill before the first epoch ended leaves it
    rows = list(csv.reader(open(run / "split.csv")))
    rows[1][1] = "kiwi"
    with open(run / "split.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = run_cli("train", "--resume", run)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "class 'kiwi', which the run does not have" in result.stderr
