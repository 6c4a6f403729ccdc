"""'None of these': an in-distribution score for each photo, and the statistics it needs.

Candidate scores (higher = more like the training photos), compared in bench/bench_trust.py:
- msp: the maximum softmax probability (Hendrycks & Gimpel 2017), the baseline;
- energy: T * logsumexp(logits / T) (Liu et al. 2020);
- mahalanobis: minus the smallest squared Mahalanobis distance to a class mean, with one shared
  covariance (Lee et al. 2018), on penultimate (pooled body) features;
- knn: minus the distance to the k-th nearest training feature, features normalised to unit
  length (Sun et al. 2022).

The model file keeps the chosen score's statistics (`TrustHead`): class means, a shrunk shared
covariance's inverse and the validation photos' sorted scores. A photo's `in_distribution` is the
share of validation photos that score no higher than it: 0.30 means it looks more typical than
30% of the photos the model was validated on. The verdict is "unknown" below the threshold,
1 - recall (default 0.05: 95% of validation photos keep their label).
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fruitnet.calibration import calibration_summary, fit_temperature
from fruitnet.errors import UsageError

DEFAULT_RECALL = 0.95  # share of validation photos that keep their label
TRUST_PREFIX = "trust."  # the TrustHead's tensors in the model file's state dict
KNN_K = 10  # fixed beforehand (Sun et al. use k of ~0.1-1% of the training set); never tuned on grocery/


def msp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits / temperature).softmax(1).amax(1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return temperature * torch.logsumexp(logits / temperature, 1)


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of centred rows x (n, d): well conditioned even when d > n.

    The closed-form shrinkage towards a scaled identity, as in scikit-learn's ledoit_wolf."""
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
    means = torch.stack([f[targets == c].mean(0) for c in range(n_classes)])
    precision = torch.linalg.inv(ledoit_wolf(f - means[targets]))
    return means.float(), precision.float()


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    d = features.float()[:, None, :] - means[None]  # (n, C, d)
    return -((d @ precision) * d).sum(-1).amin(1)


def normalise(features: torch.Tensor) -> torch.Tensor:
    return features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)


def knn(features: torch.Tensor, bank: torch.Tensor, k: int = KNN_K) -> torch.Tensor:
    """bank: normalised training features (m, d)."""
    sim = normalise(features) @ bank.T  # cosine similarity; distance^2 = 2 - 2 sim
    kth = sim.topk(min(k, bank.shape[0]), dim=1).values[:, -1]
    return -(2 - 2 * kth).clamp_min(0).sqrt()


class TrustHead(nn.Module):
    """Mahalanobis score on the fine-tuned body's features -> (score, in_distribution).

    Buffers travel in the model file (safetensors) and the ONNX graph; nothing else is needed."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor, val_scores: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("precision", precision.float())
        self.register_buffer("val_scores", val_scores.float().sort().values)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        return mahalanobis(features.float(), self.means, self.precision)

    def in_distribution(self, score: torch.Tensor) -> torch.Tensor:
        return (self.val_scores[None, :] <= score[:, None]).float().mean(1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.score(features)
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


def check_recall(recall: float) -> float:
    if not 0 < recall <= 1:
        raise UsageError(f"--unknown-recall must be in (0, 1], the share of validation photos to accept; not {recall}")
    return float(recall)


@torch.no_grad()
def fit_trust(model: nn.Module, train_features: torch.Tensor, train_targets: torch.Tensor,
              val_features: torch.Tensor, val_targets: torch.Tensor, recall: float = DEFAULT_RECALL) -> dict:
    """Calibration and the unknown verdict for a trained classifier, from its body's pooled features.

    - temperature: fitted on the validation logits (NLL, LBFGS);
    - statistics: class means and a shared shrunk covariance of the training features;
    - threshold: from the validation photos alone, so that `recall` of them keep their label.
    Attaches model.trust (a TrustHead, saved with the weights); returns the metadata to store
    under the model file's "trust" key.
    """
    recall = check_recall(recall)
    head = model.head
    val_logits = head(val_features.to(head.weight.device, head.weight.dtype)).float().cpu()
    val_features, train_features = val_features.float().cpu(), train_features.float().cpu()
    temperature = fit_temperature(val_logits, val_targets)
    means, precision = class_gaussian(train_features, train_targets.cpu(), head.out_features)
    trust = TrustHead(means, precision, torch.zeros(len(val_features)))
    trust.val_scores = trust.score(val_features).sort().values
    model.trust = trust.to(head.weight.device)
    threshold = round(1.0 - recall, 6)
    accepted = float((trust.in_distribution(trust.score(val_features)) >= threshold).float().mean())
    calibration = calibration_summary(val_logits.numpy(), val_targets.cpu().numpy(), temperature)
    return {"temperature": temperature, "score": "mahalanobis", "features": "fine-tuned body, pooled",
            "threshold": threshold, "recall": recall, "n_train": len(train_features), "n_val": len(val_features),
            "val_accepted": accepted, "val_calibration": calibration}


@torch.no_grad()
def body_features(model: nn.Module, dataset, device, arith=None, batch_size: int = 64,
                  desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled body features (float32, CPU) and targets of a dataset of (tensor, class index), in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    feats, targets = [], []
    model.eval()
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        x = x.to(device)
        with arith.autocast(device) if arith is not None else nullcontext():
            feats.append(model.body(arith.prepare_input(x) if arith is not None else x).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(targets)


def fit_model_files(run: Path, best_epoch: int, last_epoch: int, train_set, val_set, recall: float,
                    device, arith=None, log=print) -> dict:
    """Add calibration and the unknown verdict to a finished run's last.safetensors and best.safetensors.

    train_set / val_set: the unaugmented training and the validation images as (tensor, class)
    datasets. Each file gets statistics from its own weights; when best is last, it is copied.
    Returns the last file's trust metadata.
    """
    from fruitnet.model import load_model, save_model

    fitted, features, body = {}, None, None
    for name in ("last", "best"):
        path = run / f"{name}.safetensors"
        if name == "best" and best_epoch == last_epoch:
            shutil.copyfile(run / "last.safetensors", path)
            continue
        model, meta = load_model(path)
        model.to(device)
        same_body = body is not None and all(torch.equal(a, b) for a, b in zip(body, model.body.state_dict().values()))
        if not same_body:  # a frozen body is the same in both files: its features are too
            features = (body_features(model, train_set, device, arith, desc=f"trust: training features ({name})"),
                        body_features(model, val_set, device, arith, desc=f"trust: validation features ({name})"))
            body = list(model.body.state_dict().values())
        (tf, ty), (vf, vy) = features
        meta["trust"] = fitted[name] = fit_trust(model, tf, ty, vf, vy, recall)
        save_model(path, model, meta)
    t = fitted["last"]
    log(f"calibration: temperature {t['temperature']:.3f}, validation ECE {t['val_calibration']['ece_before']:.3f} -> "
        f"{t['val_calibration']['ece_after']:.3f}; unknown verdict below in_distribution {t['threshold']:g} "
        f"(keeps {t['val_accepted']:.1%} of validation photos)")
    return t
