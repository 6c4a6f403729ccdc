"""Calibrated confidence: temperature scaling, and the numbers that say whether it worked.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted on held-out
predictions by minimising the negative log-likelihood. It never changes which class wins, only
how sure the model says it is: a model trained with label smoothing is too modest (T < 1 sharpens
it), an over-fitted one too sure (T > 1 softens it).
"""

from __future__ import annotations

import numpy as np
import torch

ECE_BINS = 15


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T); LBFGS on log T (so T stays positive).

    Each photo counts as right with weight 1 - 1/(n + 2) and wrong with 1/(n + 2) (Laplace's rule
    of succession): when all n validation photos are right, plain NLL keeps falling as T -> 0 and
    would claim a certainty that n photos cannot support; this caps it near (n + 1) / (n + 2).
    With thousands of photos, or some mistakes among a few hundred, T barely moves.
    """
    logits, targets = logits.detach().double(), targets.detach().long()
    if len(logits) == 0:
        return 1.0
    n = len(logits)
    eps = 1.0 / (n + 2)
    others = torch.ones_like(logits, dtype=torch.bool)
    others[torch.arange(n), targets] = False
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = logits / log_t.exp()
        total = torch.logsumexp(z, 1)
        log_right = z[torch.arange(n), targets] - total
        log_wrong = torch.logsumexp(z.masked_fill(~others, -torch.inf), 1) - total
        loss = -((1 - eps) * log_right + eps * log_wrong).mean()
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) else 1.0


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if len(targets) == 0:
        return float("nan")
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)).mean())


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (equal widths over [0, 1]): {lo, hi, n, confidence, accuracy}."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    conf, correct = probs.max(1), probs.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)  # (lo, hi]; 0 goes to the first
    rows = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                     "confidence": float(conf[inside].mean()) if n else None,
                     "accuracy": float(correct[inside].mean()) if n else None})
    return rows


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the |accuracy - confidence| gap of each bin, weighted by its share of the photos."""
    rows = reliability(probs, targets, bins)
    total = sum(r["n"] for r in rows)
    if total == 0:
        return float("nan")
    return float(sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["n"]) / total)


def calibration_summary(logits: np.ndarray, targets: np.ndarray, temperature: float) -> dict:
    """ECE (15 bins) and NLL with the raw logits and with the temperature applied."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    before = logits.softmax(1).numpy()
    after = (logits / temperature).softmax(1).numpy()
    return {"temperature": float(temperature), "bins": ECE_BINS,
            "ece_before": expected_calibration_error(before, targets),
            "ece_after": expected_calibration_error(after, targets),
            "nll_before": nll(before, targets), "nll_after": nll(after, targets)}
