"""Patient-level decisions from slice predictions (pure numpy; no Lightning).

Two rules turn the softmax probabilities of one patient's slices into one patient class:

* :func:`majority_vote` - every slice votes for its argmax class (the paper's rule).
* :func:`infected_fraction_vote` - the patient is Normal unless more than a fraction ``tau`` of the
  slices is predicted infected; then the infected slices vote (the organisers' COVID-FACT rule).

Tie rule (both): among the classes with the most votes, the one with the highest summed probability
over the voting slices wins (equal within 1e-9 relative, to ignore summation rounding); if still
tied, the lowest class index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from covidct import NORMAL_CLASS


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape (n_slices >= 1, C >= 1), got {probs.shape}")
    return probs


def _check_normal(normal_class: int, num_classes: int) -> None:
    if not 0 <= normal_class < num_classes:
        raise ValueError(f"normal_class must be in [0, {num_classes}), got {normal_class}")


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    return tau


def _vote(probs: np.ndarray, allowed: np.ndarray | None = None) -> int:
    """Majority of argmax votes of ``probs`` (n, C) float64, n >= 1, with the module's tie rule.

    ``allowed`` (C,) bool restricts the winner to those classes (every slice must vote for one).
    """
    num_classes = probs.shape[1]
    votes = np.bincount(probs.argmax(axis=1), minlength=num_classes)
    if allowed is not None:
        votes = np.where(allowed, votes, -1)
    tied = votes == votes.max()
    if np.count_nonzero(tied) == 1:
        return int(np.flatnonzero(tied)[0])
    sums = np.where(tied, probs.sum(axis=0), -np.inf)
    best = sums.max()
    close = tied & np.isclose(sums, best, rtol=1e-9, atol=0.0)
    return int(np.flatnonzero(close)[0])


def majority_vote(probs: np.ndarray) -> int:
    """Patient class from ``probs`` (n_slices, C) float softmax probabilities.

    Each slice votes for its argmax; the class with the most votes wins. Ties: the tied class with the
    highest summed probability over the patient's slices, then the lowest class index.
    """
    return _vote(_check_probs(probs))


def infected_fraction(probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> float:
    """Fraction of slices of ``probs`` (n_slices, C) whose argmax is not ``normal_class``."""
    probs = _check_probs(probs)
    _check_normal(normal_class, probs.shape[1])
    return float(np.mean(probs.argmax(axis=1) != normal_class))


def infected_fraction_vote(probs: np.ndarray, tau: float, normal_class: int = NORMAL_CLASS) -> int:
    """COVID-FACT rule on ``probs`` (n_slices, C): ``normal_class`` if the infected fraction is <= ``tau``,
    else the majority vote (same tie rule) of the infected slices over the non-normal classes."""
    probs = _check_probs(probs)
    _check_normal(normal_class, probs.shape[1])
    tau = _check_tau(tau)
    infected = probs.argmax(axis=1) != normal_class
    if infected.mean() <= tau:
        return normal_class
    allowed = np.ones(probs.shape[1], dtype=bool)
    allowed[normal_class] = False
    return _vote(probs[infected], allowed)


VOTE_RULES: tuple[str, ...] = ("majority", "infected_fraction")


def vote(probs: np.ndarray, rule: str, tau: float, normal_class: int = NORMAL_CLASS) -> int:
    """One patient's class under ``rule`` (one of :data:`VOTE_RULES`); probs (n_slices, C)."""
    if rule == "majority":
        return majority_vote(probs)
    if rule == "infected_fraction":
        return infected_fraction_vote(probs, tau, normal_class)
    raise ValueError(f"unknown vote rule {rule!r}; expected one of {VOTE_RULES}")


def _infected_vote(probs: np.ndarray, normal_class: int) -> int:
    """The class a patient gets if called infected (``normal_class`` when no slice is infected)."""
    infected = probs.argmax(axis=1) != normal_class
    if not infected.any():
        return normal_class
    allowed = np.ones(probs.shape[1], dtype=bool)
    allowed[normal_class] = False
    return _vote(probs[infected], allowed)


def tune_tau(
    fractions: np.ndarray,
    infected_votes: np.ndarray,
    labels: np.ndarray,
    normal_class: int = NORMAL_CLASS,
) -> float:
    """The ``tau`` in [0, 1) that maximises patient accuracy of :func:`infected_fraction_vote`.

    Args:
        fractions: (P,) float infected fraction of each (validation) patient.
        infected_votes: (P,) int class each patient gets if called infected.
        labels: (P,) int true patient class.

    Candidates are 0, the midpoints between consecutive sorted unique fractions (so no threshold sits
    on a data point) and the midpoint between the largest fraction and 1 when that fraction is < 1
    (calls every patient Normal). If several candidates reach the best accuracy, the median one of
    them (the lower middle of an even count) is returned, keeping the threshold away from the edges
    of the best range. Exact, O(P log P).
    """
    fractions = np.asarray(fractions, dtype=np.float64).reshape(-1)
    infected_votes = np.asarray(infected_votes).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not fractions.size:
        raise ValueError("tune_tau needs at least one patient")
    if not fractions.size == infected_votes.size == labels.size:
        raise ValueError(
            f"fractions, infected_votes and labels must have the same length, got "
            f"{fractions.size}, {infected_votes.size}, {labels.size}"
        )
    if np.any((fractions < 0) | (fractions > 1)) or not np.all(np.isfinite(fractions)):
        raise ValueError("fractions must lie in [0, 1]")

    order = np.argsort(fractions, kind="stable")
    sorted_fractions = fractions[order]
    right_if_normal = (labels == normal_class)[order].astype(np.int64)
    right_if_infected = (infected_votes == labels)[order].astype(np.int64)
    # cum_*[k]: over the k patients with the smallest fractions.
    cum_normal = np.concatenate([[0], np.cumsum(right_if_normal)])
    cum_infected = np.concatenate([[0], np.cumsum(right_if_infected)])

    unique = np.unique(sorted_fractions)
    candidates = [np.zeros(1), (unique[:-1] + unique[1:]) / 2.0]
    if unique[-1] < 1.0:
        candidates.append(np.array([(unique[-1] + 1.0) / 2.0]))
    taus = np.unique(np.concatenate(candidates))
    n_normal = np.searchsorted(sorted_fractions, taus, side="right")  # patients with fraction <= tau
    correct = cum_normal[n_normal] + (cum_infected[-1] - cum_infected[n_normal])
    best = np.flatnonzero(correct == correct.max())
    return float(taus[best[(len(best) - 1) // 2]])


def patient_accuracy(
    fractions: np.ndarray,
    infected_votes: np.ndarray,
    labels: np.ndarray,
    tau: float,
    normal_class: int = NORMAL_CLASS,
) -> float:
    """Patient accuracy of the infected-fraction rule at ``tau`` (arrays as in :func:`tune_tau`)."""
    fractions = np.asarray(fractions, dtype=np.float64)
    pred = np.where(fractions <= tau, normal_class, np.asarray(infected_votes))
    return float(np.mean(pred == np.asarray(labels)))


@dataclass
class PatientVote:
    """Patient-level summary of its slice predictions (C = number of classes)."""

    patient: str
    n_slices: int
    votes: np.ndarray  # (C,) int64 slice argmax counts
    mean_prob: np.ndarray  # (C,) float64 mean softmax probability over slices
    infected_fraction: float
    majority: int
    infected_fraction_pred: int
    infected_vote: int  # class if called infected (normal_class when no slice is infected); for tune_tau


def vote_patients(
    patient_ids: Sequence[str] | np.ndarray,
    probs: np.ndarray,
    tau: float,
    normal_class: int = NORMAL_CLASS,
) -> list[PatientVote]:
    """Group slices by patient (in order of first appearance) and apply both voting rules.

    Args:
        patient_ids: (N,) patient id of each slice (converted to str).
        probs: (N, C) float softmax probabilities of each slice.
        tau: infected-fraction threshold for :func:`infected_fraction_vote`.
    """
    probs = _check_probs(probs)
    ids = [str(p) for p in np.asarray(patient_ids, dtype=object).reshape(-1)]
    if len(ids) != probs.shape[0]:
        raise ValueError(f"got {len(ids)} patient ids for {probs.shape[0]} slices")
    _check_normal(normal_class, probs.shape[1])
    tau = _check_tau(tau)

    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        groups.setdefault(pid, []).append(i)

    results = []
    for pid, rows in groups.items():
        p = probs[rows]
        pred = p.argmax(axis=1)
        fraction = float(np.mean(pred != normal_class))
        infected_vote = _infected_vote(p, normal_class)
        results.append(
            PatientVote(
                patient=pid,
                n_slices=len(rows),
                votes=np.bincount(pred, minlength=probs.shape[1]).astype(np.int64),
                mean_prob=p.mean(axis=0),
                infected_fraction=fraction,
                majority=_vote(p),
                infected_fraction_pred=normal_class if fraction <= tau else infected_vote,
                infected_vote=infected_vote,
            )
        )
    return results


def deduplicate(indices: np.ndarray | torch.Tensor, *arrays: Any) -> tuple:
    """Keep the first occurrence of each global sample index.

    ``DistributedSampler`` pads the dataset with repeated samples so every rank gets as many; after an
    ``all_gather`` the repeats must count once. ``indices`` (N,) int and each array (N, ...) are numpy
    arrays or torch tensors; returns ``(unique_indices_sorted, *arrays)`` with every array reordered the
    same way and of the same type (and device) as given.
    """
    idx_np = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    idx_np = idx_np.reshape(-1)
    for k, array in enumerate(arrays):
        if len(array) != idx_np.size:
            raise ValueError(f"array {k} has {len(array)} rows but there are {idx_np.size} indices")
    _, first = np.unique(idx_np, return_index=True)

    def take(array: Any) -> Any:
        if isinstance(array, torch.Tensor):
            return array[torch.as_tensor(first, dtype=torch.long, device=array.device)]
        return np.asarray(array)[first]

    return (take(indices), *(take(a) for a in arrays))
