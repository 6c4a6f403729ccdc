"""Output formats, by name; the command line is generated from these registries (docs/extending.md
shows how to add one):

- WRITERS: predict's files, `fruitnet predict MODEL PATH... --NAME FILE` for every entry.  A
  writer takes the results (predictors.Predictor.predict_paths: one dict per photo, or {path,
  error}), the model's classes, the file to write, and the heat-map overlays of --explain
  ({path: image}, empty without it), and writes that one file;
- EXPORTERS: export's formats, `fruitnet export MODEL --format NAME`.  An exporter is named by
  its module and function (imported when used: the registry is read by --help, which must not
  wait for torch) and called as fn(model_path, out, options, check=..., int8=...).
"""

from __future__ import annotations

import csv
from collections import defaultdict
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fruitnet.outputs import spreadsheet_row

GRID_LIMIT = 64  # photos drawn in one grid
LOW_CONFIDENCE = 0.6  # a top probability below this, or
NEAR_TIE = 0.1  # the top two closer than this, is marked "low confidence"
MANY_UNKNOWN = 0.2  # above this share of "unknown" answers (or of mistakes), the summary says what to do
UNKNOWN = "unknown"  # dataset.UNKNOWN, the answer for a photo of none of the classes


@dataclass(frozen=True)
class Writer:
    write: Callable[[list[dict], list[str], Path, dict], None]
    metavar: str
    help: str


def write_csv(results: list[dict], classes: list[str], path: Path, overlays: dict) -> None:
    """One row per path: label, best guess, in_distribution, error, warning, the probabilities."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(spreadsheet_row(["path", "label", "best_guess", "in_distribution", "error", "warning"]
                                   + classes))
        for r in results:
            probs = r.get("probabilities", {})
            w.writerow(spreadsheet_row([r["path"], r.get("label", ""), r.get("best_guess", r.get("label", "")),
                                        r.get("in_distribution", ""), r.get("error", ""), r.get("warning", "")]
                                       + [probs.get(c, "") for c in classes]))


def spread_over_folders(results: list[dict], limit: int) -> list[dict]:
    """At most `limit` results, shared out evenly among the folders they come from and evenly
    spaced within each, in path order: a folder of 1,257 photos sorted by class does not draw as
    64 cherries."""
    folders: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        folders[str(Path(r["path"]).parent)].append(r)
    share = dict.fromkeys(folders, 0)
    left = min(limit, len(results))
    while left:  # round-robin over the folders that still have photos
        for name, items in folders.items():
            if left and share[name] < len(items):
                share[name] += 1
                left -= 1
    chosen = [items[i * len(items) // share[name]] for name, items in folders.items() for i in range(share[name])]
    return sorted(chosen, key=lambda r: r["path"])


def write_grid(results: list[dict], classes: list[str], path: Path, overlays: dict) -> None:
    """The photos (up to GRID_LIMIT, spread over their folders), each titled with its answer."""
    from fruitnet.images import load_image
    from fruitnet.plots import CAPTION_LEGEND, plot_prediction_grid, prediction_caption

    good = [r for r in results if "error" not in r]
    shown = spread_over_folders(good, GRID_LIMIT)
    captions = [prediction_caption(r) for r in shown]
    plot_prediction_grid([overlays[r["path"]] if r["path"] in overlays else load_image(r["path"]) for r in shown],
                         [text for text, _ in captions], path, colors=[color for _, color in captions],
                         names=[r["path"] for r in shown], suptitle=f"{len(shown):,} of {len(good):,} photos shown",
                         legend=CAPTION_LEGEND)


WRITERS: dict[str, Writer] = {
    "csv": Writer(write_csv, "FILE", "also write the predictions as CSV"),
    "grid": Writer(write_grid, "FILE.png",
                   f"draw the photos (up to {GRID_LIMIT}, spread over their folders), each titled with its answer and "
                   "confidence and its file name beneath; low-confidence answers in orange with a '?', 'none of "
                   "these (closest: ...)' in purple (with --explain: the heat maps)"),
}
for _name, _writer in WRITERS.items():  # what predict checks for every writer (outputs.check_outputs)
    WRITERS[_name] = Writer(_writer.write, _writer.metavar, _writer.help + f"; replaces an existing {_writer.metavar}, "
                            "never a photo, the model or a file inside a PATH folder")


@dataclass(frozen=True)
class Exporter:
    module: str
    function: str
    help: str

    def load(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.function)


EXPORTERS: dict[str, Exporter] = {
    "onnx": Exporter("fruitnet.export", "export_onnx", "ONNX, carrying the classes and preprocessing, checked against "
                                                       "PyTorch on real photos"),
}


def is_low_confidence(result: dict) -> bool:
    """An answer whose top probability is under LOW_CONFIDENCE, or within NEAR_TIE of the second."""
    top = sorted(result["probabilities"].values(), reverse=True) + [0.0]
    return top[0] < LOW_CONFIDENCE or top[0] - top[1] < NEAR_TIE


def answer_summary(results: list[dict]) -> list[str]:
    """One line on the answers (answered, unknown, low confidence), and one per folder when the
    photos come from several (the classes of a labelled tree)."""
    good = [r for r in results if "error" not in r]
    folders: dict[str, list[dict]] = defaultdict(list)
    for r in good:
        folders[Path(r["path"]).parent.name].append(r)
    lines = [_summary(f"{len(good):,} photo(s)", good)]
    if len(folders) > 1:
        lines += [_summary(f"  {name}/: {len(rs):,}", rs) for name, rs in sorted(folders.items())]
    return lines


def _summary(what: str, results: list[dict]) -> str:
    unknown = sum(r["label"] == UNKNOWN for r in results)
    low = sum(r["label"] != UNKNOWN and is_low_confidence(r) for r in results)
    share = lambda k: f"{k / max(1, len(results)):.0%}"  # noqa: E731
    return (f"{what}: {len(results) - unknown:,} answered ({share(len(results) - unknown)}), {unknown:,} unknown "
            f"({share(unknown)}), {low:,} answered with low confidence")


def unknown_share(results: list[dict]) -> float:
    good = [r for r in results if "error" not in r]
    return sum(r["label"] == UNKNOWN for r in good) / max(1, len(good))


def advice(model: str, paths: list[str], unknown: float, wrong: float | None = None) -> str | None:
    """What to do when many answers are "unknown" (or, with labels, wrong): teach the model these
    photos, or train again with photos like them."""
    if unknown <= MANY_UNKNOWN and (wrong is None or wrong <= MANY_UNKNOWN):
        return None
    why = f"{unknown:.0%} of the answers are 'unknown'" if unknown > MANY_UNKNOWN else f"{wrong:.0%} are wrong"
    return (f"{why}: these photos are unlike the ones the model learnt from. Teach it a few of them in a local page, "
            f"in minutes: fruitnet teach {model} {' '.join(map(str, paths))} (docs/usage.md#teach), or add photos "
            "like these to the training data and train again: fruitnet train DATA NEW/")
