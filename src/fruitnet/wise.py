"""WiSE-FT (Wortsman et al. 2022): the saved model is a weight-space mix of the head-only model
(pretrained body, trained head) and the fine-tuned one (`fruitnet train --wise`), measured by
the cross-source benchmark (bench/bench_transfer.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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


class WiseFT:
    """Keeps the head-only weights; `mixed(model)` swaps the mix in for validation and saving and
    the fine-tuned weights back afterwards (training goes on from those)."""

    def __init__(self, alpha: float, start: dict[str, torch.Tensor]):
        self.alpha, self.start = alpha, start

    @contextmanager
    def mixed(self, model: nn.Module):
        """Inside: model holds the mix; yields the fine-tuned weights (what a checkpoint keeps)."""
        tuned = copy_state(model)
        model.load_state_dict(interpolate(self.start, tuned, self.alpha))
        try:
            yield tuned
        finally:
            model.load_state_dict(tuned)
