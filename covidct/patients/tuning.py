"""Tuning the rules' thresholds on validation patients, and leave-one-patient-out figures for them.

``infected_fraction``'s tau (:func:`tune_tau`) and ``threshold``'s (slice_threshold, tau) (:func:`tune_threshold`)
maximise the patient accuracy on the patients given; the leave-one-out functions decide each patient with
parameters tuned on the other patients only, so a reported accuracy is not fitted to the patient it scores.
Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidct.contracts import NORMAL_CLASS
from covidct.patients.parameters import SLICE_THRESHOLD, TAU
from covidct.patients.voting import calls_of_sorted, sorted_slices, threshold_vote

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
    return tune_sorted_threshold(
        [sorted_slices(g, normal_class) for g in groups], labels, normal_class, slice_threshold, tau
    )


def tune_sorted_threshold(
    prepared: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray,
    normal_class: int = NORMAL_CLASS,
    slice_threshold: float | None = None,
    tau: float | None = None,
) -> tuple[float, float]:
    """:func:`tune_threshold` of patients prepared by :func:`~covidct.patients.voting.sorted_slices` (no sort:
    the leave-one-out rounds prepare every patient once)."""
    labels = np.asarray(labels).reshape(-1)
    if len(prepared) != len(labels) or not len(labels):
        raise ValueError(f"need one label per patient and at least one patient, got {len(prepared)} and {len(labels)}")
    if slice_threshold is None:
        scores = np.concatenate([infected for infected, _ in prepared])
        quantiles = np.quantile(scores, np.linspace(0.05, 0.95, 19))
        candidates = np.unique(np.concatenate([SLICE_THRESHOLDS, quantiles[quantiles < 1.0]]))
    else:
        candidates = np.asarray([slice_threshold], dtype=np.float64)
    calls = [calls_of_sorted(p, candidates, normal_class) for p in prepared]
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


def leave_one_out_taus(
    fractions: np.ndarray, infected_classes: np.ndarray, labels: np.ndarray, normal_class: int = NORMAL_CLASS
) -> np.ndarray:
    """(P,) float64: the tau :func:`leave_one_out_predictions` decides patient i by (tuned on the other
    patients; :data:`~covidct.patients.parameters.TAU` for a single patient). Arrays as in :func:`tune_tau`."""
    fractions, infected_classes, labels = (np.asarray(a).reshape(-1) for a in (fractions, infected_classes, labels))
    taus = np.full(len(labels), TAU)
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
    by (tuned on the other patients, fixed values kept; the fixed values or the defaults for a single patient)."""
    labels = np.asarray(labels).reshape(-1)
    params = np.empty((len(labels), 2))
    prepared = [sorted_slices(g, normal_class) for g in groups]  # sorted once, not once per round
    for i in range(len(labels)):
        others = [p for j, p in enumerate(prepared) if j != i]
        if others:
            params[i] = tune_sorted_threshold(others, np.delete(labels, i), normal_class, slice_threshold, tau)
        else:
            params[i] = (
                SLICE_THRESHOLD if slice_threshold is None else slice_threshold,
                TAU if tau is None else tau,
            )
    return params


def leave_one_out_predictions(
    fractions: np.ndarray, infected_classes: np.ndarray, labels: np.ndarray, normal_class: int = NORMAL_CLASS
) -> np.ndarray:
    """Infected-fraction predictions (P,) int64 where patient i is decided by a tau tuned (:func:`tune_tau`)
    on the other patients only: an honest figure for a threshold fitted on the patients it scores.
    Arrays as in :func:`tune_tau`; a single patient is decided at tau :data:`~covidct.patients.parameters.TAU`."""
    fractions, infected_classes = np.asarray(fractions).reshape(-1), np.asarray(infected_classes).reshape(-1)
    taus = leave_one_out_taus(fractions, infected_classes, labels, normal_class)
    return np.where(fractions <= taus, normal_class, infected_classes).astype(np.int64)


def leave_one_out_threshold_predictions(
    groups: Sequence[np.ndarray],
    labels: np.ndarray,
    normal_class: int = NORMAL_CLASS,
    slice_threshold: float | None = None,
    tau: float | None = None,
) -> np.ndarray:
    """:func:`~covidct.patients.voting.threshold_vote` predictions (P,) int64 where patient i is decided by
    (slice_threshold, tau) tuned (:func:`tune_threshold`, fixed values kept) on the other patients only
    (:func:`leave_one_out_threshold_parameters`)."""
    parameters = leave_one_out_threshold_parameters(groups, labels, normal_class, slice_threshold, tau)
    return np.asarray(
        [threshold_vote(g, t, share_tau, normal_class) for g, (t, share_tau) in zip(groups, parameters, strict=True)],
        dtype=np.int64,
    ).reshape(-1)
