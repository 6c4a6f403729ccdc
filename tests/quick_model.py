"""A real model file in about two seconds: an ImageNet EfficientNet-Lite body (Lite0 by default) + an untrained, seeded head.

Used by the export and server tests, which check plumbing and parity, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fruitnet.backbones import get_backbone
from fruitnet.model import create_classifier, save_model

CLASSES = ["cherry", "strawberry", "tomato"]


def make_quick_model(path: Path, training: dict | None = None, backbone: str = "efficientnet_lite0") -> Path:
    torch.manual_seed(0)
    model, _ = create_classifier(backbone, len(CLASSES), "imagenet")
    meta = {"classes": CLASSES, "backbone": backbone, "preprocessing": get_backbone(backbone).preprocessing}
    if training is not None:
        meta["training"] = training
    return save_model(path, model.eval(), meta)
