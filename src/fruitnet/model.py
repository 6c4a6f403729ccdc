"""Classifier = backbone body + new linear head; the freeze policy; the model file.

The model file is a safetensors file: tensors plus a JSON metadata block (classes, backbone,
preprocessing, training summary).  Loading it never runs code from the file.  The original
project's `model.pth` (a plain torchvision resnet18 state dict) is read through
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fruitnet.backbones import create_body, get_backbone
from fruitnet.errors import ModelFileError
from fruitnet.modelpath import check_model_argument

FORMAT_VERSION = 1
# The original project: resnet18, 3 classes, 300x300 squashed, mean/std 0.5 per channel.
LEGACY_CLASSES = ["cherry", "strawberry", "tomato"]
LEGACY_PREPROCESSING = {"input_size": 300, "resize": "squash", "crop_pct": 1.0,
                        "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def set_mode(self, mode: str) -> None:
        """'freeze': only the head learns; 'unfreeze': every layer learns."""
        if mode not in ("freeze", "unfreeze"):
            raise ValueError(f"mode must be 'freeze' or 'unfreeze', not {mode!r}")
        self.frozen = mode == "freeze"
        for p in self.body.parameters():
            p.requires_grad = not self.frozen

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "frozen", False):
            self.body.eval()  # frozen: BatchNorm running statistics stay as pretrained
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def create_classifier(backbone: str, num_classes: int, weights: str = "imagenet") -> tuple[Classifier, str]:
    """Returns (classifier, description of the weight source)."""
    body, source = create_body(backbone, weights)
    return Classifier(body, get_backbone(backbone).feature_dim, num_classes), source


def save_model(path: str | Path, model: Classifier, meta: dict) -> Path:
    """Write weights and metadata to one safetensors file (written to a temp name, then renamed)."""
    path = Path(path)
    meta = {"format": "fruitnet", "format_version": FORMAT_VERSION, **meta}
    for key in ("classes", "backbone", "preprocessing"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"fruitnet": json.dumps(meta)})
    tmp.replace(path)
    return path


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # 8-byte little-endian header length, then the JSON header starting with '{'
    return len(head) == 9 and head[8:9] == b"{"


def load_model(path: str | Path, legacy: bool | None = None) -> tuple[Classifier, dict]:
    """Load a fruitnet model file, or (detected, or legacy=True) the original project's model.pth."""
    path = Path(path)
    check_model_argument(path)  # a run folder, a checkpoint, a photo: say what to pass instead
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if legacy is None:
        legacy = not _is_safetensors(path)
    if legacy:
        return _load_legacy(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fruitnet", "null"))
        state = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: damaged or incomplete model file (its header cannot be read); "
                             "copy it again from the run folder") from None
    if not isinstance(meta, dict) or meta.get("format") != "fruitnet":
        raise ModelFileError(f"{path}: safetensors file without fruitnet metadata")
    model, _ = create_classifier(meta["backbone"], len(meta["classes"]), weights="none")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit backbone {meta['backbone']}: {exc}") from exc
    return model.eval(), meta


def _load_legacy(path: Path) -> tuple[Classifier, dict]:
    neither = f"{path}: neither a fruitnet model file (.safetensors) nor the original project's model.pth"
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads fine
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise ModelFileError(f"{path}: holds Python objects, not only tensors; fruitnet never loads those "
                                 "(loading them could run code)") from None
        raise ModelFileError(neither) from None
    except Exception:  # torch.load raises many types for files that are not a state dict at all
        raise ModelFileError(neither) from None
    if isinstance(state, dict) and {"model", "optimizer", "epoch"} <= set(state):
        raise ModelFileError(f"{path}: a training checkpoint (for fruitnet train --resume), not a model file; "
                             "pass the run's best.safetensors")
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ModelFileError(f"{path}: not a torchvision resnet18 state dict (no 'fc.weight')")
    n = state["fc.weight"].shape[0]
    classes = LEGACY_CLASSES if n == len(LEGACY_CLASSES) else [f"class_{i}" for i in range(n)]
    renamed = {("head." + k[3:] if k.startswith("fc.") else "body." + k): v for k, v in state.items()}
    model, _ = create_classifier("resnet18", n, weights="none")
    try:
        model.load_state_dict(renamed)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: not a torchvision resnet18 state dict: {exc}") from exc
    meta = {"format": "fruitnet", "format_version": FORMAT_VERSION, "classes": classes,
            "backbone": "resnet18", "preprocessing": dict(LEGACY_PREPROCESSING),
            "source": f"legacy model.pth ({path.name})"}
    return model.eval(), meta
