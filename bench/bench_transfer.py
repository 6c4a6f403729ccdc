"""Cross-source benchmark (issue 8): train on one source of photos, test on the others.

    .venv/bin/python bench/bench_transfer.py                  # every backbone and variant, 3 seeds
    .venv/bin/python bench/bench_transfer.py --quick          # Lite0, two variants, 1 seed: a few minutes
    .venv/bin/python bench/bench_transfer.py --backbones efficientnet_lite1 --variants probe fast

Tasks (a model per task, backbone, variant and seed):
- webfruit -> : trained on webfruit's 3:1 split (seeded); tested on the 222 held-out webfruit photos
  (in-source), all 1,257 fruits360 studio shots, the 235 grocery/tomato shop photos (recall of
  "tomato") and the 15 comp309-sample photos;
- fruits360 -> webfruit: trained on fruits360's 3:1 split; tested on all 892 webfruit photos.
Choices made inside a variant (WiSE-FT's mixing coefficient, the probe's L2) use the training
source's own validation split only; grocery/ is never used for anything but measuring.

Decoded images and frozen-body features are cached under /tmp/transfer (FRUITNET_BENCH_CACHE),
so a second run only trains.  Prints markdown tables and writes bench/results/transfer.md with
the git commit, the command and the machine.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRUITNET_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("FRUITNET_BENCH_CACHE", "/tmp/transfer"))
CLASSES = ["cherry", "strawberry", "tomato"]

from fruitnet.arithmetic import choose  # noqa: E402
from fruitnet.backbones import create_body, get_backbone  # noqa: E402
from fruitnet.cache import DecodedImages  # noqa: E402
from fruitnet.dataset import Item, scan, split  # noqa: E402

DEVICE = torch.device("cpu")
ARITH = choose("auto", DEVICE)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --- data: every usable photo of each source, decoded once per input size ---------------------

@dataclass
class Source:
    name: str
    items: list[Item]
    targets: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.targets = torch.tensor([CLASSES.index(it.label) for it in self.items])


def load_sources() -> dict[str, Source]:
    out = {}
    for name in ("webfruit", "fruits360", "comp309-sample"):
        out[name] = Source(name, scan(SHARED / name, progress=False).usable)
    grocery = scan(SHARED / "grocery", progress=False).usable
    out["grocery-tomato"] = Source("grocery-tomato", [it for it in grocery if it.label == "tomato"])
    return out


def split_indices(source: Source, seed: int) -> tuple[list[int], list[int]]:
    """fruitnet's own 3:1 stratified split (duplicates on one side), as indices into source.items."""
    from fruitnet.dataset import Catalog

    where = {it.path: i for i, it in enumerate(source.items)}
    train, val = split(Catalog(source.name, CLASSES, source.items), 0.25, seed)
    return [where[it.path] for it in train], [where[it.path] for it in val]


def decoded(source: Source, pre: dict) -> DecodedImages:
    """Decoded, oriented, resized uint8 images (cache.DecodedImages), cached on disk per size."""
    from fruitnet.transforms import resize_size

    path = CACHE / "decoded" / f"{source.name}-{resize_size(pre)}-{pre['interpolation']}.pt"
    ds = DecodedImages([], CLASSES, pre, progress=False)
    if path.is_file():
        ds.images = torch.load(path, weights_only=True)
    else:
        ds.images = DecodedImages(source.items, CLASSES, pre, desc=f"decoding {source.name}").images
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ds.images, path)
    ds.targets = source.targets.tolist()
    return ds


class Views(Dataset):
    """Decoded images through a view function (uint8 CHW -> uint8 CHW), normalised for the model."""

    def __init__(self, images: DecodedImages, indices: list[int] | None, view, pre: dict):
        self.images, self.view = images, view
        self.indices = list(range(len(images))) if indices is None else indices
        self.mean = torch.tensor(pre["mean"]).view(3, 1, 1) * 255
        self.std = torch.tensor(pre["std"]).view(3, 1, 1) * 255

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return (self.view(self.images.images[j]).float() - self.mean) / self.std, self.images.targets[j]


def center(pre: dict):
    return T.CenterCrop(pre["input_size"])


def flipped(pre: dict):
    return T.Compose([T.CenterCrop(pre["input_size"]), T.RandomHorizontalFlip(p=1.0)])


@torch.no_grad()
def run_body(body: nn.Module, dataset: Dataset, dtype=torch.float32) -> torch.Tensor:
    body.eval()
    out = []
    for x, _ in DataLoader(dataset, batch_size=64):
        with ARITH.autocast(DEVICE):
            out.append(body(ARITH.prepare_input(x)).to(dtype).contiguous())
    return torch.cat(out)


_bodies: dict[str, nn.Module] = {}


def pretrained_body(backbone: str) -> nn.Module:
    if backbone not in _bodies:
        body, _ = create_body(backbone, "imagenet")
        _bodies[backbone] = ARITH.prepare_model(body).eval()
    return _bodies[backbone]


CUT = 4  # activations are cached where the last CUT body layers begin (EfficientNet: the last two stages)


def view_fn(pre: dict, view: str):
    """'plain' (the evaluation crop), 'flip' (its mirror) or 'AUGMENT@k' (the k-th draw of a
    robust.augmentation, seeded per image so that a view is the same whatever else ran)."""
    if view == "plain":
        return center(pre)
    if view == "flip":
        return flipped(pre)
    from fruitnet.robust import augmentation

    name, k = view.split("@")
    aug = augmentation(name, pre)
    counter = iter(range(10**9))

    def fn(img):
        torch.manual_seed(1000003 * int(k) + next(counter))
        return aug(img)

    return fn


def activations(backbone: str, source: Source, view: str) -> torch.Tensor:
    """The pretrained body's activations where its last CUT layers begin (bf16), every photo of a
    source: the frozen part runs once per view, and fine-tuning the rest only runs the rest."""
    from fruitnet.robust import split_body

    path = CACHE / "acts" / f"{backbone}-cut{CUT}-{source.name}-{view}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    pre = get_backbone(backbone).preprocessing
    prefix, _ = split_body(pretrained_body(backbone), CUT)
    t = time.perf_counter()
    acts = run_body(prefix, Views(decoded(source, pre), None, view_fn(pre, view), pre), dtype=torch.bfloat16)
    seconds = time.perf_counter() - t
    log(f"  activations {backbone} {source.name} {view}: {len(acts)} in {seconds:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(acts, path)
    path.with_suffix(".seconds").write_text(f"{seconds:.2f}")
    return acts


@torch.no_grad()
def run_suffix(suffix: nn.Module, acts: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    suffix.eval()
    out = []
    for i in range(0, len(acts), batch_size):
        with ARITH.autocast(DEVICE):
            out.append(suffix(ARITH.prepare_input(acts[i:i + batch_size].float())).float())
    return torch.cat(out)


def frozen_features(backbone: str, source: Source, view: str) -> torch.Tensor:
    """Pretrained-body features of every photo of a source (see view_fn for the views)."""
    from fruitnet.robust import split_body

    path = CACHE / "features" / f"{backbone}-{source.name}-{view}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    _, suffix = split_body(pretrained_body(backbone), CUT)
    feats = run_suffix(suffix, activations(backbone, source, view))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats


def feature_seconds(backbone: str, source: Source) -> float:
    """Wall-clock of the frozen body over a whole source, as measured when it was cached."""
    for path in (CACHE / "acts" / f"{backbone}-cut{CUT}-{source.name}-plain.seconds",
                 CACHE / "features" / f"{backbone}-{source.name}-plain.seconds"):
        if path.is_file():
            return float(path.read_text())
    return 0.0


# --- the frozen body + logistic regression (the reference probe) ------------------------------

def fit_logreg(x: torch.Tensor, y: torch.Tensor, l2: float) -> nn.Linear:
    """Multinomial logistic regression by L-BFGS: mean cross-entropy + l2/2 * |W|^2 (bias free)."""
    head = nn.Linear(x.shape[1], len(CLASSES))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=500, history_size=20, tolerance_grad=1e-6,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + l2 / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def probe(x_train, y_train, x_val, y_val) -> tuple[nn.Linear, float]:
    """The probe with its L2 strength chosen on the validation split (by log-loss: accuracy ties)."""
    best = None
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
        head = fit_logreg(x_train, y_train, l2)
        with torch.no_grad():
            loss = nn.functional.cross_entropy(head(x_val), y_val).item()
        if best is None or loss < best[0]:
            best = (loss, head, l2)
    return best[1], best[2]


def draws(augment: str, n: int) -> tuple[str, ...]:
    """Names of the first n cached draws of an augmentation: ('light@0', 'light@1', ...)."""
    return tuple(f"{augment}@{k}" for k in range(n))


@dataclass(frozen=True)
class Probe:
    """The frozen body + logistic regression, on the plain view plus extra (augmented) views."""
    views: tuple[str, ...] = ()


# --- fine-tuning, compact (fruitnet's pieces: DecodedImages, make_scheduler, robust.py) ---------

@dataclass(frozen=True)
class Recipe:
    """Fine-tuning after the probe (LP-FT).  The defaults are fruitnet's 'fast' recipe."""
    epochs: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    body_lr_scale: float = 1.0  # the body's rate relative to the head's
    layer_decay: float | None = None  # and each layer towards the input this much lower again
    freeze_layers: int = 0  # the first n body layers (robust.body_layers) stay as pretrained
    augment: str = "light"
    mix: str = "none"
    label_smoothing: float = 0.1
    low_res: int | None = 160  # the first half of the epochs at this size
    ema: float | None = None
    batch_size: int = 32


def finetune(backbone: str, images: DecodedImages, train_idx: list[int], head: nn.Linear, recipe: Recipe,
             seed: int) -> dict[str, dict]:
    """Returns state dicts: 'probe' (pretrained body + probe head), 'ft' (last epoch), 'ema'."""
    import copy

    from fruitnet.model import Classifier
    from fruitnet.robust import augmentation, batch_mix, body_layers, ema, param_groups
    from fruitnet.training import make_scheduler

    torch.manual_seed(seed)
    pre = get_backbone(backbone).preprocessing
    model = Classifier(copy.deepcopy(pretrained_body(backbone)), 1280, len(CLASSES))
    model.head.load_state_dict(head.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = body_layers(model.body)[: recipe.freeze_layers]
    for layer in frozen:
        layer.requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, recipe.lr, recipe.body_lr_scale, recipe.layer_decay),
                            weight_decay=recipe.weight_decay)
    steps = len(train_idx) // recipe.batch_size
    sched = make_scheduler(opt, {"schedule": "cosine", "warmup_epochs": 0.5}, recipe.epochs, steps)
    averaged = ema(model, recipe.ema) if recipe.ema else None
    mix = batch_mix(recipe.mix, len(CLASSES))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(recipe.epochs):
        size = recipe.low_res if recipe.low_res and epoch < recipe.epochs // 2 else pre["input_size"]
        data = Views(images, train_idx, augmentation(recipe.augment, pre, size), pre)
        model.train()
        for layer in frozen:
            layer.eval()  # pretrained BatchNorm statistics stay
        for x, y in DataLoader(data, batch_size=recipe.batch_size, shuffle=True, drop_last=True, generator=g):
            if mix is not None:
                x, y = mix(x, y)
            with ARITH.autocast(DEVICE):
                logits = model(ARITH.prepare_input(x)).float()
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if averaged is not None:
                averaged.update_parameters(model)
    out = {"probe": start, "ft": model.state_dict()}
    if averaged is not None:
        out["ema"] = averaged.module.state_dict()
    return out


@dataclass(frozen=True)
class Partial:
    """LP-FT of the last `tuned` body layers (<= CUT) and the head, on cached activations of the
    frozen rest: epoch e trains on view e % n of each photo (the plain crop, then augmented views)."""
    tuned: int = 3
    epochs: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    body_lr_scale: float = 1.0
    label_smoothing: float = 0.1
    views: tuple[str, ...] = ("plain",) + draws("light", 4)
    ema: float | None = None
    batch_size: int = 32


def finetune_partial(backbone: str, src: Source, train_idx: list[int], head: nn.Linear, recipe: Partial,
                     seed: int) -> dict[str, dict]:
    from fruitnet.model import Classifier
    from fruitnet.robust import body_layers, ema, param_groups, split_body
    from fruitnet.training import make_scheduler

    torch.manual_seed(seed)
    model = Classifier(copy_body(backbone), 1280, len(CLASSES))
    model.head.load_state_dict(head.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    layers = body_layers(model.body)
    frozen = layers[: len(layers) - recipe.tuned]
    for layer in frozen:
        layer.requires_grad_(False)
    _, suffix = split_body(model.body, CUT)
    net = nn.Sequential(suffix, model.head)
    ARITH.prepare_model(net)
    views = [activations(backbone, src, view)[train_idx] for view in recipe.views]
    y = src.targets[train_idx]
    opt = torch.optim.AdamW(param_groups(model, recipe.lr, recipe.body_lr_scale), weight_decay=recipe.weight_decay)
    steps = len(train_idx) // recipe.batch_size
    sched = make_scheduler(opt, {"schedule": "cosine", "warmup_epochs": 0.5}, recipe.epochs, steps)
    averaged = ema(model, recipe.ema) if recipe.ema else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(recipe.epochs):
        x_all = views[epoch % len(views)]
        net.train()
        for layer in frozen:
            layer.eval()
        order = torch.randperm(len(y), generator=g)
        for i in range(steps):
            batch = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            with ARITH.autocast(DEVICE):
                logits = net(ARITH.prepare_input(x_all[batch].float())).float()
            loss = loss_fn(logits, y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if averaged is not None:
                averaged.update_parameters(model)
    out = {"probe": start, "ft": model.state_dict()}
    if averaged is not None:
        out["ema"] = averaged.module.state_dict()
    return out


@torch.no_grad()
def cached_logits(backbone: str, state: dict, source: Source, indices: list[int] | None,
                  tta: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of a model whose frozen part is the pretrained one, from the cached activations."""
    from fruitnet.model import Classifier
    from fruitnet.robust import split_body

    model = Classifier(copy_body(backbone), 1280, len(CLASSES))
    model.load_state_dict(state)
    _, suffix = split_body(model.body, CUT)
    net = ARITH.prepare_model(nn.Sequential(suffix, model.head))
    sel = slice(None) if indices is None else indices
    plain = run_suffix(net, activations(backbone, source, "plain")[sel])
    flip = run_suffix(net, activations(backbone, source, "flip")[sel]) if tta else None
    return plain, flip


@torch.no_grad()
def model_logits(backbone: str, state: dict, images: DecodedImages, indices: list[int] | None,
                 tta: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of the plain view and, with tta, of the mirrored one."""
    from fruitnet.model import Classifier

    pre = get_backbone(backbone).preprocessing
    model = Classifier(copy_body(backbone), 1280, len(CLASSES))
    model.load_state_dict(state)
    plain = model.head(run_body(model.body, Views(images, indices, center(pre), pre)))
    flip = model.head(run_body(model.body, Views(images, indices, flipped(pre), pre))) if tta else None
    return plain, flip


def copy_body(backbone: str) -> nn.Module:
    import copy

    return copy.deepcopy(pretrained_body(backbone))


# --- variants, tasks, readouts --------------------------------------------------------------

VARIANTS: dict[str, Recipe | Probe | Partial | str] = {
    "probe": Probe(),  # frozen body + logistic regression
    "probe-views": Probe(views=draws("light", 4)),
    "probe-flip": Probe(views=("flip",)),
    "probe-bgtile": Probe(views=("flip",) + draws("flip+background+tile", 2)),
    "fruitnet": "fast",  # `fruitnet train` itself (training.train), its default recipe: wall-clock included
    "fast": Recipe(),  # the same recipe in the compact loop, for the readouts below
    "lowbody": Recipe(body_lr_scale=0.1),
    "layerdecay": Recipe(body_lr_scale=0.5, layer_decay=0.75),
    "ema": Recipe(ema=0.99),
    "strong": Recipe(augment="light+trivial+erasing", mix="mixup/cutmix"),
    "color": Recipe(augment="light+color"),
    "background": Recipe(augment="light+background+color"),
    "partial": Recipe(freeze_layers=6),
    "mosaic": Recipe(mix="mosaic"),
    "last1": Partial(tuned=3),  # the last stage, conv_head, bn2
    "last2": Partial(tuned=4),  # the last two stages, conv_head, bn2
    "last2-low": Partial(tuned=4, body_lr_scale=0.1),
    "last2-ema": Partial(tuned=4, ema=0.99),
    "last1-flip": Partial(tuned=3, views=("plain", "flip")),
    "last2-flip": Partial(tuned=4, views=("plain", "flip")),
    "last1-bgtile": Partial(tuned=3, views=("plain", "flip") + draws("flip+background+tile", 2)),
    "mosaic-color": Recipe(augment="light+color", mix="mosaic"),
}
TASKS = {"webfruit": ["fruits360", "grocery-tomato", "comp309-sample"], "fruits360": ["webfruit"]}
COLUMNS = [("webfruit", "fruits360", "webfruit -> fruits360"),
           ("webfruit", "grocery-tomato", "webfruit -> grocery/tomato recall"),
           ("webfruit", "comp309-sample", "webfruit -> comp309 (15)"),
           ("fruits360", "webfruit", "fruits360 -> webfruit"),
           ("webfruit", "val", "webfruit 3:1 val"),
           ("webfruit", "seconds", "training s (webfruit)")]
ALPHAS = (0.25, 0.5, 0.75, 1.0)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.argmax(1) == targets).float().mean().item()


def choose_alpha(val_acc: dict[float, float]) -> float:
    """WiSE-FT's mixing coefficient from the training source's validation split: the best accuracy,
    ties going to the smaller alpha (closer to the pretrained features, which travel better)."""
    best = max(val_acc.values())
    return min(a for a, acc in val_acc.items() if acc >= best - 1e-9)


def run_one(backbone: str, variant: str, task: str, seed: int, sources: dict[str, Source], tta: bool) -> dict:
    """{readout: {eval set: accuracy}, 'seconds': training wall-clock, ...} for one model family."""
    from fruitnet.robust import interpolate

    src = sources[task]
    train_idx, val_idx = split_indices(src, seed)
    pre = get_backbone(backbone).preprocessing
    eval_sets = {"val": (src, val_idx)} | {name: (sources[name], None) for name in TASKS[task]}

    def target(name):
        s, idx = eval_sets[name]
        return s.targets if idx is None else s.targets[idx]

    recipe = VARIANTS[variant]
    t0 = time.perf_counter()
    plain = frozen_features(backbone, src, "plain")
    x_train, y_train = plain[train_idx], src.targets[train_idx]
    views = recipe.views if isinstance(recipe, Probe) else ()
    for view in views:  # augmented views of the training photos (never of the validation ones)
        x_train = torch.cat([x_train, frozen_features(backbone, src, view)[train_idx]])
        y_train = torch.cat([y_train, src.targets[train_idx]])
    head, l2 = probe(x_train, y_train, plain[val_idx], src.targets[val_idx])
    probe_seconds = (time.perf_counter() - t0 +
                     (1 + len(views)) * feature_seconds(backbone, src) * len(train_idx) / len(src.items))
    result = {"l2": l2}

    def readout_from_logits(name: str, logits: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
        result[name] = {k: accuracy(p, target(k)) for k, (p, _) in logits.items()}
        if tta:
            result[name + "+tta"] = {k: accuracy((p + f) / 2, target(k)) for k, (p, f) in logits.items()}

    if isinstance(recipe, Probe):
        with torch.no_grad():
            logits = {}
            for name, (s, idx) in eval_sets.items():
                sel = slice(None) if idx is None else idx
                logits[name] = (head(frozen_features(backbone, s, "plain")[sel]),
                                head(frozen_features(backbone, s, "flip")[sel]) if tta else None)
        readout_from_logits("probe", logits)
        result["seconds"] = probe_seconds
        return result

    def evaluate(state: dict, names) -> dict:
        out = {}
        for name in names:
            s, idx = eval_sets[name]
            out[name] = (cached_logits(backbone, state, s, idx, tta) if isinstance(recipe, Partial)
                         else model_logits(backbone, state, decoded(s, pre), idx, tta))
        return out

    if isinstance(recipe, str):  # the real `fruitnet train`
        states, seconds = fruitnet_train(backbone, recipe, src, seed)
    elif isinstance(recipe, Partial):
        t = time.perf_counter()
        states = finetune_partial(backbone, src, train_idx, head, recipe, seed)
        views_seconds = (len(recipe.views) - 1) * feature_seconds(backbone, src) * len(train_idx) / len(src.items)
        seconds = probe_seconds + views_seconds + time.perf_counter() - t
    else:
        t = time.perf_counter()
        states = finetune(backbone, decoded(src, pre), train_idx, head, recipe, seed)
        seconds = probe_seconds + time.perf_counter() - t
    result["seconds"] = seconds
    log(f"    trained in {seconds:.0f}s; evaluating")
    for name in [k for k in ("ft", "ema") if k in states]:
        readout_from_logits(name, evaluate(states[name], eval_sets))
    if "probe" in states:  # WiSE-FT between the probe and the fine-tuned model
        val = {1.0: result["ft"]["val"]}
        for alpha in ALPHAS[:-1]:
            val[alpha] = accuracy(evaluate(interpolate(states["probe"], states["ft"], alpha), ["val"])["val"][0],
                                  target("val"))
        chosen = choose_alpha(val)
        result["alpha_val"] = chosen
        result["wise_val_curve"] = val
        for label, alpha in (("wise0.5", 0.5), ("wise@val", chosen)):
            readout_from_logits(label, evaluate(interpolate(states["probe"], states["ft"], alpha), eval_sets))
    return result


def fruitnet_train(backbone: str, recipe: str, src: Source, seed: int) -> tuple[dict, float]:
    """`fruitnet train SOURCE --backbone B --recipe R --seed S` through the library; the best model."""
    import tempfile

    from safetensors.torch import load_file

    from fruitnet.training import TrainConfig, train

    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        t = time.perf_counter()
        summary = train(TrainConfig(data=str(SHARED / src.name), out=f"{tmp}/run", backbone=backbone, recipe=recipe,
                                    seed=seed), log=lambda *a: None)
        seconds = time.perf_counter() - t
        state = load_file(summary["model"])
    return {"ft": state}, seconds


def cached_run(backbone, variant, task, seed, sources, tta, fresh) -> dict:
    import hashlib
    import json

    recipe = VARIANTS[variant]
    key = hashlib.sha256(repr((backbone, variant, recipe, task, seed, tta)).encode()).hexdigest()[:12]
    path = CACHE / "results" / f"{backbone}-{variant}-{task}-{seed}-{key}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    log(f"  {backbone} {variant} {task} seed {seed} ...")
    result = run_one(backbone, variant, task, seed, sources, tta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


# --- the table --------------------------------------------------------------------------------

def mean_spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict, backbones, variants, seeds) -> str:
    """One row per backbone, variant and readout; mean ± standard deviation over the seeds."""
    header = ["backbone", "variant", "readout"] + [c[2] for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in backbones:
        for v in variants:
            per_seed = {task: [results[(b, v, task, s)] for s in seeds if (b, v, task, s) in results] for task in TASKS}
            readouts = [k for k, val in per_seed["webfruit"][0].items() if isinstance(val, dict) and k != "wise_val_curve"] \
                if per_seed["webfruit"] else []
            for r in readouts:
                cells = []
                for task, column, _ in COLUMNS:
                    runs = per_seed[task]
                    if column == "seconds":
                        cells.append(mean_spread([x["seconds"] for x in runs], 0) if r == readouts[0] else "")
                    else:
                        cells.append(mean_spread([x[r][column] for x in runs if r in x]))
                label = r
                if r.startswith("wise@val"):
                    alphas = [x.get("alpha_val") for t in TASKS for x in per_seed[t]]
                    label += f" (alpha {', '.join(f'{a:g}' for a in alphas)})"
                lines.append("| " + " | ".join([b.replace("efficientnet_", ""), v, label] + cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}; arithmetic {ARITH.dtype} ({ARITH.reason})")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                           "efficientnet_lite2"])
    parser.add_argument("--variants", nargs="+", default=["probe", "fruitnet", "lowbody"], choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3, help="seeds 0..N-1 (split, initialisation, augmentation)")
    parser.add_argument("--tta", action="store_true", help="also read every model out with mirror TTA")
    parser.add_argument("--quick", action="store_true", help="Lite0, probe and lowbody, one seed")
    parser.add_argument("--fresh", action="store_true", help="recompute results cached under " + str(CACHE))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "transfer.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.backbones, args.variants, args.repeats = ["efficientnet_lite0"], ["probe", "lowbody"], 1
    missing = [n for n in ("webfruit", "fruits360", "grocery", "comp309-sample") if not (SHARED / n).is_dir()]
    if missing:
        print(f"{SHARED}: missing {', '.join(missing)}; this benchmark needs ../shared/data "
              "(or FRUITNET_SHARED_DATA)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    sources = load_sources()
    seeds = list(range(args.repeats))
    results = {}
    for b in args.backbones:
        for v in args.variants:
            for task in TASKS:
                for s in seeds:
                    results[(b, v, task, s)] = cached_run(b, v, task, s, sources, args.tta, args.fresh)
    command = " ".join(["python", "bench/bench_transfer.py"] + (argv if argv is not None else sys.argv[1:]))
    report = "\n".join([
        "# Cross-source benchmark (bench/bench_transfer.py)", "",
        f"command: `{command}`  ", f"commit: {git_commit()}  ", f"machine: {machine()}  ",
        f"seeds: {seeds}; cells are mean ± standard deviation over the seeds; "
        f"{time.perf_counter() - t0:.0f} s for this run (results cached in {CACHE} are reused)", "",
        table(results, args.backbones, args.variants, seeds), ""])
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["extract"]:  # fill the activation cache only: extract BACKBONE VIEWS...
        srcs = load_sources()
        for vw in sys.argv[3:]:
            for so in srcs.values():
                if vw in ("plain", "flip") or so.name in TASKS:  # augmented views: training sources only
                    activations(sys.argv[2], so, vw)
        sys.exit(0)
    sys.exit(main())
