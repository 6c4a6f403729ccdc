"""Classifier = backbone body + new linear head; the freeze policy; the model file.

The model file is a safetensors file: tensors plus a JSON metadata block (classes, backbone,
preprocessing, training summary).  Loading it never runs code from the file.  The original
project's `model.pth` (a plain torchvision resnet18 state dict) is read through
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fruitnet.backbones import create_body, get_backbone
from fruitnet.errors import ModelFileError
from fruitnet.ood import TRUST_PREFIX, TrustHead

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
        self.trust: TrustHead | None = None  # set at the end of training (ood.fit_trust); old files have none

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
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable fruitnet model file ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != "fruitnet":
        raise ModelFileError(f"{path}: safetensors file without fruitnet metadata")
    model, _ = create_classifier(meta["backbone"], len(meta["classes"]), weights="none")
    trust = {k[len(TRUST_PREFIX):]: state[k] for k in state if k.startswith(TRUST_PREFIX)}
    if trust:  # the in-distribution statistics (ood.TrustHead), shaped by the file's own tensors
        try:
            model.trust = TrustHead(**trust)
        except TypeError as exc:
            raise ModelFileError(f"{path}: unexpected in-distribution statistics ({sorted(trust)})") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit backbone {meta['backbone']}: {exc}") from exc
    return model.eval(), meta


def _load_legacy(path: Path) -> tuple[Classifier, dict]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path}: not a fruitnet model nor a plain state dict ({exc.__class__.__name__})") from exc
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
