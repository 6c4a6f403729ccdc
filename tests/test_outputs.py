"""Issue 19: outputs never overwrite inputs.  Every output option of every command is checked
before any work: never an input photo, never the model file, never inside an input folder, never
an existing file unless the option replaces one.  Each refusal is exit 2, one line, and every
input byte unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from fruitnet import cli
from fruitnet.errors import UsageError
from fruitnet.outputs import check_outputs


def snapshot(*roots: Path) -> dict:
    """Every file under the roots (or the file itself): its bytes' hash."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from quick_model import make_quick_model

    return make_quick_model(tmp_path_factory.mktemp("model") / "m.safetensors")


@pytest.fixture
def photos(tmp_path, demo_data) -> Path:
    """t/cherry/<3 jpgs>, t/tomato/<3 jpgs>: a photo folder that is also a data folder."""
    for cls in ("cherry", "tomato"):
        (tmp_path / "t" / cls).mkdir(parents=True)
        for src in sorted((demo_data / "test" / cls).glob("*.jpg"))[:3]:
            shutil.copy(src, tmp_path / "t" / cls / src.name)
    return tmp_path / "t"


def refused(capsys, *argv) -> str:
    """Run the command; assert exit 2 and one line on stderr; return that line."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- the helper ------------------------------------------------------------------------------

def test_an_output_on_an_input_photo_is_refused_even_through_a_link(photos, tmp_path):
    photo = next(photos.rglob("*.jpg"))
    (tmp_path / "link.jpg").symlink_to(photo)
    os.link(photo, tmp_path / "hard.jpg")
    for given in (photo, tmp_path / "link.jpg", tmp_path / "hard.jpg"):
        with pytest.raises(UsageError, match="is an input photo"):
            check_outputs({"--csv": given}, inputs=[str(given)], replaces={"--csv"})
    with pytest.raises(UsageError, match="is an input photo"):  # named by a glob
        check_outputs({"--grid": photo}, inputs=[str(photos / "*" / "*.jpg")], replaces={"--grid"})
    with pytest.raises(UsageError, match="is an input photo"):  # a hard link of a photo given alone
        check_outputs({"--grid": tmp_path / "hard.jpg"}, inputs=[str(photo)], replaces={"--grid"})


def test_an_output_inside_an_input_folder_or_on_the_model_is_refused(photos, tmp_path):
    for out in (photos, photos / "cherry" / "new.csv", photos / "new" / "deeper.csv"):
        with pytest.raises(UsageError, match="inside the data folder"):
            check_outputs({"--csv": out}, inputs=[str(photos)], replaces={"--csv"})
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    with pytest.raises(UsageError, match="is the model file"):
        check_outputs({"--csv": model}, model=model, replaces={"--csv"})


def test_existing_files_are_replaced_only_by_options_that_say_so(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    check_outputs({"--csv": mine}, replaces={"--csv"})  # allowed: --csv replaces
    with pytest.raises(UsageError, match="already exists; fruitnet never overwrites it"):
        check_outputs({"--out": mine})
    with pytest.raises(UsageError, match="exists and is a file"):
        check_outputs({"--out": mine}, folders={"--out"})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="already exists and is not empty"):
        check_outputs({"--explain": tmp_path / "full"}, folders={"--explain"})
    with pytest.raises(UsageError, match="is a folder"):
        check_outputs({"--csv": tmp_path / "full"}, replaces={"--csv"})
    (tmp_path / "empty").mkdir()
    check_outputs({"--explain": tmp_path / "empty"}, folders={"--explain"})
    with pytest.raises(UsageError, match="the same path as --csv"):
        check_outputs({"--csv": tmp_path / "a.png", "--grid": tmp_path / "a.png"}, replaces={"--csv", "--grid"})


# --- every output option, through the command line ------------------------------------------

def test_predict_csv_grid_and_explain_never_land_on_inputs(model, photos, tmp_path, capsys):
    photo = sorted(photos.rglob("*.jpg"))[0]
    before = snapshot(photos, model)
    assert "is the model file" in refused(capsys, "predict", model, photo, "--csv", model)
    assert "is an input photo" in refused(capsys, "predict", model, photo, "--grid", photo)
    assert "inside the data folder" in refused(capsys, "predict", model, photos, "--explain", photos)
    assert "inside the data folder" in refused(capsys, "predict", model, photos, "--csv", photos / "p.csv")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "cherry.png").write_text("not an overlay")
    assert "not empty" in refused(capsys, "predict", model, photo, "--explain", tmp_path / "full")
    assert snapshot(photos, model) == before
    assert (tmp_path / "full" / "cherry.png").read_text() == "not an overlay"


def test_check_write_exclude_and_out_never_land_on_inputs(photos, tmp_path, capsys):
    before = snapshot(photos)
    photo = sorted(photos.rglob("*.jpg"))[0]
    assert "inside the data folder" in refused(capsys, "check", photos, "--deep", "--write-exclude", photo)
    assert "the same path as --out" in refused(capsys, "check", photos, "--deep", "--out", tmp_path / "r",
                                               "--write-exclude", tmp_path / "r")
    assert snapshot(photos) == before and not (tmp_path / "r").exists()


def test_evaluate_out_never_lands_in_data_or_on_the_model(model, photos, tmp_path, capsys):
    before = snapshot(photos, model)
    assert "exists and is a file" in refused(capsys, "evaluate", model, photos, "--out", model)
    assert "inside the data folder" in refused(capsys, "evaluate", model, photos, "--out", photos / "eval")
    assert snapshot(photos, model) == before


def test_evaluate_out_inside_the_unknown_folder_is_refused(model, photos, tmp_path, capsys, demo_data):
    others = tmp_path / "others"
    others.mkdir()
    shutil.copy(sorted((demo_data / "test" / "strawberry").glob("*.jpg"))[0], others / "x.jpg")
    before = snapshot(others)
    assert "inside the data folder" in refused(capsys, "evaluate", model, photos, "--unknown", others,
                                               "--out", others / "eval")
    assert snapshot(others) == before and not (others / "eval").exists()


def test_export_out_never_lands_on_the_model_or_in_the_check_photos(model, photos, tmp_path, capsys):
    before = snapshot(photos, model)
    assert "is the model file" in refused(capsys, "export", model, "--out", model)
    assert "inside the data folder" in refused(capsys, "export", model, "--out", photos / "m.onnx",
                                               "--check", photos)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"an earlier export")
    assert "already exists" in refused(capsys, "export", model, "--int8", "--out", tmp_path / "m.onnx")
    assert snapshot(photos, model) == before and onnx.read_bytes() == b"an earlier export"


def test_demo_out_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert "not empty" in refused(capsys, "demo", "--out", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_evaluate_unknown_skips_fruitnet_output_folders(model, photos, tmp_path, demo_data):
    """Item 6: plots an earlier evaluate left in --unknown DIR are not scored as unknown photos."""
    from fruitnet.runfolder import new_output_folder

    others = tmp_path / "others"
    others.mkdir()
    for src in sorted((demo_data / "test" / "strawberry").glob("*.jpg"))[:2]:
        shutil.copy(src, others / src.name)
    earlier = new_output_folder(others / "eval-earlier", "", kind="evaluation folder")
    for name in ("confusion.png", "mistakes.png", "calibration.png"):
        shutil.copy(sorted(others.glob("*.jpg"))[0], earlier / name)
    assert cli.main(["evaluate", str(model), str(photos), "--unknown", str(others), "--json",
                     "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["unknown"]["n"] == 2
