"""Training as named steps, read top to bottom in `run_training`:

    prepare (read_data, build_model) -> open_run_folder -> build_pipeline ->
    STRATEGIES[recipe.strategy] (a checkpoint after each epoch) -> finish (calibration, the
    unknown verdict, summary.json)

The recipe names its strategy: `fit_probe` fits the head once, to convergence, by full-batch
L-BFGS on cached features (the default probe recipe); `fit_minibatch` runs epochs of SGD or AdamW
over batches of cached features (a frozen body) or of photos (every layer learns), with LP-FT's
head warm-up and the WiSE-FT mix where the recipe asks.  The recipe (config.py) holds every
number, the pipeline (pipeline.py) the data, the run folder (runfolder.py) every write.  Under
torchrun the same steps train data-parallel: distributed.py hides the difference (rank 0 scans
and writes; --batch-size is the global batch; validation counts every image once), so no step
here asks which rank it is.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fruitnet import distributed
from fruitnet.arithmetic import Arithmetic, choose_arithmetic, resolve_device
from fruitnet.backbones import get_backbone, split_body
from fruitnet.balance import Balance, resolve_balance
from fruitnet.config import (RECIPES, Recipe, TrainConfig, choose_recipe, data_folders, recipe_for, resolve,
                             resume_config)
from fruitnet.dataset import Item, apply_exclude, format_data_report, scan, scan_folders, split, split_warnings
from fruitnet.errors import DataError, UsageError
from fruitnet.features import from_dataset
from fruitnet.interrupts import Interrupts
from fruitnet.outputs import printable
from fruitnet.model import Classifier, create_classifier
from fruitnet.pipeline import FEATURE_BATCH, Pipeline, build_pipeline, make_loader
from fruitnet.progress import bar as progress_bar
from fruitnet.runfolder import RunFolder, SavedRun, output_folder, read_run
from fruitnet.wise import WiseFT, copy_state


@dataclass
class Data:
    classes: list[str]
    report: dict
    train: list[Item]
    val: list[Item]
    negatives: list[Item] = field(default_factory=list)  # photos of none of the classes (unknown/ folders)


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
    last_val: EpochResult | None = None  # the last validation (TensorBoard's end-of-run pictures)


@dataclass
class Session:
    """What every step reads: the resolved choices, the data, the model, and once opened, the
    run folder and the pipeline."""

    config: TrainConfig
    recipe: Recipe
    device: torch.device
    arith: Arithmetic
    data: Data
    model: Classifier
    balance: Balance
    weights_source: str
    log: Callable
    saved: SavedRun | None = None
    run: RunFolder | None = None
    pipeline: Pipeline | None = None
    setup_seconds: float = 0.0  # decoding and the feature pass: counted in the first epoch's seconds
    recipe_choice: str = ""  # why this recipe (config.choose_recipe): config.json and one printed line

    @property
    def checkpoint(self) -> dict | None:
        return self.saved.checkpoint if self.saved else None

    @property
    def batch_size(self) -> int:
        return distributed.world().per_rank_batch(self.config.batch_size)  # --batch-size is global

    def model_meta(self) -> dict:
        return {"classes": self.data.classes, "backbone": self.config.backbone,
                "preprocessing": get_backbone(self.config.backbone).preprocessing,
                "training_photos": sorted({it.sha256[:16] for it in self.data.train if it.sha256})}


# --- the run --------------------------------------------------------------------------------

def train(config: TrainConfig, log=print) -> dict:
    """Train as configured (the recipe fills what is left None); returns the summary."""
    distributed.init(config.device)  # under torchrun: join the process group; else a world of one
    if config.recipe is not None or config.mode is not None:  # else the data's size decides (prepare)
        config = resolve(config, distributed.world().distributed)
    return run_training(config, None, log)


def resume_training(run: str | Path, log=print, **changes) -> dict:
    """Continue a run folder.  `changes` may only hold config.RESUMABLE settings (e.g. epochs=12)."""
    distributed.init(changes.get("device") or "auto")
    saved = distributed.on_main(read_run, Path(run))
    return run_training(resume_config(saved.config["train"], changes), saved, log)


def run_training(config: TrainConfig, saved: SavedRun | None, log) -> dict:
    """The steps.  Ctrl-C anywhere raises KeyboardInterrupt after one line saying what is kept
    and, once the run folder holds its config, how to continue (--resume)."""
    log = log if distributed.is_main() else distributed.quiet
    with Interrupts() as interrupts:
        try:
            s = prepare(config, saved, log)
            open_run_folder(s)
        except BaseException as exc:
            if not interrupts.caused(exc):
                raise
            log("\ninterrupted before the run folder was made: nothing was written")
            raise KeyboardInterrupt from exc
        try:
            t0 = time.perf_counter()
            s.pipeline = build_pipeline(s.config, s.recipe, get_backbone(config.backbone).preprocessing,
                                        s.data.classes, s.data.train, s.data.val, s.model.body, s.device, s.arith,
                                        s.batch_size, log)
            s.setup_seconds = time.perf_counter() - t0
            describe_pipeline(s)
            progress = STRATEGIES[s.recipe.strategy](s)
            return finish(s, progress)
        except BaseException as exc:
            raise stopped(s.run, exc, interrupts, log) from None


def stopped(run: RunFolder, exc: BaseException, interrupts: Interrupts, log) -> BaseException:
    """Says how the run ended and how to continue it; returns what to raise: KeyboardInterrupt
    for a Ctrl-C (even one a library turned into another error), else the error itself."""
    interrupted = interrupts.caused(exc)
    why = "interrupted" if interrupted else f"stopped ({type(exc).__name__})"
    kept = "the last finished epoch is saved" if run.has_checkpoint else "no epoch finished yet"
    log(f"\n{why}: {kept}; continue with: fruitnet train --resume {run.path}")
    if interrupted and not isinstance(exc, KeyboardInterrupt):
        interruption = KeyboardInterrupt()
        interruption.__cause__ = exc
        return interruption
    return exc


# --- the steps ------------------------------------------------------------------------------

def prepare(config: TrainConfig, saved: SavedRun | None, log) -> Session:
    """Everything decided before the run folder exists: device, arithmetic, data, class balance
    and the pretrained model (missing weights stop the run before it leaves anything behind)."""
    world = distributed.world()
    if config.recipe is not None:
        world.per_rank_batch(config.batch_size)  # --batch-size is global: it must divide among the ranks
    device = world.device if world.distributed else resolve_device(config.device)
    arith = choose_arithmetic(config.precision, device)
    if config.tensorboard:
        _require_tensorboard()
    if saved is None:
        data = distributed.on_main(read_data, config, log)  # rank 0 scans; every rank gets the lists
    else:
        data = _saved_data(saved, log)
    log(f"split: {len(data.train)} train, {len(data.val)} validation")
    for warning in data.report.get("warnings", []):
        log(f"warning: {warning}")
    config, why = choose_recipe(config, len(data.train), get_backbone(config.backbone).splittable)
    if saved is None:
        config = resolve(config, world.distributed)
        world.per_rank_batch(config.batch_size)
        log(f"recipe: {why}")
    balance = balance_for(config, data, log)
    model, weights_source = build_model(config, len(data.classes), device, arith)
    return Session(config, recipe_for(config), device, arith, data, model, balance, weights_source, log, saved,
                   recipe_choice=why)


def read_data(config: TrainConfig, log=print) -> Data:
    """Scan and split (or scan --val); the data report carries the warnings the split deserves.
    Several data folders merge class by class; the photos in an unknown/ folder are negatives,
    photos of none of the classes that the unknown verdict is fitted against.  --exclude FILE
    leaves the listed photos out; near-duplicate groups (identical files and perceptual-hash
    copies, dataset.py) stay on one side of the split."""
    folders = data_folders(config)
    catalog = scan_folders(folders)
    val_catalog = scan(config.val_dir) if config.val_dir else None
    if val_catalog and val_catalog.classes != catalog.classes:
        raise DataError(f"{config.val_dir}: classes {val_catalog.classes} differ from "
                        f"{' + '.join(folders)}'s {catalog.classes}")
    catalogs, excluded = apply_exclude([c for c in (catalog, val_catalog) if c], config.exclude)
    catalog, val_catalog = catalogs[0], (catalogs[1] if val_catalog else None)
    report = {**catalog.report(), **excluded}
    if val_catalog:
        train_items, val_items = catalog.usable, val_catalog.usable
        report["validation"] = val_catalog.report()
    else:
        train_items, val_items = split(catalog, config.val_fraction, config.seed)
    report["warnings"] = split_warnings(catalog.classes, train_items, val_items)
    log(format_data_report(report))
    negatives = catalog.negatives + (val_catalog.negatives if val_catalog else [])
    return Data(catalog.classes, report, train_items, val_items, negatives)


def build_model(config: TrainConfig, n_classes: int, device: torch.device, arith: Arithmetic) -> tuple[Classifier, str]:
    """The classifier with its pretrained body, frozen or not, on its device."""
    torch.manual_seed(config.seed)  # the same new head everywhere
    model, weights_source = create_classifier(config.backbone, n_classes, config.weights)
    model.set_mode(config.mode, config.unfreeze_last)
    arith.prepare_model(model.to(device))
    return model, weights_source


def open_run_folder(s: Session) -> None:
    """The resumed run's folder, or a new one holding config.json, split.csv and the data report."""
    world = distributed.world()
    if s.saved is not None:
        s.run = RunFolder(s.saved.path, active=world.is_main, tensorboard=s.config.tensorboard)
        return
    def make(out):  # the folder and its records, or, if that fails halfway, no folder
        with output_folder(out, "", [*data_folders(s.config), s.config.val_dir], "run folder") as path:
            RunFolder(path).start(s.config, s.recipe, s.data, details)
        return path

    details = {"weights_source": s.weights_source, "device": str(s.device), "arithmetic": s.arith.as_dict(),
               "distributed": world.describe(s.config.batch_size), "balance": s.balance.as_dict(),
               "recipe_choice": s.recipe_choice}
    path = distributed.on_main(make, s.config.out)
    s.run = RunFolder(path, active=world.is_main, tensorboard=s.config.tensorboard)


def describe_pipeline(s: Session) -> None:
    arith, world = s.arith, distributed.world()
    s.log(f"arithmetic: {arith.dtype}{', channels-last' if arith.channels_last else ''} ({arith.reason}); "
          f"decoded-image cache: {'on' if s.pipeline.image_cache else 'off'}")
    if world.distributed:
        s.log(f"data-parallel: {world.size} processes ({world.backend}), global batch {s.config.batch_size} = "
              f"{world.size} x {s.batch_size}")
    if s.pipeline.feature_views is not None:
        s.log(f"feature pass: {s.setup_seconds:.1f}s for {len(s.pipeline.feature_views)} view(s) "
              "(the frozen backbone runs once, not every epoch)")


# --- the strategies ---------------------------------------------------------------------------

def fit_probe(s: Session) -> Progress:
    """The head fitted once, to convergence, by full-batch L-BFGS on every cached feature view
    (fit_linear_head).  Every rank holds all the features and computes the same steps, so no
    gradient exchange is needed under torchrun.  Deterministic and seconds long: a resumed run
    fits again from the start."""
    t = time.perf_counter()
    head, views = s.model.head, s.pipeline.feature_views
    x = torch.cat([v.tensors[0] for v in views]).to(s.device)
    y = torch.cat([v.tensors[1] for v in views]).to(s.device)
    val_x, val_y = (t.to(s.device) for t in s.pipeline.val_features.tensors)
    trace = []
    fit_linear_head(head, x, y, make_loss(s.recipe, s.balance, s.device), s.config.weight_decay, s.config.lr,
                    s.recipe.max_iterations, lambda i: trace.append(
                        {"iteration": i, **_scores(head, x, y, "train"), **_scores(head, val_x, val_y, "val")}))
    last = trace[-1]
    s.log(f"probe: {len(trace)} L-BFGS iterations{' (converged)' if len(trace) < s.recipe.max_iterations else ''}, "
          f"train loss {last['train_loss']:.4f}, train accuracy {last['train_accuracy']:.4f}, "
          f"validation loss {last['val_loss']:.4f}, validation accuracy {last['val_accuracy']:.4f}, "
          f"{time.perf_counter() - t + s.setup_seconds:.1f}s")
    progress = Progress()
    s.run.write_metrics([])  # a resumed probe fits again: its one row is written anew
    fit, val = EpochResult(last["train_loss"], last["train_accuracy"]), evaluate_epoch(
        head, s.pipeline.val_loader(), s.device, s.arith)
    record_epoch(s, progress, 1, time.perf_counter() - t + s.setup_seconds, fit, val, s.config.lr,
                 {"model": s.model.state_dict(), "fit_trace": trace}, quiet=True)
    s.run.draw_curves(trace, x="iteration", note="the probe fits once: loss and accuracy per L-BFGS iteration")
    return progress


def fit_linear_head(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, l2: float,
                    lr: float = 1.0, max_iterations: int = 125, on_iteration: Callable[[int], None] | None = None) -> int:
    """Logistic regression: the head fitted to (x, y) from zero by full-batch L-BFGS, with the L2
    penalty l2/2 x |W|^2 on the weights, until five iterations make no progress or max_iterations.
    on_iteration(i) runs after each; returns the number run.  The probe recipe's fit, and teach's."""
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    # One iteration per step, for the trace; max_eval gives the line search room (its default,
    # max_iter x 5/4 = 1, leaves none: a rejected first trial step then stalls the fit for good).
    optimizer = torch.optim.LBFGS(head.parameters(), lr=lr, max_iter=1, max_eval=25, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(head(x), y) + l2 / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    losses = []
    for iteration in range(1, max_iterations + 1):
        losses.append(float(optimizer.step(closure).detach()))
        if on_iteration is not None:
            on_iteration(iteration)
        if len(losses) > 5 and losses[-6] - losses[-1] < 1e-7 * max(1.0, abs(losses[-1])):
            break  # five iterations without progress: converged
    return iteration


@torch.no_grad()
def _scores(head: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> dict:
    logits = head(x)
    return {f"{name}_loss": nn.functional.cross_entropy(logits, y).item(),
            f"{name}_accuracy": (logits.argmax(1) == y).float().mean().item()}


def fit_minibatch(s: Session) -> Progress:
    """Epochs of SGD or AdamW over batches of cached features (frozen body) or of photos."""
    if s.config.mode == "unfreeze" and s.recipe.head_warmup_epochs and s.checkpoint is None:
        warm_up_head(s)
    frozen = s.pipeline.feature_views is not None
    net = s.model.head if frozen else s.model  # what the epochs run
    return run_epochs(s, net, list(net.parameters()) if frozen else s.model.trainable_parameters())


def fit_partial(s: Session) -> Progress:
    """Partial fine-tuning: the body's last stages (the tail) and the head train for epochs on the
    frozen stem's cached feature maps.  The head starts as the probe's fit on the plain view's
    pooled features (LP-FT: no random gradients through the pretrained stages)."""
    tail = split_body(s.model.body, s.config.unfreeze_last)[1]
    if s.checkpoint is None:
        t = time.perf_counter()
        plain = s.pipeline.feature_views[0]
        pooled = from_dataset(tail, plain, FEATURE_BATCH, s.device, s.arith,
                              desc="features (head warm-up)").tensors[0].to(s.device)
        iterations = fit_linear_head(s.model.head, pooled, plain.tensors[1].to(s.device),
                                     make_loss(s.recipe, s.balance, s.device, label_smoothing=0.0),
                                     RECIPES["probe"].weight_decay, RECIPES["probe"].lr)
        s.log(f"head warm-up: the probe's fit on the pooled features, {iterations} L-BFGS iterations, "
              f"{time.perf_counter() - t:.1f}s")
    net = nn.Sequential(tail, s.model.head)  # the body's own modules: the model file stays whole
    return run_epochs(s, net, [p for p in net.parameters() if p.requires_grad])


def run_epochs(s: Session, net: nn.Module, params: list) -> Progress:
    """The epochs of the mini-batch strategies: `net` runs on what the pipeline's train loader
    gives (photos, or cached features or feature maps) and `params` learn; a checkpoint each epoch."""
    config, recipe, model, pipeline = s.config, s.recipe, s.model, s.pipeline
    wise = None
    if config.mode != "freeze" and config.wise < 1:  # validate and save the WiSE-FT mix each epoch
        wise = WiseFT(config.wise, s.checkpoint["wise_start"] if s.checkpoint else copy_state(model))
        s.log(f"WiSE-FT: the saved model is {1 - config.wise:g} x head-only + {config.wise:g} x fine-tuned")
    optimizer = make_optimizer(params, recipe, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, recipe, config.epochs, len(pipeline.train_loader(1)))
    loss_fn = make_loss(recipe, s.balance, s.device)
    progress = _restore(s, optimizer, scheduler) if s.checkpoint is not None else Progress()
    s.run.write_metrics(progress.rows)  # from the checkpoint: an epoch logged after it is redone once
    parallel = distributed.wrap(net)  # DistributedDataParallel under torchrun; else net itself
    curves_note = (f"training loss includes label smoothing {recipe.label_smoothing}; validation loss does not"
                   if recipe.label_smoothing else "")
    s.log(f"training {config.backbone} ({config.mode}, recipe {config.recipe}) on {s.device} for {config.epochs} epochs")
    s.log(f"{'epoch':>5} {'seconds':>8} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8}")
    for epoch in range(progress.next_epoch, config.epochs + 1):
        t = time.perf_counter()
        loader = pipeline.train_loader(epoch)
        distributed.set_epoch(loader, epoch)
        lr = optimizer.param_groups[0]["lr"]
        fit = fit_epoch(parallel, loader, s.device, optimizer, loss_fn, s.arith, scheduler,
                        desc=f"epoch {epoch}/{config.epochs}")
        distributed.sync_buffers(net)  # every rank validates exactly the model rank 0 saves
        with wise.mixed(model) if wise else nullcontext() as tuned:
            val = evaluate_epoch(net, pipeline.val_loader(), s.device, s.arith)
            seconds = time.perf_counter() - t + (s.setup_seconds if epoch == progress.next_epoch else 0.0)
            record_epoch(s, progress, epoch, seconds, fit, val, lr, {
                "model": tuned if wise else model.state_dict(), "wise_start": wise.start if wise else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "loader_rng": pipeline.generator.get_state()})
            s.run.draw_curves(progress.rows, note=curves_note)
    return progress


STRATEGIES: dict[str, Callable[[Session], Progress]] = {"probe": fit_probe, "minibatch": fit_minibatch,
                                                        "partial": fit_partial}


def record_epoch(s: Session, progress: Progress, epoch: int, seconds: float, fit: EpochResult, val: EpochResult,
                 lr: float, state: dict, quiet: bool = False) -> None:
    """The epoch's row and line, the best so far, and the run folder's checkpoint and model files."""
    progress.elapsed += seconds
    progress.rows.append({"epoch": epoch, "seconds": round(seconds, 3), "train_loss": fit.loss,
                          "train_accuracy": fit.accuracy, "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": lr})
    progress.last_val = val
    if not quiet:
        s.log(f"{epoch:>5} {seconds:>8.1f} {fit.loss:>10.4f} {fit.accuracy:>9.4f} {val.loss:>9.4f} {val.accuracy:>8.4f}")
    improved = val.accuracy > progress.best["val_accuracy"]
    if improved:
        progress.best = {"val_accuracy": val.accuracy, "epoch": epoch}
    checkpoint = {**state, "epoch": epoch, "best": progress.best, "rows": progress.rows,
                  "elapsed": progress.elapsed, "rng": torch.get_rng_state()}
    s.run.end_epoch(checkpoint, s.model, {**s.model_meta(), "training": {"epoch": epoch, "val_accuracy": val.accuracy}},
                    improved)


def _restore(s: Session, optimizer, scheduler) -> Progress:
    checkpoint = s.checkpoint
    s.model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])
    if "loader_rng" in checkpoint:  # absent in runs from fruitnet 0.1.0's first releases
        s.pipeline.generator.set_state(checkpoint["loader_rng"])
    progress = Progress(checkpoint["epoch"] + 1, checkpoint["best"], checkpoint["rows"], checkpoint["elapsed"])
    s.log(f"resuming {s.run.path} at epoch {progress.next_epoch}")
    return progress


def finish(s: Session, progress: Progress) -> dict:
    """Calibration and the unknown verdict into the model files, summary.json, the last lines."""
    if progress.rows:
        frozen = s.config.mode == "freeze"  # else the cache holds mid-network maps (partial), not features
        cached = s.pipeline.feature_views[0].tensors[0] if frozen and s.pipeline.feature_views else None
        s.run.add_trust(progress.best["epoch"], progress.rows[-1]["epoch"], s.config.unknown_recall, s.device,
                        s.log, val_set=s.pipeline.val, train_set=s.pipeline.plain_train, train_features=cached,
                        mode=s.config.mode, negatives=s.data.negatives)
    pipeline, data = s.pipeline, s.data
    summary = {"best_val_accuracy": progress.best["val_accuracy"], "best_epoch": progress.best["epoch"],
               "epochs": len(progress.rows), "seconds": round(progress.elapsed, 2),
               "model": str(s.run.path / "best.safetensors"), "last_model": str(s.run.path / "last.safetensors"),
               "run": str(s.run.path), "warnings": data.report.get("warnings", []),
               "skipped": _skipped(data.report) + len(pipeline.train.dropped) + len(pipeline.val.dropped)}
    pictures = (_tensorboard_pictures(data.classes, pipeline.val.paths, progress.last_val)
                if s.run.writer is not None and progress.last_val is not None else None)
    s.run.finish(summary, pictures)
    s.log(f"best validation accuracy {progress.best['val_accuracy']:.4f} at epoch {progress.best['epoch']}; "
          f"{progress.elapsed:.1f}s")
    if summary["skipped"]:
        s.log(f"{summary['skipped']} image file(s) could not be used (listed in data_report.txt); the run is "
              "complete, and the exit code is 1")
    s.log(f"outputs in {s.run.path}/: best.safetensors, last.safetensors, metrics.csv, curves.png, split.csv, "
          "data_report.txt, config.json, summary.json" + (", tensorboard/" if s.config.tensorboard else ""))
    distributed.barrier()  # every rank returns once rank 0 has written everything
    return summary


# --- the pieces the strategies share ------------------------------------------------------------

def make_optimizer(params, recipe: Recipe, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"the {recipe.optimizer} optimizer is not for mini-batches")


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
        # float32 in (cached feature maps are bf16): autocast picks the arithmetic
        x, y = arith.prepare_input(x.to(device, torch.float32, non_blocking=True)), y.to(device, non_blocking=True)
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


@torch.no_grad()
def evaluate_epoch(net: nn.Module, loader, device, arith: Arithmetic, desc: str = "validating") -> EpochResult:
    """Plain cross-entropy (comparable across recipes) and accuracy over every validation image
    once, with the logits of all of them in order (on every rank)."""
    net.eval()
    logits, targets = [], []
    for x, y in progress_bar(loader, desc=desc, unit="batch", disable=len(loader) < 2 or not distributed.is_main()):
        with arith.autocast(device):
            logits.append(net(arith.prepare_input(x.to(device, torch.float32))).float().cpu())
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


def warm_up_head(s: Session) -> None:
    """LP-FT: train the new head on cached features of the unaugmented training photos first, so
    that fine-tuning starts from a sensible head instead of random gradients through the body."""
    t0 = time.perf_counter()
    recipe, config, pipeline = s.recipe, s.config, s.pipeline
    features = from_dataset(s.model.body, pipeline.plain_train, pipeline.batch_size, s.device, s.arith,
                            pipeline.workers, "features (head warm-up)")
    loader = make_loader(features, pipeline.batch_size, True, 0, seed=config.seed, weights=pipeline.sample_weights)
    loss_fn = make_loss(recipe, s.balance, s.device, label_smoothing=0.0)
    optimizer = make_optimizer(s.model.head.parameters(), recipe, config.lr * recipe.head_warmup_lr_factor,
                               config.weight_decay)
    scheduler = make_scheduler(optimizer, recipe, recipe.head_warmup_epochs, len(loader))
    head = distributed.wrap(s.model.head)
    for epoch in range(recipe.head_warmup_epochs):
        distributed.set_epoch(loader, epoch)
        result = fit_epoch(head, loader, s.device, optimizer, loss_fn, choose_arithmetic("fp32", s.device), scheduler)
    s.log(f"head warm-up on cached features: {recipe.head_warmup_epochs} epochs, train accuracy "
          f"{result.accuracy:.4f}, {time.perf_counter() - t0:.1f}s")


def _saved_data(saved: SavedRun, log) -> Data:
    """The run's own split; photos that have disappeared since are left out, and said so."""
    lists = []
    for items in (saved.train_items, saved.val_items, saved.negatives):
        missing = [it for it in items if not os.path.isfile(it.path)]
        for it in missing:
            log(printable(f"skipped {it.path}: file no longer exists"))
        lists.append([it for it in items if os.path.isfile(it.path)])
    report = {"warnings": split_warnings(saved.config["classes"], *lists[:2]),
              "skipped": [{"path": it.path, "reason": "file no longer exists"}
                          for items in (saved.train_items, saved.val_items, saved.negatives) for it in items
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
