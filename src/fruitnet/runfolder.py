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
import platform
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from fruitnet import __version__
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


@contextmanager
def output_folder(out: str | Path | None, prefix: str, inside: list[str | Path] = (), kind: str = "output folder"):
    """new_output_folder for a job that may fail: if the block raises, the folder goes again (an
    empty folder given as --out is left empty), so the same command can simply be run again."""
    was_empty_folder = out is not None and Path(out).is_dir()
    path = new_output_folder(out, prefix, inside, kind)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        if was_empty_folder:
            path.mkdir()
        raise


@dataclass
class SavedRun:
    """What --resume reads from a run folder."""

    path: Path
    config: dict  # config.json as written
    train_items: list[Item]
    val_items: list[Item]
    checkpoint: dict | None  # None: stopped before the first epoch ended
    negatives: list[Item] = field(default_factory=list)  # photos of none of the classes (DATA/unknown/)


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
    train_items, val_items, negatives = read_split(path / "split.csv")
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
    return SavedRun(path, config, train_items, val_items, checkpoint, negatives)


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "fruitnet": __version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


class RunFolder:
    """Writes a run's files; a no-op where `active` is False (ranks other than 0)."""

    def __init__(self, path: Path, active: bool = True, tensorboard: bool = False):
        self.path, self.active = Path(path), active
        self.writer = None
        if active:
            # imported now, not at the first epoch's end: a Ctrl-C during matplotlib's first
            # import turns into an ImportError, and training should not meet that halfway
            import fruitnet.plots  # noqa: F401
        if active and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked to be installed by training

            self.writer = SummaryWriter(str(self.path / "tensorboard"))

    def start(self, config, recipe, data, details: dict) -> None:
        """config.json (the config, the recipe and how the run was set up: `details`), split.csv
        (training.Data's photos), the data report and an empty metrics.csv."""
        if not self.active:
            return
        from fruitnet.backbones import get_backbone
        from fruitnet.pipeline import use_image_cache

        pre = get_backbone(config.backbone).preprocessing
        record = {"train": asdict(config), "recipe": asdict(recipe), "classes": data.classes, "preprocessing": pre,
                  **details, "image_cache": use_image_cache(config, pre, len(data.train) + len(data.val)),
                  "machine": machine_info(),
                  "kept_together": None if config.val_dir else data.report.get("kept_together"),
                  "excluded": len(data.report.get("excluded", [])), "negatives": len(data.negatives),
                  "command": sys.argv, "started": datetime.now().isoformat(timespec="seconds")}
        write_report(data.report, self.path)
        write_split(self.path / "split.csv", data.train, data.val, data.negatives)
        (self.path / "config.json").write_text(json.dumps(record, indent=2))
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

    def end_epoch(self, checkpoint: dict, model, meta: dict, improved: bool) -> None:
        """Checkpoint first (atomic), then the metrics row, the model files and TensorBoard's scalars."""
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
        if self.writer is not None:
            row = rows[-1]
            for name, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"),
                              ("accuracy/train", "train_accuracy"), ("accuracy/val", "val_accuracy"),
                              ("lr", "lr")):
                self.writer.add_scalar(name, row[key], row["epoch"])
            self.writer.flush()

    def draw_curves(self, rows: list[dict], x: str = "epoch", note: str = "") -> None:
        """curves.png: loss and accuracy, train and validation, per `x` (epoch, or the probe's iteration)."""
        if self.active:
            from fruitnet.plots import plot_curves

            plot_curves(rows, self.path / "curves.png", note=note, x=x)

    def add_trust(self, best_epoch: int, last_epoch: int, recall: float, device, log=print, val_set=None,
                  mode: str = "unfreeze", train_set=None, train_features: torch.Tensor | None = None,
                  negatives: list[Item] = ()) -> dict | None:
        """Add calibration and the unknown verdict (unknown.fit_trust) to last.safetensors and best.safetensors.

        val_set (and train_set): the images as (tensor, class) pairs. The body's training mode picks
        the score (unknown.choose_score); the kNN bank comes from the training photos' features: the
        cached ones (train_features) or else extracted from the photos of train_set the bank keeps
        (unknown.bank_indices); negatives: photos of none of the classes the threshold is raised against.  Each file is fitted with its own weights, in
        fp32 (the arithmetic of the library default and of ONNX); when best is last, it is copied.
        Returns the last file's trust metadata."""
        if not self.active:
            return None
        from fruitnet.model import load_model
        from fruitnet.unknown import choose_score, fit_trust

        score = choose_score(mode)
        fitted, features, body = {}, None, None
        for name in ("last", "best"):
            path = self.path / f"{name}.safetensors"
            if name == "best" and best_epoch == last_epoch:
                shutil.copyfile(self.path / "last.safetensors", path)
                continue
            model, meta = load_model(path)
            model.to(device)
            if body is None or not all(torch.equal(a, b) for a, b in zip(body, model.body.state_dict().values())):
                # a frozen body is the same in both files: so are its features
                features = _trust_features(model, meta, name, val_set, train_set, negatives, score, device,
                                           train_features)
                body = list(model.body.state_dict().values())
            val_x, val_y, extra = features
            meta["trust"] = fitted[name] = fit_trust(model, val_x, val_y, recall=recall, score=score, **extra)
            save_model(path, model, meta)
        t = fitted["last"]
        against = (f"; raised against the {t['negatives']['n']} photos of none of the classes, "
                   f"{t['negatives']['rejected']:.1%} of them rejected" if "negatives" in t else "")
        log(f"calibration: temperature {t['temperature']:.3f} (the logits are divided by it so that an answer "
            "given with 90% is right about 90% of the time; fitted by likelihood on the validation photos, so their "
            f"own calibration error can move either way: ECE {t['val_calibration']['ece_before']:.3f} -> "
            f"{t['val_calibration']['ece_after']:.3f})")
        log(f"unknown verdict ({score} score) below in_distribution {t['threshold']:g} (keeps "
            f"{t['val_accepted']:.1%} of validation photos{against})")
        return t

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


def _trust_features(model, meta: dict, name: str, val_set, train_set, negatives: list[Item], score: str, device,
                    train_features: torch.Tensor | None) -> tuple:
    """What unknown.fit_trust reads, from this file's body in fp32: (validation features, their
    targets) and, as keywords, the training features (kNN score) and the negatives' features."""
    from torch.utils.data import Subset

    from fruitnet.features import from_dataset, from_files
    from fruitnet.unknown import bank_indices

    val = from_dataset(model.body, val_set, 64, device, desc=f"calibration: validation features ({name})",
                       shared=False).tensors
    if score == "knn" and train_features is None:  # only the photos the bank keeps
        keep = bank_indices(len(train_set)).tolist()
        train_features = from_dataset(model.body, Subset(train_set, keep), 64, device, shared=False,
                                      desc="unknown verdict: training features").tensors[0]
    rows, failed = from_files(model.body, [(it.path, it.sha256) for it in negatives], meta["preprocessing"], device,
                              desc="unknown verdict: photos of none of the classes")
    negative = torch.from_numpy(rows[[it.path not in failed for it in negatives]]) if len(negatives) else None
    return val[0], val[1], {"train_features": train_features, "negative_features": negative}
