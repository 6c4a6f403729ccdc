"""A real model file in about two seconds: ImageNet EfficientNet-Lite0 body + an untrained, seeded head.

Used by the export and server tests, which check plumbing and parity, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fruitnet.backbones import get_backbone
from fruitnet.model import create_classifier, save_model

CLASSES = ["cherry", "strawberry", "tomato"]


def make_quick_model(path: Path, training: dict | None = None) -> Path:
    torch.manual_seed(0)
    model, _ = create_classifier("efficientnet_lite0", len(CLASSES), "imagenet")
    meta = {"classes": CLASSES, "backbone": "efficientnet_lite0",
            "preprocessing": get_backbone("efficientnet_lite0").preprocessing}
    if training is not None:
        meta["training"] = training
    return save_model(path, model.eval(), meta)
