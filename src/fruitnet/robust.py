"""Robust fine-tuning: pieces that keep a fine-tuned model right on photos from other sources.

Each piece is small and switchable; the training recipe decides which to use (the cross-source
benchmark, bench/bench_transfer.py, measured them):
- `interpolate`: WiSE-FT (Wortsman et al. 2022), a weight-space mix of the head-only model and
  the fine-tuned one, which recovers the pretrained features' robustness at no inference cost;
- `param_groups`: a lower learning rate for the body than for the head (optionally decaying layer
  by layer towards the input), so fine-tuning distorts pretrained features less;
- `ema`: an exponential moving average of the weights (torch.optim.swa_utils.AveragedModel);
- `TTA`: test-time augmentation as a module (mirror and rescaled views, logits averaged), so it
  exports to ONNX like any model;
- `augmentation` / `batch_mix`: named training augmentations on uint8 image tensors, and
  mixup / cutmix on batches (torchvision.transforms.v2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2 as T

from fruitnet.transforms import _INTERPOLATION


# --- WiSE-FT --------------------------------------------------------------------------------

def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * end, tensor by tensor: alpha 0 is `start`, 1 is `end`, exactly.

    start is the head-only model (pretrained body, trained head), end the fine-tuned one.
    BatchNorm running means and variances are interpolated like the weights: each is the statistic
    of its own endpoint's features, and the mix of the two is what the mixed layers see.
    Integer tensors (BatchNorm's num_batches_tracked) are counters, not weights; they only matter
    for BatchNorm with momentum=None, which none of our backbones uses.  They are interpolated and
    rounded, so that both endpoints stay exact and the count stays a whole number.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
    if start.keys() != end.keys():
        raise ValueError(f"state dicts differ: {sorted(start.keys() ^ end.keys())[:4]}")
    mixed = {}
    for name, a in start.items():
        b = end[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ ({tuple(a.shape)} and {tuple(b.shape)})")
        if alpha == 0.0 or alpha == 1.0:  # exact endpoints, whatever the dtype
            mixed[name] = (a if alpha == 0.0 else b).clone()
        elif a.is_floating_point():
            mixed[name] = torch.lerp(a, b.to(a.dtype), alpha)
        else:
            mixed[name] = torch.round((1 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
    return mixed


# --- learning rates per part ------------------------------------------------------------------

def body_layers(body: nn.Module) -> list[nn.Module]:
    """The body's layers from input to output: its children, with stages (nn.Sequential) opened.

    timm's EfficientNet: conv_stem, bn1, 7 stages, conv_head, bn2; torchvision's ResNet: conv1,
    bn1, then the blocks of layer1..layer4.  Layers without parameters are left out.
    """
    layers = []
    for child in body.children():
        parts = list(child.children()) if isinstance(child, nn.Sequential) else [child]
        layers += [p for p in parts if any(True for _ in p.parameters())]
    return layers


def _forward_children(body: nn.Module) -> list[nn.Module]:
    """The body's children in forward order, stages (nn.Sequential) opened; ends with its pooling."""
    out = []
    for child in body.children():
        out += list(child.children()) if isinstance(child, nn.Sequential) else [child]
    return out


def split_body(body: nn.Module, tuned_layers: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, suffix) with suffix(prefix(x)) == body(x) in eval mode; the suffix holds the last
    `tuned_layers` of body_layers(body) (plus pooling).  Both share the body's modules, so training
    the suffix trains the body; the prefix's output can be cached while it stays frozen."""
    layers = body_layers(body)
    if not 0 < tuned_layers <= len(layers):
        raise ValueError(f"tuned_layers must be between 1 and {len(layers)}, not {tuned_layers}")
    children = _forward_children(body)
    cut = next(i for i, m in enumerate(children) if m is layers[len(layers) - tuned_layers])
    return nn.Sequential(*children[:cut]), nn.Sequential(*children[cut:], nn.Flatten(1))


def param_groups(model: nn.Module, lr: float, body_lr_scale: float = 1.0,
                 layer_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups for a classifier (model.body, model.head).

    The head learns at `lr`; the body's output layer at lr * body_lr_scale, and with layer_decay
    each layer further towards the input at layer_decay times the next one's rate.  Frozen
    parameters (requires_grad False) are left out.  Each group carries its own "lr".
    """
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": lr, "name": "head"}]
    layers = body_layers(model.body)
    seen = set()
    for depth, layer in enumerate(reversed(layers)):
        scale = body_lr_scale * (layer_decay ** depth if layer_decay else 1.0)
        params = [p for p in layer.parameters() if p.requires_grad]
        seen.update(id(p) for p in layer.parameters())
        groups.append({"params": params, "lr": lr * scale, "name": f"body.{len(layers) - 1 - depth}"})
    rest = [p for p in model.body.parameters() if id(p) not in seen and p.requires_grad]
    if rest:  # parameters outside the layers found above: the body's rate
        groups.append({"params": rest, "lr": lr * body_lr_scale, "name": "body.other"})
    return [g for g in groups if g["params"]]


# --- weight averaging -------------------------------------------------------------------------

class _EmaOfFloats:
    """EMA of floating tensors; integer buffers (BatchNorm's counters) are copied from the model."""

    def __init__(self, decay: float):
        self.ema = get_ema_multi_avg_fn(decay)

    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged) -> None:
        if averaged[0].is_floating_point():
            self.ema(averaged, current, n_averaged)
        else:
            torch._foreach_copy_(averaged, current)


def ema(model: nn.Module, decay: float = 0.998) -> AveragedModel:
    """A running exponential average of the model's weights and BatchNorm statistics.

    Call .update_parameters(model) after each optimizer step; .module is the averaged model.
    """
    return AveragedModel(model, multi_avg_fn=_EmaOfFloats(decay), use_buffers=True)


# --- test-time augmentation -------------------------------------------------------------------

class TTA(nn.Module):
    """model(x) averaged over views of x: itself, its mirror image, and optionally the same view
    resized by each of `scales` (the bodies pool globally, so they take any input size).

    Logits are averaged (a geometric mean of the probabilities); a module, so `fruitnet export`
    traces it to ONNX with the dynamic batch axis and checks it like any model.
    """

    def __init__(self, model: nn.Module, flip: bool = True, scales: tuple[float, ...] = ()):
        super().__init__()
        self.model, self.flip, self.scales = model, flip, tuple(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x, x.flip(3)] if self.flip else [x]
        n = x.shape[0]
        logits = self.model(torch.cat(views)).reshape(len(views), n, -1).sum(0)  # one pass for same-size views
        size = int(x.shape[-1])  # fixed by the preprocessing (only the batch axis is dynamic in ONNX)
        for s in self.scales:  # the whole view at another resolution (the body pools globally)
            side = round(size * s)
            logits = logits + self.model(F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                                                       antialias=s < 1))
        return logits / (len(views) + len(self.scales))

    @property
    def trust(self):
        """The wrapped model's unknown verdict, applied to the averaged logits (export reads it)."""
        return getattr(self.model, "trust", None)


# --- training augmentations -------------------------------------------------------------------

def _white_background(p: float = 0.5):
    """Studio shots on white: near-white pixels replaced by a random smooth colour field."""

    def apply(img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= p:
            return img
        mask = (img.min(0).values > 225)[None]
        field = F.interpolate(torch.rand(1, 3, 4, 4) * 255, size=img.shape[-2:], mode="bicubic",
                              align_corners=False)[0].clamp(0, 255).to(img.dtype)
        return torch.where(mask, field, img)

    return apply


def _tile(p: float = 0.5, grids: tuple[int, ...] = (2, 3)):
    """A cluster from one fruit: the image tiled k x k (k drawn from grids), back at its size."""

    def apply(img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= p:
            return img
        k = grids[int(torch.randint(len(grids), ()))]
        h, w = img.shape[-2:]
        small = F.interpolate(img[None].float(), size=(h // k, w // k), mode="bilinear", antialias=True,
                              align_corners=False)
        grid = small.repeat(1, 1, k, k)
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0].round().clamp(0, 255).to(img.dtype)

    return apply


AUGMENTATION_PIECES = {
    "color": lambda: T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.03),
    "trivial": lambda: T.TrivialAugmentWide(),
    "randaug": lambda: T.RandAugment(num_ops=2, magnitude=9),
    "erasing": lambda: T.RandomErasing(p=0.25, value=0),
    "background": _white_background,
    "tile": _tile,
}


def augmentation(name: str, pre: dict, size: int | None = None, scale: tuple[float, float] = (0.35, 1.0)):
    """uint8 CHW tensor -> augmented uint8 CHW tensor of size x size (default: the input size).

    'none': the centre crop (evaluation); 'light': random-resized crop and mirror (fruitnet's
    default); 'flip': the centre crop, mirrored half of the time; 'light+color',
    'flip+background+tile', ...: the base followed by the named pieces (AUGMENTATION_PIECES), in
    the order given ('background' always first: it needs the whole white surround).
    """
    size = size or pre["input_size"]
    first, *pieces = name.split("+")
    if first == "none" and not pieces:
        return T.CenterCrop(size)
    if first not in ("light", "flip"):
        raise ValueError(f"augmentation {name!r}: starts with 'light' or 'flip' (or is 'none')")
    unknown = [p for p in pieces if p not in AUGMENTATION_PIECES]
    if unknown:
        raise ValueError(f"augmentation {name!r}: unknown {unknown}; choose from {sorted(AUGMENTATION_PIECES)}")
    interp = _INTERPOLATION[pre["interpolation"]]
    crop = (T.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True) if first == "light"
            else T.Compose([T.CenterCrop(pre["input_size"])] +
                           ([T.Resize(size, interpolation=interp, antialias=True)] if size != pre["input_size"] else [])))
    front = [AUGMENTATION_PIECES[p]() for p in pieces if p == "background"]
    rest = [AUGMENTATION_PIECES[p]() for p in pieces if p != "background"]
    return T.Compose(front + [crop, T.RandomHorizontalFlip()] + rest)


class Mosaic:
    """Same-class mosaics: with probability p an image of the batch becomes a k x k grid (k drawn
    from `grids`) of photos of its own class from the same batch, label unchanged.  Many small
    fruit, as in a heap or a cluster: a model should not tell the fruit by how many there are."""

    def __init__(self, p: float = 0.3, grids: tuple[int, ...] = (2, 3)):
        self.p, self.grids = p, grids

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        out = x.clone()
        for i in torch.nonzero(torch.rand(n) < self.p).flatten().tolist():
            k = self.grids[int(torch.randint(len(self.grids), ()))]
            same = torch.nonzero(y == y[i]).flatten()
            picks = same[torch.randint(len(same), (k * k,))]
            tiles = F.interpolate(x[picks], size=(h // k, w // k), mode="bilinear", antialias=True, align_corners=False)
            grid = tiles.reshape(k, k, c, h // k, w // k).permute(2, 0, 3, 1, 4).reshape(1, c, k * (h // k), k * (w // k))
            out[i] = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0]
        return out, y


def batch_mix(name: str, num_classes: int):
    """Batch augmentations, (images, class indices) -> (images, labels): 'mosaic' (labels kept),
    'mixup', 'cutmix', 'mixup/cutmix' (one of the two per batch; soft labels), or 'mosaic+mixup'
    etc. (mosaic first).  'none' returns None."""
    if name == "none":
        return None
    mosaic, _, rest = name.partition("+") if name.startswith("mosaic") else ("", "", name)
    if mosaic and mosaic != "mosaic":
        raise ValueError(f"batch mix {name!r}: choose none, mosaic, mixup, cutmix, mixup/cutmix or mosaic+...")
    choices = {"mixup": lambda: T.MixUp(alpha=0.2, num_classes=num_classes),
               "cutmix": lambda: T.CutMix(alpha=1.0, num_classes=num_classes)}
    names = rest.split("/") if rest else []
    if any(n not in choices for n in names):
        raise ValueError(f"batch mix {name!r}: choose none, mosaic, mixup, cutmix, mixup/cutmix or mosaic+...")
    made = [choices[n]() for n in names]
    mixer = None if not made else made[0] if len(made) == 1 else T.RandomChoice(made)
    if not mosaic:
        return mixer
    tiles = Mosaic()
    return tiles if mixer is None else (lambda x, y: mixer(*tiles(x, y)))
