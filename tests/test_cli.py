"""End-to-end: the commands a user types, with real files, real models and exit codes."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from awkward import lying_jpeg_bytes, make_awkward_folder, tall_gif_bytes, wide_png_bytes
from conftest import run_cli
from quick_model import bad_metadata_cases, make_quick_model, with_metadata

RUN_FILES = {"config.json", "split.csv", "data_report.json", "data_report.txt", "metrics.csv", "curves.png",
             "best.safetensors", "last.safetensors", "summary.json", "checkpoint.pt"}


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward") / "photos"
    return root, make_awkward_folder(root)


def test_check_names_every_unusable_file_and_exits_1(awkward):
    root, info = awkward
    result = run_cli("check", root)
    assert result.returncode == 1
    for rel, reason in info["unusable"].items():
        assert f"{root / rel}: " in result.stdout and reason in result.stdout
    report = json.loads(run_cli("check", root, "--json").stdout)
    assert report["classes"] == ["cherry", "strawberry", "tomato"]


@pytest.mark.parametrize("args, message", [
    (["check", "/no/such/folder"], "not found"),
    (["train", "/no/such/folder"], "not found"),
    (["train", "x", "--epochs", "0"], "at least 1"),
    (["train", "x", "--backbone", "vgg"], "invalid choice"),
    (["serve", "m.safetensors", "--port", "99999"], "argument --port: must be between 1 and 65535, not 99999"),
    (["serve", "m.safetensors", "--port", "0"], "argument --port: must be between 1 and 65535, not 0"),
    (["serve", "m.safetensors", "--port=-1"], "argument --port: must be between 1 and 65535, not -1"),
    (["serve", "m.safetensors", "--timeout-request", "0"], "must be more than 0"),
])
def test_unusable_arguments_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_awkward_folder_trains_predicts_and_evaluates(awkward, tmp_path):
    root, info = awkward
    run = tmp_path / "run"
    result = run_cli("train", root, "--backbone", "efficientnet_lite0", "--mode", "freeze", "--lr", "0.5",
                     "--out", run)
    assert result.returncode == 1, result.stderr  # the run is complete; some image files could not be used
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    for rel in info["unusable"]:
        assert str(root / rel) in result.stdout
    report = json.loads((run / "data_report.json").read_text())
    assert {Path(s["path"]).relative_to(root).as_posix() for s in report["skipped"]} == set(info["unusable"])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert list(rows[0]) == ["epoch", "seconds", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    assert [r["epoch"] for r in rows] == ["1"]  # the probe recipe fits once
    summary = json.loads((run / "summary.json").read_text())
    assert {"best_val_accuracy", "best_epoch", "epochs", "seconds", "model"} <= set(summary)
    config = json.loads((run / "config.json").read_text())
    # given values are honoured exactly; the others are the recipe's, resolved and recorded
    assert config["train"]["lr"] == 0.5 and config["train"]["epochs"] == config["recipe"]["epochs"] == 1
    assert config["train"]["recipe"] == "probe" and config["train"]["weight_decay"] == config["recipe"]["weight_decay"]
    assert config["machine"]["torch"] and config["arithmetic"]["dtype"] in ("bf16", "fp32")
    # never overwrite a run
    again = run_cli("train", root, "--backbone", "efficientnet_lite0", "--epochs", "1", "--out", run)
    assert again.returncode == 2 and "already exists" in again.stderr

    model = run / "best.safetensors"
    pred = run_cli("predict", model, root, "--json", "--grid", tmp_path / "grid.png", "--csv", tmp_path / "p.csv")
    assert pred.returncode == 1  # some files could not be read
    results = {Path(r["path"]).relative_to(root).as_posix(): r for r in json.loads(pred.stdout)}
    assert set(results) == set(info["usable"]) | set(info["unusable"])
    for rel in info["unusable"]:
        assert "error" in results[rel]
    for rel in info["usable"]:  # 2 epochs on a few photos: some may be "none of these", with a best guess
        assert results[rel]["label"] in info["classes"] + ["unknown"] and results[rel]["best_guess"] in info["classes"]
        assert sum(results[rel]["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    assert len(list(csv.reader(open(tmp_path / "p.csv")))) == len(results) + 1

    ev = run_cli("evaluate", model, root, "--json", "--out", tmp_path / "eval")
    assert ev.returncode == 1  # unusable files were skipped
    rep = json.loads(ev.stdout)
    assert {"accuracy", "n", "classes", "per_class", "confusion_matrix", "skipped"} <= set(rep)
    assert rep["n"] == len(info["usable"])
    assert {"accuracy", "precision", "recall", "f1", "support"} == set(rep["per_class"]["cherry"])
    assert {"confusion.png", "confusion.csv", "mistakes.png", "report.json"} <= {p.name for p in (tmp_path / "eval").iterdir()}


def test_evaluate_refuses_classes_the_model_does_not_know(trained_model, tmp_path, demo_data):
    data = tmp_path / "data"
    for cls in ("cherry", "banana"):
        (data / cls).mkdir(parents=True)
        for src in sorted((demo_data / "test" / "cherry").glob("*.jpg"))[:2]:
            (data / cls / src.name).write_bytes(src.read_bytes())
    result = run_cli("evaluate", trained_model, data, "--out", tmp_path / "ev")
    assert result.returncode == 2 and "banana" in result.stderr


def test_predict_table_shows_every_class_probability(trained_model, demo_data):
    photo = sorted((demo_data / "test" / "strawberry").glob("*.jpg"))[0]
    result = run_cli("predict", trained_model, photo)
    assert result.returncode == 0
    header, row, summary = result.stdout.strip().splitlines()[-3:]
    assert header.split()[-3:] == ["cherry", "strawberry", "tomato"]
    assert row.split()[1] == "strawberry"
    assert summary.startswith("1 photo(s): 1 answered (100%)")


PEAK_RSS = """
import runpy, sys
sys.argv = ["fruitnet", *sys.argv[1:]]
try:
    runpy.run_module("fruitnet", run_name="__main__")
finally:  # the process's own peak resident memory, printed last
    print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1], file=sys.stderr)
"""


def test_predict_keeps_every_answer_with_bounded_memory(trained_model, tmp_path, demo_data):
    """Tiny files that used to need ~17 GB (a 1x65535 GIF resized to 256 x 16.8M) get their own
    error; the photos in the same call keep their answers; the process stays under 1.5 GB."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the peak memory from /proc (Linux)")
    (tmp_path / "tall.gif").write_bytes(tall_gif_bytes())
    (tmp_path / "wide.png").write_bytes(wide_png_bytes())
    (tmp_path / "liar.jpg").write_bytes(lying_jpeg_bytes())
    photos = sorted((demo_data / "test" / "tomato").glob("*.jpg"))[:2]
    paths = [tmp_path / "tall.gif", photos[0], tmp_path / "wide.png", tmp_path / "liar.jpg", photos[1]]
    # the address-space cap is a safety net for the machine if this regresses (the old code then dies
    # of MemoryError instead of taking 17 GB); the assertion is on the peak resident memory
    six_gb = 6 << 30
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, "predict", str(trained_model), *map(str, paths), "--json"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            preexec_fn=lambda: __import__("resource").setrlimit(__import__("resource").RLIMIT_AS,
                                                                                  (six_gb, six_gb)))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert "extreme aspect ratio: 1x65535" in rows["tall.gif"]["error"]
    assert "extreme aspect ratio: 20000x10" in rows["wide.png"]["error"]
    assert "truncated image data" in rows["liar.jpg"]["error"]
    assert all(rows[p.name]["label"] in ("cherry", "strawberry", "tomato") for p in photos)
    peak_mb = int(result.stderr.strip().splitlines()[-1]) / 1024
    assert peak_mb < 1536, f"predict peaked at {peak_mb:.0f} MB"


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-models")
    good = make_quick_model(root / "good.safetensors")
    cases = bad_metadata_cases()
    return {name: (with_metadata(good, root / f"{name}.safetensors", cases[name][0]), cases[name][1])
            for name in ("a-million-classes", "std-0")}


@pytest.mark.parametrize("case", ["a-million-classes", "std-0"])  # every case, in-process: test_model.py
def test_predict_refuses_a_bad_model_file_in_one_line(bad_models, demo_data, case):
    path, words = bad_models[case]
    result = run_cli("predict", path, sorted((demo_data / "test" / "cherry").glob("*.jpg"))[0], timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith(f"fruitnet predict: error: {path}: ") and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_resnet18_trains_from_a_local_weights_file_and_stops_without_weights(tmp_path, demo_data):
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
    result = run_cli("train", demo_data / "test", "--backbone", "resnet18", "--weights",
                     tmp_path / "resnet18-f37072fd.pth", "--epochs", "1", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["weights_source"].endswith("resnet18-f37072fd.pth")

    import os

    env_result = subprocess.run([sys.executable, "-m", "fruitnet", "train", str(demo_data / "test"), "--backbone",
                                 "resnet18", "--epochs", "1", "--out", str(tmp_path / "none")], capture_output=True, text=True,
                                env={**os.environ, "TORCH_HOME": str(tmp_path / "empty")})
    assert env_result.returncode == 2
    assert "--weights" in env_result.stderr and "leave out --backbone (the default, efficientnet_lite1)" in \
        env_result.stderr
    assert not (tmp_path / "none").exists()


def test_ctrl_c_leaves_a_resumable_run_that_resumes_from_another_directory(tmp_path, demo_data):
    run = tmp_path / "run"
    # started from the repository with a relative DATA path, as a user would
    proc = subprocess.Popen([sys.executable, "-m", "fruitnet", "train", "demo_data/train", "--backbone",
                             "efficientnet_lite0", "--mode", "freeze", "--recipe", "fast", "--no-feature-cache", "--workers", "0",
                             "--epochs", "6", "--lr", "0.01", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=demo_data.parent)
    metrics = run / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"continue with: fruitnet train --resume {run}" in out
    assert (run / "checkpoint.pt").is_file()  # written before the metrics row that the test waited for
    done = len(metrics.read_text().splitlines()) - 1
    assert 1 <= done < 6
    refused = run_cli("train", "--resume", run, "--lr", "0.5", cwd=tmp_path)
    assert refused.returncode == 2 and "--lr cannot change" in refused.stderr
    result = run_cli("train", "--resume", run, cwd=tmp_path)  # elsewhere: split.csv paths still resolve
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(metrics)))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert json.loads((run / "summary.json").read_text())["epochs"] == 6


def test_a_run_stopped_before_its_first_epoch_resumes_from_epoch_1(tmp_path, demo_data):
    run = tmp_path / "run"
    args = ["--backbone", "efficientnet_lite0", "--mode", "freeze", "--recipe", "seed", "--epochs", "2", "--lr", "0.01"]
    assert run_cli("train", demo_data / "test", *args, "--out", run).returncode == 0
    first = list(csv.DictReader(open(run / "metrics.csv")))
    # what a kill during the feature pass leaves: the folder's records, no checkpoint, no epoch
    for name in ("checkpoint.pt", "best.safetensors", "last.safetensors", "summary.json", "curves.png"):
        (run / name).unlink()
    (run / "metrics.csv").write_text(",".join(first[0]) + "\n")
    result = run_cli("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    again = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in again] == ["1", "2"]
    assert [r["val_accuracy"] for r in again] == [r["val_accuracy"] for r in first]  # same seed, same run


def test_outputs_never_land_in_the_data_folder_or_on_existing_files(tmp_path, demo_data, trained_model):
    data = tmp_path / "photos"
    for cls in ("cherry", "strawberry"):
        (data / cls).mkdir(parents=True)
        for src in sorted((demo_data / "test" / cls).glob("*.jpg"))[:3]:
            (data / cls / src.name).write_bytes(src.read_bytes())
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    inside = run_cli("train", data, "--backbone", "efficientnet_lite0", "--out", data / "cherry" / "run2")
    assert inside.returncode == 2 and "inside the data folder" in inside.stderr
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for args in (["train", data, "--backbone", "efficientnet_lite0", "--out", a_file],
                 ["evaluate", trained_model, data, "--out", a_file],
                 ["evaluate", trained_model, data, "--out", data / "eval"]):
        result = run_cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "report.json").write_text("{}")
    again = run_cli("evaluate", trained_model, data, "--out", tmp_path / "done")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (tmp_path / "done" / "report.json").read_text() == "{}" and a_file.read_text() == "mine"
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_folder_named_unknown_is_no_class_and_is_said_so(tmp_path, demo_data):
    for cls in ("cherry", "unknown"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for src in sorted((demo_data / "test" / "cherry").glob("*.jpg"))[:2]:
            (tmp_path / "data" / cls / src.name).write_bytes(src.read_bytes())
    result = run_cli("train", tmp_path / "data", "--backbone", "efficientnet_lite0", "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown/ holds photos of none of the classes, not a class" in result.stderr
    assert not (tmp_path / "run").exists()


# --- the first hour (issue 13): no dead ends, numbers that warn, exit codes that agree ----------


def _copy_photos(demo_data, dest: Path, per_class: dict[str, int], split: str = "test") -> Path:
    for cls, n in per_class.items():
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for src in sorted((demo_data / split / cls).glob("*.jpg"))[:n]:
            (dest / cls / src.name).write_bytes(src.read_bytes())
    return dest


def test_model_argument_mistakes_say_what_was_given_and_what_to_pass(trained_model, tmp_path, demo_data):
    run, photos = trained_model.parent, demo_data / "test"
    photo = sorted((photos / "cherry").glob("*.jpg"))[0]
    cases = [
        (["predict", run, photo], f"{run} is a run folder; pass {run / 'best.safetensors'}"),
        (["evaluate", run, photos], f"{run} is a run folder; pass {run / 'best.safetensors'}"),
        (["export", run], f"{run} is a run folder; pass {run / 'best.safetensors'}"),
        (["evaluate", photos, trained_model],
         f"{photos} is a folder and {trained_model} a model file: the model comes first: "
         f"fruitnet evaluate {trained_model} {photos}"),
        (["predict", photos, trained_model], f"the model comes first: fruitnet predict {trained_model} {photos}"),
        (["predict", photos, photo], f"{photos} is a folder, not a model file"),
        (["predict", run / "checkpoint.pt", photo],
         f"is a training checkpoint (for fruitnet train --resume), not a model file; pass {run / 'best.safetensors'}"),
        (["predict", photo, photo], f"{photo} is an image, not a model file"),
    ]
    for args, message in cases:
        result = run_cli(*args, "--out", tmp_path / "never") if args[0] == "evaluate" else run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "never").exists()


def test_unreadable_model_files_are_described_in_words(trained_model, tmp_path, demo_data, capsys):
    import pickle

    from fruitnet.cli import main

    photo = sorted((demo_data / "test" / "cherry").glob("*.jpg"))[0]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trained_model.read_bytes()[:5000])
    text = tmp_path / "model.pth"
    text.write_text("hello\n")
    objects = tmp_path / "objects.pth"
    objects.write_bytes(pickle.dumps({"fc.weight": object}))
    renamed = tmp_path / "model2.pth"  # a checkpoint under another name: told by its content
    renamed.write_bytes((trained_model.parent / "checkpoint.pt").read_bytes())
    for path, words in ((truncated, "damaged or incomplete model file"),
                        (text, "neither a fruitnet model file (.safetensors) nor the original project's model.pth"),
                        (objects, "holds Python objects, not only tensors"),
                        (renamed, "a training checkpoint (for fruitnet train --resume)")):
        assert main(["predict", str(path), str(photo)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: {words}" in err, err
        assert not any(name in err for name in ("SafetensorError", "UnpicklingError", "KeyError")), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is usable here")
def test_device_that_is_not_there_is_an_argument_error(demo_data, tmp_path):
    for device, message in (("cuda", "--device cuda: no CUDA device here; use --device cpu"),
                            ("gpu", "--device gpu: not a device; use auto, cpu, cuda or cuda:N")):
        result = run_cli("train", demo_data / "test", "--device", device, "--out", tmp_path / device)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / device).exists()


def test_one_folder_gets_one_exit_code_from_check_train_and_evaluate(trained_model, tmp_path, demo_data):
    """The rule: files that are not images are ignored (not a failure); image files that cannot be
    used are skipped and make the exit code 1, in check, train and evaluate alike.  A class with one
    photo trains, and the run says its numbers cannot be trusted."""
    data = _copy_photos(demo_data, tmp_path / "photos", {"cherry": 4, "strawberry": 4, "tomato": 1})
    (data / "cherry" / "notes.txt").write_text("taken in June\n")
    train_args = ["--backbone", "efficientnet_lite0", "--mode", "freeze", "--recipe", "seed", "--epochs", "1"]
    for broken, code in ((False, 0), (True, 1)):
        if broken:
            (data / "strawberry" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
        check = run_cli("check", data)
        run = tmp_path / f"run-{code}"
        train = run_cli("train", data, *train_args, "--out", run)
        evaluate = run_cli("evaluate", trained_model, data, "--out", tmp_path / f"eval-{code}")
        assert (check.returncode, train.returncode, evaluate.returncode) == (code, code, code), \
            (check.stderr, train.stderr, evaluate.stderr)
        assert f"{data / 'cherry' / 'notes.txt'}: not an image file" in check.stdout  # named, not just counted
        summary = json.loads((run / "summary.json").read_text())
        assert summary["skipped"] == code
        warnings = [w for w in summary["warnings"] if "'tomato'" in w]
        assert any("only 1 photo" in w for w in warnings) and any("no validation photo" in w for w in warnings)
        assert json.loads((run / "data_report.json").read_text())["warnings"] == summary["warnings"]
        assert "warning: class 'tomato' has only 1 photo(s)" in (run / "data_report.txt").read_text()
        assert "warning: class 'tomato' has only 1 photo(s)" in train.stdout
    assert "broken.jpg: truncated or corrupt" in check.stdout and "broken.jpg" in train.stdout


def test_check_names_ignored_files_and_duplicate_groups_then_counts_the_rest(tmp_path, demo_data):
    data = _copy_photos(demo_data, tmp_path / "photos", {"cherry": 7, "strawberry": 2})
    for i, src in enumerate(sorted((data / "cherry").glob("*.jpg"))):
        (data / "strawberry" / f"copy{i}.jpg").write_bytes(src.read_bytes())
        (data / "cherry" / f"note{i}.txt").write_text("x")
    result = run_cli("check", data)
    assert result.returncode == 0, result.stderr
    assert "each kept on one side of the split" in result.stdout
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "each kept on one side of the split" in line) + 1
    groups = [line for line in lines[start:start + 6] if " = " in line]  # the first five, then "and 2 more"
    assert len(groups) == 5 and all("copy" in g for g in groups)
    assert "and 2 more groups of identical files (--json lists them all)" in result.stdout
    assert "7 duplicate group(s) span two classes (label conflicts):" in result.stdout
    assert "7 other file(s) ignored (not a failure):" in result.stdout
    assert sum("note" in line and "not an image file" in line for line in result.stdout.splitlines()) == 5
    assert "and 2 more files" in result.stdout

    loose = tmp_path / "loose"
    loose.mkdir()
    for src in sorted((demo_data / "test" / "cherry").glob("*.jpg"))[:3]:
        (loose / src.name).write_bytes(src.read_bytes())
    result = run_cli("check", loose)
    assert result.returncode == 2
    assert (f"found 3 image(s) directly in {loose}; put them in one folder per class: {loose}/<class>/<image>"
            in result.stderr)


def _tiny_photos(folder: Path) -> list[Path]:
    from PIL import Image

    paths = []
    for cls, (w, h) in (("cherry", (16, 16)), ("tomato", (29, 17))):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        path = folder / cls / f"tiny_{w}x{h}.png"
        Image.new("RGB", (w, h), (200, 30, 40)).save(path)
        paths.append(path)
    return paths


def test_evaluate_warns_about_training_photos_and_small_images(trained_model, tmp_path, demo_data):
    data = tmp_path / "photos"
    shutil.copytree(demo_data / "train", data)  # the folder the model was trained on ...
    tiny = _tiny_photos(data)  # ... and two thumbnails
    trained_on = sum(row["split"] == "train" for row in csv.DictReader(open(trained_model.parent / "split.csv")))
    result = run_cli("evaluate", trained_model, data, "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    total = sum(1 for _ in (demo_data / "train").rglob("*.jpg")) + len(tiny)
    assert report["n"] == total and len(report["warnings"]) == 2
    seen, small = report["warnings"]
    assert seen.startswith(f"{trained_on} of {total} photos were used to train this model")
    assert small.startswith(f"2 of {total} photos are much smaller than the model's 224-pixel input") and \
        all(str(p) in small for p in tiny)
    text = (tmp_path / "eval" / "report.txt").read_text()
    assert f"warning: {seen}" in text and f"warning: {small}" in text and f"warning: {seen}" in result.stdout
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "eval" / "predictions.csv"))}
    assert "16x16 pixels" in rows["tiny_16x16.png"]["warning"] and not rows["25_100.jpg"]["warning"]
    held_out = run_cli("evaluate", trained_model, demo_data / "test", "--json", "--out", tmp_path / "eval2")
    assert held_out.returncode == 0 and json.loads(held_out.stdout)["warnings"] == []


def test_predict_flags_small_photos_says_its_arithmetic_and_writes_lines_to_a_pipe(trained_model, tmp_path,
                                                                                    demo_data):
    import os

    photos = tmp_path / "photos"
    shutil.copytree(demo_data / "test", photos)
    tiny = {p.name for p in _tiny_photos(photos)}
    env = {**os.environ, "FRUITNET_PROGRESS_SECONDS": "0"}  # a line per batch, to see them in a short run
    result = subprocess.run([sys.executable, "-m", "fruitnet", "predict", str(trained_model), str(photos),
                             "--csv", str(tmp_path / "p.csv"), "--batch-size", "8"],
                            capture_output=True, text=True, env=env)  # stdout and stderr are pipes
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("predicting:")]
    assert len(lines) >= 4 and lines[-1].startswith("predicting: 100% 32/32"), result.stderr
    assert "fruitnet predict: arithmetic: pytorch, " in result.stderr
    flagged = [line for line in result.stdout.splitlines() if "warning: small image" in line]
    assert {Path(line.split()[0]).name for line in flagged} == tiny
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert {Path(r["path"]).name for r in rows if r["warning"]} == tiny
    as_json = run_cli("predict", trained_model, photos, "--json")
    assert "arithmetic" not in as_json.stdout and "arithmetic: pytorch" in as_json.stderr
    results = json.loads(as_json.stdout)
    assert {Path(r["path"]).name for r in results if "warning" in r} == tiny
    assert all(r["warning"].startswith("small image: ") for r in results if "warning" in r)


def test_help_argument_errors_and_check_do_not_import_torch(demo_data, tmp_path):
    script = f"""
import sys
import fruitnet.cli
for argv in (["--help"], ["predict", "--help"], ["train", "x", "--epochs", "2.5"],
             ["evaluate", {str(demo_data / 'test')!r}, {str(demo_data / 'test')!r}],
             ["check", {str(demo_data / 'train')!r}]):
    try:
        code = fruitnet.cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    print(argv[0], code, file=sys.stderr)
    assert "torch" not in sys.modules, argv
print("no torch")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr
    assert [line.split()[-1] for line in result.stderr.splitlines() if line.split()[0] in
            ("--help", "predict", "train", "evaluate", "check")] == ["0", "0", "2", "2", "0"]


def test_every_command_argument_and_option_says_what_it_is_and_its_default():
    import argparse

    from fruitnet.cli import build_parser

    parser = build_parser()
    assert parser.description.startswith("fruitnet: fine-tune")  # for users, not a note for developers
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest for c in commands._choices_actions} == set(commands.choices)
    assert all(c.help and c.help.strip() for c in commands._choices_actions)  # the one-line list in `fruitnet --help`
    undescribed, no_default = [], []
    for name, sub in commands.choices.items():
        assert sub.description, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"{name} {action.option_strings[0] if action.option_strings else action.metavar or action.dest}"
            if not (action.help and action.help.strip()):
                undescribed.append(what)
            elif action.option_strings and action.default not in (None, False) \
                    and f"(default: {action.default}" not in action.help:
                no_default.append(f"{what}: {action.help}")
    assert undescribed == [] and no_default == []
