"""The training loop and its recipes.

Read top to bottom: resolve the config, scan and split the data, build the classifier, then
one plain loop of epochs.  In --mode freeze the backbone never changes, so its features are
computed once and the head trains on them (epochs then take milliseconds); --no-feature-cache
keeps the per-epoch image path for comparison.

Under torchrun the same function trains data-parallel (DistributedDataParallel): see
distributed.py for the rules (rank 0 owns the run folder and the console; --batch-size is the
global batch; validation counts every image once).
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
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from fruitnet import __version__, distributed
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


def _loader(dataset: Dataset, batch_size, shuffle, workers, seed) -> DataLoader:
    """Under torchrun each rank reads its own shard (distributed.sampler)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=distributed.sampler(dataset, shuffle, seed, g),
                      num_workers=workers, generator=g, persistent_workers=workers > 0)


@torch.no_grad()
def extract_features(body: nn.Module, loader: DataLoader, device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    body.eval()
    feats, targets = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not distributed.is_main()):
        feats.append(body(x.to(device)).float().cpu())
        targets.append(y)
    if not feats:  # an empty shard (fewer images than ranks)
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(targets)


def run_epoch(net: nn.Module, loader: DataLoader, device, optimizer=None, loss_fn=None, desc="") -> tuple[float, float]:
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy) over all ranks."""
    training = optimizer is not None
    net.train(training)
    total_loss, correct, n = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=len(loader) < 2 or not distributed.is_main())
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
    total_loss, correct, n = distributed.sum_across(total_loss, correct, n)
    return total_loss / max(n, 1), correct / max(n, 1)


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _read_run(run: Path) -> dict:
    """What --resume needs from a run folder (under torchrun rank 0 reads it and broadcasts it)."""
    if not (run / "checkpoint.pt").is_file():
        raise DataError(f"{run}: no checkpoint.pt to resume from")
    saved = _load_json(run / "config.json")
    return {"train": saved["train"], "classes": saved["classes"], "split": read_split(run / "split.csv"),
            "state": torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)}


def _read_data(config: TrainConfig, log) -> tuple[list[str], dict, list[Item], list[Item]]:
    """Scan and split: (classes, data report, train items, validation items)."""
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
    return classes, report, train_items, val_items


def train(config: TrainConfig, resume: str | None = None, log=print) -> dict:
    """Train as configured; returns the summary (also written to summary.json)."""
    world = distributed.init(config.device)  # under torchrun: join the process group; else a world of one
    log = log if world.is_main else distributed.quiet
    if resume:
        run = Path(resume)
        saved_run = distributed.on_main(_read_run, run)
        saved = saved_run["train"]
        if config.epochs is not None:  # --epochs given: train up to it; otherwise the run's own count
            saved["epochs"] = config.epochs
        config = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
    if config.recipe not in RECIPES:
        raise DataError(f"unknown recipe {config.recipe!r}; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[config.recipe]
    device = world.device if world.distributed else _device(config.device)
    batch_size = world.per_rank_batch(config.batch_size)  # --batch-size is global; a plain run: itself
    torch.manual_seed(config.seed)
    backbone = get_backbone(config.backbone)
    pre = backbone.preprocessing

    # --- data (under torchrun rank 0 scans and splits, and every rank gets its lists) ----------
    if resume:
        classes, (train_items, val_items) = saved_run["classes"], saved_run["split"]
    else:
        classes, report, train_items, val_items = distributed.on_main(_read_data, config, log)
    log(f"split: {len(train_items)} train, {len(val_items)} validation")

    # --- model (weights resolved before the run folder exists: a missing file stops early) ---
    model, weights_source = create_classifier(config.backbone, len(classes), config.weights)
    model.set_mode(config.mode)
    model.to(device)

    def start_run() -> Path:
        run = new_run_folder(config.out)
        write_report(report, run)
        write_split(run / "split.csv", train_items, val_items)
        (run / "config.json").write_text(json.dumps({
            "train": asdict(config), "recipe": recipe, "classes": classes, "preprocessing": pre,
            "weights_source": weights_source, "device": str(device), "machine": machine_info(),
            "distributed": world.describe(config.batch_size),
            "command": sys.argv, "started": datetime.now().isoformat(timespec="seconds")}, indent=2))
        return run

    run = run if resume else distributed.on_main(start_run)  # only rank 0 creates and writes the folder

    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=config.lr, momentum=recipe["momentum"],
                                weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    start_epoch, best, rows, elapsed = 1, {"val_accuracy": -1.0, "epoch": 0}, [], 0.0
    if resume:
        state = saved_run["state"]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, rows, elapsed = state["epoch"] + 1, state["best"], state["rows"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        log(f"resuming {run} at epoch {start_epoch}")
    if world.distributed:
        log(f"data-parallel: {world.size} processes ({world.backend}), global batch {config.batch_size} = "
            f"{world.size} x {batch_size}")

    # --- data pipeline: cached features (frozen) or images --------------------------------
    t0 = time.perf_counter()
    workers = config.workers
    train_tf = train_transform(pre, recipe["augment"])
    val_loader = _loader(ImageDataset(val_items, classes, eval_transform(pre)), batch_size, False, workers, config.seed)
    train_loader = _loader(ImageDataset(train_items, classes, train_tf), batch_size, True, workers, config.seed)
    net: nn.Module = model
    if config.mode == "freeze" and config.feature_cache and recipe["augment"] == "none":
        # in dataset order; under torchrun each rank extracts its shard and all gather the whole set
        in_order = _loader(ImageDataset(train_items, classes, train_tf), batch_size, False, workers, config.seed)
        ftrain = distributed.gather_shards(*extract_features(model.body, in_order, device, "features (train)"))
        fval = distributed.gather_shards(*extract_features(model.body, val_loader, device, "features (val)"))
        train_loader = _loader(TensorDataset(*ftrain), batch_size, True, 0, config.seed)
        val_loader = _loader(TensorDataset(*fval), 256, False, 0, config.seed)
        net = model.head
        log(f"feature pass: {time.perf_counter() - t0:.1f}s (the frozen backbone runs once, not every epoch)")
    parallel_net = distributed.wrap(net)  # DistributedDataParallel under torchrun; else net itself
    setup_seconds = time.perf_counter() - t0

    metrics_path = run / "metrics.csv"
    if world.is_main:  # rewritten from the checkpoint: an epoch logged after the last checkpoint is redone once
        with open(metrics_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(METRIC_COLUMNS)
            w.writerows([row[c] for c in METRIC_COLUMNS] for row in rows)
    meta = {"classes": classes, "backbone": config.backbone, "preprocessing": pre}
    log(f"training {config.backbone} ({config.mode}, recipe {config.recipe}) on {device} for {config.epochs} epochs")
    log(f"{'epoch':>5} {'seconds':>8} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8}")
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            t = time.perf_counter()
            distributed.set_epoch(train_loader, epoch)
            train_loss, train_acc = run_epoch(parallel_net, train_loader, device, optimizer, loss_fn,
                                              desc=f"epoch {epoch}/{config.epochs}")
            distributed.sync_buffers(net)  # every rank validates exactly the model rank 0 saves
            val_loss, val_acc = run_epoch(net, val_loader, device, loss_fn=loss_fn, desc="validating")
            seconds = time.perf_counter() - t + (setup_seconds if epoch == start_epoch else 0.0)
            elapsed += seconds
            row = {"epoch": epoch, "seconds": round(seconds, 3), "train_loss": train_loss,
                   "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
                   "lr": optimizer.param_groups[0]["lr"]}
            rows.append(row)
            log(f"{epoch:>5} {seconds:>8.1f} {train_loss:>10.4f} {train_acc:>9.4f} {val_loss:>9.4f} {val_acc:>8.4f}")
            summary = {"epoch": epoch, "val_accuracy": val_acc}
            improved = val_acc > best["val_accuracy"]
            if improved:
                best = {"val_accuracy": val_acc, "epoch": epoch}
            if world.is_main:  # the run folder is rank 0's alone
                with open(metrics_path, "a", newline="") as f:
                    csv.writer(f).writerow([row[c] for c in METRIC_COLUMNS])
                save_model(run / "last.safetensors", model, {**meta, "training": summary})
                if improved:
                    save_model(run / "best.safetensors", model, {**meta, "training": summary})
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "best": best, "rows": rows, "elapsed": elapsed, "rng": torch.get_rng_state()},
                           run / "checkpoint.pt.tmp")
                os.replace(run / "checkpoint.pt.tmp", run / "checkpoint.pt")  # a kill mid-write leaves the old one
    except BaseException as exc:  # Ctrl-C; under torchrun also another rank failing (torchrun stops the rest)
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped ({type(exc).__name__})"
        log(f"\n{why}: the last finished epoch is saved; continue with: fruitnet train --resume {run}" if rows
            else f"\n{why} before the first epoch finished: nothing to resume")
        raise

    from fruitnet.plots import plot_curves

    summary = {"best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"], "epochs": len(rows),
               "seconds": round(elapsed, 2), "model": str(run / "best.safetensors"),
               "last_model": str(run / "last.safetensors"), "run": str(run)}
    if world.is_main:
        plot_curves(rows, run / "curves.png")
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"best validation accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}; {elapsed:.1f}s")
    log(f"outputs in {run}/: best.safetensors, last.safetensors, metrics.csv, curves.png, split.csv, "
        "data_report.txt, config.json, summary.json")
    distributed.barrier()  # every rank returns once rank 0 has written everything
    return summary
