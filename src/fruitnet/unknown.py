"""'None of these': an in-distribution score for each photo, and what it needs.

Candidate scores (higher = more like the training photos), compared in bench/bench_trust.py on
webfruit against ../shared/data/grocery/other:
- msp: the maximum softmax probability (Hendrycks & Gimpel 2017), the baseline;
- energy: T * logsumexp(logits / T) with T = 1 (Liu et al. 2020);
- mahalanobis: minus the squared Mahalanobis distance of the body's pooled features to the
  nearest class mean, with one shared covariance (Lee et al. 2018);
- knn: minus the distance of the normalised pooled features to the k-th nearest training photo's
  (k = 10, Sun et al. 2022).

Which one a model gets depends on its body (choose_score), as measured (bench/results/trust.md):
- frozen body (`--mode freeze`, the default probe): the body is the pretrained one, whose
  features tell fruit from other things far better than a linear head's logits do. kNN: AUROC
  0.981, 86.9% of grocery/other rejected, 83.8% of shop tomatoes kept, every blank square
  rejected; Mahalanobis 0.972, 89.3%, 75.3%, and one of 8 blank squares passed; energy 0.875, 65.7%.
- partly tuned body (`--mode partial`: the last stages fine-tuned; bench/results/trust-partial.md,
  webfruit): kNN on the model's own body is still the better score: AUROC 0.971 against energy's
  0.960 (0.882 against 0.844 with the shop tomatoes counted as known), 85.6% of grocery/other
  rejected against 87.6%, 50.6% of shop tomatoes kept against 32.8%, and every blank square
  rejected against 5 of 8.
- wholly fine-tuned body (`--mode unfreeze`): the features have been bent towards the three
  classes; energy on the logits is the better score (AUROC 0.953, against 0.932 for Mahalanobis
  on the fine-tuned body, and a kNN that kept only 33% of the shop tomatoes).

A photo's `in_distribution` is the share of validation photos that score no higher than it:
0.30 means it looks more typical than 30% of the photos the model was validated on. The verdict
is "unknown" below the threshold, 1 - recall (default 0.05: 95% of validation photos keep their
label).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fruitnet.calibration import calibration_summary, fit_temperature
from fruitnet.config import UNKNOWN_RECALL as DEFAULT_RECALL
from fruitnet.config import check_unknown_recall

TRUST_PREFIX = "trust."  # the UnknownVerdict's tensors in the model file's state dict


def msp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits / temperature).softmax(1).amax(1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return temperature * torch.logsumexp(logits / temperature, 1)


# --- Mahalanobis: a candidate that bench_trust compares, not shipped (see the docstring) -------

def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of centred rows x (n, d): well conditioned even when d > n.

    The closed-form shrinkage towards a scaled identity, as in scikit-learn's ledoit_wolf (which
    would need the features as NumPy float64 and gives the same matrix; tested)."""
    x = x.double()
    n, d = x.shape
    emp = x.T @ x / n
    mu = torch.trace(emp) / d
    x2 = x * x
    beta_ = (x2.T @ x2).sum()
    delta_ = (emp * emp).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * torch.trace(emp) + d * mu * mu) / d
    shrink = 0.0 if float(delta) == 0 else float(min(beta, delta) / delta)
    return (1 - shrink) * emp + shrink * mu * torch.eye(d, dtype=x.dtype)


def class_gaussian(features: torch.Tensor, targets: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (C, d) and the inverse of the shared, shrunk covariance (d, d), float32."""
    f = features.double()
    targets = torch.as_tensor(targets)
    means = torch.stack([f[targets == c].mean(0) if (targets == c).any() else f.mean(0) for c in range(n_classes)])
    precision = torch.linalg.inv(ledoit_wolf(f - means[targets]))
    return means.float(), precision.float()


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Minus the squared distance to the nearest class mean: higher = more like the training photos."""
    d = features.float()[:, None, :] - means[None]  # (n, C, d)
    return -((d @ precision) * d).sum(-1).amin(1)


# --- kNN: shipped for frozen bodies ----------------------------------------------------------

def normalise(features: torch.Tensor) -> torch.Tensor:
    return features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)


KNN_K = 10  # fixed beforehand (Sun et al. use ~0.1-1% of the training set); never tuned on grocery/
MAX_BANK = 1000  # training photos kept for kNN (5 MB at 1,280 features); more are sampled evenly


def knn(features: torch.Tensor, bank: torch.Tensor, k: int = KNN_K) -> torch.Tensor:
    """Minus the distance to the k-th nearest row of bank (normalised training features)."""
    sim = normalise(features) @ bank.T  # cosine similarity; distance^2 = 2 - 2 sim
    kth = sim.topk(min(k, bank.shape[0]), dim=1).values[:, -1]
    return -(2 - 2 * kth).clamp_min(0).sqrt()


def knn_left_out(features: torch.Tensor, bank: torch.Tensor, groups: np.ndarray, bank_groups: np.ndarray,
                 k: int = KNN_K, block: int = 1024) -> torch.Tensor:
    """knn() for rows whose own photos are in the bank: row i leaves out the bank rows of its own
    group (groups[i] == bank_groups[j]: itself, and its copies), so it scores only by the others.
    A block of rows at a time: memory stays at block x len(bank)."""
    groups, bank_groups = torch.as_tensor(groups), torch.as_tensor(bank_groups)
    scores = []
    for start in range(0, len(features), block):
        sim = normalise(features[start:start + block]) @ bank.T
        sim[groups[start:start + block, None] == bank_groups[None, :]] = -2.0  # below any cosine similarity
        kth = sim.topk(min(k, bank.shape[0] - 1), dim=1).values[:, -1]
        scores.append(-(2 - 2 * kth).clamp_min(0).sqrt())
    return torch.cat(scores) if scores else torch.zeros(0)


def far_out(distances: np.ndarray) -> np.ndarray:
    """Tukey's fence: the distances beyond the upper quartile by more than 1.5 times the
    interquartile range (a textbook rule, not tuned here: bench/results/check.md)."""
    q1, q3 = np.percentile(distances, [25, 75])
    return distances > q3 + 1.5 * (q3 - q1)


def bank_indices(n: int, limit: int = MAX_BANK) -> torch.Tensor:
    """Which of n training photos the kNN bank keeps: all, or an evenly spaced, deterministic
    sample of `limit`, so each class keeps about its share."""
    return torch.linspace(0, n - 1, limit).round().long() if n > limit else torch.arange(n)


def knn_bank(features: torch.Tensor, limit: int = MAX_BANK) -> torch.Tensor:
    """The normalised training features of bank_indices (at most `limit`)."""
    return normalise(features[bank_indices(len(features), limit)])


SCORES = ("energy", "knn")
# bf16 moved the default model's kNN scores on webfruit's 892 photos by at most 0.023, a fifth of
# the validation scores' interquartile range (0.112), and flipped 3 verdicts; twice that is re-checked.
VERDICT_MARGIN = 0.4


def choose_score(mode: str) -> str:
    """The score a model ships with, by its body's training mode, as measured (see the module's
    docstring): kNN on a frozen or partly tuned body, energy on a wholly fine-tuned one."""
    return "energy" if mode == "unfreeze" else "knn"


class UnknownVerdict(nn.Module):
    """(logits, pooled features) -> (score, in_distribution).

    Its buffers travel in the model file (safetensors) and the ONNX graph: the validation photos'
    sorted scores and, for the kNN score, the bank of normalised training features."""

    def __init__(self, val_scores: torch.Tensor, bank: torch.Tensor | None = None):
        super().__init__()
        self.score_name = "energy" if bank is None else "knn"
        self.register_buffer("val_scores", val_scores.float().sort().values)
        if bank is not None:
            self.register_buffer("bank", bank.float())

    def score(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.score_name == "energy":
            return energy(logits.float())
        return knn(features, self.bank)

    def in_distribution(self, score: torch.Tensor) -> torch.Tensor:
        return (self.val_scores[None, :] <= score[:, None]).float().mean(1)

    def near_verdict(self, score: torch.Tensor, threshold: float, margin: float = VERDICT_MARGIN) -> torch.Tensor:
        """Which scores lie within `margin` x the validation scores' interquartile range of the
        score where the verdict changes (in_distribution reaches threshold): there, bf16 rounding
        can flip it, and predict runs the photo again in fp32."""
        n = len(self.val_scores)
        edge = self.val_scores[min(n - 1, max(0, math.ceil(round(threshold * n, 6)) - 1))]
        spread = self.val_scores[(3 * (n - 1)) // 4] - self.val_scores[(n - 1) // 4]
        return (score - edge).abs() < margin * spread

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.score(logits, features)
        return score, self.in_distribution(score)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Probability that a known photo scores higher than an unknown one (ties count half):
    the area under the ROC curve, by the Mann-Whitney rank sum."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if len(known) == 0 or len(unknown) == 0:
        return float("nan")
    values = np.concatenate([known, unknown])
    order = values.argsort(kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # tied values share their average rank
    return float((ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2) / (len(known) * len(unknown)))


NEGATIVE_SLACK = 0.05  # the threshold may rise by this share of validation photos to reject the negatives


def fit_threshold(known_scores: torch.Tensor, negative_scores: torch.Tensor, recall: float,
                  slack: float = NEGATIVE_SLACK) -> float:
    """The in_distribution share below which a photo is "unknown": 1 - recall, raised (by at most
    `slack`) to the level that rejects the most negatives (photos known to be of none of the
    classes) at the least cost to known photos."""
    base = round(1.0 - recall, 6)
    if not len(negative_scores):
        return base
    ordered = known_scores.float().sort().values
    shares = (ordered[None, :] <= negative_scores.float()[:, None]).float().mean(1)  # the negatives' in_distribution
    candidates = sorted({base} | {round(float(v) + 1e-6, 6) for v in shares if base < float(v) + 1e-6 <= base + slack})
    rejected = [(float((shares < t).float().mean()), -t) for t in candidates]
    return -max(rejected)[1]


@torch.no_grad()
def fit_trust(model: nn.Module, val_features: torch.Tensor, val_targets: torch.Tensor,
              recall: float = DEFAULT_RECALL, score: str = "energy", train_features: torch.Tensor | None = None,
              negative_features: torch.Tensor | None = None) -> dict:
    """Calibration and the unknown verdict for a trained classifier, from its own photos.

    - temperature: fitted on the validation logits (NLL, LBFGS);
    - score "knn": a bank of the training photos' normalised features;
    - threshold: the validation photos' scores, so that `recall` of them keep their label, raised
      against the negatives (photos of none of the classes, from unknown/ folders) where given
      (fit_threshold).
    Features are the body's pooled features (the head makes the logits). Attaches model.trust
    (a UnknownVerdict, saved with the weights); returns the metadata for the model file's "trust" key.
    """
    recall = check_unknown_recall(recall)
    if score not in SCORES:
        raise ValueError(f"unknown in-distribution score {score!r}; known: {', '.join(SCORES)}")
    head = model.head
    logits = lambda f: head(f.float().to(head.weight.device, head.weight.dtype)).float().cpu()  # noqa: E731
    val_features = val_features.float().cpu()
    val_logits = logits(val_features)
    temperature = fit_temperature(val_logits, val_targets)
    stats = {"bank": knn_bank(train_features.cpu())} if score == "knn" else {}
    val_scores = UnknownVerdict(torch.zeros(1), **stats).score(val_logits, val_features)
    trust = UnknownVerdict(val_scores, **stats)
    model.trust = trust.to(head.weight.device)
    negatives = torch.zeros(0) if negative_features is None or not len(negative_features) else \
        trust.score(logits(negative_features), negative_features.float().cpu())
    threshold = fit_threshold(val_scores, negatives, recall)
    accepted = float((trust.in_distribution(val_scores) >= threshold).float().mean())
    calibration = calibration_summary(val_logits.numpy(), val_targets.cpu().numpy(), temperature)
    fitted = {"temperature": temperature, "score": score, "threshold": threshold, "recall": recall,
              "n_val": len(val_logits), "val_accepted": accepted, "val_calibration": calibration}
    if len(negatives):
        fitted["negatives"] = {"n": len(negatives),
                               "rejected": float((trust.in_distribution(negatives) < threshold).float().mean())}
    return fitted
