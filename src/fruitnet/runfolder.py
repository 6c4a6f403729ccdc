"""The run folder: every file a training run writes, in one class (under torchrun, rank 0's alone).

Order of writes at the end of an epoch, so that a kill at any moment leaves a consistent folder:
checkpoint.pt first (written to a temporary name, then renamed), then the metrics row, the model
files and curves.png.  `--resume` trusts the checkpoint and rewrites metrics.csv from it.

A folder with config.json but no checkpoint.pt (stopped before the first epoch ended) resumes
from epoch 1.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from fruitnet.dataset import RUN_MARKER, Item, read_split, write_report, write_split
from fruitnet.errors import UsageError
from fruitnet.model import save_model
from fruitnet.outputs import check_outputs

METRIC_COLUMNS = ["epoch", "seconds", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]


def new_output_folder(out: str | Path | None, prefix: str, inside: list[str | Path] = (),
                      kind: str = "output folder") -> Path:
    """Create `out` (new or empty, outside the `inside` folders: outputs.check_outputs), or
    runs/<prefix><timestamp>[-n] when None, with a marker file: should the folder ever be moved
    into a photo folder, scan skips it instead of reading its pictures as photos."""
    if out is None:
        base = Path("runs") / f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
    path = Path(out)
    check_outputs({"--out": path}, inputs=inside, folders={"--out"})
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text(json.dumps({"fruitnet": kind, "created": datetime.now().isoformat(timespec="seconds")}))
    return path


@dataclass
class SavedRun:
    """What --resume reads from a run folder."""

    path: Path
    config: dict  # config.json as written
    train_items: list[Item]
    val_items: list[Item]
    checkpoint: dict | None  # None: stopped before the first epoch ended


def read_run(path: Path) -> SavedRun:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a fruitnet run folder (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
        config["train"], config["classes"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(f"{path / 'config.json'}: unreadable ({exc.__class__.__name__}); "
                         "the run cannot be resumed") from None
    if not (path / "split.csv").is_file():
        raise UsageError(f"{path}: split.csv is missing; the run cannot be resumed")
    train_items, val_items = read_split(path / "split.csv")
    stray = next((it for it in train_items + val_items if it.label not in config["classes"]), None)
    if stray is not None:
        raise UsageError(f"{path / 'split.csv'}: {stray.path} is in class {stray.label!r}, which the run does not "
                         f"have ({', '.join(map(repr, config['classes']))}); the run cannot be resumed")
    checkpoint = None
    if (path / "checkpoint.pt").is_file():
        try:  # tensors and plain containers only: never code from the file
            checkpoint = torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"{path / 'checkpoint.pt'}: not a fruitnet checkpoint ({exc.__class__.__name__}); "
                             "the run cannot be resumed") from None
    return SavedRun(path, config, train_items, val_items, checkpoint)


class RunFolder:
    """Writes a run's files; a no-op where `active` is False (ranks other than 0)."""

    def __init__(self, path: Path, active: bool = True, tensorboard: bool = False):
        self.path, self.active = Path(path), active
        self.writer = None
        if active and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked to be installed by training

            self.writer = SummaryWriter(str(self.path / "tensorboard"))

    def start(self, config: dict, report: dict, train_items: list[Item], val_items: list[Item]) -> None:
        """config.json, split.csv, the data report and an empty metrics.csv."""
        if not self.active:
            return
        write_report(report, self.path)
        write_split(self.path / "split.csv", train_items, val_items)
        (self.path / "config.json").write_text(json.dumps(config, indent=2))
        self.write_metrics([])

    def write_metrics(self, rows: list[dict]) -> None:
        if not self.active:
            return
        with open(self.path / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(METRIC_COLUMNS)
            w.writerows([row[c] for c in METRIC_COLUMNS] for row in rows)

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / "checkpoint.pt").is_file()

    def end_epoch(self, checkpoint: dict, model, meta: dict, improved: bool, curves_note: str = "") -> None:
        """Checkpoint first (atomic), then the metrics row, the model files and curves.png."""
        if not self.active:
            return
        torch.save(checkpoint, self.path / "checkpoint.pt.tmp")
        os.replace(self.path / "checkpoint.pt.tmp", self.path / "checkpoint.pt")  # a kill mid-write keeps the old one
        rows = checkpoint["rows"]
        with open(self.path / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow([rows[-1][c] for c in METRIC_COLUMNS])
        save_model(self.path / "last.safetensors", model, meta)
        if improved:
            save_model(self.path / "best.safetensors", model, meta)
        from fruitnet.plots import plot_curves

        plot_curves(rows, self.path / "curves.png", note=curves_note)
        if self.writer is not None:
            row = rows[-1]
            for name, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"),
                              ("accuracy/train", "train_accuracy"), ("accuracy/val", "val_accuracy"),
                              ("lr", "lr")):
                self.writer.add_scalar(name, row[key], row["epoch"])
            self.writer.flush()

    def add_trust(self, best_epoch: int, last_epoch: int, recall: float, device, log=print, **data) -> None:
        """Fit calibration and the unknown verdict (ood.fit_model_files: data are its photos and
        features) into best.safetensors and last.safetensors."""
        if self.active:
            from fruitnet.ood import fit_model_files

            fit_model_files(self.path, best_epoch, last_epoch, recall=recall, device=device, log=log, **data)

    def finish(self, summary: dict, images: dict | None = None) -> None:
        """summary.json; in TensorBoard, the given end-of-run pictures ({tag: PNG path})."""
        if not self.active:
            return
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            for tag, png in (images or {}).items():
                self.writer.add_image(tag, np.asarray(Image.open(png).convert("RGB")), summary["epochs"],
                                      dataformats="HWC")
            self.writer.close()
