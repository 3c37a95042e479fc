"""The vote rule registry: rule name -> how it votes, what it scores, and how a call of it is explained.

Adding a rule is one :data:`RULES` entry (its arithmetic in :mod:`covidct.patients.voting`) plus one YAML in
``conf/vote/``. :func:`vote` (:func:`vote_with`) and :func:`scores_with` dispatch through the registry;
:data:`VOTE_RULES`, :data:`LEARNED_RULES`, :data:`SHARE_RULES` and :data:`RULE_SCORES` derive from it;
:func:`check_vote_settings` validates a rule and its parameters (:mod:`covidct.patients.parameters`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from covidct.contracts import NORMAL_CLASS
from covidct.errors import ConfigError, CovidCTError
from covidct.patients.parameters import (
    CENTER_SLICES,
    SLICE_THRESHOLD,
    TAU,
    TOP_K,
    TUNED_KEYS,
    VOTE_PARAMETER_RULES,
    WINDOW_SLICES,
    VoteParameters,
)
from covidct.patients.voting import (
    check_normal,
    check_probs,
    check_tau,
    infected_class,
    infected_fraction,
    infected_fraction_vote,
    infected_share,
    majority_vote,
    mean_prob_vote,
    threshold_scores,
    threshold_vote,
    topk_mean,
    topk_mean_vote,
    vote_shares,
    weighted_center_scores,
    weighted_center_vote,
)

#: a rule's vote: (slice probabilities (n_slices, C) in position order, parameters, normal class) -> class
VoteFunction = Callable[[np.ndarray, VoteParameters, int], int]
#: a rule's scores: the same arguments -> (C,) float64 per-class scores
ScoresFunction = Callable[[np.ndarray, VoteParameters, int], np.ndarray]


@dataclass(frozen=True)
class Rule:
    """One patient rule.

    Attributes:
        vote: the patient's class (see :data:`VoteFunction`).
        scores: the per-class scores the rule ranks by (see :data:`ScoresFunction`); what the patient ROC is
            scored with. For an argmax rule their argmax is the vote (up to the tie rule).
        scores_name: what ``scores`` are, in words (the run report's ROC label).
        explanation: what a call rests on, in words, as a ``str.format`` template over the
            :class:`VoteParameters` fields (``{k}``, ``{center_slices}``, ...): what a patient's sentence in the
            ``decision`` column of patients.csv says it was decided on (after the slice count for a share rule).
        share: the rule calls a patient Normal unless a share of its slices exceeds a tau (then a sick class
            wins), instead of taking the argmax of its scores.
        learned: fitted on slice features (:mod:`covidct.patients.aggregation`), not a function of the
            probabilities: ``vote`` and ``scores`` refuse.
    """

    vote: VoteFunction
    scores: ScoresFunction
    scores_name: str
    explanation: str
    share: bool = False
    learned: bool = False


def _learned(rule: str) -> Callable[..., int]:
    def refuse(*_: object) -> int:
        raise ValueError(f"rule {rule!r} is learned on slice embeddings: use covidct.patients.aggregation, not vote()")

    return refuse


def _no_scores(rule: str) -> Callable[..., np.ndarray]:
    def refuse(*_: object) -> np.ndarray:
        raise ValueError(f"no scores for rule {rule!r}; expected one of {VOTE_RULES}")

    return refuse


#: every vote rule, in the order the rule tables list them (the fixed rules, then the learned ones)
RULES: dict[str, Rule] = {
    "majority": Rule(
        vote=lambda probs, p, normal: majority_vote(probs),
        scores=lambda probs, p, normal: vote_shares(probs),
        scores_name="share of slice votes",
        explanation="slice votes",
    ),
    "infected_fraction": Rule(
        vote=lambda probs, p, normal: infected_fraction_vote(probs, p.tau, normal),
        scores=lambda probs, p, normal: vote_shares(probs),
        scores_name="share of slice votes (Normal: 1 - infected fraction)",
        explanation="slices infected (argmax not Normal)",
        share=True,
    ),
    "mean_prob": Rule(
        vote=lambda probs, p, normal: mean_prob_vote(probs),
        scores=lambda probs, p, normal: check_probs(probs).mean(axis=0),
        scores_name="mean slice probability",
        explanation="mean P",
    ),
    "weighted_center": Rule(
        vote=lambda probs, p, normal: weighted_center_vote(probs, p.center_slices, normal, p.window_slices),
        scores=lambda probs, p, normal: weighted_center_scores(probs, p.center_slices, normal, p.window_slices),
        scores_name="weighted slice votes of the central window, as shares",
        explanation="weighted vote shares (central {center_slices} of {window_slices} slices)",
    ),
    "topk_mean": Rule(
        vote=lambda probs, p, normal: topk_mean_vote(probs, p.k),
        scores=lambda probs, p, normal: topk_mean(probs, p.k),
        scores_name="mean of the top-k slice probabilities",
        explanation="mean of the top {k} P",
    ),
    "threshold": Rule(
        vote=lambda probs, p, normal: threshold_vote(probs, p.slice_threshold, p.threshold_tau, normal),
        scores=lambda probs, p, normal: threshold_scores(probs, p.slice_threshold, normal),
        scores_name="infected share, split between the sick classes by their mean probability",
        explanation="slices with P(infected) > {slice_threshold:.3f}",
        share=True,
    ),
    "mil": Rule(
        vote=_learned("mil"),
        scores=_no_scores("mil"),
        scores_name="MIL head probability",
        explanation="head fitted on all validation patients: P",
        learned=True,
    ),
}
#: the rules that are functions of the slice probabilities (:func:`vote` applies them)
VOTE_RULES: tuple[str, ...] = tuple(name for name, rule in RULES.items() if not rule.learned)
#: rules learned on slice features (:mod:`covidct.patients.aggregation`): a valid ``vote.rule``, scored by the
#: patient vote callback and applied by predict.py, but not by :func:`vote`
LEARNED_RULES: tuple[str, ...] = tuple(name for name, rule in RULES.items() if rule.learned)
#: rules that call a patient Normal unless a share of its slices exceeds a tau; the others take an argmax
SHARE_RULES: tuple[str, ...] = tuple(name for name, rule in RULES.items() if rule.share)
#: what :func:`scores_with` gives per class, by rule (the run report's ROC label)
RULE_SCORES: dict[str, str] = {name: rule.scores_name for name, rule in RULES.items()}


def rule_of(name: str) -> Rule:
    """The registered rule ``name``; ValueError naming the known ones otherwise."""
    if name not in RULES:
        raise ValueError(f"unknown vote rule {name!r}; expected one of {VOTE_RULES}")
    return RULES[name]


def vote_with(parameters: VoteParameters, probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> int:
    """One patient's class under ``parameters.rule`` with its parameters; ``probs`` (n_slices, C) float in
    position order. A learned rule refuses (it votes on slice features: :mod:`covidct.patients.aggregation`)."""
    return rule_of(parameters.rule).vote(probs, parameters, normal_class)


def vote(
    probs: np.ndarray,
    rule: str,
    tau: float = TAU,
    normal_class: int = NORMAL_CLASS,
    *,
    k: int = TOP_K,
    center_slices: int = CENTER_SLICES,
    window_slices: int = WINDOW_SLICES,
    slice_threshold: float = SLICE_THRESHOLD,
    threshold_tau: float = TAU,
) -> int:
    """One patient's class under ``rule`` (one of :data:`VOTE_RULES`); probs (n_slices, C) in position
    order. ``tau`` is used by ``infected_fraction``, ``k`` by ``topk_mean``, ``center_slices`` and
    ``window_slices`` by ``weighted_center``, ``slice_threshold`` and ``threshold_tau`` by ``threshold``."""
    parameters = VoteParameters(rule, tau, k, center_slices, window_slices, slice_threshold, threshold_tau)
    return vote_with(parameters, probs, normal_class)


def scores_with(parameters: VoteParameters, probs: np.ndarray, normal_class: int = NORMAL_CLASS) -> np.ndarray:
    """(C,) float64: the per-class scores ``parameters.rule`` ranks one patient's ``probs`` (n_slices, C) (position
    order) by: what the run report scores the patient ROC with (:data:`RULE_SCORES`). For the argmax rules their
    argmax is the vote (up to the tie rule); the share rules (:data:`SHARE_RULES`) call Normal by a tau instead
    (their Normal score is 1 - the infected fraction or share)."""
    return np.asarray(rule_of(parameters.rule).scores(probs, parameters, normal_class), dtype=np.float64)


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
    if (rule is not None or source) and rule not in RULES:
        raise error(f"{prefix}vote.rule={rule!r} is not known; choose one of {sorted(RULES)}{suffix}")
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


def check_vote_parameters(
    parameters: VoteParameters, *, source: str = "", fix: str = "", error: type[CovidCTError] = ConfigError
) -> None:
    """:func:`check_vote_settings` on every value of ``parameters``."""
    check_vote_settings(**parameters.to_sidecar(), source=source, fix=fix, error=error)


# ---- every rule on every patient -----------------------------------------------------------------------


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
    probs = check_probs(probs)
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
    parameters: VoteParameters,
    normal_class: int = NORMAL_CLASS,
) -> list[PatientVote]:
    """Group slices by patient (:func:`group_slices`) and apply every rule of :data:`VOTE_RULES` once, each with
    its own of ``parameters`` (whose rule is not used). ``tau`` is the infected-fraction threshold (tune it
    first: :func:`~covidct.patients.tuning.tune_tau`), ``slice_threshold`` and ``threshold_tau`` the threshold
    rule's (:func:`~covidct.patients.tuning.tune_threshold`)."""
    check_tau(parameters.tau)
    check_normal(normal_class, check_probs(probs).shape[1])
    return [
        PatientVote(
            patient=pid,
            n_slices=len(p),
            votes=np.bincount(p.argmax(axis=1), minlength=p.shape[1]).astype(np.int64),
            mean_prob=p.mean(axis=0),
            infected_fraction=infected_fraction(p, normal_class),
            infected_class=infected_class(p, normal_class),
            rule_votes={rule: RULES[rule].vote(p, parameters, normal_class) for rule in VOTE_RULES},
            infected_share=infected_share(p, parameters.slice_threshold, normal_class),
        )
        for pid, p in group_slices(patient_ids, probs).items()
    ]
