from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import matplotlib

from fruitnet.metrics import confusion_matrix, classification_report
from fruitnet import plots
from fruitnet.plots import plot_confusion, plot_curves, plot_mistakes, plot_prediction_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_w=100, min_h=80):
    path = Path(path)
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.mode in ("RGB", "RGBA")
        w, h = im.size
        assert w >= min_w and h >= min_h, im.size
        arr = np.asarray(im.convert("RGB"))
    # not a blank canvas
    assert arr.std() > 1.0
    return w, h


def _photo(seed, size=(320, 240)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8) + base.astype(np.uint8)
    arr[: size[1] // 2, : size[0] // 2] = 255 - base
    return Image.fromarray(arr)


def test_backend_is_agg():
    assert matplotlib.get_backend().lower() == "agg"


def _rows(n, val=True):
    rows = []
    for e in range(1, n + 1):
        rows.append({
            "epoch": e,
            "train_loss": 1.5 / e,
            "train_accuracy": 1 - 0.5 / e,
            "val_loss": (1.7 / e) if val else None,
            "val_accuracy": (0.9 - 0.4 / e) if val else None,
        })
    return rows


def test_curves_many_epochs(tmp_path):
    out = plot_curves(_rows(12), tmp_path / "deep" / "curves.png")
    assert isinstance(out, Path)
    w, h = _check_png(out, 500, 200)
    assert w > h  # two panels side by side


def test_curves_single_epoch(tmp_path):
    out = plot_curves(_rows(1), tmp_path / "c1.png")
    _check_png(out, 500, 200)


def test_curves_without_validation(tmp_path):
    out = plot_curves(_rows(3, val=False), tmp_path / "c_noval.png")
    _check_png(out, 500, 200)
    rows = _rows(3)
    rows[0]["val_accuracy"] = float("nan")
    rows[0]["val_loss"] = float("nan")
    _check_png(plot_curves(rows, tmp_path / "c_nan.png"), 500, 200)


def test_curves_close_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plot_curves(_rows(2), tmp_path / "a.png")
    plot_confusion(np.eye(2, dtype=int), ["a", "b"], tmp_path / "b.png")
    plot_prediction_grid([_photo(0)], ["x"], tmp_path / "c.png")
    plot_mistakes([], [], [], [], tmp_path / "d.png")
    assert len(plt.get_fignums()) == before


def test_confusion_two_classes(tmp_path):
    cm = confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2)
    out = plot_confusion(cm, ["apple", "banana"], tmp_path / "cm2.png")
    _check_png(out, 250, 250)


def test_confusion_with_normalized(tmp_path):
    r = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 2], ["a", "b", "c"])
    out = plot_confusion(
        r["confusion_matrix"], r["classes"], tmp_path / "cm3.png",
        normalized_matrix=r["confusion_matrix_normalized"], title="val set",
    )
    _check_png(out, 250, 250)


def test_confusion_fifteen_classes(tmp_path):
    k = 15
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, k, 600)
    y_pred = np.where(rng.random(600) < 0.7, y_true, rng.integers(0, k, 600))
    classes = [f"fruit_class_{i:02d}" for i in range(k)]
    r = classification_report(y_true, y_pred, classes)
    out = plot_confusion(
        r["confusion_matrix"], classes, tmp_path / "cm15.png",
        normalized_matrix=r["confusion_matrix_normalized"],
    )
    w, h = _check_png(out, 700, 700)
    w2, h2 = _check_png(plot_confusion(np.eye(2, dtype=int), ["a", "b"], tmp_path / "s.png"), 200, 200)
    assert w > w2 and h > h2  # figure scales with class count


def test_confusion_shape_mismatch(tmp_path):
    with pytest.raises(ValueError):
        plot_confusion(np.zeros((3, 3)), ["a", "b"], tmp_path / "x.png")


def test_grid_one_image(tmp_path):
    out = plot_prediction_grid([_photo(1)], ["strawberry 97.3%"], tmp_path / "g1.png")
    _check_png(out, 150, 150)


def test_grid_thirty_images_with_colors(tmp_path):
    imgs = [_photo(i, size=(1200, 900)) for i in range(30)]
    titles = [f"class{i % 5} {90 + i / 10:.1f}%" for i in range(30)]
    colors = ["green" if i % 3 else "red" for i in range(30)]
    out = plot_prediction_grid(imgs, titles, tmp_path / "g30.png", colors=colors)
    w, h = _check_png(out, 600, 600)
    # default ncols = min(6, ceil(sqrt(30))) = 6 -> 5 rows; the grid is wider than tall-ish
    assert w > h * 0.9


def test_grid_thumbnail_downscale():
    big = _photo(3, size=(2000, 1000))
    arr = plots._thumb(big)
    assert max(arr.shape[:2]) <= 256
    assert arr.shape[2] == 3
    gray = Image.new("L", (50, 40), 128)
    assert plots._thumb(gray).shape == (40, 50, 3)


def test_grid_explicit_ncols_and_mismatch(tmp_path):
    imgs = [_photo(i) for i in range(4)]
    w, h = _check_png(plot_prediction_grid(imgs, list("abcd"), tmp_path / "row.png", ncols=4))
    assert w > 2 * h  # one row of four
    with pytest.raises(ValueError):
        plot_prediction_grid(imgs, ["a"], tmp_path / "bad.png")


def test_mistakes_none(tmp_path):
    out = plot_mistakes([], [], [], [], tmp_path / "m0.png")
    _check_png(out, 100, 50)


def test_mistakes_five(tmp_path):
    imgs = [_photo(i) for i in range(5)]
    out = plot_mistakes(
        imgs,
        ["apple", "banana", "cherry", "apple", "kiwi"],
        ["banana", "apple", "apple", "kiwi", "cherry"],
        [0.93, 0.88, 0.75, 0.61, 0.52],
        tmp_path / "m5.png",
    )
    _check_png(out, 300, 200)


def test_mistakes_max_items(tmp_path):
    n = 40
    imgs = [_photo(i, size=(64, 64)) for i in range(n)]
    out = plot_mistakes(imgs, ["a"] * n, ["b"] * n, [0.9] * n, tmp_path / "mmax.png", max_items=8)
    _check_png(out)
    with pytest.raises(ValueError):
        plot_mistakes(imgs, ["a"], ["b"], [0.5], tmp_path / "bad.png")


# --- pictures you can act on: what is chosen, what is written under each photo -----------------


def _drawn_texts(monkeypatch) -> list:
    """Patches plots._save to record, for each figure saved, its texts and its image cells' frames."""
    saved, original = [], plots._save

    def record(fig, path, dpi=100):
        texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
        frames = [[(ax.axison and s.get_visible(), s.get_linewidth()) for s in ax.spines.values()]
                  for ax in fig.axes if ax.images]  # a spine is drawn only while the axis is on
        saved.append({"texts": texts, "frames": frames})
        return original(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", record)
    return saved


def _mistake(true, predicted, confidence, i):
    return {"true": true, "predicted": predicted, "confidence": confidence, "path": f"{true}/{true}_{i:04d}.jpg"}


def test_spread_mistakes_takes_turns_across_confusion_pairs_and_counts_them_all():
    # 280 confident cherry-called-tomato frames, 20 less confident tomato-called-cherry, 3 kiwi-called-apple
    mistakes = ([_mistake("cherry", "tomato", 0.99 - i / 10000, i) for i in range(280)]
                + [_mistake("tomato", "cherry", 0.90 - i / 1000, i) for i in range(20)]
                + [_mistake("kiwi", "apple", 0.60 - i / 100, i) for i in range(3)])
    shown, total = plots.spread_mistakes(mistakes[::-1], 24)  # the order given does not matter
    assert total == 303
    assert len(shown) == 24
    pairs = [(m["true"], m["predicted"]) for m in shown]
    # round-robin, the pairs ordered by their most confident mistake: each pair's best first
    assert pairs[:6] == [("cherry", "tomato"), ("tomato", "cherry"), ("kiwi", "apple")] * 2
    assert pairs.count(("kiwi", "apple")) == 3
    assert pairs.count(("cherry", "tomato")) == 11 and pairs.count(("tomato", "cherry")) == 10
    # within a pair, most confident first
    tomato_cherry = [m["confidence"] for m in shown if m["true"] == "tomato"]
    assert tomato_cherry == sorted(tomato_cherry, reverse=True) and tomato_cherry[0] == 0.90


def test_spread_mistakes_with_few_or_none():
    assert plots.spread_mistakes([], 24) == ([], 0)
    few = [_mistake("a", "b", 0.5, 0), _mistake("a", "b", 0.9, 1)]
    shown, total = plots.spread_mistakes(few, 24)
    assert total == 2 and [m["confidence"] for m in shown] == [0.9, 0.5]


def test_mistakes_gallery_says_how_many_of_all_and_names_every_file(tmp_path, monkeypatch):
    saved = _drawn_texts(monkeypatch)
    names = [f"photos/cherry/cherry_{i:04d}.jpg" for i in range(5)]
    out = plot_mistakes([_photo(i) for i in range(5)], ["cherry"] * 5, ["tomato"] * 5, [0.9] * 5,
                        tmp_path / "mistakes.png", names=names, total=303)
    _check_png(out, 300, 200)
    texts = saved[-1]["texts"]
    assert any("5 of 303 mistakes" in t for t in texts)
    for i in range(5):
        assert f"cherry_{i:04d}.jpg" in texts  # the file name (not its folders) under the photo
    assert all(visible and width > 0 for frame in saved[-1]["frames"] for visible, width in frame)


def test_prediction_caption_marks_low_confidence_near_ties_and_unknown():
    sure = {"label": "tomato", "probabilities": {"cherry": 0.02, "strawberry": 0.01, "tomato": 0.97}}
    text, color = plots.prediction_caption(sure)
    assert text == "tomato 97.0%" and color == plots.COLORS["sure"]

    tie = {"label": "strawberry", "probabilities": {"cherry": 0.481, "strawberry": 0.497, "tomato": 0.022}}
    text, color = plots.prediction_caption(tie)
    assert "strawberry 49.7%" in text and "low confidence" in text and "cherry 48.1%" in text
    assert color == plots.COLORS["low"] != plots.COLORS["sure"]

    near = {"label": "cherry", "probabilities": {"cherry": 0.68, "strawberry": 0.31, "tomato": 0.01}}
    assert "low confidence" not in plots.prediction_caption(near)[0]  # 0.68, 0.37 ahead: an answer
    close = {"label": "cherry", "probabilities": {"cherry": 0.62, "strawberry": 0.55, "tomato": 0.01}}
    assert "low confidence" in plots.prediction_caption(close)[0]  # above 0.6 but the top two within 0.1

    unknown = {"label": "unknown", "best_guess": "tomato", "in_distribution": 0.01,
               "probabilities": {"cherry": 0.2, "strawberry": 0.19, "tomato": 0.61}}
    text, color = plots.prediction_caption(unknown)
    assert text == "none of these\n(closest: tomato 61.0%)"
    assert color == plots.COLORS["unknown"] not in (plots.COLORS["sure"], plots.COLORS["low"])


def test_prediction_grid_frames_every_photo_and_names_its_file(tmp_path, monkeypatch):
    saved = _drawn_texts(monkeypatch)
    white = Image.new("RGB", (200, 150), "white")
    names = ["/data/photos/white_plate.jpg", "/data/photos/a_rather_long_file_name_from_a_phone_2024_0001.jpg"]
    _check_png(plot_prediction_grid([white, _photo(1)], ["tomato 97.0%", "cherry 51.0% ?\nlow confidence"],
                                    tmp_path / "grid.png", colors=["black", "darkorange"], names=names))
    texts, frames = saved[-1]["texts"], saved[-1]["frames"]
    assert "white_plate.jpg" in texts
    long_name = next(t for t in texts if t.startswith("a_rather_long"))
    assert long_name.endswith("0001.jpg") and len(long_name) <= 30  # shortened in the middle, suffix kept
    assert len(frames) == 2 and all(visible and width > 0 for frame in frames for visible, width in frame)
    with pytest.raises(ValueError):
        plot_prediction_grid([white], ["x"], tmp_path / "bad.png", names=["a.jpg", "b.jpg"])
