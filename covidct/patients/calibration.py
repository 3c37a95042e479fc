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


def fit_temperature(probs: np.ndarray, targets: np.ndarray, max_iter: int = 50) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of softmax(logits / T) over slices with a known target.

    Args:
        probs: (N, C) float softmax probabilities (of logits at T = 1).
        targets: (N,) int class per slice; negative = unknown (left out).

    The NLL is convex in beta = 1 / T (a log-sum-exp of beta-scaled logits minus a linear term), so Newton's
    method on beta, kept inside [1 / T_MAX, 1 / T_MIN] and falling back to bisection where a step would leave
    the bracket, finds its minimum in a few float64 passes over the slices (no autograd). Returns 1.0 when no
    slice has a known target.
    """
    known = np.asarray(targets) >= 0
    if not known.any():
        return 1.0
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64)[known], EPS, None))  # (K, C) logits up to a constant
    z_true = z[np.arange(len(z)), np.asarray(targets)[known]]
    lo, hi, beta = 1.0 / T_MAX, 1.0 / T_MIN, 1.0
    if _nll_derivatives(z, z_true, lo)[0] >= 0:  # the NLL rises from the smallest beta on: T at its cap
        return T_MAX
    if _nll_derivatives(z, z_true, hi)[0] <= 0:  # still falling at the largest beta (separable slices)
        return T_MIN
    for _ in range(max_iter):
        gradient, curvature = _nll_derivatives(z, z_true, beta)
        if gradient > 0:  # the minimum lies below beta
            hi = beta
        else:
            lo = beta
        step = beta - gradient / curvature if curvature > 0 else np.nan
        beta_next = step if lo < step < hi else (lo + hi) / 2
        if abs(beta_next - beta) <= 1e-9 * beta:
            beta = beta_next
            break
        beta = beta_next
    return float(np.clip(1.0 / beta, T_MIN, T_MAX))


def _nll_derivatives(z: np.ndarray, z_true: np.ndarray, beta: float) -> tuple[float, float]:
    """First and second derivative in ``beta`` of the mean NLL of softmax(beta * z) (K, C) at the targets'
    logits ``z_true`` (K,): E_p[z] - z_true and Var_p[z], averaged over the slices."""
    scaled = beta * z
    p = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    mean = (p * z).sum(axis=1)
    variance = (p * z * z).sum(axis=1) - mean * mean
    return float(np.mean(mean - z_true)), float(np.mean(variance))


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
