"""The training loop and its recipes.

Read top to bottom: resolve the config, scan and split the data, build the classifier, then
one plain loop of epochs.  Where the time goes, and what saves it:
- images are decoded, oriented and resized once per run and kept as uint8 (cache.py); epochs
  then crop, flip and normalise tensors;
- in --mode freeze the backbone never changes, so its features are computed once (a few
  augmented views when the recipe augments) and the head trains on them: epochs take
  milliseconds; --no-feature-cache keeps the per-epoch image path for comparison;
- bf16 autocast and channels-last where the hardware runs them natively (arithmetic.py);
- recipes: 'seed' is the original project exactly; 'fast' warms the head up on cached
  features, then fine-tunes everything with AdamW, a cosine schedule, label smoothing,
  random-resized crops and flips, at a lower resolution in the first epochs.

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
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from fruitnet import __version__, distributed
from fruitnet.arithmetic import PRECISIONS, Arithmetic, choose, resolve_device
from fruitnet.backbones import get_backbone
from fruitnet.cache import DEFAULT_MAX_BYTES, DecodedImages, estimated_bytes
from fruitnet.balance import resolve_balance, sample_weights
from fruitnet.errors import DataError, UsageError
from fruitnet.dataset import (ImageDataset, Item, apply_exclude, format_report, read_split, scan, split,
                              write_report, write_split)
from fruitnet.model import create_classifier, save_model
from fruitnet.transforms import eval_transform, train_transform

RECIPES = {
    # The original project, exactly: plain SGD, constant learning rate, no augmentation.
    "seed": {"optimizer": "sgd", "momentum": 0.0, "lr": 0.001, "weight_decay": 0.01, "epochs": 30,
             "schedule": "constant", "warmup_epochs": 0, "label_smoothing": 0.0, "augment": "none",
             "feature_views": 1, "head_warmup_epochs": 0, "low_res": None, "drop_last": False},
    # Chosen by measurement (bench/bench_train.py): see the README's performance section.
    "fast": {"optimizer": "adamw", "momentum": 0.0, "lr": 0.001, "weight_decay": 0.05, "epochs": 8,
             "schedule": "cosine", "warmup_epochs": 0.5, "label_smoothing": 0.1, "augment": "light",
             "feature_views": 4, "head_warmup_epochs": 40, "low_res": {"size": 160, "fraction": 0.5},
             # one batch shape per resolution: bf16 kernels are compiled per shape on first use
             "drop_last": True},
}
DEFAULT_RECIPE = "fast"
METRIC_COLUMNS = ["epoch", "seconds", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]


@dataclass
class TrainConfig:
    data: str
    val_dir: str | None = None
    out: str | None = None
    backbone: str = "resnet18"
    weights: str = "imagenet"
    mode: str = "unfreeze"
    epochs: int | None = None  # None: the recipe's
    batch_size: int = 32
    lr: float | None = None  # None: the recipe's
    weight_decay: float | None = None  # None: the recipe's
    val_fraction: float = 0.25
    seed: int = 0
    recipe: str = DEFAULT_RECIPE
    feature_cache: bool = True
    image_cache: bool = True
    precision: str = "auto"
    workers: int = 2
    device: str = "auto"
    exclude: str | None = None  # doctor: a file of photo paths to leave out (check --deep --write-exclude)
    balance: str = "auto"  # doctor: auto | none | weights | sampler (balance.py)


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


def _loader(dataset: Dataset, batch_size, shuffle, workers, seed, drop_last: bool = False,
            weights: list[float] | None = None) -> DataLoader:
    """Under torchrun each rank reads its own shard (distributed.sampler); weights: draw with replacement."""
    g = torch.Generator().manual_seed(seed)
    drop_last = drop_last and len(dataset) > batch_size * distributed.world().size
    sampler = (torch.utils.data.WeightedRandomSampler(weights, len(dataset), generator=g) if weights  # doctor
               else distributed.sampler(dataset, shuffle, seed, g))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      num_workers=workers, generator=g, persistent_workers=workers > 0, drop_last=drop_last)


@torch.no_grad()
def extract_features(body: nn.Module, loader: DataLoader, device, desc: str,
                     arith: Arithmetic | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    arith = arith or choose("fp32", device)
    body.eval()
    feats, targets = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not distributed.is_main()):
        with arith.autocast(device):
            feats.append(body(arith.prepare_input(x.to(device))).float().cpu())
        targets.append(y)
    if not feats:  # an empty shard (fewer images than ranks)
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(targets)


def run_epoch(net: nn.Module, loader: DataLoader, device, optimizer=None, loss_fn=None, desc="",
              arith: Arithmetic | None = None, scheduler=None) -> tuple[float, float]:
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy) over all ranks."""
    arith = arith or choose("fp32", device)
    training = optimizer is not None
    net.train(training)
    total_loss, correct, n = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=len(loader) < 2 or not distributed.is_main())
    with torch.set_grad_enabled(training):
        for x, y in bar:
            x, y = arith.prepare_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            with arith.autocast(device):
                logits = net(x).float()
            loss = loss_fn(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
    total_loss, correct, n = distributed.sum_across(total_loss, correct, n)
    return total_loss / max(n, 1), correct / max(n, 1)


def make_optimizer(params, recipe: dict, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe["momentum"], weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer, recipe: dict, epochs: int, steps_per_epoch: int):
    """Per-step learning-rate factor: constant, or linear warm-up then cosine decay to zero."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(recipe["warmup_epochs"] * steps_per_epoch)

    def factor(step: int) -> float:
        if recipe["schedule"] == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    val_catalog = scan(config.val_dir) if config.val_dir else None
    if val_catalog and val_catalog.classes != classes:
        raise DataError(f"{config.val_dir}: classes {val_catalog.classes} differ from {config.data}'s {classes}")
    # doctor: --exclude FILE leaves the listed photos out of training and validation
    catalogs, excluded = apply_exclude([c for c in (catalog, val_catalog) if c], config.exclude)
    catalog, val_catalog = catalogs[0], (catalogs[1] if val_catalog else None)
    report = {**catalog.report(), **excluded}
    log(format_report(report))
    if config.val_dir:
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
    if config.precision not in PRECISIONS:
        raise DataError(f"unknown precision {config.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if config.balance == "sampler" and world.distributed:  # doctor
        raise UsageError("--balance sampler is not supported under torchrun; use --balance weights")
    recipe = RECIPES[config.recipe]
    # values given on the command line are honoured exactly; the rest come from the recipe
    config = replace(config, **{k: recipe[k] for k in ("epochs", "lr", "weight_decay") if getattr(config, k) is None})
    # under torchrun: this rank's device; a plain run: the (possibly resumed) config's
    device = world.device if world.distributed else resolve_device(config.device)
    arith = choose(config.precision, device)
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
    # doctor: --balance (balance.py): class-weighted loss or a class-balanced sampler
    train_counts = {c: sum(it.label == c for it in train_items) for c in classes}
    balance = resolve_balance(config.balance, train_counts)
    log(f"balance: {balance.reason}")
    class_w = torch.tensor(balance.class_weights, device=device) if balance.mode == "weights" else None
    sample_w = (sample_weights([classes.index(it.label) for it in train_items], train_counts)
                if balance.mode == "sampler" else None)

    # --- model (weights resolved before the run folder exists: a missing file stops early) ---
    model, weights_source = create_classifier(config.backbone, len(classes), config.weights)
    model.set_mode(config.mode)
    arith.prepare_model(model.to(device))
    torch.manual_seed(config.seed + world.rank)  # same initial model everywhere, own augmentations per rank
    use_image_cache = config.image_cache and \
        estimated_bytes(len(train_items) + len(val_items), pre) <= DEFAULT_MAX_BYTES

    def start_run() -> Path:
        run = new_run_folder(config.out)
        write_report(report, run)
        write_split(run / "split.csv", train_items, val_items)
        (run / "config.json").write_text(json.dumps({
            "train": asdict(config), "recipe": recipe, "classes": classes, "preprocessing": pre,
            "weights_source": weights_source, "device": str(device), "arithmetic": arith.as_dict(),
            "image_cache": use_image_cache, "machine": machine_info(),
            "distributed": world.describe(config.batch_size),
            "balance": balance.as_dict(), "kept_together": report.get("kept_together"),  # doctor
            "excluded": len(report.get("excluded", [])),  # doctor
            "command": sys.argv, "started": datetime.now().isoformat(timespec="seconds")}, indent=2))
        return run

    run = run if resume else distributed.on_main(start_run)  # only rank 0 creates and writes the folder

    log(f"arithmetic: {arith.dtype}{', channels-last' if arith.channels_last else ''} ({arith.reason}); "
        f"decoded-image cache: {'on' if use_image_cache else 'off'}")
    if world.distributed:
        log(f"data-parallel: {world.size} processes ({world.backend}), global batch {config.batch_size} = "
            f"{world.size} x {batch_size}")

    # --- data pipeline: decoded images in memory, and cached features where the body is frozen ---
    t0 = time.perf_counter()
    if use_image_cache:  # decoded once; crops and flips then run on tensors, no worker processes needed
        workers = 0
        train_ds = DecodedImages(train_items, classes, pre, recipe["augment"], desc="decoding (train)",
                                 progress=world.is_main)
        val_ds = DecodedImages(val_items, classes, pre, "none", desc="decoding (val)", progress=world.is_main)
    else:
        workers = config.workers
        train_ds = ImageDataset(train_items, classes, train_transform(pre, recipe["augment"]))
        val_ds = ImageDataset(val_items, classes, eval_transform(pre))
    plain_train = (train_ds.with_augment("none") if use_image_cache  # the training images, unaugmented
                   else ImageDataset(train_items, classes, eval_transform(pre)))
    train_loader = _loader(train_ds, batch_size, True, workers, config.seed, recipe["drop_last"], weights=sample_w)
    val_loader = _loader(val_ds, batch_size, False, workers, config.seed)

    def features(dataset: Dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        # in dataset order; under torchrun each rank extracts its shard and all gather the whole set
        loader = _loader(dataset, batch_size, False, workers, config.seed)
        return distributed.gather_shards(*extract_features(model.body, loader, device, desc, arith))

    net: nn.Module = model
    train_views = None  # frozen: one TensorDataset of features per view, epoch e trains on view e % n
    if config.mode == "freeze" and config.feature_cache:
        n_views = recipe["feature_views"] if recipe["augment"] != "none" else 1
        train_views = [TensorDataset(*features(plain_train, "features (train)"))]
        for v in range(1, n_views):
            train_views.append(TensorDataset(*features(train_ds, f"features (train, augmented view {v})")))
        val_loader = _loader(TensorDataset(*features(val_ds, "features (val)")), 256, False, 0, config.seed)
        train_loader = _loader(train_views[0], batch_size, True, 0, config.seed, weights=sample_w)
        net = model.head
        log(f"feature pass: {time.perf_counter() - t0:.1f}s for {n_views} view(s) "
            "(the frozen backbone runs once, not every epoch)")
    elif recipe["head_warmup_epochs"] and not resume:
        # a trained head first, so that fine-tuning does not start from random gradients
        ftrain = features(plain_train, "features (head warm-up)")
        warm_loader = _loader(TensorDataset(*ftrain), batch_size, True, 0, config.seed, weights=sample_w)
        warm_opt = make_optimizer(model.head.parameters(), recipe, config.lr * 10, config.weight_decay)
        warm_sched = make_scheduler(warm_opt, recipe, recipe["head_warmup_epochs"], len(warm_loader))
        head = distributed.wrap(model.head)
        for warm_epoch in range(recipe["head_warmup_epochs"]):
            distributed.set_epoch(warm_loader, warm_epoch)
            _, warm_acc = run_epoch(head, warm_loader, device, warm_opt, nn.CrossEntropyLoss(weight=class_w),
                                    scheduler=warm_sched)
        log(f"head warm-up on cached features: {recipe['head_warmup_epochs']} epochs, train accuracy "
            f"{warm_acc:.4f}, {time.perf_counter() - t0:.1f}s")

    optimizer = make_optimizer(net.parameters() if net is model.head else model.trainable_parameters(),
                               recipe, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, recipe, config.epochs, len(train_loader))
    loss_fn = nn.CrossEntropyLoss(weight=class_w, label_smoothing=recipe["label_smoothing"])  # doctor: weight
    start_epoch, best, rows, elapsed = 1, {"val_accuracy": -1.0, "epoch": 0}, [], 0.0
    if resume:
        state = saved_run["state"]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, rows, elapsed = state["epoch"] + 1, state["best"], state["rows"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        log(f"resuming {run} at epoch {start_epoch}")
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
            if train_views is not None and len(train_views) > 1:
                train_loader = _loader(train_views[(epoch - 1) % len(train_views)], batch_size, True, 0, config.seed,
                                       weights=sample_w)
            if use_image_cache and recipe["low_res"]:  # progressive resizing: small crops first, full size last
                low = epoch <= recipe["low_res"]["fraction"] * config.epochs
                train_ds.set_resolution(recipe["low_res"]["size"] if low else pre["input_size"])
            distributed.set_epoch(train_loader, epoch)
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc = run_epoch(parallel_net, train_loader, device, optimizer, loss_fn,
                                              desc=f"epoch {epoch}/{config.epochs}", arith=arith, scheduler=scheduler)
            distributed.sync_buffers(net)  # every rank validates exactly the model rank 0 saves
            # validation loss is plain cross-entropy, comparable across recipes (no label smoothing)
            val_loss, val_acc = run_epoch(net, val_loader, device, loss_fn=nn.CrossEntropyLoss(), desc="validating",
                                          arith=arith)
            seconds = time.perf_counter() - t + (setup_seconds if epoch == start_epoch else 0.0)
            elapsed += seconds
            row = {"epoch": epoch, "seconds": round(seconds, 3), "train_loss": train_loss,
                   "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
                   "lr": lr}
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
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
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
