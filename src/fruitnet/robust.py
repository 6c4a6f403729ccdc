"""Robust fine-tuning pieces, measured by the cross-source benchmark (bench/bench_transfer.py):

- `interpolate`: WiSE-FT (Wortsman et al. 2022), a weight-space mix of the head-only model and
  the fine-tuned one (`fruitnet train --wise`);
- `TTA`: test-time augmentation as a module (mirror and rescaled views, logits averaged), so it
  exports to ONNX like any model (`--tta` on evaluate, predict, serve and export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


# --- test-time augmentation ----------------------------------------------------------------

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
