"""The training loop and its recipes.

Read top to bottom: resolve the config, scan and split the data, build the classifier, then
one plain loop of epochs.  In --mode freeze the backbone never changes, so its features are
computed once and the head trains on them (epochs then take milliseconds); --no-feature-cache
keeps the per-epoch image path for comparison.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from fruitnet import __version__
from fruitnet.backbones import get_backbone
from fruitnet.dataset import (DataError, ImageDataset, Item, format_report, read_split, scan, split,
                              write_report, write_split)
from fruitnet.model import Classifier, create_classifier, save_model
from fruitnet.transforms import eval_transform, train_transform

RECIPES = {
    # The original project, exactly: plain SGD, constant learning rate, no augmentation.
    "seed": {"optimizer": "sgd", "momentum": 0.0, "schedule": "constant", "label_smoothing": 0.0,
             "augment": "none"},
}
METRIC_COLUMNS = ["epoch", "seconds", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]


@dataclass
class TrainConfig:
    data: str
    val_dir: str | None = None
    out: str | None = None
    backbone: str = "resnet18"
    weights: str = "imagenet"
    mode: str = "unfreeze"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.001
    weight_decay: float = 0.01
    val_fraction: float = 0.25
    seed: int = 0
    recipe: str = "seed"
    feature_cache: bool = True
    workers: int = 2
    device: str = "auto"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "fruitnet": __version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def new_run_folder(out: str | None) -> Path:
    """Never reuse a folder that already holds something."""
    if out is None:
        base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    else:
        path = Path(out)
        if path.exists() and any(path.iterdir()):
            raise DataError(f"{path}: run folder already exists and is not empty; choose another --out "
                            "(or --resume it)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _loader(items: list[Item], classes, transform, batch_size, shuffle, workers, seed) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ImageDataset(items, classes, transform), batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers, generator=g, persistent_workers=workers > 0)


@torch.no_grad()
def extract_features(body: nn.Module, loader: DataLoader, device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    body.eval()
    feats, targets = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        feats.append(body(x.to(device)).float().cpu())
        targets.append(y)
    return torch.cat(feats), torch.cat(targets)


def run_epoch(net: nn.Module, loader: DataLoader, device, optimizer=None, loss_fn=None, desc="") -> tuple[float, float]:
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy)."""
    training = optimizer is not None
    net.train(training)
    total_loss, correct, n = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=len(loader) < 2)
    with torch.set_grad_enabled(training):
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)
            loss = loss_fn(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
    return total_loss / max(n, 1), correct / max(n, 1)


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def train(config: TrainConfig, resume: str | None = None, log=print) -> dict:
    """Train as configured; returns the summary (also written to summary.json)."""
    if resume:
        run = Path(resume)
        if not (run / "checkpoint.pt").is_file():
            raise DataError(f"{run}: no checkpoint.pt to resume from")
        saved = _load_json(run / "config.json")["train"]
        saved["epochs"] = config.epochs if config.epochs != saved["epochs"] else saved["epochs"]
        config = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
    if config.recipe not in RECIPES:
        raise DataError(f"unknown recipe {config.recipe!r}; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[config.recipe]
    device = _device(config.device)
    torch.manual_seed(config.seed)
    backbone = get_backbone(config.backbone)
    pre = backbone.preprocessing

    # --- data --------------------------------------------------------------------------------
    if resume:
        classes = _load_json(run / "config.json")["classes"]
        train_items, val_items = read_split(run / "split.csv")
    else:
        catalog = scan(config.data)
        classes = catalog.classes
        report = catalog.report()
        log(format_report(report))
        if config.val_dir:
            val_catalog = scan(config.val_dir)
            if val_catalog.classes != classes:
                raise DataError(f"{config.val_dir}: classes {val_catalog.classes} differ from {config.data}'s {classes}")
            train_items, val_items = catalog.usable, val_catalog.usable
            report["validation"] = val_catalog.report()
        else:
            train_items, val_items = split(catalog, config.val_fraction, config.seed)
    log(f"split: {len(train_items)} train, {len(val_items)} validation")

    # --- model (weights resolved before the run folder exists: a missing file stops early) ---
    model, weights_source = create_classifier(config.backbone, len(classes), config.weights)
    model.set_mode(config.mode)
    model.to(device)
    run = run if resume else new_run_folder(config.out)
    if not resume:
        write_report(report, run)
        write_split(run / "split.csv", train_items, val_items)
        (run / "config.json").write_text(json.dumps({
            "train": asdict(config), "recipe": recipe, "classes": classes, "preprocessing": pre,
            "weights_source": weights_source, "device": str(device), "machine": machine_info(),
            "command": sys.argv, "started": datetime.now().isoformat(timespec="seconds")}, indent=2))

    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=config.lr, momentum=recipe["momentum"],
                                weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    start_epoch, best, rows, elapsed = 1, {"val_accuracy": -1.0, "epoch": 0}, [], 0.0
    if resume:
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, rows, elapsed = state["epoch"] + 1, state["best"], state["rows"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        log(f"resuming {run} at epoch {start_epoch}")

    # --- data pipeline: cached features (frozen) or images --------------------------------
    t0 = time.perf_counter()
    workers = config.workers
    train_tf = train_transform(pre, recipe["augment"])
    val_loader = _loader(val_items, classes, eval_transform(pre), config.batch_size, False, workers, config.seed)
    train_loader = _loader(train_items, classes, train_tf, config.batch_size, True, workers, config.seed)
    net: nn.Module = model
    if config.mode == "freeze" and config.feature_cache and recipe["augment"] == "none":
        ftrain = extract_features(model.body, train_loader, device, "features (train)")
        fval = extract_features(model.body, val_loader, device, "features (val)")
        g = torch.Generator().manual_seed(config.seed)
        train_loader = DataLoader(TensorDataset(*ftrain), batch_size=config.batch_size, shuffle=True, generator=g)
        val_loader = DataLoader(TensorDataset(*fval), batch_size=256)
        net = model.head
        log(f"feature pass: {time.perf_counter() - t0:.1f}s (the frozen backbone runs once, not every epoch)")
    setup_seconds = time.perf_counter() - t0

    metrics_path = run / "metrics.csv"
    if not metrics_path.exists():
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(METRIC_COLUMNS)
    meta = {"classes": classes, "backbone": config.backbone, "preprocessing": pre}
    log(f"training {config.backbone} ({config.mode}, recipe {config.recipe}) on {device} for {config.epochs} epochs")
    log(f"{'epoch':>5} {'seconds':>8} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8}")
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            t = time.perf_counter()
            train_loss, train_acc = run_epoch(net, train_loader, device, optimizer, loss_fn,
                                              desc=f"epoch {epoch}/{config.epochs}")
            val_loss, val_acc = run_epoch(net, val_loader, device, loss_fn=loss_fn, desc="validating")
            seconds = time.perf_counter() - t + (setup_seconds if epoch == start_epoch else 0.0)
            elapsed += seconds
            row = {"epoch": epoch, "seconds": round(seconds, 3), "train_loss": train_loss,
                   "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
                   "lr": optimizer.param_groups[0]["lr"]}
            rows.append(row)
            with open(metrics_path, "a", newline="") as f:
                csv.writer(f).writerow([row[c] for c in METRIC_COLUMNS])
            log(f"{epoch:>5} {seconds:>8.1f} {train_loss:>10.4f} {train_acc:>9.4f} {val_loss:>9.4f} {val_acc:>8.4f}")
            summary = {"epoch": epoch, "val_accuracy": val_acc}
            save_model(run / "last.safetensors", model, {**meta, "training": summary})
            if val_acc > best["val_accuracy"]:
                best = {"val_accuracy": val_acc, "epoch": epoch}
                save_model(run / "best.safetensors", model, {**meta, "training": summary})
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "best": best, "rows": rows, "elapsed": elapsed, "rng": torch.get_rng_state()},
                       run / "checkpoint.pt.tmp")
            os.replace(run / "checkpoint.pt.tmp", run / "checkpoint.pt")
    except KeyboardInterrupt:
        log(f"\ninterrupted: the last finished epoch is saved; continue with: fruitnet train --resume {run}")
        raise

    from fruitnet.plots import plot_curves

    plot_curves(rows, run / "curves.png")
    summary = {"best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"], "epochs": len(rows),
               "seconds": round(elapsed, 2), "model": str(run / "best.safetensors"),
               "last_model": str(run / "last.safetensors"), "run": str(run)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"best validation accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}; {elapsed:.1f}s")
    log(f"outputs in {run}/: best.safetensors, last.safetensors, metrics.csv, curves.png, split.csv, "
        "data_report.txt, config.json, summary.json")
    return summary
