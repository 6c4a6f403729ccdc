"""Pictures: training curves, confusion heatmap, prediction grid, worst-mistakes gallery.

All functions write a PNG to ``path`` (parent folders are created), close their
figure and return the path as a :class:`pathlib.Path`. Uses the non-interactive
Agg backend, so it works on headless machines.
"""

from __future__ import annotations

import functools
import math
import warnings
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fruitnet.formats import is_low_confidence  # noqa: E402

__all__ = ["plot_curves", "plot_confusion", "plot_prediction_grid", "plot_mistakes", "plot_reliability",
           "prediction_caption", "spread_mistakes"]

THUMB_PX = 256
MAX_COLS = 6
MAX_LABEL = 40  # characters of a class name on the confusion matrix's axes
FRAME = "0.55"  # the thin grey frame around every cell: white photos stay visible on the white page
COLORS = {"sure": "black", "low": "darkorange", "unknown": "tab:purple", "mistake": "red"}
CAPTION_LEGEND = [("answer", COLORS["sure"]), ("low confidence ?", COLORS["low"]),
                  ("none of these (unknown)", COLORS["unknown"])]  # prediction_caption's colours


def _literal(plot):
    """Every text drawn as written: matplotlib reads '$...$' as mathtext, so a class or file name
    such as 'tomato $2_$3' would be typeset, or crash the plot when it is not valid TeX.  A
    character the font lacks (an emoji) is drawn as a box, without a warning per character."""
    @functools.wraps(plot)
    def draw(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}), warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Glyph \d+ .* missing from font")
            return plot(*args, **kwargs)
    return draw


def _save(fig: Any, path: str | PathLike[str], dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _num(v: Any) -> float:
    """Convert a possibly-missing value to float (None / bad -> NaN)."""
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------- curves


@_literal
def plot_curves(rows: list[dict], path: str | PathLike[str], note: str = "", x: str = "epoch") -> Path:
    """Loss and accuracy per epoch (or per `x`, e.g. the probe's L-BFGS iteration), train and
    val, in two side-by-side panels.

    The accuracy axis zooms to the data (0.97 vs 1.00 must be visible); `note` goes under the
    title (e.g. that the training loss includes label smoothing)."""
    rows = list(rows)
    epochs = np.array(
        [_num(r.get(x, i + 1)) for i, r in enumerate(rows)], dtype=np.float64
    )
    series = {
        k: np.array([_num(r.get(k)) for r in rows], dtype=np.float64)
        for k in ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
    }

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    # markers make single points (1 epoch) visible
    style = {"marker": "o", "markersize": 4, "linewidth": 1.8}
    for ax, kind in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
            y = series[f"{split}_{kind}"]
            ok = np.isfinite(y) & np.isfinite(epochs)
            if ok.any():
                ax.plot(epochs[ok], y[ok], color=color, label=split, **style)
        ax.set_xlabel(x)
        ax.set_ylabel(kind)
        ax.set_title(kind)
        ax.grid(True, alpha=0.35)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
        finite_ep = epochs[np.isfinite(epochs)]
        if finite_ep.size:
            lo, hi = finite_ep.min(), finite_ep.max()
            if lo == hi:
                ax.set_xlim(lo - 1, hi + 1)
            if np.allclose(finite_ep, np.round(finite_ep)):
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    accs = np.concatenate([series["train_accuracy"], series["val_accuracy"]])
    accs = accs[np.isfinite(accs)]
    if accs.size:
        lo, hi = float(accs.min()), float(accs.max())
        pad = max(0.01, 0.08 * (hi - lo))
        ax_acc.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi + pad < 1.0 else 1.0 + pad / 4)
    losses = np.concatenate([series["train_loss"], series["val_loss"]])
    losses = losses[np.isfinite(losses)]
    if losses.size and losses.min() >= 0:
        ax_loss.set_ylim(bottom=0.0, top=max(float(losses.max()) * 1.08, 1e-3))

    title = _curves_title(rows, series["val_accuracy"], epochs, x, ax_acc)
    fig.suptitle(title + (f"\n{note}" if note else ""))
    fig.tight_layout()
    return _save(fig, path)


def _curves_title(rows: list[dict], val_acc: np.ndarray, epochs: np.ndarray, x: str, ax_acc) -> str:
    """The best validation accuracy and where it was (marked on the accuracy panel), or, for a
    single fit, the last one."""
    if x != "epoch" and np.isfinite(val_acc).any():  # a single fit: the model kept is the last one
        return f"val accuracy {val_acc[np.isfinite(val_acc)][-1] * 100:.2f}% after {len(rows)} {x}s"
    if np.isfinite(val_acc).any():
        best = int(np.nanargmax(np.where(np.isfinite(val_acc), val_acc, -np.inf)))
        ep = epochs[best]
        ep_txt = f"{int(ep)}" if np.isfinite(ep) and ep == round(ep) else f"{ep:g}"
        ax_acc.axvline(ep, color="tab:orange", linestyle=":", alpha=0.7)
        return f"best val accuracy {val_acc[best] * 100:.2f}% at {x} {ep_txt}"
    return f"no {x}s recorded" if not rows else "no validation data"


# --------------------------------------------------------------------------- confusion


@_literal
def plot_confusion(
    matrix: Any,
    classes: Sequence[str],
    path: str | PathLike[str],
    normalized_matrix: Any = None,
    title: str = "Confusion matrix",
) -> Path:
    """Heatmap of a confusion matrix (rows = true, columns = predicted), cells annotated.

    Colour follows the row-normalised matrix (so rare classes are as visible as
    common ones); each cell shows its count and, if ``normalized_matrix`` is
    given, the row percentage.
    """
    m = np.asarray(matrix, dtype=np.float64)
    classes = [_elide(str(c), MAX_LABEL) for c in classes]  # a class name may be 255 characters
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"matrix shape {m.shape} does not match {k} classes")
    if normalized_matrix is not None:
        norm = np.asarray(normalized_matrix, dtype=np.float64)
        if norm.shape != (k, k):
            raise ValueError(f"normalized_matrix shape {norm.shape} does not match {k} classes")
        shade = np.nan_to_num(norm)
    else:
        norm = None
        rs = m.sum(axis=1, keepdims=True)
        shade = np.divide(m, rs, out=np.zeros_like(m), where=rs != 0)

    # size: ~0.75 in per cell for few classes, shrinking to ~0.55 in for many
    cell_in = 0.8 if k <= 6 else (0.65 if k <= 12 else 0.55)
    longest = max((len(c) for c in classes), default=1)
    label_in = min(2.5, 0.09 * longest + 0.4)
    side = max(4.0, k * cell_in + label_in + 1.2)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    cmap = plt.get_cmap("Blues")
    im = ax.imshow(shade, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of true class")

    tick_fs = 11 if k <= 6 else (9 if k <= 12 else 8)
    cell_fs = 12 if k <= 4 else (10 if k <= 8 else (8 if k <= 14 else 7))
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, fontsize=tick_fs, rotation=45 if (k > 4 or longest > 8) else 0,
                       ha="right" if (k > 4 or longest > 8) else "center",
                       rotation_mode="anchor")
    ax.set_yticklabels(classes, fontsize=tick_fs)
    ax.set_xlabel("predicted", fontsize=tick_fs + 1)
    ax.set_ylabel("true", fontsize=tick_fs + 1)
    ax.set_title(title, fontsize=tick_fs + 3)
    # thin white grid between cells
    ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)

    _annotate_cells(ax, m, norm, shade, cmap, cell_fs)
    fig.tight_layout()
    return _save(fig, path)


def _annotate_cells(ax, m: np.ndarray, norm: np.ndarray | None, shade: np.ndarray, cmap, fontsize: int) -> None:
    """Each cell's count (and row percentage), white on dark cells and black on light ones."""
    k = len(m)
    for i in range(k):
        for j in range(k):
            count = m[i, j]
            count_txt = f"{int(count)}" if count == round(count) else f"{count:.2g}"
            txt = count_txt
            if norm is not None and count != 0:
                txt = f"{count_txt}\n{norm[i, j] * 100:.0f}%" if k > 8 else f"{count_txt}\n{norm[i, j] * 100:.1f}%"
            r, g, b, _ = cmap(float(np.clip(shade[i, j], 0, 1)))
            luminance = 0.299 * r + 0.587 * g + 0.114 * b
            ax.text(j, i, txt, ha="center", va="center", color="white" if luminance < 0.5 else "black",
                    fontsize=fontsize, linespacing=1.1)


# --------------------------------------------------------------------------- image grids


def _thumb(img: Any, max_px: int = THUMB_PX) -> np.ndarray:
    """Downscale a PIL image (or array) to <= max_px on its long side, as an RGB array."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img))
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if max(img.size) > max_px:
        img = img.copy()
        img.thumbnail((max_px, max_px), Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return arr


def _short_name(name: str, max_chars: int = 30) -> str:
    """A file name that fits under its tile: the middle elided, the start and the suffix kept."""
    return _elide(Path(str(name)).name, max_chars)


def _elide(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    keep = max_chars - 1
    return text[: keep - keep // 3] + "…" + text[-(keep // 3):]


def _grid(
    images: Sequence[Any],
    titles: Sequence[str],
    path: str | PathLike[str],
    ncols: int | None,
    colors: Sequence[str] | None,
    suptitle: str | None = None,
    names: Sequence[str] | None = None,
    legend: Sequence[tuple[str, str]] | None = None,
) -> Path:
    """Photos in a grid: each in a thin frame, its title above (in its colour), its file name below;
    legend: (words, colour) pairs saying what the title colours mean, under the suptitle."""
    n = len(images)
    if ncols is None:
        ncols = min(MAX_COLS, max(1, math.ceil(math.sqrt(n))))
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    thumbs = [_thumb(im) for im in images]
    # tile height follows the typical aspect ratio so landscape photos leave no big gaps
    aspect = float(np.clip(np.median([t.shape[0] / max(1, t.shape[1]) for t in thumbs]), 0.5, 1.5))
    tile_in = 3.0 if n <= 4 else (2.5 if n <= 16 else 2.2)
    fontsize = 11 if n <= 4 else (9 if n <= 16 else 8)
    n_lines = max(str(t).count("\n") + 1 for t in titles) if len(titles) else 1
    title_in = 0.12 + 0.2 * n_lines * fontsize / 10 + (0.2 * fontsize / 10 if names else 0)
    fig, axes = plt.subplots(
        nrows, ncols,
        figsize=(ncols * tile_in, nrows * (tile_in * aspect + title_in) + (0.4 if suptitle else 0)),
        squeeze=False,
    )
    for idx, ax in enumerate(axes.flat):
        if idx >= n:
            ax.axis("off")
            continue
        ax.imshow(thumbs[idx])
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(FRAME)
            spine.set_linewidth(0.8)
        color = colors[idx] if colors is not None and idx < len(colors) and colors[idx] else "black"
        ax.set_title(str(titles[idx]) if idx < len(titles) else "", fontsize=fontsize, color=color)
        if names is not None:
            ax.set_xlabel(_short_name(names[idx]), fontsize=fontsize - 1, color="0.3")
    if suptitle:
        fig.suptitle(suptitle, fontsize=fontsize + 3)
    fig.tight_layout()
    if legend:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, marker="s", linestyle="", markersize=9, label=t) for t, c in legend]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=fontsize + 1,
                   labelcolor=[c for _, c in legend], bbox_to_anchor=(0.5, 1.0 if not suptitle else 0.985))
    return _save(fig, path)


def _message_png(text: str, path: str | PathLike[str]) -> Path:
    fig = plt.figure(figsize=(4, 1.5))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=100)  # no bbox tight: keep the full canvas
    finally:
        plt.close(fig)
    return path


def prediction_caption(result: dict) -> tuple[str, str]:
    """The grid's title for one prediction and its colour: 'tomato 97.1%' (black); a top probability
    under formats.LOW_CONFIDENCE or the top two within formats.NEAR_TIE: 'strawberry 49.7% ?' over 'low confidence
    (cherry 48.1%)' (orange); an unknown verdict: 'none of these' over '(closest: tomato 61.0%)' (purple)."""
    probs = result["probabilities"]
    best = result.get("best_guess", result["label"])
    if result["label"] == "unknown":  # predictors.UNKNOWN (not imported: plots stays free of torch)
        return f"none of these\n(closest: {best} {probs[best]:.1%})", COLORS["unknown"]
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    second, p2 = ranked[1] if len(ranked) > 1 else ("", 0.0)
    if is_low_confidence(result):
        return f"{best} {probs[best]:.1%} ?\nlow confidence ({second} {p2:.1%})", COLORS["low"]
    return f"{best} {probs[best]:.1%}", COLORS["sure"]


@_literal
def plot_prediction_grid(
    images: list[Image.Image],
    titles: list[str],
    path: str | PathLike[str],
    ncols: int | None = None,
    colors: list[str] | None = None,
    names: list[str] | None = None,
    suptitle: str | None = None,
    legend: list[tuple[str, str]] | None = None,
) -> Path:
    """Grid of photos, each titled (e.g. "strawberry 97.3%", see prediction_caption), optional
    per-title colours and file names (written under each photo), a title over the grid and a
    legend of the colours."""
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    if colors is not None and len(colors) != len(images):
        raise ValueError(f"{len(images)} images but {len(colors)} colors")
    if names is not None and len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    if not images:
        return _message_png("No images", path)
    return _grid(images, titles, path, ncols, colors, suptitle=suptitle, names=names, legend=legend)


def spread_mistakes(mistakes: Sequence[dict], max_items: int = 24) -> tuple[list[dict], int]:
    """Which mistakes to show, and how many there are: round-robin over the (true, predicted) pairs,
    each pair's mistakes most confident first, the pairs ordered by their most confident mistake.
    So one confusion with 200 near-identical frames cannot crowd out every other confusion.
    Each mistake is a dict with at least "true", "predicted" and "confidence"."""
    pairs: dict[tuple[str, str], list[dict]] = {}
    for m in sorted(mistakes, key=lambda m: -float(m["confidence"])):
        pairs.setdefault((m["true"], m["predicted"]), []).append(m)
    queues = list(pairs.values())  # dicts keep insertion order: by each pair's most confident mistake
    chosen: list[dict] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        chosen += [q[depth] for q in queues if depth < len(q)]
        if len(chosen) >= max_items:
            break
    return chosen[: max(0, int(max_items))], len(mistakes)


@_literal
def plot_mistakes(
    images: list[Image.Image],
    true_labels: list[str],
    pred_labels: list[str],
    confidences: list[float],
    path: str | PathLike[str],
    max_items: int = 24,
    names: list[str] | None = None,
    total: int | None = None,
) -> Path:
    """Gallery of wrong predictions (the caller chooses them, e.g. with spread_mistakes), each
    titled true / predicted (confidence) with its file name beneath; the title says how many of
    `total` mistakes are shown (default: as many as given).

    Confidences may be fractions (0..1) or percentages (>1). With no mistakes a
    small PNG saying "No mistakes" is written.
    """
    n = len(images)
    if not (len(true_labels) == len(pred_labels) == len(confidences) == n):
        raise ValueError("images, true_labels, pred_labels and confidences must have equal length")
    if names is not None and len(names) != n:
        raise ValueError(f"{n} images but {len(names)} names")
    total = n if total is None else int(total)
    n = min(n, max(0, int(max_items)))
    if n == 0:
        return _message_png("No mistakes", path)
    titles = []
    for t, p, c in zip(true_labels[:n], pred_labels[:n], confidences[:n]):
        c = float(c)
        pct = c * 100 if c <= 1.0 else c
        title = f"true: {t} / pred: {p} ({pct:.0f}%)"
        if len(title) > 30:  # keep long titles inside their tile
            title = f"true: {t} /\npred: {p} ({pct:.0f}%)"
        titles.append(title)
    return _grid(
        images[:n], titles, path, None, [COLORS["mistake"]] * n,
        suptitle=f"{n} of {total} mistakes (most confident first, spread across confusion pairs)",
        names=None if names is None else names[:n],
    )


# --------------------------------------------------------------------------- calibration


@_literal
def plot_reliability(
    before: list[dict],
    after: list[dict],
    path: str | PathLike[str],
    ece_before: float,
    ece_after: float,
    temperature: float,
) -> Path:
    """Reliability diagram: accuracy against confidence per bin (calibration.reliability rows),
    before and after temperature scaling, with the share of photos per bin beneath."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    width = before[0]["hi"] - before[0]["lo"] if before else 1 / 15
    total = max(1, sum(r["n"] for r in after))
    for rows, name, color, ece, shift in ((before, "before", "tab:grey", ece_before, -0.2),
                                          (after, f"after (T = {temperature:.3g})", "tab:blue", ece_after, 0.2)):
        full = [r for r in rows if r["n"]]
        ax.plot([r["confidence"] for r in full], [r["accuracy"] for r in full], marker="o", color=color,
                label=f"{name}: ECE {ece:.3f}")
        ax_n.bar([(r["lo"] + r["hi"]) / 2 + shift * width for r in rows], [r["n"] / total for r in rows],
                 width=width * 0.4, color=color)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.35)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title("Reliability (15 bins): is a 90% answer right 90% of the time?", fontsize=10)
    ax_n.set_xlabel("confidence (probability of the predicted class)")
    ax_n.set_ylabel("share of photos")
    ax_n.grid(True, alpha=0.35)
    fig.tight_layout()
    return _save(fig, path)
