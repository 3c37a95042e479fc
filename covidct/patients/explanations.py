"""What the configured rule decided each validation patient on, in figures and one sentence per patient, and
``patients.csv``'s table (no Lightning).

The figures are recomputed from the slice probabilities of a :class:`~covidct.patients.decisions.ValidationVotes`
with the :class:`~covidct.patients.decisions.PatientVoter`'s settings; leave-one-out parameters are those the
reported calls were decided by, so every sentence agrees with the reported call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from covidct.contracts import CLASS_NAMES, NORMAL_CLASS
from covidct.patients.decisions import PatientVoter, ValidationVotes
from covidct.patients.parameters import VoteParameters
from covidct.patients.rules import LEARNED_RULES, RULE_SCORES, RULES, VOTE_RULES, scores_with
from covidct.patients.tuning import leave_one_out_taus, leave_one_out_threshold_parameters, tune_threshold
from covidct.patients.voting import infected_share, sick_margin

SICK = [c for c in range(len(CLASS_NAMES)) if c != NORMAL_CLASS]
EVERY_CLASS = list(range(len(CLASS_NAMES)))
TIE = " (a tie: the higher summed probability wins)"


@dataclass(frozen=True)
class PatientDecisions:
    """What the configured rule decided each validation patient on (P patients, C classes): the figures a
    reader checks a call against. The rule calls a patient sick (not Normal) when ``quantity`` > ``threshold``.

    Attributes:
        rule: the configured rule.
        quantity_name, threshold_name: e.g. ``infected fraction`` and ``tau``.
        quantity: (P,) float64, NaN where not recorded (``mil`` without :class:`MilDetails`).
        threshold: (P,) float64, the threshold that decided each patient (leave-one-out: one per patient).
        threshold_all: the threshold tuned on (or fixed for) all validation patients.
        parameters: where the rule's parameters come from, one sentence.
        scores: (P, C) float64 the rule's per-class scores (:func:`~covidct.patients.rules.scores_with`; the ``mil``
            head's in-sample probabilities), what the patient ROC is scored by; NaN where not recorded.
        scores_name: what ``scores`` are.
        why: (P,) one sentence per patient: the figures and the comparison that made the call.
        slice_threshold: the threshold rule's slice threshold on P(infected) (tuned on all patients), else None.
        patient_slice_threshold: (P,) the slice threshold that decided each patient (threshold rule), else None.
        infected_fraction_tau: (P,) the tau the ``infected_fraction`` rule's reported vote used, whatever the rule.
        window: ``weighted_center``'s (central slices, voting window), else None.
    """

    rule: str
    quantity_name: str
    threshold_name: str
    quantity: np.ndarray
    threshold: np.ndarray
    threshold_all: float
    parameters: str
    scores: np.ndarray
    scores_name: str
    why: list[str]
    slice_threshold: float | None
    patient_slice_threshold: np.ndarray | None
    infected_fraction_tau: np.ndarray
    window: tuple[int, int] | None = None


def slice_groups(votes: ValidationVotes) -> list[np.ndarray]:
    """Each validation patient's (n_i, C) slice probabilities (head first), in ``votes.patients``' order."""
    groups = [votes.slice_probs[votes.slice_patient == p] for p in np.unique(votes.slice_patient)]
    if [len(g) for g in groups] != [v.n_slices for v in votes.patients]:
        raise ValueError("ValidationVotes: the slices per patient do not match the patients' slice counts")
    return groups


def _class_list(values: np.ndarray, classes: list[int], fmt: str) -> str:
    return ", ".join(f"{CLASS_NAMES[c]} {format(values[c], fmt)}" for c in classes)


def _tied(votes: np.ndarray) -> bool:
    """Whether the largest of ``votes`` (counts) is shared."""
    return int((votes == votes.max()).sum()) > 1


def _explained(parameters: VoteParameters) -> str:
    """The registry's explanation of ``parameters.rule``, filled in with ``parameters``."""
    return RULES[parameters.rule].explanation.format_map(vars(parameters))


def threshold_rule_parameters(votes: ValidationVotes, voter: PatientVoter) -> VoteParameters:
    """``voter``'s parameters with the threshold rule's (slice_threshold, tau) as tuned (or fixed) on all of
    ``votes``' patients."""
    groups, parameters = slice_groups(votes), voter.parameters
    if not (voter.threshold_tuned and groups):
        return parameters
    t, share_tau = tune_threshold(
        groups, votes.labels, slice_threshold=voter.fixed_slice_threshold, tau=voter.fixed_tau
    )
    return replace(parameters, slice_threshold=t, threshold_tau=share_tau)


def patient_decisions(votes: ValidationVotes, voter: PatientVoter) -> PatientDecisions:
    """Per patient of ``votes``, the quantity ``votes.rule`` decided on, the threshold that decided it, the
    rule's class scores and one sentence saying why, recomputed from the slice probabilities with ``voter``'s
    settings (k, central slices, fixed or tuned tau and slice threshold)."""
    groups, n, rule = slice_groups(votes), len(votes.patients), votes.rule
    parameters = replace(threshold_rule_parameters(votes, voter), rule=rule)
    fractions = np.asarray([v.infected_fraction for v in votes.patients], dtype=np.float64)
    sick_class = np.asarray([v.infected_class for v in votes.patients])
    taus = leave_one_out_taus(fractions, sick_class, votes.labels) if votes.tau_tuned else np.full(n, votes.tau)
    if rule in LEARNED_RULES:
        mil = votes.mil
        scores = mil.probs.astype(np.float64) if mil is not None else np.full((n, len(CLASS_NAMES)), np.nan)
    else:
        scores = np.asarray([scores_with(parameters, g) for g in groups]).reshape(n, -1)
    if rule == "infected_fraction":
        fields = _infected_fraction_decisions(votes, parameters, fractions, taus)
    elif rule == "threshold":
        fields = _threshold_decisions(votes, voter, parameters, groups)
    else:
        fields = _argmax_decisions(votes, parameters, scores)
    return PatientDecisions(
        rule=rule,
        scores=np.asarray(scores, dtype=np.float64),
        scores_name=RULE_SCORES[rule],
        infected_fraction_tau=taus,
        window=(parameters.center_slices, parameters.window_slices) if rule == "weighted_center" else None,
        **fields,
    )


def _decision_fields(
    names: tuple[str, str],
    quantity: np.ndarray,
    threshold: np.ndarray,
    threshold_all: float,
    parameters: str,
    why: list[str],
    slice_threshold: float | None = None,
    patient_slice_threshold: np.ndarray | None = None,
) -> dict:
    """The rule-specific :class:`PatientDecisions` fields."""
    return {
        "quantity_name": names[0],
        "threshold_name": names[1],
        "quantity": np.asarray(quantity, dtype=np.float64),
        "threshold": np.asarray(threshold, dtype=np.float64),
        "threshold_all": float(threshold_all),
        "parameters": parameters,
        "why": why,
        "slice_threshold": slice_threshold,
        "patient_slice_threshold": patient_slice_threshold,
    }


def _infected_fraction_decisions(
    votes: ValidationVotes, parameters: VoteParameters, fractions: np.ndarray, taus: np.ndarray
) -> dict:
    """infected_fraction: the infected fraction of each patient against its (leave-one-out) tau."""
    source = (
        f"tau {votes.tau:.3f} tuned on all validation patients; each patient is called with a tau tuned on the "
        "other validation patients (leave-one-out), the tau column"
        if votes.tau_tuned
        else f"tau fixed at {votes.tau:.3f} (vote.tau)"
    )
    why = []
    for v, f, tau, p in zip(votes.patients, fractions, taus, votes.predicted, strict=True):
        infected = int(v.n_slices - v.votes[NORMAL_CLASS])
        head = f"{infected} of {v.n_slices} {_explained(parameters)}: fraction {f:.3f}"
        tie = TIE if _tied(v.votes[SICK]) else ""
        why.append(
            f"{head} > tau {tau:.3f}; the infected slices vote {_class_list(v.votes, SICK, 'd')}{tie}: {CLASS_NAMES[p]}"
            if f > tau
            else f"{head} <= tau {tau:.3f}: {CLASS_NAMES[p]}"
        )
    return _decision_fields(("infected fraction", "tau"), fractions, taus, votes.tau, source, why)


def _threshold_decisions(
    votes: ValidationVotes, voter: PatientVoter, parameters: VoteParameters, groups: list[np.ndarray]
) -> dict:
    """threshold: each patient's infected share at its (leave-one-out) slice threshold against its tau."""
    t_all, share_tau, n = parameters.slice_threshold, parameters.threshold_tau, len(groups)
    per_patient = (
        leave_one_out_threshold_parameters(
            groups, votes.labels, slice_threshold=voter.fixed_slice_threshold, tau=voter.fixed_tau
        )
        if voter.threshold_tuned
        else np.tile([t_all, share_tau], (n, 1))
    ).reshape(n, 2)
    slice_thresholds, taus = per_patient[:, 0], per_patient[:, 1]
    shares = np.asarray([infected_share(g, t) for g, t in zip(groups, slice_thresholds, strict=True)])
    source = (
        f"slice threshold {t_all:.3f} and tau {share_tau:.3f} tuned on all validation patients; each patient is "
        "called with both tuned on the other validation patients (leave-one-out), the slice threshold and tau "
        "columns"
        if voter.threshold_tuned
        else f"slice threshold {t_all:.3f} and tau {share_tau:.3f} fixed"
    )
    why = []
    for g, t, s, tau, p in zip(groups, slice_thresholds, shares, taus, votes.predicted, strict=True):
        above = (1.0 - g[:, NORMAL_CLASS]) > t
        head = f"{int(above.sum())} of {len(g)} {_explained(replace(parameters, slice_threshold=t))}: share {s:.3f}"
        mean = (g[above] if above.any() else g).mean(axis=0)
        why.append(
            f"{head} > tau {tau:.3f}; mean P over them {_class_list(mean, SICK, '.3f')}: {CLASS_NAMES[p]}"
            if s > tau
            else f"{head} <= tau {tau:.3f}: {CLASS_NAMES[p]}"
        )
    return _decision_fields(
        ("infected share", "tau"), shares, taus, share_tau, source, why, float(t_all), slice_thresholds
    )


def _argmax_decisions(votes: ValidationVotes, parameters: VoteParameters, scores: np.ndarray) -> dict:
    """The argmax rules (and ``mil``): each patient's sick margin (best sick score - Normal's) against 0."""
    n, rule, learned = len(votes.patients), parameters.rule, parameters.rule in LEARNED_RULES
    margins = np.asarray([sick_margin(s, NORMAL_CLASS) for s in scores]) if n else np.zeros(0)
    source = (
        "an argmax rule: the class with the highest score wins (sick margin = best sick class's score - "
        "Normal's; > 0 calls the patient sick)"
    )
    if learned:
        source += (
            "; the reported calls are cross-fitted (each patient by a head fitted on the other patients), "
            "the probabilities shown are the head fitted on all of them (in-sample)"
        )
    why = []
    for v, s, p in zip(votes.patients, scores, votes.predicted, strict=True):
        if rule == "majority":
            text = f"{_explained(parameters)} {_class_list(v.votes, EVERY_CLASS, 'd')}{TIE if _tied(v.votes) else ''}"
        elif learned and votes.mil is None:
            text = "cross-fitted head (probabilities not recorded)"
        else:
            text = f"{_explained(parameters)} {_class_list(s, EVERY_CLASS, '.3f')}"
        if learned and votes.mil is not None:
            text = f"cross-fitted head; {text}"
        why.append(f"{text}: {CLASS_NAMES[p]}")
    return _decision_fields(("sick margin", "threshold"), margins, np.zeros(n), 0.0, source, why)


def _r(value: float) -> float | str:
    """A CSV number to 4 decimals; NaN as an empty cell."""
    return "" if np.isnan(value) else round(float(value), 4)


def patients_table(votes: ValidationVotes, decisions: PatientDecisions) -> tuple[list[str], list[list]]:
    """``patients.csv``'s header and rows, one per validation patient: truth, the configured rule's call and
    what it was decided on (``decision``, ``decision_quantity``, ``decision_threshold``; the threshold rule's
    ``slice_threshold``; ``score_<class>``), every rule's reported vote (leave-one-out / cross-fitted where the
    rule is tuned or learned: the votes the per-rule accuracies count), infected fraction with the tau its
    rule used for this patient, infected share, slices, slice votes and mean probability per class (and the
    in-sample MIL probabilities when recorded)."""
    threshold_rule = decisions.patient_slice_threshold is not None
    rules = [*VOTE_RULES, *[r for r in LEARNED_RULES if r in votes.predictions]]
    header = [
        "patient",
        "true_class",
        "predicted_class",
        "correct",
        "decision",
        "decision_quantity",
        "decision_threshold",
        *(["slice_threshold"] if threshold_rule else []),
        *[f"score_{c}" for c in CLASS_NAMES],
        *[f"{rule}_vote" for rule in rules],
        "infected_fraction",
        "infected_fraction_tau",
        "infected_share",
        "n_slices",
        *[f"votes_{c}" for c in CLASS_NAMES],
        *[f"mean_prob_{c}" for c in CLASS_NAMES],
        *([f"mil_prob_{c}" for c in CLASS_NAMES] if votes.mil is not None else []),
    ]
    rows = []
    for i, (v, t, p) in enumerate(zip(votes.patients, votes.labels, votes.predicted, strict=True)):
        rows.append(
            [
                v.patient,
                CLASS_NAMES[t],
                CLASS_NAMES[p],
                bool(t == p),
                decisions.why[i],
                _r(decisions.quantity[i]),
                _r(decisions.threshold[i]),
                *([_r(decisions.patient_slice_threshold[i])] if threshold_rule else []),
                *[_r(s) for s in decisions.scores[i]],
                *[CLASS_NAMES[votes.predictions[rule][i]] for rule in rules],
                _r(v.infected_fraction),
                _r(decisions.infected_fraction_tau[i]),
                _r(v.infected_share),
                v.n_slices,
                *v.votes.tolist(),
                *[_r(m) for m in v.mean_prob],
                *([_r(m) for m in votes.mil.probs[i]] if votes.mil is not None else []),
            ]
        )
    return header, rows
