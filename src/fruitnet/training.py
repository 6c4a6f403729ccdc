"""Training as named steps, read top to bottom in `_fit`:

    read_data -> build_model -> RunFolder -> build_pipeline -> warm_up_head ->
    for each epoch: fit_epoch, evaluate_epoch, RunFolder.end_epoch -> RunFolder.finish

The recipe (config.py) holds every number; the pipeline (pipeline.py) holds the data; the run
folder (runfolder.py) holds every write.  Under torchrun the same steps train data-parallel:
distributed.py hides the difference (rank 0 scans and writes; --batch-size is the global batch;
validation counts every image once), so no step here asks which rank it is.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from fruitnet import __version__, distributed
from fruitnet.arithmetic import Arithmetic, choose, resolve_device
from fruitnet.backbones import get_backbone
from fruitnet.balance import Balance, resolve_balance, sample_weights
from fruitnet.config import Recipe, TrainConfig, recipe_for, resolve, resume_config
from fruitnet.dataset import Item, apply_exclude, format_report, scan, split, split_warnings
from fruitnet.errors import DataError, UsageError
from fruitnet.model import Classifier, create_classifier
from fruitnet.pipeline import Pipeline, build_pipeline, extract_features, make_loader, use_image_cache
from fruitnet.predictors import UNKNOWN
from fruitnet.progress import bar as progress_bar
from fruitnet.robust import interpolate
from fruitnet.runfolder import RunFolder, SavedRun, new_output_folder, read_run


@dataclass
class Data:
    classes: list[str]
    report: dict
    train: list[Item]
    val: list[Item]


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    logits: torch.Tensor | None = None  # evaluation: every validation image's logits, in order
    targets: torch.Tensor | None = None


@dataclass
class Progress:
    """What a checkpoint restores: where the run is and what it has seen."""

    next_epoch: int = 1
    best: dict = field(default_factory=lambda: {"val_accuracy": -1.0, "epoch": 0})
    rows: list[dict] = field(default_factory=list)
    elapsed: float = 0.0


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "fruitnet": __version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


# --- the steps ------------------------------------------------------------------------------

def read_data(config: TrainConfig, log=print) -> Data:
    """Scan and split (or scan --val); the data report carries the warnings the split deserves.
    --exclude FILE leaves the listed photos out of both sides; near-duplicate groups (identical
    files and perceptual-hash copies, dataset.py) stay on one side of the split."""
    catalog = scan(config.data)
    if UNKNOWN in catalog.classes:
        raise DataError(f"{config.data}: a class folder named {UNKNOWN!r} would be confused with the answer "
                        f"{UNKNOWN!r} that fruitnet gives for photos of none of the classes; rename it "
                        "(e.g. 'other')")
    val_catalog = scan(config.val_dir) if config.val_dir else None
    if val_catalog and val_catalog.classes != catalog.classes:
        raise DataError(f"{config.val_dir}: classes {val_catalog.classes} differ from "
                        f"{config.data}'s {catalog.classes}")
    catalogs, excluded = apply_exclude([c for c in (catalog, val_catalog) if c], config.exclude)
    catalog, val_catalog = catalogs[0], (catalogs[1] if val_catalog else None)
    report = {**catalog.report(), **excluded}
    if val_catalog:
        train_items, val_items = catalog.usable, val_catalog.usable
        report["validation"] = val_catalog.report()
    else:
        train_items, val_items = split(catalog, config.val_fraction, config.seed)
    report["warnings"] = split_warnings(catalog.classes, train_items, val_items)
    log(format_report(report))
    return Data(catalog.classes, report, train_items, val_items)


def build_model(config: TrainConfig, n_classes: int, device: torch.device, arith: Arithmetic) -> tuple[Classifier, str]:
    """The classifier with its pretrained body (resolved before the run folder exists: missing
    weights stop the run before it leaves anything behind), frozen or not, on its device."""
    torch.manual_seed(config.seed)  # the same new head everywhere
    model, weights_source = create_classifier(config.backbone, n_classes, config.weights)
    model.set_mode(config.mode)
    arith.prepare_model(model.to(device))
    return model, weights_source


def make_optimizer(params, recipe: Recipe, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if recipe.optimizer == "lbfgs":  # weight_decay enters the loss instead (fit_head_lbfgs)
        return torch.optim.LBFGS(params, lr=lr, max_iter=recipe.lbfgs_iterations, history_size=20,
                                 line_search_fn="strong_wolfe")
    raise UsageError(f"unknown optimizer {recipe.optimizer!r}")


def make_scheduler(optimizer, recipe: Recipe, epochs: int, steps_per_epoch: int):
    """Per-step learning-rate factor: constant, or linear warm-up then cosine decay to zero."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(recipe.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if recipe.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit_epoch(net: nn.Module, loader, device, optimizer, loss_fn, arith: Arithmetic, scheduler=None,
              desc: str = "") -> EpochResult:
    """One training pass (a scheduler steps per batch). Mean loss and accuracy over all ranks."""
    net.train()
    total_loss, correct, n = 0.0, 0, 0
    for x, y in progress_bar(loader, desc=desc, unit="batch", disable=len(loader) < 2 or not distributed.is_main()):
        x, y = arith.prepare_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with arith.autocast(device):
            logits = net(x).float()
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    total_loss, correct, n = distributed.sum_across(total_loss, correct, n)
    return EpochResult(total_loss / max(n, 1), correct / max(n, 1))


def fit_head_lbfgs(head: nn.Linear, views: list, device, optimizer, loss_fn, l2: float) -> EpochResult:
    """One epoch of the probe recipe: L-BFGS iterations on every cached feature view at once
    (logistic regression, L2 penalty on the weights).  Every rank holds all the features and
    computes the same step, so no gradient exchange is needed under torchrun."""
    x = torch.cat([v.tensors[0] for v in views]).to(device)
    y = torch.cat([v.tensors[1] for v in views]).to(device)
    head.train()

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(head(x), y) + l2 / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        logits = head(x)
        return EpochResult(loss_fn(logits, y).item(), (logits.argmax(1) == y).float().mean().item())


@torch.no_grad()
def evaluate_epoch(net: nn.Module, loader, device, arith: Arithmetic, desc: str = "validating") -> EpochResult:
    """Plain cross-entropy (comparable across recipes) and accuracy over every validation image
    once, with the logits of all of them in order (on every rank)."""
    net.eval()
    logits, targets = [], []
    for x, y in progress_bar(loader, desc=desc, unit="batch", disable=len(loader) < 2 or not distributed.is_main()):
        with arith.autocast(device):
            logits.append(net(arith.prepare_input(x.to(device))).float().cpu())
        targets.append(y)
    logits = torch.cat(logits) if logits else torch.empty(0)
    targets = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    logits, targets = distributed.gather_shards(logits, targets)
    if not len(targets):
        return EpochResult(float("nan"), float("nan"), logits, targets)
    loss = nn.functional.cross_entropy(logits, targets).item()
    return EpochResult(loss, int((logits.argmax(1) == targets).sum()) / len(targets), logits, targets)


def balance_for(config: TrainConfig, data: Data, log=print) -> Balance:
    """--balance for the training photos' counts (balance.py), said in words."""
    balance = resolve_balance(config.balance, {c: sum(it.label == c for it in data.train) for c in data.classes})
    log(f"balance: {balance.reason}")
    return balance


def make_loss(recipe: Recipe, balance: Balance, device, label_smoothing: float | None = None) -> nn.Module:
    """Cross-entropy, weighted per class when the balance says so."""
    weight = torch.tensor(balance.class_weights, device=device) if balance.mode == "weights" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.label_smoothing if label_smoothing is None
                               else label_smoothing)


def warm_up_head(model: Classifier, pipeline: Pipeline, recipe: Recipe, config: TrainConfig, device,
                 arith: Arithmetic, log=print, balance: Balance | None = None) -> None:
    """LP-FT: train the new head on cached features of the unaugmented training photos first, so
    that fine-tuning starts from a sensible head instead of random gradients through the body."""
    t0 = time.perf_counter()
    features = extract_features(model.body, pipeline.plain_train, pipeline.batch_size, device, pipeline.workers,
                                arith, "features (head warm-up)")
    loader = make_loader(features, pipeline.batch_size, True, 0, seed=config.seed, weights=pipeline.sample_weights)
    loss_fn = make_loss(recipe, balance, device, label_smoothing=0.0) if balance else nn.CrossEntropyLoss()
    optimizer = make_optimizer(model.head.parameters(), recipe, config.lr * recipe.head_warmup_lr_factor,
                               config.weight_decay)
    scheduler = make_scheduler(optimizer, recipe, recipe.head_warmup_epochs, len(loader))
    head = distributed.wrap(model.head)
    for epoch in range(recipe.head_warmup_epochs):
        distributed.set_epoch(loader, epoch)
        result = fit_epoch(head, loader, device, optimizer, loss_fn, choose("fp32", device), scheduler)
    log(f"head warm-up on cached features: {recipe.head_warmup_epochs} epochs, train accuracy "
        f"{result.accuracy:.4f}, {time.perf_counter() - t0:.1f}s")


# --- the run --------------------------------------------------------------------------------

def train(config: TrainConfig, log=print) -> dict:
    """Train as configured (the recipe fills what is left None); returns the summary."""
    distributed.init(config.device)  # under torchrun: join the process group; else a world of one
    return _fit(resolve(config), None, log)


def resume_training(run: str | Path, log=print, **changes) -> dict:
    """Continue a run folder.  `changes` may only hold config.RESUMABLE settings (e.g. epochs=12)."""
    distributed.init(changes.get("device") or "auto")
    saved = distributed.on_main(read_run, Path(run))
    config = resume_config(saved.config["train"], changes)
    return _fit(config, saved, log)


def _fit(config: TrainConfig, saved: SavedRun | None, log) -> dict:
    world = distributed.world()
    log = log if world.is_main else distributed.quiet
    recipe = recipe_for(config)
    device = world.device if world.distributed else resolve_device(config.device)
    arith = choose(config.precision, device)
    batch_size = world.per_rank_batch(config.batch_size)  # --batch-size is global; a plain run: itself
    pre = get_backbone(config.backbone).preprocessing
    if config.tensorboard:
        _require_tensorboard()

    if saved is None:
        data = distributed.on_main(read_data, config, log)  # rank 0 scans; every rank gets the lists
    else:
        data = _saved_data(saved, log)
    log(f"split: {len(data.train)} train, {len(data.val)} validation")
    for warning in data.report.get("warnings", []):
        log(f"warning: {warning}")
    if config.balance == "sampler" and recipe.optimizer == "lbfgs":
        raise UsageError(f"--balance sampler draws batches; the {config.recipe} recipe fits on all photos at once: "
                         "use --balance weights")
    if config.balance == "sampler" and world.distributed:
        raise UsageError("--balance sampler is not supported under torchrun; use --balance weights")
    balance = balance_for(config, data, log)
    model, weights_source = build_model(config, len(data.classes), device, arith)

    if saved is None:
        path = distributed.on_main(new_output_folder, config.out, "", [config.data, config.val_dir], "run folder")
    else:
        path = saved.path
    run = RunFolder(path, active=world.is_main, tensorboard=config.tensorboard)
    if saved is None:
        run.start({"train": asdict(config), "recipe": asdict(recipe), "classes": data.classes,
                   "preprocessing": pre, "weights_source": weights_source, "device": str(device),
                   "arithmetic": arith.as_dict(),
                   "image_cache": use_image_cache(config, pre, len(data.train) + len(data.val)),
                   "machine": machine_info(),
                   "distributed": world.describe(config.batch_size), "balance": balance.as_dict(),
                   "kept_together": None if config.val_dir else data.report.get("kept_together"),
                   "excluded": len(data.report.get("excluded", [])), "command": sys.argv,
                   "started": datetime.now().isoformat(timespec="seconds")},
                  data.report, data.train, data.val)

    t0 = time.perf_counter()
    torch.manual_seed(config.seed + world.rank)  # own augmentations per rank
    pipeline = build_pipeline(config, recipe, pre, data.classes, data.train, data.val, model.body, device, arith,
                              batch_size, log)
    if balance.mode == "sampler":
        pipeline.sample_weights = sample_weights([data.classes.index(it.label) for it in data.train],
                                                 {c: sum(it.label == c for it in data.train) for c in data.classes})
    log(f"arithmetic: {arith.dtype}{', channels-last' if arith.channels_last else ''} ({arith.reason}); "
        f"decoded-image cache: {'on' if pipeline.image_cache else 'off'}")
    if world.distributed:
        log(f"data-parallel: {world.size} processes ({world.backend}), global batch {config.batch_size} = "
            f"{world.size} x {batch_size}")
    if pipeline.feature_views is not None:
        log(f"feature pass: {time.perf_counter() - t0:.1f}s for {len(pipeline.feature_views)} view(s) "
            "(the frozen backbone runs once, not every epoch)")
    checkpoint = saved.checkpoint if saved else None
    if config.mode == "unfreeze" and recipe.head_warmup_epochs and checkpoint is None:
        warm_up_head(model, pipeline, recipe, config, device, arith, log, balance)
    # WiSE-FT: the head-only model (pretrained body, warmed-up head) is kept, and what is
    # validated and saved each epoch is its weight mix with the fine-tuned model
    mixing = config.mode == "unfreeze" and config.wise < 1
    head_only = None
    if mixing:
        head_only = checkpoint["wise_start"] if checkpoint is not None else _copy_state(model)
        log(f"WiSE-FT: the saved model is {1 - config.wise:g} x head-only + {config.wise:g} x fine-tuned")

    net = model.head if pipeline.feature_views is not None else model  # what the epochs run
    full_batch = recipe.optimizer == "lbfgs"
    if full_batch and checkpoint is None:  # the same start on every rank: the fit is deterministic
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    optimizer = make_optimizer(net.parameters() if net is model.head else model.trainable_parameters(),
                               recipe, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, recipe, config.epochs, len(pipeline.train_loader(1)))
    loss_fn = make_loss(recipe, balance, device)
    progress = Progress()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        progress = Progress(checkpoint["epoch"] + 1, checkpoint["best"], checkpoint["rows"], checkpoint["elapsed"])
        torch.set_rng_state(checkpoint["rng"])
        if "loader_rng" in checkpoint:  # absent in runs from fruitnet 0.1.0's first releases
            pipeline.generator.set_state(checkpoint["loader_rng"])
        log(f"resuming {run.path} at epoch {progress.next_epoch}")
    run.write_metrics(progress.rows)  # from the checkpoint: an epoch logged after it is redone once
    parallel_net = distributed.wrap(net)  # DistributedDataParallel under torchrun; else net itself
    setup_seconds = time.perf_counter() - t0

    meta = {"classes": data.classes, "backbone": config.backbone, "preprocessing": pre,
            "training_photos": sorted({it.sha256[:16] for it in data.train if it.sha256})}
    note = (f"training loss includes label smoothing {recipe.label_smoothing}; validation loss does not"
            if recipe.label_smoothing else "")
    log(f"training {config.backbone} ({config.mode}, recipe {config.recipe}) on {device} for {config.epochs} epochs")
    log(f"{'epoch':>5} {'seconds':>8} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8}")
    try:
        for epoch in range(progress.next_epoch, config.epochs + 1):
            t = time.perf_counter()
            loader = pipeline.train_loader(epoch)
            distributed.set_epoch(loader, epoch)
            lr = optimizer.param_groups[0]["lr"]
            if full_batch:
                fit = fit_head_lbfgs(net, pipeline.feature_views, device, optimizer, loss_fn, config.weight_decay)
            else:
                fit = fit_epoch(parallel_net, loader, device, optimizer, loss_fn, arith, scheduler,
                                desc=f"epoch {epoch}/{config.epochs}")
            distributed.sync_buffers(net)  # every rank validates exactly the model rank 0 saves
            tuned = _copy_state(model) if mixing else None
            if mixing:
                model.load_state_dict(interpolate(head_only, tuned, config.wise))
            val = evaluate_epoch(net, pipeline.val_loader(), device, arith)
            seconds = time.perf_counter() - t + (setup_seconds if epoch == progress.next_epoch else 0.0)
            progress.elapsed += seconds
            progress.rows.append({"epoch": epoch, "seconds": round(seconds, 3), "train_loss": fit.loss,
                                  "train_accuracy": fit.accuracy, "val_loss": val.loss,
                                  "val_accuracy": val.accuracy, "lr": lr})
            log(f"{epoch:>5} {seconds:>8.1f} {fit.loss:>10.4f} {fit.accuracy:>9.4f} {val.loss:>9.4f} {val.accuracy:>8.4f}")
            improved = val.accuracy > progress.best["val_accuracy"]
            if improved:
                progress.best = {"val_accuracy": val.accuracy, "epoch": epoch}
            run.end_epoch({"model": tuned if mixing else model.state_dict(), "wise_start": head_only,
                           "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch, "best": progress.best,
                           "rows": progress.rows, "elapsed": progress.elapsed, "rng": torch.get_rng_state(),
                           "loader_rng": pipeline.generator.get_state()},
                          model, {**meta, "training": {"epoch": epoch, "val_accuracy": val.accuracy}}, improved, note)
            if mixing:  # training goes on from the fine-tuned weights
                model.load_state_dict(tuned)
    except BaseException as exc:  # Ctrl-C; under torchrun also another rank failing (torchrun stops the rest)
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped ({type(exc).__name__})"
        kept = "the last finished epoch is saved" if run.has_checkpoint else "no epoch finished yet"
        log(f"\n{why}: {kept}; continue with: fruitnet train --resume {run.path}")
        raise

    if progress.rows:  # the temperature and the unknown verdict's threshold, into best and last
        cached = pipeline.feature_views[0].tensors[0] if pipeline.feature_views else None  # the plain view
        run.add_trust(progress.best["epoch"], progress.rows[-1]["epoch"], config.unknown_recall, device, log,
                      val_set=pipeline.val, train_set=pipeline.plain_train, train_features=cached,
                      frozen_body=config.mode == "freeze")
    summary = {"best_val_accuracy": progress.best["val_accuracy"], "best_epoch": progress.best["epoch"],
               "epochs": len(progress.rows), "seconds": round(progress.elapsed, 2),
               "model": str(run.path / "best.safetensors"), "last_model": str(run.path / "last.safetensors"),
               "run": str(run.path), "warnings": data.report.get("warnings", []),
               "skipped": _skipped(data.report) + len(pipeline.train.dropped) + len(pipeline.val.dropped)}
    run.finish(summary, _tensorboard_pictures(data.classes, pipeline.val.paths, val) if run.writer is not None else None)
    log(f"best validation accuracy {progress.best['val_accuracy']:.4f} at epoch {progress.best['epoch']}; "
        f"{progress.elapsed:.1f}s")
    if summary["skipped"]:
        log(f"{summary['skipped']} image file(s) could not be used (listed in data_report.txt); the run is "
            "complete, and the exit code is 1")
    log(f"outputs in {run.path}/: best.safetensors, last.safetensors, metrics.csv, curves.png, split.csv, "
        "data_report.txt, config.json, summary.json" + (", tensorboard/" if config.tensorboard else ""))
    distributed.barrier()  # every rank returns once rank 0 has written everything
    return summary


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _saved_data(saved: SavedRun, log) -> Data:
    """The run's own split; photos that have disappeared since are left out, and said so."""
    lists = []
    for items in (saved.train_items, saved.val_items):
        missing = [it for it in items if not os.path.isfile(it.path)]
        for it in missing:
            log(f"skipped {it.path}: file no longer exists")
        lists.append([it for it in items if os.path.isfile(it.path)])
    report = {"warnings": split_warnings(saved.config["classes"], *lists),
              "skipped": [{"path": it.path, "reason": "file no longer exists"}
                          for items in (saved.train_items, saved.val_items) for it in items
                          if not os.path.isfile(it.path)]}
    return Data(saved.config["classes"], report, *lists)


def _skipped(report: dict) -> int:
    """Image files the scans (of DATA and of --val) found unusable."""
    return len(report.get("skipped", [])) + len(report.get("validation", {}).get("skipped", []))


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'fruitnet[tensorboard]' "
                         "(or pip install tensorboard)") from None


def _tensorboard_pictures(classes: list[str], val_paths: list[str], val: EpochResult) -> dict:
    """The last epoch's validation confusion matrix and a few of its predictions, for TensorBoard."""
    from fruitnet.images import load_image
    from fruitnet.metrics import confusion_matrix, normalize_rows
    from fruitnet.plots import plot_confusion, plot_prediction_grid

    folder = Path(tempfile.mkdtemp(prefix="fruitnet-tb-"))
    predicted = val.logits.argmax(1).tolist()
    matrix = confusion_matrix(val.targets.tolist(), predicted, len(classes))
    plot_confusion(matrix, classes, folder / "confusion.png", normalized_matrix=normalize_rows(matrix),
                   title="Validation confusion matrix (last epoch)")
    shown = range(0, len(val_paths), max(1, len(val_paths) // 16))[:16]
    probs = val.logits.softmax(1)
    plot_prediction_grid([load_image(val_paths[i]) for i in shown],
                         [f"{classes[predicted[i]]} {probs[i].max():.0%}" for i in shown], folder / "predictions.png",
                         colors=["green" if predicted[i] == val.targets[i] else "red" for i in shown])
    return {"validation/confusion_matrix": folder / "confusion.png", "validation/predictions": folder / "predictions.png"}
