import pickle
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.models import resnet18

from fruitnet.errors import WeightsUnavailable
from fruitnet.backbones import LITE0_SHA256, create_body, get_backbone, lite0_weights_file
from fruitnet.errors import ModelFileError
from fruitnet.model import create_classifier, load_model, save_model
from fruitnet.predictors import TorchPredictor
from quick_model import bad_metadata_cases, make_quick_model, with_metadata


def test_lite0_imagenet_weights_are_real_and_offline(demo_data):
    """The packaged weights load (sha256 checked) and recognise a strawberry as ImageNet's class 949."""
    import hashlib

    assert hashlib.sha256(lite0_weights_file().read_bytes()).hexdigest() == LITE0_SHA256
    body, source = create_body("efficientnet_lite0", "imagenet")
    assert source.endswith("efficientnet-lite0-57934424.pth")
    state = torch.load(lite0_weights_file(), weights_only=True)
    fc_w, fc_b = state["_fc.weight"], state["_fc.bias"]
    from fruitnet.transforms import eval_transform

    tf = eval_transform(get_backbone("efficientnet_lite0").preprocessing)
    files = sorted((demo_data / "test" / "strawberry").glob("*.jpg"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        logits = body.eval()(x) @ fc_w.T + fc_b
    assert (logits.argmax(1) == 949).float().mean() >= 0.8


def test_model_file_round_trip_gives_identical_outputs(tmp_path):
    model, _ = create_classifier("efficientnet_lite0", 4, "none")
    meta = {"classes": ["a", "b", "c", "d"], "backbone": "efficientnet_lite0",
            "preprocessing": get_backbone("efficientnet_lite0").preprocessing, "training": {"val_accuracy": 0.5}}
    path = save_model(tmp_path / "m.safetensors", model.eval(), meta)
    loaded, meta2 = load_model(path)
    assert meta2["classes"] == meta["classes"] and meta2["preprocessing"] == meta["preprocessing"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_freeze_trains_only_the_head_and_keeps_batchnorm_statistics():
    model, _ = create_classifier("resnet18", 3, "none")
    model.set_mode("freeze")
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.head.parameters()}
    before = model.body.bn1.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(before, model.body.bn1.running_mean)
    model.set_mode("unfreeze")
    assert len(model.trainable_parameters()) == len(list(model.parameters()))


def test_resnet18_local_weights_file_drops_old_fc(tmp_path):
    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    model, source = create_classifier("resnet18", 3, str(tmp_path / "resnet18-f37072fd.pth"))
    assert source.endswith("resnet18-f37072fd.pth")
    assert torch.equal(model.body.conv1.weight, reference.conv1.weight)
    assert model.head.out_features == 3


def test_resnet18_without_reachable_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailable) as err:
        create_body("resnet18", "imagenet")
    assert "--weights" in str(err.value) and "efficientnet_lite0" in str(err.value)


def original_inference(state_dict_path, image_paths):
    """The original project's inference code: resnet18 with a 3-way fc, 300x300, mean/std 0.5."""
    net = resnet18()
    net.fc = torch.nn.Linear(net.fc.in_features, 3)
    net.load_state_dict(torch.load(state_dict_path))
    net.eval()
    tf = T.Compose([T.Resize((300, 300)), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in image_paths])
    with torch.no_grad():
        return torch.softmax(net(x), dim=1)


def test_original_model_pth_gives_the_original_probabilities(tmp_path, demo_data):
    torch.manual_seed(0)
    net = resnet18()
    net.fc = torch.nn.Linear(512, 3)
    torch.save(net.state_dict(), tmp_path / "model.pth")
    paths = sorted(str(p) for p in (demo_data / "test").rglob("*.jpg"))[:12]
    big = Image.open(paths[0]).resize((1600, 1200))  # a camera-sized photo, not a square thumbnail
    big.save(tmp_path / "big.jpg", quality=92)
    paths.append(str(tmp_path / "big.jpg"))
    expected = original_inference(tmp_path / "model.pth", paths)
    predictor = TorchPredictor(tmp_path / "model.pth")  # detected as a legacy file
    assert predictor.classes == ["cherry", "strawberry", "tomato"]
    got = predictor.predict_paths(paths)
    for row, exp in zip(got, expected):
        probs = torch.tensor([row["probabilities"][c] for c in predictor.classes])
        assert torch.allclose(probs, exp, atol=1e-5)
        assert row["label"] == predictor.classes[int(exp.argmax())]


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_model_file_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Exploit()
    evil.marker = str(marker)
    with open(tmp_path / "model.pth", "wb") as f:
        pickle.dump({"fc.weight": evil}, f)
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "model.pth")
    assert not marker.exists()
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError, match="junk.safetensors"):
        load_model(tmp_path / "junk.safetensors")


# --- model metadata is checked against a schema before anything is built from it (issue 11) ------

@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    return make_quick_model(tmp_path_factory.mktemp("schema") / "model.safetensors")


@pytest.mark.parametrize("case", list(bad_metadata_cases()))
def test_bad_metadata_is_refused_in_one_line_before_anything_is_allocated(good_model, tmp_path, case):
    change, words = bad_metadata_cases()[case]
    path = with_metadata(good_model, tmp_path / f"{case}.safetensors", change)
    start = time.perf_counter()
    with pytest.raises(ModelFileError) as err:
        load_model(path)
    # a million classes used to build a 5.8 GB head first (18 s); the file itself is 17 MB
    assert time.perf_counter() - start < 1
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and words in message, message


def test_files_written_before_the_schema_and_unknown_keys_still_load(good_model, tmp_path):
    def older(meta):  # no crop_pct (the transform's default 1.0 applies), plus keys this version does not know
        pre = {k: v for k, v in meta["preprocessing"].items() if k != "crop_pct"}
        return {**meta, "preprocessing": pre, "calibration": {"temperature": 1.5}, "exported_from": "x"}

    path = with_metadata(good_model, tmp_path / "older.safetensors", older)
    _, meta = load_model(path)
    assert meta["calibration"] == {"temperature": 1.5} and "crop_pct" not in meta["preprocessing"]


def test_save_model_refuses_metadata_that_load_would_refuse(tmp_path):
    model, _ = create_classifier("efficientnet_lite0", 2, "none")
    pre = {**get_backbone("efficientnet_lite0").preprocessing, "std": [0.5, 0.0, 0.5]}
    with pytest.raises(ModelFileError, match="std.1"):
        save_model(tmp_path / "m.safetensors", model, {"classes": ["a", "b"], "backbone": "efficientnet_lite0",
                                                        "preprocessing": pre})
    assert not list(tmp_path.iterdir())


def test_any_failure_on_one_file_is_that_files_error(good_model, demo_data, monkeypatch):
    """Fault injection: decoding one file runs out of memory, another hits an unexpected bug; the
    others in the same batch keep their answers (it used to lose the whole batch)."""
    import fruitnet.preprocess as preprocess  # where predictors (and the service) decode a file

    real = preprocess.load_image
    photos = [str(p) for p in sorted((demo_data / "test" / "cherry").glob("*.jpg"))[:4]]
    failures = {photos[1]: MemoryError(), photos[2]: ZeroDivisionError("division by zero")}

    def flaky(path, *args, **kwargs):
        if str(path) in failures:
            raise failures[str(path)]
        return real(path, *args, **kwargs)

    monkeypatch.setattr(preprocess, "load_image", flaky)
    rows = TorchPredictor(good_model, device="cpu").predict_paths(photos, batch_size=4)
    assert [r["path"] for r in rows] == photos
    assert rows[1]["error"] == "not enough memory to process it"
    assert rows[2]["error"] == "cannot be processed (ZeroDivisionError: division by zero)"
    assert rows[0]["label"] and rows[3]["label"]


def test_a_text_file_given_as_the_model_is_called_what_it_is(tmp_path):
    from conftest import DEMO_DATA, run_cli

    notes = tmp_path / "README.md"
    notes.write_text("# my notes\nnot a model\n")
    result = run_cli("predict", notes, DEMO_DATA / "test" / "cherry")
    assert result.returncode == 2
    assert "nor the original project's model.pth (it is a text file)" in result.stderr
    assert "Python objects" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_folding_batchnorm_into_the_convolutions_keeps_the_function(backbone):
    """predict's bf16 body (model.fold_batchnorm): no BatchNorm left, the same outputs, the file's
    own model untouched (fp32 and the re-checks run it)."""
    from fruitnet.model import fold_batchnorm

    pretrained = backbone != "resnet18"  # resnet18's weights are not offline: statistics of its own to fold
    model, _ = create_classifier(backbone, 3, "imagenet" if pretrained else "none")
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and not pretrained):
        bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 10
    x = torch.randn(2, 3, 224, 224, generator=generator)
    with torch.no_grad():
        for a, b in zip(model.logits_and_features(x), folded.logits_and_features(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "resnet18"])
def test_fusing_each_activation_into_its_convolution_gives_the_same_bf16_numbers(backbone):
    """predict's bf16 body on the CPU (model.fuse_conv_activations): every ReLU6 of an
    EfficientNet-Lite body runs inside its convolution (timm's asymmetric "same" padding
    included), with exactly the outputs of the unfused bf16 body on real photos; ResNet18's
    BatchNorms carry no activation, so nothing of it is fused."""
    from conftest import DEMO_DATA
    from fruitnet.model import fold_batchnorm, fuse_conv_activations
    from fruitnet.transforms import eval_transform

    pretrained = backbone != "resnet18"
    model, _ = create_classifier(backbone, 3, "imagenet" if pretrained else "none")
    folded = fold_batchnorm(model.eval()).to(memory_format=torch.channels_last)
    relu6 = sum(isinstance(m, torch.nn.ReLU6) for m in folded.modules())
    fused, count = fuse_conv_activations(fold_batchnorm(model).to(memory_format=torch.channels_last))
    assert count == relu6 and (count > 30) == pretrained
    assert not any(isinstance(m, torch.nn.ReLU6) for m in fused.modules())
    transform = eval_transform(get_backbone(backbone).describe_preprocessing())
    photos = sorted((DEMO_DATA / "test").rglob("*.jpg"))[:6]
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos]).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in zip(folded.logits_and_features(x), fused.logits_and_features(x)):
            assert torch.equal(a, b)
