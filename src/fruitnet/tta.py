"""Test-time augmentation as a module (`--tta` on evaluate, predict, serve and export): each
photo's logits and features averaged over views of it, measured by the cross-source benchmark
(bench/bench_transfer.py).  A module, so `fruitnet export` traces it to ONNX like any model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        return self.logits_and_features(x)[0]

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled features, each averaged over the views (the unknown verdict scores the mean)."""
        views = [x, x.flip(3)] if self.flip else [x]
        n = x.shape[0]
        logits, features = self.model.logits_and_features(torch.cat(views))  # one pass for same-size views
        logits, features = (t.reshape(len(views), n, -1).sum(0) for t in (logits, features))
        size = int(x.shape[-1])  # fixed by the preprocessing (only the batch axis is dynamic in ONNX)
        for s in self.scales:  # the whole view at another resolution (the body pools globally)
            side = round(size * s)
            more = self.model.logits_and_features(F.interpolate(x, size=(side, side), mode="bilinear",
                                                                align_corners=False, antialias=s < 1))
            logits, features = logits + more[0], features + more[1]
        k = len(views) + len(self.scales)
        return logits / k, features / k

    @property
    def trust(self):
        """The wrapped model's unknown verdict, applied to the averaged logits (export reads it)."""
        return getattr(self.model, "trust", None)
