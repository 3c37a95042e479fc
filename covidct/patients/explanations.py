"""What a vote rule decided a patient on, in figures and one sentence, and ``patients.csv``'s table (numpy
only: no Lightning, no torch).

:func:`explain_call` explains ONE patient's call from its slice probabilities under given
:class:`~covidct.patients.parameters.VoteParameters`: the quantity the rule compared, the threshold, the rule's
scores and the "why" sentence. Training's :func:`patient_decisions` calls it for each validation patient of a
:class:`~covidct.patients.decisions.ValidationVotes` with the parameters that patient was called with
(leave-one-out where tuned), so every sentence agrees with the reported call; predict.py calls it with the
checkpoint's fixed parameters (:mod:`covidct.predict.predictor`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from covidct.contracts import CLASS_NAMES, DECISION_COLUMNS, NORMAL_CLASS, mean_prob_column, score_column
from covidct.patients.parameters import VoteParameters
from covidct.patients.rules import LEARNED_RULES, RULE_SCORES, RULES, VOTE_RULES, scores_with
from covidct.patients.tuning import leave_one_out_taus, leave_one_out_threshold_parameters, tune_threshold
from covidct.patients.voting import infected_fraction, infected_share, sick_margin

if TYPE_CHECKING:  # torch: predict.py's ONNX path imports this module without it
    from covidct.patients.decisions import PatientVoter, ValidationVotes

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


def decision_names(rule: str) -> tuple[str, str]:
    """(quantity, threshold) names of what ``rule`` compares: the share rules their fraction or share of slices
    against tau, the argmax rules (and ``mil``) the sick margin against 0."""
    return {"infected_fraction": ("infected fraction", "tau"), "threshold": ("infected share", "tau")}.get(
        rule, ("sick margin", "threshold")
    )


@dataclass(frozen=True)
class PatientCall:
    """One patient's call explained (C classes): the rule calls the patient sick (not Normal) when
    ``quantity`` > ``threshold`` (an argmax rule at a margin of exactly 0: its tie rule).

    Attributes:
        quantity: float, what the rule compared (:func:`decision_names`); NaN where not recorded.
        threshold: float, what it was compared to (the argmax rules: 0).
        scores: (C,) float64 the rule's per-class scores; NaN where not recorded.
        why: one sentence: the figures and the comparison that made the call, ending in the called class.
    """

    quantity: float
    threshold: float
    scores: np.ndarray
    why: str


def explain_call(
    probs: np.ndarray,
    parameters: VoteParameters,
    predicted: int,
    scores: np.ndarray | None = None,
    cross_fitted: bool = False,
) -> PatientCall:
    """Why ``predicted`` (class index) is one patient's call under ``parameters`` (the rule and the values the
    patient was called with), from its ``probs`` (n_slices, C) slice probabilities, head first: the one place
    the sentences are made (training's :func:`patient_decisions`, predict.py's patient CSV).

    ``scores`` (C,): the rule's scores when already computed (training: with the parameters tuned on all
    patients; a learned rule: its head's probabilities, all NaN where not recorded); None computes them with
    :func:`~covidct.patients.rules.scores_with` (a learned rule: not recorded). ``cross_fitted``: a learned
    rule's call came from a head fitted on the other patients."""
    probs, rule = np.asarray(probs), parameters.rule
    if scores is None:
        scores = np.full(probs.shape[1], np.nan) if rule in LEARNED_RULES else scores_with(parameters, probs)
    scores = np.asarray(scores, dtype=np.float64)
    if rule == "infected_fraction":
        quantity, threshold, why = _fraction_call(probs, parameters, predicted)
    elif rule == "threshold":
        quantity, threshold, why = _threshold_call(probs, parameters, predicted)
    else:
        quantity, threshold, why = _argmax_call(probs, parameters, predicted, scores, cross_fitted)
    return PatientCall(float(quantity), float(threshold), scores, why)


def _fraction_call(probs: np.ndarray, parameters: VoteParameters, predicted: int) -> tuple[float, float, str]:
    """infected_fraction: the patient's infected fraction against ``parameters.tau``."""
    votes = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    n, f, tau = len(probs), infected_fraction(probs), parameters.tau
    head = f"{n - int(votes[NORMAL_CLASS])} of {n} {_explained(parameters)}: fraction {f:.3f}"
    if f <= tau:
        return f, tau, f"{head} <= tau {tau:.3f}: {CLASS_NAMES[predicted]}"
    tie = TIE if _tied(votes[SICK]) else ""
    voted = f"the infected slices vote {_class_list(votes, SICK, 'd')}{tie}"
    return f, tau, f"{head} > tau {tau:.3f}; {voted}: {CLASS_NAMES[predicted]}"


def _threshold_call(probs: np.ndarray, parameters: VoteParameters, predicted: int) -> tuple[float, float, str]:
    """threshold: the patient's infected share at ``parameters.slice_threshold`` against its ``threshold_tau``."""
    t, tau = parameters.slice_threshold, parameters.threshold_tau
    above = (1.0 - probs[:, NORMAL_CLASS]) > t
    share = infected_share(probs, t)
    head = f"{int(above.sum())} of {len(probs)} {_explained(parameters)}: share {share:.3f}"
    if share <= tau:
        return share, tau, f"{head} <= tau {tau:.3f}: {CLASS_NAMES[predicted]}"
    mean = (probs[above] if above.any() else probs).mean(axis=0)
    return (
        share,
        tau,
        f"{head} > tau {tau:.3f}; mean P over them {_class_list(mean, SICK, '.3f')}: {CLASS_NAMES[predicted]}",
    )


def _argmax_call(
    probs: np.ndarray, parameters: VoteParameters, predicted: int, scores: np.ndarray, cross_fitted: bool
) -> tuple[float, float, str]:
    """The argmax rules (and ``mil``): the sick margin (best sick score - Normal's) of ``scores`` against 0."""
    learned, recorded = parameters.rule in LEARNED_RULES, not np.isnan(scores).all()
    if parameters.rule == "majority":
        votes = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
        text = f"{_explained(parameters)} {_class_list(votes, EVERY_CLASS, 'd')}{TIE if _tied(votes) else ''}"
    elif learned and not recorded:
        text = f"{'cross-fitted ' if cross_fitted else ''}head (probabilities not recorded)"
    else:
        text = f"{_explained(parameters)} {_class_list(scores, EVERY_CLASS, '.3f')}"
    if learned and recorded and cross_fitted:
        text = f"cross-fitted head; {text}"
    return sick_margin(scores, NORMAL_CLASS), 0.0, f"{text}: {CLASS_NAMES[predicted]}"


def patient_decisions(votes: ValidationVotes, voter: PatientVoter) -> PatientDecisions:
    """Per patient of ``votes``, the quantity ``votes.rule`` decided on, the threshold that decided it, the
    rule's class scores and one sentence saying why (:func:`explain_call` with the parameters the patient was
    called with), recomputed from the slice probabilities with ``voter``'s settings (k, central slices, fixed
    or tuned tau and slice threshold)."""
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
        fields, called_with = _infected_fraction_fields(votes), [replace(parameters, tau=t) for t in taus]
    elif rule == "threshold":
        fields, called_with = _threshold_fields(votes, voter, parameters, groups)
    else:
        fields, called_with = _argmax_fields(rule), [parameters] * n
    calls = [
        explain_call(g, p, c, s, cross_fitted=rule in LEARNED_RULES)
        for g, p, c, s in zip(groups, called_with, votes.predicted, scores, strict=True)
    ]
    return PatientDecisions(
        rule=rule,
        quantity_name=decision_names(rule)[0],
        threshold_name=decision_names(rule)[1],
        quantity=np.asarray([c.quantity for c in calls], dtype=np.float64),
        threshold=np.asarray([c.threshold for c in calls], dtype=np.float64),
        scores=np.asarray(scores, dtype=np.float64),
        scores_name=RULE_SCORES[rule],
        why=[c.why for c in calls],
        infected_fraction_tau=taus,
        window=(parameters.center_slices, parameters.window_slices) if rule == "weighted_center" else None,
        **fields,
    )


def _rule_fields(
    threshold_all: float,
    parameters: str,
    slice_threshold: float | None = None,
    patient_slice_threshold: np.ndarray | None = None,
) -> dict:
    """The :class:`PatientDecisions` fields about the rule as a whole (not one patient's call)."""
    return {
        "threshold_all": float(threshold_all),
        "parameters": parameters,
        "slice_threshold": slice_threshold,
        "patient_slice_threshold": patient_slice_threshold,
    }


def _infected_fraction_fields(votes: ValidationVotes) -> dict:
    """infected_fraction: where its tau comes from (each patient is called with its leave-one-out tau)."""
    source = (
        f"tau {votes.tau:.3f} tuned on all validation patients; each patient is called with a tau tuned on the "
        "other validation patients (leave-one-out), the tau column"
        if votes.tau_tuned
        else f"tau fixed at {votes.tau:.3f} (vote.tau)"
    )
    return _rule_fields(votes.tau, source)


def _threshold_fields(
    votes: ValidationVotes, voter: PatientVoter, parameters: VoteParameters, groups: list[np.ndarray]
) -> tuple[dict, list[VoteParameters]]:
    """threshold: where its (slice threshold, tau) come from, and each patient's (leave-one-out) parameters."""
    t_all, share_tau, n = parameters.slice_threshold, parameters.threshold_tau, len(groups)
    per_patient = (
        leave_one_out_threshold_parameters(
            groups, votes.labels, slice_threshold=voter.fixed_slice_threshold, tau=voter.fixed_tau
        )
        if voter.threshold_tuned
        else np.tile([t_all, share_tau], (n, 1))
    ).reshape(n, 2)
    source = (
        f"slice threshold {t_all:.3f} and tau {share_tau:.3f} tuned on all validation patients; each patient is "
        "called with both tuned on the other validation patients (leave-one-out), the slice threshold and tau "
        "columns"
        if voter.threshold_tuned
        else f"slice threshold {t_all:.3f} and tau {share_tau:.3f} fixed"
    )
    called_with = [replace(parameters, slice_threshold=t, threshold_tau=tau) for t, tau in per_patient]
    return _rule_fields(share_tau, source, float(t_all), per_patient[:, 0]), called_with


def _argmax_fields(rule: str) -> dict:
    """The argmax rules (and ``mil``): what the sick margin is, and for ``mil`` which head's figures are shown."""
    source = (
        "an argmax rule: the class with the highest score wins (sick margin = best sick class's score - "
        "Normal's; > 0 calls the patient sick)"
    )
    if rule in LEARNED_RULES:
        source += (
            "; the reported calls are cross-fitted (each patient by a head fitted on the other patients), "
            "the probabilities shown are the head fitted on all of them (in-sample)"
        )
    return _rule_fields(0.0, source)


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
        *DECISION_COLUMNS,
        *(["slice_threshold"] if threshold_rule else []),
        *map(score_column, CLASS_NAMES),
        *[f"{rule}_vote" for rule in rules],
        "infected_fraction",
        "infected_fraction_tau",
        "infected_share",
        "n_slices",
        *[f"votes_{c}" for c in CLASS_NAMES],
        *map(mean_prob_column, CLASS_NAMES),
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
