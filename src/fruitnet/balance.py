"""Class balance: how uneven the classes are, and what training does about it (--balance).

- 'none': plain loss, photos drawn uniformly;
- 'weights': cross-entropy weighted per class, n / (k * count), scikit-learn's 'balanced' weights;
- 'sampler': photos drawn with replacement so that every class is drawn equally often;
- 'auto' (the default): 'weights' when the largest class has more than IMBALANCE_RATIO times the
  photos of the smallest, else 'none'.
No torch here: training turns the numbers into a loss weight or a sampler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fruitnet.errors import UsageError

IMBALANCE_RATIO = 1.5
BALANCE_MODES = ("auto", "none", "weights", "sampler")


@dataclass(frozen=True)
class Balance:
    requested: str
    mode: str  # what training does: none | weights | sampler
    ratio: float  # photos in the largest class / in the smallest
    class_weights: list[float]  # per class, in class order (all 1.0 for 'none')
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def imbalance_ratio(counts: dict[str, int]) -> float:
    values = [n for n in counts.values()]
    return max(values) / max(1, min(values))


def class_weights(counts: dict[str, int]) -> list[float]:
    """n / (k * count_c) per class: every class contributes equally to the loss."""
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.repeat(np.arange(len(counts)), list(counts.values()))
    return [float(w) for w in compute_class_weight("balanced", classes=np.arange(len(counts)), y=labels)]


def resolve_balance(requested: str, counts: dict[str, int]) -> Balance:
    """What --balance REQUESTED means for these training counts, with the reason in words."""
    if requested not in BALANCE_MODES:
        raise UsageError(f"unknown --balance {requested!r}; choose one of: {', '.join(BALANCE_MODES)}")
    ratio = imbalance_ratio(counts)
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    shape = (f"largest class {largest} has {counts[largest]} photos, {ratio:.2f}x the smallest "
             f"({smallest}, {counts[smallest]})")
    mode = requested
    if requested == "auto":
        mode = "weights" if ratio > IMBALANCE_RATIO else "none"
        reason = (f"auto: {shape}, above {IMBALANCE_RATIO}x: class-weighted loss" if mode == "weights"
                  else f"auto: {shape}, within {IMBALANCE_RATIO}x: no balancing")
    else:
        reason = f"{requested} (asked for): {shape}"
    weights = class_weights(counts) if mode == "weights" else [1.0] * len(counts)
    return Balance(requested, mode, round(ratio, 4), weights, reason)


def sample_weights(targets: list[int], counts: dict[str, int]) -> list[float]:
    """Per-photo drawing weights for the 'sampler' mode: 1 / (its class's count)."""
    per_class = [1.0 / max(1, n) for n in counts.values()]
    return [per_class[t] for t in targets]
