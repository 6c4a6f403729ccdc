"""Issue 9: calibrated probabilities, the "unknown" verdict (model file, ONNX, predict, evaluate),
and Grad-CAM heat maps.

The trained model (conftest.trained_model) is EfficientNet-Lite0 with its head trained on the
bundled Fruits-360 studio shots; training fitted its temperature, statistics and threshold."""

import csv
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import DEMO_DATA, run_cli, shared_folder
from PIL import Image, ImageDraw
from quick_model import CLASSES, make_quick_model

from fruitnet import unknown
from fruitnet.calibration import MAX_TEMPERATURE, expected_calibration_error, fit_temperature, nll
from fruitnet.dataset import read_split
from fruitnet.evaluate import evaluate
from fruitnet.explain import model_view
from fruitnet.export import export_onnx
from fruitnet.model import load_model, save_model
from fruitnet.unknown import auroc
from fruitnet.predictors import OnnxPredictor, TorchPredictor, expand_paths

KNOWN = sorted(str(p) for p in (DEMO_DATA / "test").rglob("*.jpg"))  # Fruits-360, CC BY-SA 4.0


def other_photos(n: int) -> list[str]:
    """n photos of none of the classes, spread over ../shared/data/grocery/other (skips where absent)."""
    paths, _ = expand_paths([str(shared_folder("grocery") / "other")])
    return [paths[round(i * (len(paths) - 1) / (n - 1))] for i in range(n)]


# --- calibration ------------------------------------------------------------------------------

@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_fit_recovers_a_known_temperature(true_t):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 4, generator=g) * 3
    targets = torch.multinomial((logits / true_t).softmax(1), 1, generator=g)[:, 0]  # drawn at temperature true_t
    assert fit_temperature(logits, targets) == pytest.approx(true_t, rel=0.04)


def test_temperature_stays_finite_when_every_validation_photo_is_right():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 3.0]]).repeat(20, 1)
    t = fit_temperature(logits, logits.argmax(1))
    confidence = float((logits / t).softmax(1).amax(1).mean())
    assert 0.05 < t < 1 and 0.95 < confidence < 0.995  # sharper, but not "100%" from 60 photos


def test_temperature_of_an_uninformative_model_stays_in_bounds():
    """Logits that say nothing about the class (an untrained head) would flatten to T -> infinity."""
    logits = torch.randn(300, 3, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(100))  # unrelated to the logits
    assert fit_temperature(logits, targets) == MAX_TEMPERATURE


def test_ece_nll_and_auroc_on_known_cases():
    probs = np.array([[0.8, 0.2]] * 10)
    assert expected_calibration_error(probs, np.array([0] * 8 + [1] * 2)) == pytest.approx(0.0)  # 80% sure, 80% right
    assert expected_calibration_error(probs, np.zeros(10, dtype=int)) == pytest.approx(0.2)  # 80% sure, always right
    assert nll(probs, np.zeros(10, dtype=int)) == pytest.approx(-np.log(0.8))
    assert auroc([3, 4, 5], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0
    assert auroc([2, 1, 3], [1.5, 3]) == pytest.approx(2.5 / 6)  # the tie counts half


# --- the model file -----------------------------------------------------------------------------

def test_training_stores_calibration_and_statistics_in_both_model_files(trained_model):
    for name in ("best", "last"):
        model, meta = load_model(trained_model.with_name(f"{name}.safetensors"))
        trust = meta["trust"]
        # a frozen body: the kNN score on its (pretrained) features, as measured in bench_trust
        assert trust["score"] == "knn" and trust["recall"] == 0.95 and trust["threshold"] == pytest.approx(0.05)
        assert trust["temperature"] > 0 and trust["val_accepted"] >= 0.95
        cal = trust["val_calibration"]  # T minimises the validation NLL (up to the small Laplace share)
        assert cal["temperature"] == trust["temperature"] and cal["nll_after"] <= cal["nll_before"] + 0.01
        scores = model.trust.val_scores
        assert len(scores) == trust["n_val"] and torch.all(scores[1:] >= scores[:-1])
        bank = model.trust.bank  # every training photo (fewer than unknown.MAX_BANK), normalised
        assert bank.shape == (len(read_split(trained_model.parent / "split.csv")[0]), model.head.in_features)
        assert torch.allclose(bank.norm(dim=1), torch.ones(len(bank)), atol=1e-5)


def test_knn_bank_holds_the_training_photos_features(trained_model):
    """Row i of the bank is training photo i's normalised feature.  Training reuses its cached
    features, computed in bf16 where the CPU has it, so the rows are near, not equal, to fp32's."""
    model, _ = load_model(trained_model)
    predictor = TorchPredictor(trained_model, device="cpu")
    train_items = read_split(trained_model.parent / "split.csv")[0]
    x = torch.stack([predictor.transform(Image.open(it.path).convert("RGB")) for it in train_items])
    with torch.no_grad():
        features = unknown.normalise(model.body(x))
    similarity = features @ model.trust.bank.T
    assert torch.equal(similarity.argmax(0), torch.arange(len(train_items)))
    assert float(similarity.diagonal().min()) > 0.99


def test_knn_bank_keeps_an_even_sample_of_a_large_training_set():
    features = torch.arange(1, 3001, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 0.0]]) + torch.tensor([[0.0, 1.0]])
    bank = unknown.knn_bank(features, limit=1000)
    assert bank.shape == (1000, 2) and torch.allclose(bank.norm(dim=1), torch.ones(1000))
    assert torch.allclose(bank[0], unknown.normalise(features[:1])[0]) and torch.allclose(bank[-1], unknown.normalise(features[-1:])[0])
    assert torch.equal(unknown.knn_bank(features[:500], limit=1000), unknown.normalise(features[:500]))


def test_knn_score_on_a_known_case():
    bank = unknown.normalise(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    features = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    # k = 2: (2, 0) is at distance 0 from the first row and sqrt(2 - 2 cos 45°) from the third;
    # (0, -3) points away: sqrt(2) from the first row (90°), then sqrt(2 + sqrt 2) from the third (135°)
    assert unknown.knn(features, bank, k=2).tolist() == pytest.approx([-(2 - 2 ** 0.5) ** 0.5, -(2 + 2 ** 0.5) ** 0.5])
    assert unknown.knn(features, bank, k=1).tolist() == pytest.approx([0.0, -(2 ** 0.5)], abs=1e-3)


def test_ledoit_wolf_matches_scikit_learn():
    from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

    x = torch.randn(40, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.linspace(0.1, 3, 60)
    x = x - x.mean(0)  # more dimensions than rows, as with a few photos and 1,280 features
    theirs, _ = sklearn_ledoit_wolf(x.numpy(), assume_centered=True)
    assert np.allclose(unknown.ledoit_wolf(x).numpy(), theirs, rtol=1e-9, atol=1e-12)


def test_mahalanobis_score_on_a_known_case():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    precision = torch.diag(torch.tensor([1.0, 4.0]))
    features = torch.tensor([[1.0, 1.0], [9.0, 0.0], [5.0, 0.0]])
    # (1, 1): 1 + 4 to the first mean; (9, 0): 1 to the second; (5, 0): 25 to either
    assert unknown.mahalanobis(features, means, precision).tolist() == [-5.0, -1.0, -25.0]


@pytest.mark.parametrize("change, words", [
    (lambda state, trust: state.pop("trust.bank"), "for the knn score"),
    (lambda state, trust: state.update({"trust.bank": state["trust.bank"][:, :5].contiguous()}), ", 5]"),  # a bank as wide as another body's features
    (lambda state, trust: state.update({"trust.bank": state["trust.bank"].repeat(20, 1)}), "0, 1280]"),  # more rows than unknown.MAX_BANK
    (lambda state, trust: trust.update(score="energy"), "for the energy score"),
])
def test_model_file_with_statistics_that_do_not_fit_its_score_is_refused(trained_model, tmp_path, change, words):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fruitnet.errors import ModelFileError

    with safe_open(str(trained_model), framework="pt") as f:
        meta = json.loads(f.metadata()["fruitnet"])
    state = load_file(str(trained_model))
    change(state, meta["trust"])
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"fruitnet": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="unexpected in-distribution statistics") as err:
        load_model(bad)
    assert words in str(err.value) and str(bad) in str(err.value)


def test_statistics_round_trip_through_the_model_file(trained_model, tmp_path):
    model, meta = load_model(trained_model)
    copy = save_model(tmp_path / "copy.safetensors", model, meta)
    again, meta2 = load_model(copy)
    assert meta2["trust"] == meta["trust"]
    assert torch.equal(again.trust.val_scores, model.trust.val_scores)
    a = TorchPredictor(trained_model, device="cpu").predict_paths(KNOWN[:4])
    b = TorchPredictor(copy, device="cpu").predict_paths(KNOWN[:4])
    assert a == b and all("in_distribution" in r for r in a)


def test_old_model_file_without_temperature_or_statistics_keeps_working(tmp_path):
    path = make_quick_model(tmp_path / "old.safetensors")  # as written before calibration existed
    predictor = TorchPredictor(path, device="cpu")
    assert predictor.temperature == 1.0 and predictor.threshold is None and not predictor.unknown
    result = predictor.predict_paths(KNOWN[:1])[0]
    assert set(result) == {"path", "label", "probabilities"}  # the schema it always had
    model, _ = load_model(path)
    with torch.no_grad():
        plain = model(predictor.transform(Image.open(KNOWN[0]).convert("RGB"))[None]).softmax(1)[0]
    assert max(abs(result["probabilities"][c] - float(p)) for c, p in zip(CLASSES, plain)) < 1e-5
    report = evaluate(path, DEMO_DATA / "test", tmp_path / "eval", progress=False)
    assert report["calibration"]["temperature"] == 1.0 and report["coverage"] == 1.0
    assert (tmp_path / "eval" / "calibration.png").is_file()


def test_bad_unknown_recall_stops_training_with_exit_code_2(tmp_path):
    result = run_cli("train", DEMO_DATA / "train", "--out", tmp_path / "run", "--unknown-recall", "1.5")
    assert result.returncode == 2 and "--unknown-recall" in result.stderr
    assert not (tmp_path / "run").exists()


# --- ONNX ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust-onnx") / "model.onnx"
    summary = export_onnx(trained_model, out, check=[str(DEMO_DATA / "test")], log=lambda *a: None)
    return out, summary


def test_onnx_file_carries_temperature_threshold_and_statistics(trained_model, exported):
    path, summary = exported
    _, meta = load_model(trained_model)
    model = onnx.load(str(path))
    carried = json.loads({p.key: p.value for p in model.metadata_props}["fruitnet"])
    assert carried["trust"] == meta["trust"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities", "score", "in_distribution", "known"]
    predictor = OnnxPredictor(path)
    assert predictor.temperature == meta["trust"]["temperature"] and predictor.threshold == meta["trust"]["threshold"]
    assert summary["parity"]["verdicts_agree"] == summary["parity"]["n"] == len(KNOWN)


def test_bare_onnx_graph_gives_calibrated_probabilities_and_the_verdict(trained_model, exported):
    path, _ = exported
    _, meta = load_model(trained_model)
    predictor = TorchPredictor(trained_model, device="cpu")
    x = torch.stack([predictor.transform(Image.open(p).convert("RGB")) for p in KNOWN[:5]]).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probs, score, in_dist, known = session.run(None, {"input": x})
    t, threshold = meta["trust"]["temperature"], meta["trust"]["threshold"]
    assert np.allclose(probs, torch.from_numpy(logits / t).softmax(1).numpy(), atol=1e-6)
    assert np.array_equal(known, in_dist >= np.float32(threshold))
    assert np.all((0 <= in_dist) & (in_dist <= 1)) and score.shape == (5,)


def test_int8_export_keeps_the_score_in_fp32(trained_model, tmp_path):
    """Quantising the kNN bank to int8 would blur the distances: the trust nodes are left out of
    quantisation, and their statistics stay float32."""
    summary = export_onnx(trained_model, tmp_path / "m.onnx", check=[str(DEMO_DATA / "test")], int8=True,
                          log=lambda *a: None)
    graph = onnx.load(summary["int8"]["path"]).graph
    bank_shape = list(load_model(trained_model)[0].trust.bank.shape)
    bank = [t for t in graph.initializer if sorted(t.dims) == sorted(bank_shape)]  # or its transpose
    assert [onnx.TensorProto.DataType.Name(t.data_type) for t in bank] == ["FLOAT"]
    similarity = next(n for n in graph.node if n.name.startswith("/trust/") and n.op_type == "MatMul")
    assert bank[0].name in similarity.input  # the float bank itself, no int8 copy dequantized


def test_onnx_verdicts_equal_pytorch_verdicts(trained_model, exported):
    path, _ = exported
    photos = KNOWN[::3] + other_photos(10)
    torch_results = TorchPredictor(trained_model, device="cpu", precision="fp32").predict_paths(photos)
    onnx_results = OnnxPredictor(path).predict_paths(photos)
    labels = [r["label"] for r in torch_results]
    assert "unknown" in labels and set(labels) - {"unknown"}  # both verdicts are exercised
    assert [r["label"] for r in onnx_results] == labels
    assert [r["best_guess"] for r in onnx_results] == [r["best_guess"] for r in torch_results]
    n_val = load_model(trained_model)[1]["trust"]["n_val"]
    assert max(abs(a["in_distribution"] - b["in_distribution"]) for a, b in zip(onnx_results, torch_results)) \
        <= 1 / n_val + 1e-4  # at most one validation photo's step apart


# --- predict and evaluate ----------------------------------------------------------------------------

def test_predict_answers_unknown_for_photos_of_other_things(trained_model, tmp_path):
    others, known = other_photos(12), KNOWN[::5]
    result = run_cli("predict", trained_model, *others, *known, "--json", "--csv", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    rows = {r["path"]: r for r in json.loads(result.stdout)}
    unknown = [rows[p] for p in others if rows[p]["label"] == "unknown"]
    assert len(unknown) >= 10, [rows[p] for p in others]
    assert all(r["best_guess"] in CLASSES and r["in_distribution"] < 0.05 for r in unknown)
    answered = [rows[p] for p in known if rows[p]["label"] != "unknown"]
    assert len(answered) >= len(known) - 1 and all(r["label"] == r["best_guess"] for r in answered)
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["path"]: r["label"] for r in table} == {p: r["label"] for p, r in rows.items()}
    assert all(r["best_guess"] in CLASSES and r["in_distribution"] for r in table)
    table_out = run_cli("predict", trained_model, others[0])
    assert f"unknown ({rows[others[0]]['best_guess']})" in table_out.stdout
    off = json.loads(run_cli("predict", trained_model, *others[:4], "--json", "--no-unknown").stdout)
    assert all(r["label"] == r["best_guess"] for r in off)


def test_evaluate_reports_calibration_coverage_and_the_unknown_folder(trained_model, tmp_path):
    data = tmp_path / "test"
    shutil.copytree(DEMO_DATA / "test", data)
    (data / "unknown").mkdir()
    for p in other_photos(15):
        shutil.copy(p, data / "unknown")
    report = evaluate(trained_model, data, tmp_path / "eval", progress=False)
    assert report["n"] == len(KNOWN)  # the unknown/ photos are not a class
    cal = report["calibration"]
    assert cal["bins"] == 15 and cal["temperature"] == load_model(trained_model)[1]["trust"]["temperature"]
    assert 0 <= cal["ece_after"] <= 1 and cal["nll_after"] > 0
    u = report["unknown"]
    assert u["n"] == 15 and u["auroc"] >= 0.9 and u["rejected"] >= 0.8 and u["known_accepted"] == report["coverage"]
    assert report["coverage"] >= 0.8 and report["answered_accuracy"] >= report["accuracy"] - 0.05
    for name in ("calibration.png", "mistakes.png", "report.txt", "predictions.csv"):
        assert (tmp_path / "eval" / name).is_file()
    assert "AUROC" in (tmp_path / "eval" / "report.txt").read_text()


# --- where it looked ---------------------------------------------------------------------------------

def red_disc_on_grey(cx=70, cy=150, r=45) -> Image.Image:
    image = Image.new("RGB", (224, 224), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 20, 30))
    return image


def test_gradcam_heat_lies_on_the_red_disc(trained_model):
    """The head was trained on red fruit on white, so the red disc is its only evidence; the disc
    sits off centre and off the diagonal, so a flipped, transposed or centred map fails."""
    predictor = TorchPredictor(trained_model, device="cpu")
    image = red_disc_on_grey()
    view = np.asarray(model_view(image, predictor.preprocessing)).astype(int)
    disc = (view[..., 0] > 150) & (view[..., 1] < 100)
    x = predictor.transform(image)[None]
    heat = predictor.heat_maps(x, [int(predictor.outputs(x)[0].argmax())])[0]
    assert heat.shape == disc.shape and heat.max() == pytest.approx(1.0)
    assert heat[disc].mean() > 3 * heat[~disc].mean()
    assert disc[np.unravel_index(heat.argmax(), heat.shape)]


def test_predict_explain_writes_one_overlay_per_photo(trained_model, tmp_path):
    photos = KNOWN[:3]
    result = run_cli("predict", trained_model, *photos, "--explain", tmp_path / "cam", "--grid", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "cam").iterdir())
    assert written == sorted(f"{p.split('/')[-1][:-4]}.png" for p in photos)
    overlay = Image.open(tmp_path / "cam" / written[0])
    assert overlay.size == (2 * 224, 224 + 28)  # the photo as the model saw it | the heat map; the caption
    assert Image.open(tmp_path / "grid.png").size[0] > 0 and "3 heat-map overlays" in result.stdout


def test_explain_with_an_onnx_model_says_why_not(exported, tmp_path):
    path, _ = exported
    result = run_cli("predict", path, KNOWN[0], "--explain", tmp_path / "cam")
    assert result.returncode == 2 and "PyTorch model file" in result.stderr
    assert not (tmp_path / "cam").exists()
