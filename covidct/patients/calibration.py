"""Temperature scaling (Guo et al. 2017): one scalar T that divides the logits, fitted on validation
slices by minimising their negative log-likelihood. It changes no slice's argmax, only how confident the
probabilities are, so thresholds on probabilities (``vote=threshold``, ``mean_prob``, ``topk_mean``)
and the reliability of the reported probabilities improve. Expected calibration error by torchmetrics."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

#: smallest probability taken as a log (softmax outputs in float32 reach 0)
EPS = 1e-12
#: the range a fitted temperature is kept in (a degenerate fit must not zero or explode the logits)
T_MIN, T_MAX = 0.05, 20.0


def log_probs(probs: np.ndarray) -> torch.Tensor:
    """(N, C) softmax probabilities -> float64 (N, C) logits up to a per-row constant (which softmax ignores)."""
    return torch.as_tensor(np.asarray(probs, dtype=np.float64)).clamp_min(EPS).log()


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) probabilities -> float32 (N, C) softmax(logits / ``temperature``)."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float32)
    return (log_probs(probs) / temperature).softmax(dim=1).numpy().astype(np.float32)


def fit_temperature(probs: np.ndarray, targets: np.ndarray, max_iter: int = 100) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of softmax(logits / T) over slices with a known target.

    Args:
        probs: (N, C) float softmax probabilities (of logits at T = 1).
        targets: (N,) int class per slice; negative = unknown (left out).

    LBFGS on log T (so T stays positive), from T = 1. Returns 1.0 when no slice has a known target.
    """
    known = np.asarray(targets) >= 0
    if not known.any():
        return 1.0
    # called from Lightning's validation hooks, which run under inference mode / no_grad
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(log_probs(np.asarray(probs)[known]), np.asarray(targets)[known], max_iter)


def _fit(logits: torch.Tensor, targets: np.ndarray, max_iter: int) -> float:
    """LBFGS on log T for :func:`fit_temperature` (autograd on)."""
    target = torch.as_tensor(targets, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(np.clip(log_t.exp().item(), T_MIN, T_MAX))


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the known ``targets`` (N,) under ``probs`` (N, C)."""
    known = np.asarray(targets) >= 0
    target = torch.as_tensor(np.asarray(targets)[known], dtype=torch.long)
    return float(torch.nn.functional.nll_loss(log_probs(np.asarray(probs)[known]), target))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE (torchmetrics, L1, ``n_bins`` equal-width bins) over the known ``targets`` (N,)."""
    known = np.asarray(targets) >= 0
    if not known.any():
        return float("nan")
    p = torch.as_tensor(np.asarray(probs, dtype=np.float32)[known])
    t = torch.as_tensor(np.asarray(targets)[known], dtype=torch.long)
    return float(multiclass_calibration_error(p, t, num_classes=p.shape[1], n_bins=n_bins, norm="l1"))
