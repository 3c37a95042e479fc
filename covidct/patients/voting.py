"""The vote rules' arithmetic: one patient's slice probabilities -> its class, and the per-class scores each
rule ranks by (pure numpy; the rule registry is :mod:`covidct.patients.rules`, the tuning of the rules'
thresholds :mod:`covidct.patients.tuning`).

Six rules turn the softmax probabilities of one patient's slices, ``probs`` (n_slices, C) float, into
one patient class (an int in [0, C)). Slices must be in position order along the body axis (covidct's
caches and ``read_series`` give them head first); only :func:`weighted_center_vote` uses the order.

* :func:`majority_vote` - every slice votes for its argmax class (the paper's rule).
* :func:`infected_fraction_vote` - the patient is Normal unless more than a fraction ``tau`` of the
  slices is predicted infected; then the infected slices vote (the organisers' COVID-FACT rule).
* :func:`mean_prob_vote` - the argmax of the mean slice probabilities.
* :func:`weighted_center_vote` - the SPGC 2021 winner's rule: only the central ``window_slices`` (80)
  slices vote; argmax votes weighted 1 in the central ``center_slices`` (40), and 0.7 (COVID-19, CAP)
  or 0.5 (Normal) in the rest of the window.
* :func:`topk_mean_vote` - per class, the mean of its ``k`` most confident slice probabilities.
* :func:`threshold_vote` - a slice is infected when its infected probability 1 - P(Normal) exceeds
  ``slice_threshold``; the patient is Normal unless more than a share ``tau`` of its slices is infected,
  then the sick class with the larger mean probability over its infected slices. Unlike the argmax rules
  it still sees infection that never wins a slice's argmax (a model whose scale is off).

Tie rule (all): among the classes with the best score (votes, weighted votes, mean or top-k mean
probability; equal within 1e-9 relative, to ignore summation rounding), the one with the highest summed
probability over the voting slices wins (same tolerance); if still tied, the lowest class index.
:func:`weighted_center_vote` first gives a tie to COVID-19 when it is among the tied classes.
"""

from __future__ import annotations

import numpy as np

from covidct.contracts import COVID_CLASS, NORMAL_CLASS
from covidct.patients.parameters import CENTER_SLICES, TOP_K, WINDOW_SLICES

#: weighted_center: weight of an argmax vote outside the central slices, by the class voted for
OUTER_WEIGHT_INFECTED: float = 0.7
OUTER_WEIGHT_NORMAL: float = 0.5


def check_probs(probs: np.ndarray) -> np.ndarray:
    """``probs`` as float64 (n_slices >= 1, C >= 1); ValueError otherwise."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape (n_slices >= 1, C >= 1), got {probs.shape}")
    return probs


def check_normal(normal_class: int, num_classes: int) -> None:
    if not 0 <= normal_class < num_classes:
        raise ValueError(f"normal_class must be in [0, {num_classes}), got {normal_class}")


def check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    return tau


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _winners(scores: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """The module's tie rule, row-wise: (T,) int64 index of the best of each row of ``scores`` (T, C) float;
    among tied classes the largest of ``sums`` (T, C) (the summed probability over the voting slices),
    then the lowest index."""
    tied = np.isclose(scores, scores.max(axis=1, keepdims=True), rtol=1e-9, atol=0.0)
    tied_sums = np.where(tied, sums, -np.inf)
    close = tied & np.isclose(tied_sums, tied_sums.max(axis=1, keepdims=True), rtol=1e-9, atol=0.0)
    return close.argmax(axis=1).astype(np.int64)


def _winner(scores: np.ndarray, probs: np.ndarray, preferred: int | None = None) -> int:
    """Index of the best of ``scores`` (C,) float with the module's tie rule; ``probs`` (n, C) are the
    voting slices. ``preferred``: the class that wins any tie it is part of (before the other rules)."""
    if preferred is not None and np.isclose(scores[preferred], scores.max(), rtol=1e-9, atol=0.0):
        return preferred
    return int(_winners(scores[None, :], probs.sum(axis=0)[None, :])[0])


def _vote(probs: np.ndarray, allowed: np.ndarray | None = None) -> int:
    """Majority of argmax votes of ``probs`` (n, C) float64, n >= 1, with the module's tie rule.

    ``allowed`` (C,) bool restricts the winner to those classes (every slice must vote for one).
    """
    votes = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]).astype(np.float64)
    if allowed is not None:
        votes = np.where(allowed, votes, -1.0)
    return _winner(votes, probs)


def majority_vote(probs: np.ndarray) -> int:
    """Patient class from ``probs`` (n_slices, C) float softmax probabilities.

    Each slice votes for its argmax; the class with the most votes wins. Ties: the tied class with the
    highest summed probability over the patient's slices, then the lowest class index.
    """
    return _vote(check_probs(probs))


def infected_fraction(probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> float:
    """Fraction of slices of ``probs`` (n_slices, C) whose argmax is not ``normal_class``."""
    probs = check_probs(probs)
    check_normal(normal_class, probs.shape[1])
    return float(np.mean(probs.argmax(axis=1) != normal_class))


def infected_class(probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> int:
    """The class a patient of ``probs`` (n_slices, C) gets if called infected: the majority vote (module
    tie rule) of its infected slices over the non-normal classes; ``normal_class`` if none is infected."""
    probs = check_probs(probs)
    check_normal(normal_class, probs.shape[1])
    infected = probs.argmax(axis=1) != normal_class
    if not infected.any():
        return normal_class
    allowed = np.ones(probs.shape[1], dtype=bool)
    allowed[normal_class] = False
    return _vote(probs[infected], allowed)


def infected_fraction_vote(probs: np.ndarray, tau: float, normal_class: int = NORMAL_CLASS) -> int:
    """COVID-FACT rule on ``probs`` (n_slices, C): ``normal_class`` if the :func:`infected_fraction` is <=
    ``tau``, else the :func:`infected_class`."""
    tau = check_tau(tau)
    if infected_fraction(probs, normal_class) <= tau:
        return normal_class
    return infected_class(probs, normal_class)


def mean_prob_vote(probs: np.ndarray) -> int:
    """Argmax of the mean of ``probs`` (n_slices, C) over slices (ties: the lowest class index)."""
    probs = check_probs(probs)
    return _winner(probs.mean(axis=0), probs)


def central_mask(n_slices: int, center_slices: int = CENTER_SLICES) -> np.ndarray:
    """(n_slices,) bool: True for the ``center_slices`` slices centred on the middle of the series
    (all of them when there are fewer); with an odd surplus the extra outer slice is at the end."""
    center_slices = _check_positive_int("center_slices", center_slices)
    start = max(0, (n_slices - center_slices) // 2)
    central = np.zeros(n_slices, dtype=bool)
    central[start : start + center_slices] = True
    return central


def weighted_center_counts(
    probs: np.ndarray,
    center_slices: int = CENTER_SLICES,
    normal_class: int = NORMAL_CLASS,
    window_slices: int = WINDOW_SLICES,
) -> np.ndarray:
    """(C,) float64: the weighted argmax votes per class of ``probs`` (n_slices, C) that
    :func:`weighted_center_vote` compares (weights 1 / 0.7 / 0.5 / 0 by position and class, see there)."""
    probs = check_probs(probs)
    check_normal(normal_class, probs.shape[1])
    if _check_positive_int("window_slices", window_slices) < _check_positive_int("center_slices", center_slices):
        raise ValueError(f"window_slices ({window_slices}) must be >= center_slices ({center_slices})")
    pred = probs.argmax(axis=1)
    outer = np.where(pred == normal_class, OUTER_WEIGHT_NORMAL, OUTER_WEIGHT_INFECTED)
    weights = np.where(central_mask(len(probs), center_slices), 1.0, outer)
    weights = np.where(central_mask(len(probs), window_slices), weights, 0.0)
    return np.bincount(pred, weights=weights, minlength=probs.shape[1])


def weighted_center_vote(
    probs: np.ndarray,
    center_slices: int = CENTER_SLICES,
    normal_class: int = NORMAL_CLASS,
    window_slices: int = WINDOW_SLICES,
) -> int:
    """SPGC 2021 winner's rule on ``probs`` (n_slices, C) in position order along the body axis.

    Only the central ``window_slices`` slices vote (see :func:`central_mask`; the winner: 80). Each votes
    for its argmax with weight 1 if it is among the central ``center_slices`` slices (the winner: 40),
    else ``OUTER_WEIGHT_INFECTED`` (0.7) for an infected class and ``OUTER_WEIGHT_NORMAL`` (0.5) for
    ``normal_class``. The largest weighted count wins; a tie goes to COVID-19 if it is tied, else the
    module's tie rule. A series of ``window_slices`` slices or fewer votes with all of them (the winner's
    published code let no slice vote there and called every such patient COVID-19: not reproduced).
    """
    probs = check_probs(probs)
    scores = weighted_center_counts(probs, center_slices, normal_class, window_slices)
    covid = COVID_CLASS if COVID_CLASS < probs.shape[1] and COVID_CLASS != normal_class else None
    return _winner(scores, probs, preferred=covid)


def topk_mean(probs: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """(C,) float64: per class, the mean of its ``min(k, n_slices)`` largest probabilities in ``probs``
    (n_slices, C)."""
    probs = check_probs(probs)
    k = min(_check_positive_int("k", k), len(probs))
    return np.sort(probs, axis=0)[-k:].mean(axis=0)


def topk_mean_vote(probs: np.ndarray, k: int = TOP_K) -> int:
    """Argmax over classes of :func:`topk_mean` of ``probs`` (n_slices, C); the module's tie rule."""
    probs = check_probs(probs)
    return _winner(topk_mean(probs, k), probs)


def infected_probability(probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> np.ndarray:
    """(n_slices,) float64: 1 - P(``normal_class``) of each slice of ``probs`` (n_slices, C)."""
    probs = check_probs(probs)
    check_normal(normal_class, probs.shape[1])
    return 1.0 - probs[:, normal_class]


def infected_share(probs: np.ndarray, slice_threshold: float, normal_class: int = NORMAL_CLASS) -> float:
    """Share of the slices of ``probs`` (n_slices, C) whose :func:`infected_probability` exceeds ``slice_threshold``."""
    return float(np.mean(infected_probability(probs, normal_class) > slice_threshold))


def threshold_class(probs: np.ndarray, slice_threshold: float, normal_class: int = NORMAL_CLASS) -> int:
    """The class a patient of ``probs`` (n_slices, C) gets if called infected by :func:`threshold_vote`: the
    sick class with the largest mean probability over the slices above ``slice_threshold`` (over all slices
    when none is), module tie rule."""
    probs = check_probs(probs)
    above = infected_probability(probs, normal_class) > slice_threshold
    voting = probs[above] if above.any() else probs
    scores = np.where(np.arange(probs.shape[1]) == normal_class, -np.inf, voting.mean(axis=0))
    return _winner(scores, voting)


def threshold_calls(
    probs: np.ndarray, slice_thresholds: np.ndarray, normal_class: int = NORMAL_CLASS
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`infected_share` (T,) float64 and :func:`threshold_class` (T,) int64 of one patient's ``probs``
    (n_slices, C) at each of ``slice_thresholds`` (T,), at once: the slices above a threshold are the top
    of the slices sorted by infected probability, so their class sums come from one cumulative sum."""
    return calls_of_sorted(sorted_slices(probs, normal_class), slice_thresholds, normal_class)


def sorted_slices(probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """One patient's ``probs`` (n, C) prepared for :func:`calls_of_sorted`: (float64 (n,) infected probabilities in
    ascending order, float64 (n + 1, C) class sums of the top 0..n slices by infected probability). Sorting once
    lets the leave-one-out tuning call a patient at many threshold sets without sorting again."""
    probs = check_probs(probs)
    check_normal(normal_class, probs.shape[1])
    infected = infected_probability(probs, normal_class)
    order = np.argsort(infected, kind="stable")
    top_sums = np.concatenate([np.zeros((1, probs.shape[1])), np.cumsum(probs[order][::-1], axis=0)])
    return infected[order], top_sums


def calls_of_sorted(
    prepared: tuple[np.ndarray, np.ndarray], slice_thresholds: np.ndarray, normal_class: int = NORMAL_CLASS
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`threshold_calls` of a patient prepared by :func:`sorted_slices`: (T,) shares and (T,) classes."""
    infected, top_sums = prepared
    thresholds = np.asarray(slice_thresholds, dtype=np.float64).reshape(-1)
    n = len(infected)
    above = n - np.searchsorted(infected, thresholds, side="right")  # (T,) slices above each threshold
    voting = np.where(above > 0, above, n)  # none above: all slices vote
    sums = top_sums[voting]  # (T, C)
    scores = sums / voting[:, None]
    scores[:, normal_class] = -np.inf
    return above / n, _winners(scores, sums)


def threshold_vote(probs: np.ndarray, slice_threshold: float, tau: float, normal_class: int = NORMAL_CLASS) -> int:
    """``normal_class`` if :func:`infected_share` at ``slice_threshold`` is <= ``tau``, else :func:`threshold_class`."""
    tau = check_tau(tau)
    if infected_share(probs, slice_threshold, normal_class) <= tau:
        return normal_class
    return threshold_class(probs, slice_threshold, normal_class)


# ---- per-class scores each rule ranks by (what the run report's patient ROC is scored with) -------------


def vote_shares(probs: np.ndarray) -> np.ndarray:
    """(C,) float64: the share of the slices of ``probs`` (n_slices, C) whose argmax is each class (sums to 1)."""
    probs = check_probs(probs)
    return np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) / len(probs)


def weighted_center_scores(
    probs: np.ndarray,
    center_slices: int = CENTER_SLICES,
    normal_class: int = NORMAL_CLASS,
    window_slices: int = WINDOW_SLICES,
) -> np.ndarray:
    """(C,) float64: :func:`weighted_center_vote`'s weighted argmax votes per class of ``probs`` (n_slices, C),
    divided by their sum (so they sum to 1; the argmax is the same)."""
    scores = weighted_center_counts(probs, center_slices, normal_class, window_slices)
    return scores / scores.sum()


def threshold_scores(probs: np.ndarray, slice_threshold: float, normal_class: int = NORMAL_CLASS) -> np.ndarray:
    """(C,) float64 for :func:`threshold_vote` on ``probs`` (n_slices, C): ``normal_class`` gets 1 - the
    :func:`infected_share` s at ``slice_threshold``; each sick class c gets s * m_c / sum of the sick m, where m
    is the mean probability over the slices above the threshold (over all slices when none is), the
    quantity :func:`threshold_class` compares. The scores sum to 1."""
    probs = check_probs(probs)
    share = infected_share(probs, slice_threshold, normal_class)
    above = infected_probability(probs, normal_class) > slice_threshold
    mean = (probs[above] if above.any() else probs).mean(axis=0)
    sick = np.arange(probs.shape[1]) != normal_class
    total = mean[sick].sum()
    split = mean / total if total > 0 else np.full(probs.shape[1], 1.0 / max(1, int(sick.sum())))
    return np.where(sick, share * split, 1.0 - share)


def sick_margin(scores: np.ndarray, normal_class: int = NORMAL_CLASS) -> float:
    """The best sick class's score minus ``normal_class``'s, of ``scores`` (C,): an argmax rule calls the
    patient sick when it is > 0 (at 0, the tie rule decides)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.delete(scores, normal_class).max() - scores[normal_class])
