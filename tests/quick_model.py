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


def with_metadata(model: Path, out: Path, change) -> Path:
    """A copy of `model` with its metadata replaced by change(metadata) (a dict, or anything JSON)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model), framework="pt") as f:
        meta = json.loads(f.metadata()["fruitnet"])
    save_file(load_file(str(model)), str(out), metadata={"fruitnet": json.dumps(change(meta))})
    return out


def bad_metadata_cases() -> dict:
    """name -> (change to a good model's metadata, words the refusal must contain)."""
    pre = lambda m, **kw: {**m, "preprocessing": {**m["preprocessing"], **kw}}  # noqa: E731
    return {
        "missing-classes": (lambda m: {k: v for k, v in m.items() if k != "classes"}, "classes: missing"),
        "classes-not-a-list": (lambda m: {**m, "classes": "cherry,tomato"}, "classes: Input should be a valid list"),
        "input-size-a-string": (lambda m: pre(m, input_size="224"), "input_size: Input should be a valid integer"),
        "unknown-backbone": (lambda m: {**m, "backbone": "vit_huge"}, "unknown backbone 'vit_huge'"),
        "duplicate-classes": (lambda m: {**m, "classes": ["cherry", "cherry", "tomato"]}, "repeated: 'cherry'"),
        "empty-class-name": (lambda m: {**m, "classes": ["cherry", "", "tomato"]}, "classes.1"),
        "a-million-classes": (lambda m: {**m, "classes": [f"c{i}" for i in range(10**6)]}, "at most 10000 items"),
        "input-size-100000": (lambda m: pre(m, input_size=100000), "input_size: Input should be less than or equal to 1024"),
        "std-0": (lambda m: pre(m, std=[0, 0.5, 0.5]), "std.0: Input should be greater than 0"),
        "unknown-interpolation": (lambda m: pre(m, interpolation="lanczos"), "interpolation"),
        "head-for-other-classes": (lambda m: {**m, "classes": ["a", "b", "c", "d"]}, "the head's weights have shape [3, 1280]"),
        "not-an-object": (lambda m: [1, 2], "without fruitnet metadata"),
    }
