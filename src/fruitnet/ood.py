"""'None of these': an in-distribution score for each photo, and what it needs.

Candidate scores (higher = more like the training photos), compared in bench/bench_trust.py on
webfruit against ../shared/data/grocery/other:
- msp: the maximum softmax probability (Hendrycks & Gimpel 2017), the baseline;
- energy: T * logsumexp(logits / T) with T = 1 (Liu et al. 2020);
- Mahalanobis distance to the class means, shared covariance (Lee et al. 2018), and the distance
  to the k-th nearest training feature (Sun et al. 2022), each on the fine-tuned and on the
  pretrained body's pooled features (in the bench script).
The energy score is the one shipped: it met the targets at no cost (the logits are there anyway;
the pretrained-feature scores separate a little better but need a second body, twice the
inference time), and the model file only gains the validation photos' scores.

A photo's `in_distribution` is the share of validation photos that score no higher than it:
0.30 means it looks more typical than 30% of the photos the model was validated on. The verdict
is "unknown" below the threshold, 1 - recall (default 0.05: 95% of validation photos keep their
label).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fruitnet.calibration import calibration_summary, fit_temperature
from fruitnet.config import UNKNOWN_RECALL as DEFAULT_RECALL
from fruitnet.errors import UsageError
from fruitnet.progress import bar as progress_bar

TRUST_PREFIX = "trust."  # the TrustHead's tensors in the model file's state dict


def msp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits / temperature).softmax(1).amax(1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return temperature * torch.logsumexp(logits / temperature, 1)


class TrustHead(nn.Module):
    """The energy score of the logits -> (score, in_distribution).

    Its one buffer, the validation photos' sorted scores, travels in the model file (safetensors)
    and the ONNX graph; nothing else is needed."""

    def __init__(self, val_scores: torch.Tensor):
        super().__init__()
        self.register_buffer("val_scores", val_scores.float().sort().values)

    def in_distribution(self, score: torch.Tensor) -> torch.Tensor:
        return (self.val_scores[None, :] <= score[:, None]).float().mean(1)

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = energy(logits.float())
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
    if not 0 < recall < 1:
        raise UsageError(f"--unknown-recall must be between 0 and 1, the share of validation photos to accept; "
                         f"not {recall}")
    return float(recall)


@torch.no_grad()
def fit_trust(model: nn.Module, val_features: torch.Tensor, val_targets: torch.Tensor,
              recall: float = DEFAULT_RECALL) -> dict:
    """Calibration and the unknown verdict for a trained classifier, from the validation photos alone.

    - temperature: fitted on the validation logits (NLL, LBFGS);
    - threshold: the validation photos' energy scores, so that `recall` of them keep their label.
    val_features are the body's pooled features (the head makes the logits). Attaches model.trust
    (a TrustHead, saved with the weights); returns the metadata for the model file's "trust" key.
    """
    recall = check_recall(recall)
    head = model.head
    val_logits = head(val_features.to(head.weight.device, head.weight.dtype)).float().cpu()
    temperature = fit_temperature(val_logits, val_targets)
    trust = TrustHead(energy(val_logits))
    model.trust = trust.to(head.weight.device)
    threshold = round(1.0 - recall, 6)
    accepted = float((trust.in_distribution(energy(val_logits)) >= threshold).float().mean())
    calibration = calibration_summary(val_logits.numpy(), val_targets.cpu().numpy(), temperature)
    return {"temperature": temperature, "score": "energy", "threshold": threshold, "recall": recall,
            "n_val": len(val_logits), "val_accepted": accepted, "val_calibration": calibration}


@torch.no_grad()
def body_features(model: nn.Module, dataset, device, batch_size: int = 64,
                  desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled body features (fp32, CPU) and targets of a dataset of (tensor, class index), in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    feats, targets = [], []
    model.eval()
    for x, y in progress_bar(loader, desc=desc, unit="batch"):
        feats.append(model.body(x.to(device)).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(targets)


def fit_model_files(run: Path, best_epoch: int, last_epoch: int, val_set, recall: float, device,
                    log=print) -> dict:
    """Add calibration and the unknown verdict to a finished run's last.safetensors and best.safetensors.

    val_set: the validation images as (tensor, class) pairs. Each file is fitted with its own
    weights, in fp32 (the arithmetic of the library default and of ONNX); when best is last, it
    is copied. Returns the last file's trust metadata.
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
            features = body_features(model, val_set, device, desc=f"calibration: validation features ({name})")
            body = list(model.body.state_dict().values())
        meta["trust"] = fitted[name] = fit_trust(model, *features, recall)
        save_model(path, model, meta)
    t = fitted["last"]
    log(f"calibration: temperature {t['temperature']:.3f}, validation ECE {t['val_calibration']['ece_before']:.3f} -> "
        f"{t['val_calibration']['ece_after']:.3f}; unknown verdict below in_distribution {t['threshold']:g} "
        f"(keeps {t['val_accepted']:.1%} of validation photos)")
    return t
