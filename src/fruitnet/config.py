"""What a training run is asked to do: the typed recipes and TrainConfig (no torch import here).

A recipe holds every number the training loop uses; TrainConfig holds what the user chose.
The command line derives its options, defaults and help text from these two, so a value is
written in one place only.  `resolve` turns what was given into a complete, checked config:
the recipe fills what the user left out, and nothing the user gave is ever overridden.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from fruitnet.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")  # arithmetic.choose_arithmetic resolves them per device
UNKNOWN_RECALL = 0.95  # share of validation photos that keep their label (the rest set the "unknown" threshold)


def _check_literals(obj) -> None:
    """Refuse a value outside a Literal field's choices (an unknown optimizer must not become AdamW)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        literal = hint if typing.get_origin(hint) is Literal else next(
            (a for a in args if typing.get_origin(a) is Literal), None)
        value = getattr(obj, f.name)
        if literal is not None and value is not None and value not in typing.get_args(literal):
            raise UsageError(f"{f.name} must be one of {', '.join(map(str, typing.get_args(literal)))}, "
                             f"not {value!r}")


@dataclass(frozen=True)
class Recipe:
    """Every number a recipe uses.  `epochs`, `lr`, `weight_decay` and `batch_size` are defaults
    that --epochs, --lr, --weight-decay and --batch-size replace.

    `strategy` names the training loop (training.STRATEGIES): 'probe' fits the head once, by
    full-batch L-BFGS on cached features, to convergence; 'minibatch' runs epochs of SGD or AdamW;
    'partial' fits the probe, then trains the body's last `unfreeze_last` stages and the head
    for epochs on cached mid-network features (the frozen stages run once)."""

    description: str
    strategy: Literal["probe", "minibatch", "partial"]
    lr: float
    weight_decay: float  # probe: an L2 penalty weight_decay/2 x |W|^2 added to the mean loss
    epochs: int  # probe: 1 (one fit)
    optimizer: Literal["sgd", "adamw", "lbfgs"] = "sgd"  # lbfgs: the probe's, full batch
    mode: Literal["freeze", "unfreeze", "partial"] = "unfreeze"  # what --mode defaults to with this recipe
    batch_size: int = 32
    momentum: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = 0.0  # linear learning-rate warm-up, in epochs (cosine schedule)
    label_smoothing: float = 0.0  # training loss only; validation loss is plain cross-entropy
    augment: Literal["none", "light"] = "none"
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random-resized crop: share of the image's area
    feature_views: int = 1  # frozen body: cached feature views (1 plain + n-1 augmented)
    head_warmup_epochs: int = 0  # unfrozen: train the new head on cached features first (LP-FT)
    head_warmup_lr_factor: float = 10.0  # the head warm-up's lr, as a multiple of lr
    low_res_size: int | None = None  # progressive resizing: train at this size first ...
    low_res_fraction: float = 0.0  # ... for this share of the epochs, then at the model's input size
    drop_last: bool = False  # one batch shape per resolution: bf16 kernels are compiled per shape
    wise: float = 1.0  # unfreeze: WiSE-FT, the saved model is (1 - wise) x head-only + wise x fine-tuned
    max_iterations: int = 125  # probe: L-BFGS iterations at most (it stops earlier once converged)
    unfreeze_last: int = 0  # partial: how many of the body's last stages train (with conv_head and the head)

    def __post_init__(self):
        _check_literals(self)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError(f"crop_scale must be 0 < low <= high <= 1, not {self.crop_scale}")
        if not 0 <= self.wise <= 1:
            raise UsageError(f"wise must be between 0 and 1, not {self.wise}")
        if self.feature_views < 1 or self.epochs < 1 or self.batch_size < 1:
            raise UsageError("feature_views, epochs and batch_size must be at least 1")
        if (self.strategy == "probe") != (self.optimizer == "lbfgs"):
            raise UsageError("the probe strategy, and it alone, uses the lbfgs optimizer")
        if (self.strategy == "partial") != (self.mode == "partial") or (self.mode == "partial") != (
                self.unfreeze_last > 0):
            raise UsageError("the partial strategy, and it alone, runs in mode partial with unfreeze_last stages")

    def low_res_epochs(self, epochs: int) -> int:
        """How many of `epochs` train at low_res_size (0 without progressive resizing)."""
        return int(self.low_res_fraction * epochs) if self.low_res_size else 0


RECIPES: dict[str, Recipe] = {
    # Chosen by measurement (bench/bench_transfer.py): on photos from other sources the pretrained
    # features with a fully fitted linear head beat every fine-tuned variant, in seconds.
    "probe": Recipe(
        description="frozen body: logistic regression on the pretrained features, fitted to convergence "
                    "(full-batch L-BFGS on cached features)",
        strategy="probe", optimizer="lbfgs", lr=1.0, weight_decay=0.001, epochs=1, mode="freeze"),
    "original": Recipe(
        description="the original project exactly: plain SGD, constant lr, no augmentation",
        strategy="minibatch", optimizer="sgd", lr=0.001, weight_decay=0.01, epochs=30),
    # Chosen by measurement (bench/bench_train.py): see docs/results.md.
    "fast": Recipe(
        description="head warm-up on cached features, then AdamW, cosine, label smoothing, "
                    "random-resized crops and flips, low resolution first; saves the WiSE-FT mix (0.5)",
        strategy="minibatch", optimizer="adamw", lr=0.001, weight_decay=0.05, epochs=8, schedule="cosine",
        warmup_epochs=0.5, label_smoothing=0.1, augment="light", feature_views=4, head_warmup_epochs=40,
        low_res_size=160, low_res_fraction=0.5, drop_last=True,
        wise=0.5),  # WiSE-FT halfway: better on other sources and on its own split (bench_transfer.py)
    # Chosen by measurement (bench/bench_accuracy.py, docs/results-accuracy.md).
    "partial": Recipe(
        description="the probe's head, then the body's last stages and the head fine-tuned for epochs on cached "
                    "mid-network feature maps (AdamW, cosine, label smoothing, random-resized crops and flips)",
        strategy="partial", mode="partial", unfreeze_last=2, optimizer="adamw", lr=0.001, weight_decay=0.05,
        epochs=8, batch_size=64, schedule="cosine", warmup_epochs=0.5, label_smoothing=0.1, augment="light",
        feature_views=4),
}
RECIPE_ALIASES = {"seed": "original"}  # the original recipe's first name: old commands and runs keep working
DEFAULT_RECIPE = "probe"  # without --recipe or --mode, choose_recipe picks by the data's size
UNFREEZE_RECIPE = "fast"  # the recipe when only --mode unfreeze is given
PARTIAL_RECIPE = "partial"  # ... and with only --mode partial
# The default trains the partial recipe from this many training photos on, the probe below it
# (measured: bench/bench_accuracy.py --sizes, docs/results-accuracy.md).
PARTIAL_FROM_PHOTOS = 1500
DEFAULT_BACKBONE = "efficientnet_lite1"  # the best offline backbone by bench/bench_transfer.py


# fruitnet teach's rankings of the new photos (teach.rank); coverage ships, chosen by bench/bench_teach.py
TEACH_STRATEGIES = ("coverage", "diverse", "uncertainty", "random")


def check_unknown_recall(recall: float) -> float:
    """The share of validation photos that keep their label: strictly between 0 and 1."""
    if not 0 < recall < 1:
        raise UsageError(f"--unknown-recall must be between 0 and 1, the share of validation photos to accept; "
                         f"not {recall}")
    return float(recall)


def _opt(default, help: str, **argparse):
    """A TrainConfig field with the command line's help text (and argparse extras) beside it."""
    return field(default=default, metadata={"help": help, **argparse})


@dataclass(frozen=True)
class TrainConfig:
    """What the user chose.  None for epochs, lr, weight_decay, batch_size: the recipe's."""

    data: str | tuple[str, ...] | None = None  # one folder, or several merged class by class (train A/ B/)
    val_dir: str | None = _opt(None, "a separate labelled folder for validation (instead of splitting DATA)",
                               flag="--val", metavar="DIR")
    out: str | None = _opt(None, "run folder (default runs/<timestamp>); never overwritten", metavar="RUN")
    backbone: str = _opt(DEFAULT_BACKBONE, "pretrained network to fine-tune (resnet18, the original project's, "
                                           "needs its weights downloadable or --weights FILE)", choices="backbones")
    weights: str = _opt("imagenet", "imagenet | none | FILE (a state dict)")
    mode: Literal["freeze", "unfreeze", "partial"] | None = _opt(
        None, "freeze: only the new last layer learns; unfreeze: every layer learns; partial: the last "
              "--unfreeze-last stages of the body and the last layer learn, on cached mid-network features",
        recipe=True)
    unfreeze_last: int | None = _opt(None, "partial: how many of the body's last stages learn", type="positive_int",
                                     recipe=True)
    recipe: str | None = _opt(None, f"training recipe (default: by the training photos' count, probe under "
                                    f"{PARTIAL_FROM_PHOTOS:,}, partial from there, said once and kept in config.json; "
                                    f"{UNFREEZE_RECIPE} with --mode unfreeze, {PARTIAL_RECIPE} with --mode partial; "
                                    "'original', also spelled 'seed', is the original project's exactly)",
                              choices="recipes")
    epochs: int | None = _opt(None, "passes over the training photos", type="positive_int", recipe=True)
    batch_size: int | None = _opt(None, "photos per step (the global batch under torchrun)",
                                  type="positive_int", recipe=True)
    lr: float | None = _opt(None, "learning rate", type="positive_float", recipe=True)
    wise: float | None = _opt(None, "unfreeze: WiSE-FT weight mix saved as the model, 0 = the head-only model "
                                    "(pretrained body), 1 = the fine-tuned one", type="mix", recipe=True)
    weight_decay: float | None = _opt(None, "weight decay", type="non_negative_float", recipe=True)
    val_fraction: float = _opt(0.25, "share of each class held out for validation", type="fraction")
    seed: int = _opt(0, "seed for the split, the initial head and the augmentations", type=int)
    precision: Literal[PRECISIONS] = _opt(
        "auto", "auto: bf16 where the CPU (AVX512-BF16/AMX) or GPU runs it natively, else fp32")
    feature_cache: bool = _opt(True, "in freeze mode, run the backbone on every image every epoch (slow)",
                               flag="--no-feature-cache")
    image_cache: bool = _opt(True, "decode every image every epoch instead of once per run",
                             flag="--no-image-cache")
    workers: int = _opt(2, "image-decoding worker processes (without the image cache)", type=int)
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    unknown_recall: float = _opt(UNKNOWN_RECALL, "share of validation photos that keep their label; photos less "
                                 "typical than the rest are answered 'unknown'", type="fraction")
    tensorboard: bool = _opt(False, "also write TensorBoard event files into the run folder "
                                    "(pip install 'fruitnet[tensorboard]')", flag="--tensorboard")
    exclude: str | None = _opt(None, "leave the photos listed in FILE out of training and validation (one path "
                                     "a line, e.g. from check --deep --write-exclude); DATA is not touched",
                               metavar="FILE")
    balance: Literal["auto", "none", "weights", "sampler"] = _opt(
        "auto", "auto: class-weighted loss when the largest class has more than 1.5x the photos of the "
                "smallest; weights; sampler (draw every class equally often); none")

    def __post_init__(self):
        _check_literals(self)
        check_unknown_recall(self.unknown_recall)
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr must be more than 0, not {self.lr}")


@dataclass(frozen=True)
class InferenceOptions:
    """How a model file is run, the same for predict, evaluate, serve and export (each command
    offers the fields that apply to it; cli.py generates the options from these fields)."""

    runtime: Literal["auto", "torch", "onnx"] = _opt(
        "auto", "torch runs a .safetensors file (or the original model.pth), onnx an exported .onnx file with "
                "onnxruntime; auto: by the file's suffix")
    precision: Literal[PRECISIONS] = _opt(
        "auto", "auto: bf16 where the CPU (AVX512-BF16/AMX) or GPU runs it natively, else fp32 (PyTorch runtime)")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N (PyTorch runtime)")
    legacy: bool = _opt(False, "MODEL is the original project's model.pth (detected automatically otherwise)",
                        flag="--legacy")
    unknown: bool = _opt(True, "never answer 'unknown': always the best class (in_distribution is still given)",
                         flag="--no-unknown")
    tta: bool = _opt(False, "average each photo's prediction with its mirror image's (test-time augmentation): "
                            "twice the compute; an .onnx file must have been exported with --tta", flag="--tta")
    batch_size: int = _opt(32, "photos per forward pass", type="positive_int")

    def __post_init__(self):
        _check_literals(self)


# On --resume these may change: they say how to run, not what to train.  Every other option is
# refused (exit 2) rather than silently ignored.
RESUMABLE = ("epochs", "device", "workers", "precision")


def data_folders(config: TrainConfig) -> list[str]:
    """The data folders, one or several (train A/ B/)."""
    if config.data is None:
        return []
    return [config.data] if isinstance(config.data, str) else list(config.data)


def recipe_name(config: TrainConfig) -> str:
    if config.recipe is not None:
        return RECIPE_ALIASES.get(config.recipe, config.recipe)
    return {"unfreeze": UNFREEZE_RECIPE, "partial": PARTIAL_RECIPE}.get(config.mode, DEFAULT_RECIPE)


def choose_recipe(config: TrainConfig, n_train: int, splittable: bool) -> tuple[TrainConfig, str]:
    """The recipe by the data's size when neither --recipe nor --mode was given (as measured: the
    probe is as good on a few hundred photos and seconds long; partial fine-tuning gains from
    PARTIAL_FROM_PHOTOS on), and the one line that says why."""
    if config.recipe is not None or config.mode is not None:
        return config, f"{recipe_name(config)}: as asked"
    if n_train < PARTIAL_FROM_PHOTOS or not splittable:
        why = (f"{n_train} training photos, fewer than {PARTIAL_FROM_PHOTOS}" if splittable
               else f"{config.backbone} cannot be fine-tuned in part")
        return replace(config, recipe="probe"), f"auto: probe ({why}: the frozen body's features, in seconds)"
    return replace(config, recipe="partial"), (
        f"auto: partial ({n_train} training photos, at least {PARTIAL_FROM_PHOTOS}: the last stages fine-tuned on "
        "cached mid-network features; --recipe probe trains in seconds, and only a probe can be taught with "
        "fruitnet teach)")


def recipe_for(config: TrainConfig) -> Recipe:
    try:
        return RECIPES[recipe_name(config)]
    except KeyError:
        raise UsageError(f"unknown recipe {config.recipe!r}; choose one of: {', '.join(RECIPES)}") from None


def resolve(config: TrainConfig, distributed: bool = False) -> TrainConfig:
    """Fill what the user left to the recipe (what the user gave is kept exactly), and refuse
    options that cannot go together, before anything is read or written."""
    recipe = recipe_for(config)
    given_epochs, given_unfreeze = config.epochs, config.unfreeze_last
    config = replace(config, recipe=recipe_name(config), **{
        f.name: getattr(recipe, f.name) for f in fields(config)
        if f.metadata.get("recipe") and getattr(config, f.name) is None})
    if recipe.strategy == "probe":
        if config.mode != "freeze" or not config.feature_cache:
            raise UsageError(f"the {config.recipe} recipe fits the last layer on cached features: it needs --mode "
                             "freeze and the feature cache (for fine-tuning every layer use --recipe fast)")
        if given_epochs not in (None, 1):
            raise UsageError(f"the {config.recipe} recipe fits once, to convergence (at most {recipe.max_iterations} "
                             "L-BFGS iterations): --epochs is for the mini-batch recipes (original, fast)")
        if config.balance == "sampler":
            raise UsageError(f"--balance sampler draws batches; the {config.recipe} recipe fits on all photos at "
                             "once: use --balance weights")
    if (recipe.strategy == "partial") != (config.mode == "partial"):
        raise UsageError(f"--mode partial goes with the partial recipe (not {config.recipe}); leave out --recipe")
    if recipe.strategy != "partial" and given_unfreeze:
        raise UsageError("--unfreeze-last is for partial fine-tuning: add --mode partial")
    if config.balance == "sampler" and distributed:
        raise UsageError("--balance sampler is not supported under torchrun; use --balance weights")
    return config


def resume_config(saved: dict, given: dict) -> TrainConfig:
    """The run's own config, with the RESUMABLE values the user gave again; any other given value
    is refused: changing what is trained halfway would make the run's records wrong."""
    refused = sorted(k for k, v in given.items() if v is not None and k not in RESUMABLE
                     and v != saved.get(k))
    if refused:
        names = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise UsageError(f"--resume continues a run as it was configured; {names} cannot change "
                         f"(only {', '.join('--' + k for k in RESUMABLE)} can): start a new run instead")
    known = {f.name for f in fields(TrainConfig)}
    # a run saved before a setting existed continues as it began: without class balancing or WiSE-FT
    values = {"balance": "none", "wise": 1.0, **{k: v for k, v in saved.items() if k in known}}
    values.update({k: v for k, v in given.items() if v is not None and k in RESUMABLE})
    return TrainConfig(**values)
