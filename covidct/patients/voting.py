"""Patient-level decisions from slice predictions (pure numpy; no Lightning).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import isfinite
from typing import Any

import numpy as np

from covidct import CLASS_NAMES, NORMAL_CLASS
from covidct.errors import ConfigError, CovidCTError

COVID_CLASS: int = CLASS_NAMES.index("COVID-19")
#: defaults of the rules' parameters (``vote.center_slices``, ``vote.window_slices``, ``vote.k``)
CENTER_SLICES: int = 40
WINDOW_SLICES: int = 80
TOP_K: int = 5
#: threshold's slice threshold when it is neither tuned (no validation patients) nor set
SLICE_THRESHOLD: float = 0.5
#: weighted_center: weight of an argmax vote outside the central slices, by the class voted for
OUTER_WEIGHT_INFECTED: float = 0.7
OUTER_WEIGHT_NORMAL: float = 0.5


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
    return _vote(_check_probs(probs))


def infected_fraction(probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> float:
    """Fraction of slices of ``probs`` (n_slices, C) whose argmax is not ``normal_class``."""
    probs = _check_probs(probs)
    _check_normal(normal_class, probs.shape[1])
    return float(np.mean(probs.argmax(axis=1) != normal_class))


def infected_class(probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> int:
    """The class a patient of ``probs`` (n_slices, C) gets if called infected: the majority vote (module
    tie rule) of its infected slices over the non-normal classes; ``normal_class`` if none is infected."""
    probs = _check_probs(probs)
    _check_normal(normal_class, probs.shape[1])
    infected = probs.argmax(axis=1) != normal_class
    if not infected.any():
        return normal_class
    allowed = np.ones(probs.shape[1], dtype=bool)
    allowed[normal_class] = False
    return _vote(probs[infected], allowed)


def infected_fraction_vote(probs: np.ndarray, tau: float, normal_class: int = NORMAL_CLASS) -> int:
    """COVID-FACT rule on ``probs`` (n_slices, C): ``normal_class`` if the :func:`infected_fraction` is <=
    ``tau``, else the :func:`infected_class`."""
    tau = _check_tau(tau)
    if infected_fraction(probs, normal_class) <= tau:
        return normal_class
    return infected_class(probs, normal_class)


def mean_prob_vote(probs: np.ndarray) -> int:
    """Argmax of the mean of ``probs`` (n_slices, C) over slices (ties: the lowest class index)."""
    probs = _check_probs(probs)
    return _winner(probs.mean(axis=0), probs)


def central_mask(n_slices: int, center_slices: int = CENTER_SLICES) -> np.ndarray:
    """(n_slices,) bool: True for the ``center_slices`` slices centred on the middle of the series
    (all of them when there are fewer); with an odd surplus the extra outer slice is at the end."""
    center_slices = _check_positive_int("center_slices", center_slices)
    start = max(0, (n_slices - center_slices) // 2)
    central = np.zeros(n_slices, dtype=bool)
    central[start : start + center_slices] = True
    return central


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
    probs = _check_probs(probs)
    _check_normal(normal_class, probs.shape[1])
    if _check_positive_int("window_slices", window_slices) < _check_positive_int("center_slices", center_slices):
        raise ValueError(f"window_slices ({window_slices}) must be >= center_slices ({center_slices})")
    pred = probs.argmax(axis=1)
    outer = np.where(pred == normal_class, OUTER_WEIGHT_NORMAL, OUTER_WEIGHT_INFECTED)
    weights = np.where(central_mask(len(probs), center_slices), 1.0, outer)
    weights = np.where(central_mask(len(probs), window_slices), weights, 0.0)
    scores = np.bincount(pred, weights=weights, minlength=probs.shape[1])
    covid = COVID_CLASS if COVID_CLASS < probs.shape[1] and COVID_CLASS != normal_class else None
    return _winner(scores, probs, preferred=covid)


def topk_mean(probs: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """(C,) float64: per class, the mean of its ``min(k, n_slices)`` largest probabilities in ``probs``
    (n_slices, C)."""
    probs = _check_probs(probs)
    k = min(_check_positive_int("k", k), len(probs))
    return np.sort(probs, axis=0)[-k:].mean(axis=0)


def topk_mean_vote(probs: np.ndarray, k: int = TOP_K) -> int:
    """Argmax over classes of :func:`topk_mean` of ``probs`` (n_slices, C); the module's tie rule."""
    probs = _check_probs(probs)
    return _winner(topk_mean(probs, k), probs)


def infected_probability(probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> np.ndarray:
    """(n_slices,) float64: 1 - P(``normal_class``) of each slice of ``probs`` (n_slices, C)."""
    probs = _check_probs(probs)
    _check_normal(normal_class, probs.shape[1])
    return 1.0 - probs[:, normal_class]


def infected_share(probs: np.ndarray, slice_threshold: float, normal_class: int = NORMAL_CLASS) -> float:
    """Share of the slices of ``probs`` (n_slices, C) whose :func:`infected_probability` exceeds ``slice_threshold``."""
    return float(np.mean(infected_probability(probs, normal_class) > slice_threshold))


def threshold_class(probs: np.ndarray, slice_threshold: float, normal_class: int = NORMAL_CLASS) -> int:
    """The class a patient of ``probs`` (n_slices, C) gets if called infected by :func:`threshold_vote`: the
    sick class with the largest mean probability over the slices above ``slice_threshold`` (over all slices
    when none is), module tie rule."""
    probs = _check_probs(probs)
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
    probs = _check_probs(probs)
    _check_normal(normal_class, probs.shape[1])
    thresholds = np.asarray(slice_thresholds, dtype=np.float64).reshape(-1)
    infected = infected_probability(probs, normal_class)
    order = np.argsort(infected, kind="stable")
    n = len(order)
    above = n - np.searchsorted(infected[order], thresholds, side="right")  # (T,) slices above each threshold
    top_sums = np.concatenate([np.zeros((1, probs.shape[1])), np.cumsum(probs[order][::-1], axis=0)])
    voting = np.where(above > 0, above, n)  # none above: all slices vote
    sums = top_sums[voting]  # (T, C)
    scores = sums / voting[:, None]
    scores[:, normal_class] = -np.inf
    return above / n, _winners(scores, sums)


def threshold_vote(probs: np.ndarray, slice_threshold: float, tau: float, normal_class: int = NORMAL_CLASS) -> int:
    """``normal_class`` if :func:`infected_share` at ``slice_threshold`` is <= ``tau``, else :func:`threshold_class`."""
    tau = _check_tau(tau)
    if infected_share(probs, slice_threshold, normal_class) <= tau:
        return normal_class
    return threshold_class(probs, slice_threshold, normal_class)


#: slice thresholds tried by :func:`tune_threshold`, besides the quantiles of the validation slices' probabilities
SLICE_THRESHOLDS: np.ndarray = np.round(np.arange(0.05, 1.0, 0.05), 2)


def tune_threshold(
    groups: Sequence[np.ndarray],
    labels: np.ndarray,
    normal_class: int = NORMAL_CLASS,
    slice_threshold: float | None = None,
    tau: float | None = None,
) -> tuple[float, float]:
    """(slice_threshold, tau) of :func:`threshold_vote` that maximise the accuracy over patients.

    Args:
        groups: per patient, (n_slices, C) float probabilities.
        labels: (P,) int true patient class.
        slice_threshold, tau: a fixed value is kept (only the other one is tuned).

    Slice thresholds tried: :data:`SLICE_THRESHOLDS` and the 5%..95% quantiles of every slice's infected
    probability (a model whose probabilities all sit below 0.5 still gets thresholds inside its range);
    for each, tau by :func:`tune_tau` on the patients' infected shares. Among equally accurate thresholds
    the median one is returned (away from the edges of the best range).
    """
    labels = np.asarray(labels).reshape(-1)
    if len(groups) != len(labels) or not len(labels):
        raise ValueError(f"need one label per patient and at least one patient, got {len(groups)} and {len(labels)}")
    if slice_threshold is None:
        scores = np.concatenate([infected_probability(g, normal_class) for g in groups])
        quantiles = np.quantile(scores, np.linspace(0.05, 0.95, 19))
        candidates = np.unique(np.concatenate([SLICE_THRESHOLDS, quantiles[quantiles < 1.0]]))
    else:
        candidates = np.asarray([slice_threshold], dtype=np.float64)
    calls = [threshold_calls(g, candidates, normal_class) for g in groups]
    all_shares = np.stack([c[0] for c in calls], axis=1)  # (T, P)
    all_sick = np.stack([c[1] for c in calls], axis=1)
    results = []
    for t, shares, sick in zip(candidates, all_shares, all_sick, strict=True):
        share_tau = tune_tau(shares, sick, labels, normal_class) if tau is None else float(tau)
        correct = np.where(shares <= share_tau, normal_class, sick) == labels
        results.append((float(correct.mean()), float(t), share_tau))
    best = max(r[0] for r in results)
    tied = [r for r in results if r[0] == best]
    _, t, tau = tied[(len(tied) - 1) // 2]
    return t, tau


def leave_one_out_threshold_predictions(
    groups: Sequence[np.ndarray],
    labels: np.ndarray,
    normal_class: int = NORMAL_CLASS,
    slice_threshold: float | None = None,
    tau: float | None = None,
) -> np.ndarray:
    """:func:`threshold_vote` predictions (P,) int64 where patient i is decided by (slice_threshold, tau)
    tuned (:func:`tune_threshold`, fixed values kept) on the other patients only; a single patient is
    decided by the fixed values or the defaults (0.5, 0.5)."""
    labels = np.asarray(labels).reshape(-1)
    preds = np.empty(len(labels), dtype=np.int64)
    for i in range(len(labels)):
        others = [g for j, g in enumerate(groups) if j != i]
        if others:
            t, share_tau = tune_threshold(others, np.delete(labels, i), normal_class, slice_threshold, tau)
        else:
            t = SLICE_THRESHOLD if slice_threshold is None else slice_threshold
            share_tau = 0.5 if tau is None else tau
        preds[i] = threshold_vote(groups[i], t, share_tau, normal_class)
    return preds


VOTE_RULES: tuple[str, ...] = (
    "majority",
    "infected_fraction",
    "mean_prob",
    "weighted_center",
    "topk_mean",
    "threshold",
)
#: rules learned on slice embeddings (:mod:`covidct.patients.aggregation`), not functions of probabilities: a valid
#: ``vote.rule``, scored by the patient vote callback and applied by predict.py, but not by :func:`vote`
LEARNED_RULES: tuple[str, ...] = ("mil",)


#: the vote parameters a checkpoint and an export's sidecar (its ``vote`` object) record, in
#: :func:`check_vote_settings`'s order
VOTE_KEYS: tuple[str, ...] = (
    "rule",
    "tau",
    "k",
    "center_slices",
    "window_slices",
    "slice_threshold",
    "threshold_tau",
    "temperature",
)
#: parameters whose null in the config means "tuned on the validation patients"
TUNED_KEYS: tuple[str, ...] = ("tau", "slice_threshold")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and isfinite(value)


def _slices(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


#: what each numeric vote parameter must be: (test, the rule in words)
VOTE_PARAMETER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tau": (lambda v: _real(v) and 0.0 <= v <= 1.0, "in [0, 1] (a fraction of slices)"),
    "k": (_slices, "an integer >= 1 (slices)"),
    "center_slices": (_slices, "an integer >= 1 (slices)"),
    "window_slices": (_slices, "an integer >= 1 (slices)"),
    "slice_threshold": (lambda v: _real(v) and 0.0 <= v < 1.0, "in [0, 1) (an infected probability)"),
    "threshold_tau": (lambda v: _real(v) and 0.0 <= v <= 1.0, "in [0, 1] (a fraction of slices)"),
    "temperature": (lambda v: _real(v) and v > 0.0, "a finite number > 0 (it divides the logits)"),
}


def check_vote_settings(
    rule: str | None,
    tau: float | None = None,
    k: int | None = None,
    center_slices: int | None = None,
    window_slices: int | None = None,
    slice_threshold: float | None = None,
    threshold_tau: float | None = None,
    temperature: float | None = None,
    *,
    source: str = "",
    fix: str = "",
    error: type[CovidCTError] = ConfigError,
) -> None:
    """Raise ``error`` naming the key (``vote.rule``, ``vote.tau``, ``vote.k``, ...) for a bad value.

    Config values (``source`` empty): None is not checked (tau and slice_threshold None = tuned). Values a
    file records (``source``: the sidecar or checkpoint, which the message names first; ``fix``: what to do,
    which ends it): every one must be set."""
    prefix, suffix = (f"{source}: ", f"; {fix}" if fix else "") if source else ("", "")
    if (rule is not None or source) and rule not in VOTE_RULES + LEARNED_RULES:
        raise error(
            f"{prefix}vote.rule={rule!r} is not known; choose one of {sorted(VOTE_RULES + LEARNED_RULES)}{suffix}"
        )
    values = {
        "tau": tau,
        "k": k,
        "center_slices": center_slices,
        "window_slices": window_slices,
        "slice_threshold": slice_threshold,
        "threshold_tau": threshold_tau,
        "temperature": temperature,
    }
    for key, value in values.items():
        valid, what = VOTE_PARAMETER_RULES[key]
        if (value is not None or source) and not valid(value):
            tuned = " or null (tuned)" if key in TUNED_KEYS and not source else ""
            raise error(f"{prefix}vote.{key} must be {what}{tuned}, got {value!r}{suffix}")
    if window_slices is not None and center_slices is not None and window_slices < center_slices:
        raise error(
            f"{prefix}vote.window_slices={window_slices} must be >= vote.center_slices={center_slices}: the central "
            f"slices lie inside the voting window{suffix}"
        )


def vote(
    probs: np.ndarray,
    rule: str,
    tau: float = 0.5,
    normal_class: int = NORMAL_CLASS,
    *,
    k: int = TOP_K,
    center_slices: int = CENTER_SLICES,
    window_slices: int = WINDOW_SLICES,
    slice_threshold: float = SLICE_THRESHOLD,
    threshold_tau: float = 0.5,
) -> int:
    """One patient's class under ``rule`` (one of :data:`VOTE_RULES`); probs (n_slices, C) in position
    order. ``tau`` is used by ``infected_fraction``, ``k`` by ``topk_mean``, ``center_slices`` and
    ``window_slices`` by ``weighted_center``, ``slice_threshold`` and ``threshold_tau`` by ``threshold``."""
    if rule == "majority":
        return majority_vote(probs)
    if rule == "infected_fraction":
        return infected_fraction_vote(probs, tau, normal_class)
    if rule == "mean_prob":
        return mean_prob_vote(probs)
    if rule == "weighted_center":
        return weighted_center_vote(probs, center_slices, normal_class, window_slices)
    if rule == "topk_mean":
        return topk_mean_vote(probs, k)
    if rule == "threshold":
        return threshold_vote(probs, slice_threshold, threshold_tau, normal_class)
    if rule in LEARNED_RULES:
        raise ValueError(f"rule {rule!r} is learned on slice embeddings: use covidct.patients.aggregation, not vote()")
    raise ValueError(f"unknown vote rule {rule!r}; expected one of {VOTE_RULES}")


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


def leave_one_out_predictions(
    fractions: np.ndarray, infected_classes: np.ndarray, labels: np.ndarray, normal_class: int = NORMAL_CLASS
) -> np.ndarray:
    """Infected-fraction predictions (P,) int64 where patient i is decided by a tau tuned (:func:`tune_tau`)
    on the other patients only: an honest figure for a threshold fitted on the patients it scores.
    Arrays as in :func:`tune_tau`; a single patient is decided at tau 0.5."""
    fractions, infected_classes, labels = (np.asarray(a).reshape(-1) for a in (fractions, infected_classes, labels))
    preds = np.empty(len(labels), dtype=np.int64)
    for i in range(len(labels)):
        others = np.arange(len(labels)) != i
        tau = (
            tune_tau(fractions[others], infected_classes[others], labels[others], normal_class) if others.any() else 0.5
        )
        preds[i] = normal_class if fractions[i] <= tau else infected_classes[i]
    return preds


@dataclass(frozen=True)
class PatientVote:
    """One patient's slice predictions summed up, and every rule's vote (C = number of classes)."""

    patient: str
    n_slices: int
    votes: np.ndarray  # (C,) int64 slice argmax counts
    mean_prob: np.ndarray  # (C,) float64 mean softmax probability over slices
    infected_fraction: float  # see infected_fraction()
    infected_class: int  # see infected_class(): the class if called infected
    rule_votes: dict[str, int]  # every rule of VOTE_RULES -> class
    infected_share: float = float("nan")  # see infected_share(): at the threshold rule's slice_threshold


def group_slices(patient_ids: Sequence[str] | np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Patient id -> its rows of ``probs`` (N, C), in the given order; patients in order of first appearance.

    Args:
        patient_ids: (N,) patient id of each slice (converted to str).
        probs: (N, C) float softmax probabilities, each patient's slices in position order.
    """
    probs = _check_probs(probs)
    ids = [str(p) for p in np.asarray(patient_ids, dtype=object).reshape(-1)]
    if len(ids) != probs.shape[0]:
        raise ValueError(f"got {len(ids)} patient ids for {probs.shape[0]} slices")
    rows: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        rows.setdefault(pid, []).append(i)
    return {pid: probs[r] for pid, r in rows.items()}


def vote_patients(
    patient_ids: Sequence[str] | np.ndarray,
    probs: np.ndarray,
    tau: float,
    normal_class: int = NORMAL_CLASS,
    *,
    k: int = TOP_K,
    center_slices: int = CENTER_SLICES,
    window_slices: int = WINDOW_SLICES,
    slice_threshold: float = SLICE_THRESHOLD,
    threshold_tau: float = 0.5,
) -> list[PatientVote]:
    """Group slices by patient (:func:`group_slices`) and apply every rule of :data:`VOTE_RULES` once.

    ``tau`` is the infected-fraction threshold (tune it first, e.g. with :func:`tune_tau` on the
    :func:`infected_fraction` and :func:`infected_class` of each group); ``k``, ``center_slices``
    and ``window_slices`` are the parameters of :func:`topk_mean_vote` and :func:`weighted_center_vote`,
    ``slice_threshold`` and ``threshold_tau`` those of :func:`threshold_vote` (see :func:`tune_threshold`).
    """
    tau = _check_tau(tau)
    params = {
        "k": k,
        "center_slices": center_slices,
        "window_slices": window_slices,
        "slice_threshold": slice_threshold,
        "threshold_tau": threshold_tau,
    }
    _check_normal(normal_class, _check_probs(probs).shape[1])
    return [
        PatientVote(
            patient=pid,
            n_slices=len(p),
            votes=np.bincount(p.argmax(axis=1), minlength=p.shape[1]).astype(np.int64),
            mean_prob=p.mean(axis=0),
            infected_fraction=infected_fraction(p, normal_class),
            infected_class=infected_class(p, normal_class),
            rule_votes={r: vote(p, r, tau, normal_class, **params) for r in VOTE_RULES},
            infected_share=infected_share(p, slice_threshold, normal_class),
        )
        for pid, p in group_slices(patient_ids, probs).items()
    ]


# ---- what each rule decides on (for patients.csv and the run report) ---------------------------------

#: rules that call a patient Normal unless a share of its slices exceeds a tau (then a sick class wins);
#: every other rule takes the argmax of per-class scores (:func:`rule_scores`)
SHARE_RULES: tuple[str, ...] = ("infected_fraction", "threshold")

#: what :func:`rule_scores` gives per class, by rule (the run report's ROC label)
RULE_SCORES: dict[str, str] = {
    "majority": "share of slice votes",
    "infected_fraction": "share of slice votes (Normal: 1 - infected fraction)",
    "mean_prob": "mean slice probability",
    "weighted_center": "weighted slice votes of the central window, as shares",
    "topk_mean": "mean of the top-k slice probabilities",
    "threshold": "infected share, split between the sick classes by their mean probability",
    "mil": "MIL head probability",
}


def vote_shares(probs: np.ndarray) -> np.ndarray:
    """(C,) float64: the share of the slices of ``probs`` (n_slices, C) whose argmax is each class (sums to 1)."""
    probs = _check_probs(probs)
    return np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) / len(probs)


def weighted_center_scores(
    probs: np.ndarray,
    center_slices: int = CENTER_SLICES,
    normal_class: int = NORMAL_CLASS,
    window_slices: int = WINDOW_SLICES,
) -> np.ndarray:
    """(C,) float64: :func:`weighted_center_vote`'s weighted argmax votes per class of ``probs`` (n_slices, C),
    divided by their sum (so they sum to 1; the argmax is the same)."""
    probs = _check_probs(probs)
    _check_normal(normal_class, probs.shape[1])
    pred = probs.argmax(axis=1)
    outer = np.where(pred == normal_class, OUTER_WEIGHT_NORMAL, OUTER_WEIGHT_INFECTED)
    weights = np.where(central_mask(len(probs), center_slices), 1.0, outer)
    weights = np.where(central_mask(len(probs), window_slices), weights, 0.0)
    scores = np.bincount(pred, weights=weights, minlength=probs.shape[1])
    return scores / scores.sum()


def threshold_scores(probs: np.ndarray, slice_threshold: float, normal_class: int = NORMAL_CLASS) -> np.ndarray:
    """(C,) float64 for :func:`threshold_vote` on ``probs`` (n_slices, C): ``normal_class`` gets 1 - the
    :func:`infected_share` s at ``slice_threshold``; each sick class c gets s * m_c / sum of the sick m, where m
    is the mean probability over the slices above the threshold (over all slices when none is), the
    quantity :func:`threshold_class` compares. The scores sum to 1."""
    probs = _check_probs(probs)
    share = infected_share(probs, slice_threshold, normal_class)
    above = infected_probability(probs, normal_class) > slice_threshold
    mean = (probs[above] if above.any() else probs).mean(axis=0)
    sick = np.arange(probs.shape[1]) != normal_class
    total = mean[sick].sum()
    split = mean / total if total > 0 else np.full(probs.shape[1], 1.0 / max(1, int(sick.sum())))
    return np.where(sick, share * split, 1.0 - share)


def rule_scores(
    probs: np.ndarray,
    rule: str,
    normal_class: int = NORMAL_CLASS,
    *,
    k: int = TOP_K,
    center_slices: int = CENTER_SLICES,
    window_slices: int = WINDOW_SLICES,
    slice_threshold: float = SLICE_THRESHOLD,
) -> np.ndarray:
    """(C,) float64: the per-class scores ``rule`` ranks one patient's classes by (``probs`` (n_slices, C) in
    position order); what the run report scores the patient ROC with (:data:`RULE_SCORES`).

    ``majority`` and ``infected_fraction``: :func:`vote_shares` (Normal's is 1 - the infected fraction);
    ``mean_prob``: the mean probabilities; ``weighted_center``: :func:`weighted_center_scores`; ``topk_mean``:
    :func:`topk_mean`; ``threshold``: :func:`threshold_scores`. For the argmax rules the argmax of the scores
    is the vote (up to the tie rule); the share rules (:data:`SHARE_RULES`) call Normal by a tau instead."""
    if rule in ("majority", "infected_fraction"):
        return vote_shares(probs)
    if rule == "mean_prob":
        return _check_probs(probs).mean(axis=0)
    if rule == "weighted_center":
        return weighted_center_scores(probs, center_slices, normal_class, window_slices)
    if rule == "topk_mean":
        return topk_mean(probs, k)
    if rule == "threshold":
        return threshold_scores(probs, slice_threshold, normal_class)
    raise ValueError(f"rule_scores: no scores for rule {rule!r}; expected one of {VOTE_RULES}")


def sick_margin(scores: np.ndarray, normal_class: int = NORMAL_CLASS) -> float:
    """The best sick class's score minus ``normal_class``'s, of ``scores`` (C,): an argmax rule calls the
    patient sick when it is > 0 (at 0, the tie rule decides)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.delete(scores, normal_class).max() - scores[normal_class])


def leave_one_out_taus(
    fractions: np.ndarray, infected_classes: np.ndarray, labels: np.ndarray, normal_class: int = NORMAL_CLASS
) -> np.ndarray:
    """(P,) float64: the tau :func:`leave_one_out_predictions` decides patient i by (tuned on the other
    patients; 0.5 for a single patient). Arrays as in :func:`tune_tau`."""
    fractions, infected_classes, labels = (np.asarray(a).reshape(-1) for a in (fractions, infected_classes, labels))
    taus = np.full(len(labels), 0.5)
    for i in range(len(labels)):
        others = np.arange(len(labels)) != i
        if others.any():
            taus[i] = tune_tau(fractions[others], infected_classes[others], labels[others], normal_class)
    return taus


def leave_one_out_threshold_parameters(
    groups: Sequence[np.ndarray],
    labels: np.ndarray,
    normal_class: int = NORMAL_CLASS,
    slice_threshold: float | None = None,
    tau: float | None = None,
) -> np.ndarray:
    """(P, 2) float64: the (slice_threshold, tau) :func:`leave_one_out_threshold_predictions` decides patient i
    by (tuned on the other patients, fixed values kept; the fixed values or (0.5, 0.5) for a single patient)."""
    labels = np.asarray(labels).reshape(-1)
    params = np.empty((len(labels), 2))
    for i in range(len(labels)):
        others = [g for j, g in enumerate(groups) if j != i]
        if others:
            params[i] = tune_threshold(others, np.delete(labels, i), normal_class, slice_threshold, tau)
        else:
            params[i] = (
                SLICE_THRESHOLD if slice_threshold is None else slice_threshold,
                0.5 if tau is None else tau,
            )
    return params
