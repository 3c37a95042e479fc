"""One validation epoch's patient decisions from its slice probabilities (no Lightning).

:class:`PatientVoter` holds the vote settings and what it fits across epochs (a :class:`VoteParameters`):
per epoch it calibrates a temperature on the slices with a known class, tunes ``infected_fraction``'s tau and
``threshold``'s (slice_threshold, tau) on the validation patients (unless fixed), votes every rule per
patient, reports the tuned rules leave-one-patient-out and the learned ``mil`` rule cross-fitted, and scores
every rule (:class:`ValidationVotes`). The patient vote callback gathers the slices and calls it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from covidct.contracts import CLASS_NAMES, PATIENT_ACC, PATIENT_F1, calibration_metric, rule_metric, vote_parameter
from covidct.errors import ConfigError
from covidct.patients.aggregation import GatedAttentionMIL, cross_fit_predictions, fit_mil, one_thread, pad_bags
from covidct.patients.calibration import (
    T_MAX,
    T_MIN,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from covidct.patients.metrics import patient_metrics, rules_table
from covidct.patients.mil_features import DEFAULT_MIL_FEATURES, check_mil_features, slice_features
from covidct.patients.parameters import CENTER_SLICES, SLICE_THRESHOLD, TAU, TOP_K, WINDOW_SLICES, VoteParameters
from covidct.patients.rules import (
    LEARNED_RULES,
    VOTE_RULES,
    PatientVote,
    check_vote_settings,
    group_slices,
    vote_patients,
)
from covidct.patients.tuning import (
    leave_one_out_predictions,
    leave_one_out_threshold_predictions,
    tune_tau,
    tune_threshold,
)
from covidct.patients.voting import infected_class, infected_fraction

log = logging.getLogger(__name__)
#: fewest validation patients (of at least two classes) whose slices a temperature is fitted on
MIN_CALIBRATION_PATIENTS = 4
#: the learned rule ``mil`` is fitted and scored (cross-fitted) from this many validation patients on
MIN_MIL_PATIENTS = 2


@dataclass(frozen=True)
class MilDetails:
    """The ``mil`` head fitted on every validation patient, applied to them: in-sample, unlike the reported
    ``mil`` calls, which are cross-fitted.

    ``probs`` (P, C) float32 class probabilities per patient (ascending patient index); ``attention`` (N,)
    float32 each slice's attention weight within its patient (a patient's weights sum to 1), in the order
    of the slices given (``ValidationVotes.slice_rows``)."""

    probs: np.ndarray
    attention: np.ndarray


def mil_details(head: GatedAttentionMIL | None, patient: np.ndarray, features: np.ndarray | None) -> MilDetails | None:
    """:class:`MilDetails` of ``head`` on what it reads of each slice, ``features`` (N, F) float, grouped by
    ``patient`` (N,) int; None without a head or features."""
    if head is None or features is None:
        return None
    patient = np.asarray(patient)
    rows = [np.flatnonzero(patient == p) for p in np.unique(patient)]
    attention = np.zeros(len(patient), dtype=np.float32)
    head.eval()
    with torch.inference_mode(), one_thread():  # every patient in one padded batch
        x, mask = pad_bags([head.features(torch.as_tensor(np.asarray(features[r], dtype=np.float32))) for r in rows])
        logits, weights = head.forward_padded(x, mask)
    for i, r in enumerate(rows):
        attention[r] = weights[i, : len(r)].numpy()
    return MilDetails(logits.softmax(dim=1).numpy().astype(np.float32), attention)


def bags_by_patient(patient: np.ndarray, features: np.ndarray) -> list[np.ndarray]:
    """``features`` (N, F) of slices of ``patient`` (N,) int -> one (n_i, F) bag per patient, by ascending patient
    index (the order of ``ValidationVotes.labels``), each patient's slices in the given order."""
    patient = np.asarray(patient)
    order = np.argsort(patient, kind="stable")
    return np.split(np.asarray(features)[order], np.flatnonzero(np.diff(patient[order])) + 1)


@dataclass(frozen=True)
class ValidationVotes:
    """One validation epoch's patient decisions: what ``patients.csv``, the run report, the W&B tables
    and the run summary read (the callback's ``best`` holds the best epoch's).

    ``predictions[rule]`` (P,) are the *reported* predictions: for ``infected_fraction`` with a tuned
    tau, each patient decided by a tau tuned on the other patients (leave-one-out); for ``mil`` (present
    once fitted: every epoch when it is the configured rule, else the best epoch at the end of fit), each patient
    decided by a head fitted on the other patients; every other entry
    equals ``patients[i].rule_votes[rule]``, which for ``infected_fraction`` uses ``tau`` tuned on all
    of them. After a resume the best epoch of the earlier run has ``metrics`` and ``confusion`` only.

    ``temperature`` (the one ``slice_probs`` were divided by) and ``mil`` (:class:`MilDetails`) are what the
    run report shows beyond the calls; None where they were not recorded.
    :func:`covidct.patients.explanations.patient_decisions` says per patient what the configured rule decided on.
    """

    epoch: int
    rule: str  # the configured rule
    tau: float  # infected_fraction's threshold (tuned on all validation patients unless fixed)
    tau_tuned: bool
    patients: list[PatientVote]  # validation patients, by patient index
    labels: np.ndarray  # (P,) int64 true class
    predictions: dict[str, np.ndarray]  # rule -> (P,) int64 reported predictions
    metrics: dict[str, float]  # the logged scalars (val/patient/..., rules/..., vote/..., calibration/...)
    confusion: np.ndarray  # (C, C) int64 of ``rule``, rows = truth
    slice_rows: np.ndarray  # (N,) int64 cache row of each validation slice, sorted
    slice_patient: np.ndarray  # (N,) int64 patient index of each slice
    slice_probs: np.ndarray  # (N, C) float32 softmax probabilities (calibrated: divided by ``temperature``)
    temperature: float | None = None  # None: not recorded (see metrics' calibration/temperature)
    mil: MilDetails | None = None  # the MIL head fitted on every validation patient, applied to them
    mil_pending: np.ndarray | None = None  # (N, F) what mil reads of each slice, until fitted (PatientVoter.fit_mil)

    @property
    def score(self) -> float:
        return self.metrics[PATIENT_ACC]

    @property
    def predicted(self) -> np.ndarray:
        """(P,) the configured rule's reported predictions."""
        return self.predictions[self.rule]

    @classmethod
    def restored(
        cls, epoch: int, rule: str, tau: float, tau_tuned: bool, metrics: dict[str, float], confusion: list | None
    ) -> ValidationVotes:
        """The best epoch of an earlier run, as a checkpoint keeps it: ``metrics`` and ``confusion`` (C, C)
        (None: not recorded), no patients or slices."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(
            epoch,
            rule,
            tau,
            tau_tuned,
            [],
            empty,
            {},
            metrics,
            empty.reshape(0, 0) if confusion is None else np.asarray(confusion, dtype=np.int64),
            empty,
            empty,
            np.zeros((0, len(CLASS_NAMES)), dtype=np.float32),
        )


class PatientVoter:
    """Decides each validation epoch's patient calls; keeps the vote parameters it fits (``parameters``: the
    latest tuned or fixed ones, what predict.py votes with).

    Args:
        rule: one of :data:`~covidct.patients.rules.RULES`; drives ``val/patient/acc``.
        tau: fixed infected-fraction threshold; None = tuned on the validation patients.
        k: ``topk_mean``'s slices averaged per class.
        center_slices: ``weighted_center``'s central slices that count fully.
        window_slices: ``weighted_center``'s central slices that vote at all.
        slice_threshold: ``threshold``'s infected probability above which a slice is infected; None = tuned
            with its tau (a fixed ``tau`` is then that rule's tau too).
        calibration: fit a temperature on the validation slices with a known target every epoch
            (:mod:`covidct.patients.calibration`) and vote on the calibrated probabilities.
        mil: fit and score the learned ``mil`` rule: every epoch when it is ``rule`` (always on then), else on the
            best epoch, by :meth:`fit_mil` (the callback calls it at the end of fit).
        mil_features: what the ``mil`` head reads of each slice (:mod:`covidct.patients.mil_features`).
    """

    def __init__(
        self,
        rule: str = "infected_fraction",
        tau: float | None = None,
        k: int = TOP_K,
        center_slices: int = CENTER_SLICES,
        window_slices: int = WINDOW_SLICES,
        slice_threshold: float | None = None,
        calibration: bool = True,
        mil: bool = True,
        mil_features: str = DEFAULT_MIL_FEATURES,
    ):
        check_vote_settings(rule, tau, k, center_slices, window_slices, slice_threshold)
        try:
            self.mil_features = check_mil_features(mil_features)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.rule, self.calibration = rule, calibration
        self.fixed_tau, self.fixed_slice_threshold = tau, slice_threshold
        self.parameters = VoteParameters(
            rule,
            tau=TAU if tau is None else float(tau),
            k=k,
            center_slices=center_slices,
            window_slices=window_slices,
            slice_threshold=SLICE_THRESHOLD if slice_threshold is None else float(slice_threshold),
            threshold_tau=TAU if tau is None else float(tau),
        )
        self.mil = mil or rule in LEARNED_RULES
        self.rule_table: tuple[list[str], list[list]] = ([], [])  # the last epoch's rules_table
        self._calibration_refused = False  # warned that there are too few validation patients to calibrate on
        self._mil_refused = False  # warned that there are too few validation patients to score mil on

    def fix_to(self, source: VoteParameters) -> None:
        """Take tau, the threshold rule's parameters and the temperature from ``source``, fixed: nothing is
        tuned or calibrated (a run without validation patients, ``vote.from_ckpt``)."""
        self.parameters = self.parameters.with_fitted(replace(source, mil_head=None))
        self.fixed_tau, self.fixed_slice_threshold = source.tau, source.slice_threshold
        self.calibration = False

    @property
    def threshold_tuned(self) -> bool:
        """Whether the threshold rule's parameters are tuned (either is not fixed)."""
        return self.fixed_tau is None or self.fixed_slice_threshold is None

    def decide(
        self,
        epoch: int,
        index: np.ndarray,
        patient: np.ndarray,
        probs: np.ndarray,
        patient_ids: list[str],
        patient_labels: np.ndarray,
        targets: np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
    ) -> ValidationVotes:
        """Calibrate (with ``calibration``), tune tau and the threshold rule (unless fixed), then vote every
        rule once per patient and score each rule. With ``mil`` on (and ``embeddings`` where it reads them):
        when ``mil`` is the configured rule, fit and score it now (its score picks the best epoch); else keep
        what it reads as ``mil_pending``, for :meth:`fit_mil` on the best epoch only (six head fits an epoch
        were most of the vote's cost).

        ``index`` (N,) cache rows sorted (so each patient's slices are head first), ``patient`` (N,)
        patient index, ``probs`` (N, C), ``targets`` (N,) slice targets (-1 unknown; None: none known),
        ``embeddings`` (N, D) float32 slice embeddings or None; ``patient_ids`` / ``patient_labels`` (all
        patients,)."""
        self._check_embeddings(embeddings)
        calibration = self.calibrate(probs, patient, patient_labels, targets)
        probs = apply_temperature(probs, self.parameters.temperature)
        order = np.argsort(patient, kind="stable")  # by patient, each patient's slices still head first
        ids = np.asarray(patient_ids, dtype=object)[patient[order]]
        grouped = group_slices(ids, probs[order])
        number = {pid: i for i, pid in enumerate(patient_ids)}
        labels = np.asarray(patient_labels)[[number[pid] for pid in grouped]]
        self.tune(list(grouped.values()), labels)
        patients = vote_patients(ids, probs[order], self.parameters)
        predictions = self.reported_predictions(patients, list(grouped.values()), labels)
        mil_input = self.mil_input(probs, embeddings)  # (N, F) in the given order, or None
        fit_now = mil_input is not None and self.rule in LEARNED_RULES and self._enough_for_mil(len(labels))
        if fit_now:
            predictions["mil"] = self.fit_mil_rule(bags_by_patient(patient, mil_input), labels)
        metrics_by_rule = {rule: patient_metrics(preds, labels) for rule, preds in predictions.items()}
        self.rule_table = rules_table(metrics_by_rule)
        return ValidationVotes(
            epoch,
            self.rule,
            self.parameters.tau,
            self.fixed_tau is None,
            patients,
            labels,
            predictions,
            self.epoch_metrics(metrics_by_rule, patients, labels) | calibration,
            metrics_by_rule[self.rule]["confusion"],
            index,
            patient,
            probs,
            temperature=float(self.parameters.temperature),
            mil=mil_details(self.parameters.mil_head, patient, mil_input) if fit_now else None,
            mil_pending=None if fit_now else mil_input,
        )

    def fit_mil(self, result: ValidationVotes) -> ValidationVotes:
        """``result`` with its ``mil_pending`` fitted: ``mil`` cross-fitted into its predictions and
        ``rules/mil/*`` metrics, the head fitted on all of its patients kept in ``parameters`` and applied to
        them (``mil``). Unchanged (but for ``mil_pending``) with nothing pending or too few patients."""
        if result.mil_pending is None or not self._enough_for_mil(len(result.labels)):
            return replace(result, mil_pending=None)
        calls = self.fit_mil_rule(bags_by_patient(result.slice_patient, result.mil_pending), result.labels)
        scores = patient_metrics(calls, result.labels)
        return replace(
            result,
            predictions=result.predictions | {"mil": calls},
            metrics=result.metrics | {rule_metric("mil", k): v for k, v in scores.items() if k != "confusion"},
            mil=mil_details(self.parameters.mil_head, result.slice_patient, result.mil_pending),
            mil_pending=None,
        )

    def _check_embeddings(self, embeddings: np.ndarray | None) -> None:
        if embeddings is None and self.rule in LEARNED_RULES and self.mil_features == "embeddings":
            raise ConfigError(
                f"vote.rule={self.rule} needs slice embeddings, but the model's validation_step returned no "
                "'embedding': use SliceClassifier (covidct.models.classifier), vote.mil_features=log_probs or a "
                "fixed vote rule"
            )

    def tune(self, groups: list[np.ndarray], labels: np.ndarray) -> None:
        """Fit tau and the threshold rule's (slice_threshold, tau) on the validation ``groups`` (per patient
        (n, C) probabilities) and their ``labels`` (P,), each unless fixed by the config."""
        fitted: dict[str, float] = {}
        if self.fixed_tau is None:
            fractions = np.asarray([infected_fraction(g) for g in groups])
            fitted["tau"] = tune_tau(fractions, np.asarray([infected_class(g) for g in groups]), labels)
        if self.threshold_tuned:
            fitted["slice_threshold"], fitted["threshold_tau"] = tune_threshold(
                groups, labels, slice_threshold=self.fixed_slice_threshold, tau=self.fixed_tau
            )
        self.parameters = replace(self.parameters, **fitted)

    def reported_predictions(
        self, patients: list[PatientVote], groups: list[np.ndarray], labels: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Rule -> (P,) the calls each rule is scored by: the tuned rules leave-one-patient-out (a figure not
        fitted to the patient it scores), the others as voted."""
        predictions = {rule: np.asarray([v.rule_votes[rule] for v in patients]) for rule in VOTE_RULES}
        if self.fixed_tau is None:
            fractions = np.asarray([v.infected_fraction for v in patients])
            infected = np.asarray([v.infected_class for v in patients])
            predictions["infected_fraction"] = leave_one_out_predictions(fractions, infected, labels)
        if self.threshold_tuned:
            predictions["threshold"] = leave_one_out_threshold_predictions(
                groups, labels, slice_threshold=self.fixed_slice_threshold, tau=self.fixed_tau
            )
        return predictions

    def epoch_metrics(
        self, metrics_by_rule: dict[str, dict[str, Any]], patients: list[PatientVote], labels: np.ndarray
    ) -> dict[str, float]:
        """The logged scalars: ``val/patient/{acc,f1_macro}`` of the configured rule, ``rules/<rule>/<metric>``
        of every rule and ``vote/<parameter>`` (the fitted ones)."""
        chosen = metrics_by_rule[self.rule]
        metrics = {PATIENT_ACC: chosen["acc"], PATIENT_F1: chosen["f1_macro"]}
        metrics |= {
            rule_metric(rule, k): v for rule, m in metrics_by_rule.items() for k, v in m.items() if k != "confusion"
        }
        metrics[vote_parameter("tau")] = self.parameters.tau
        metrics[vote_parameter("threshold_slice_threshold")] = self.parameters.slice_threshold
        metrics[vote_parameter("threshold_tau")] = self.parameters.threshold_tau
        tuned = np.asarray([v.rule_votes["infected_fraction"] for v in patients])
        metrics[rule_metric("infected_fraction", "acc_at_tuned_tau")] = float(np.mean(tuned == labels))
        return metrics

    # ---- calibration ----------------------------------------------------------------------------
    def calibrate(
        self, probs: np.ndarray, patient: np.ndarray, patient_labels: np.ndarray, targets: np.ndarray | None
    ) -> dict[str, float]:
        """Fit the temperature on the slices with a known target (unless ``calibration`` is off); returns the
        ``calibration/*`` metrics: the temperature, ECE and NLL before and after at slice level (when any
        slice has a known target) and ECE at patient level (each patient's mean slice probabilities against
        its class)."""
        known = np.full(len(probs), -1) if targets is None else np.asarray(targets)
        if self.calibration and self._enough_to_calibrate(patient[known >= 0], known[known >= 0]):
            self.parameters = replace(self.parameters, temperature=fit_temperature(probs, known))
            self._warn_at_bound(self.parameters.temperature)
        temperature = self.parameters.temperature
        after = apply_temperature(probs, temperature)
        patients = np.unique(patient)
        labels = np.asarray(patient_labels)[patients]
        mean_of = lambda p: np.stack([p[patient == i].mean(axis=0) for i in patients])  # noqa: E731
        metrics = {
            calibration_metric("temperature"): temperature,
            calibration_metric("patient_ece_before"): expected_calibration_error(mean_of(probs), labels),
            calibration_metric("patient_ece_after"): expected_calibration_error(mean_of(after), labels),
        }
        if (known >= 0).any():
            for name, p in (("before", probs), ("after", after)):
                metrics[calibration_metric(f"slice_ece_{name}")] = expected_calibration_error(p, known)
                metrics[calibration_metric(f"slice_nll_{name}")] = nll(p, known)
        return metrics

    @staticmethod
    def _warn_at_bound(temperature: float) -> None:
        if temperature in (T_MIN, T_MAX):
            log.warning(
                "calibration: the fitted temperature hit its bound (%g): the model is confidently wrong on the "
                "validation slices or they are too few to calibrate on; its probabilities are %s. "
                "calibration=false keeps them raw",
                temperature,
                "flattened" if temperature == T_MAX else "sharpened",
            )

    def _enough_to_calibrate(self, patient: np.ndarray, target: np.ndarray) -> bool:
        """Whether the slices with a known target (``patient``, ``target``: (K,) int) come from at least
        :data:`MIN_CALIBRATION_PATIENTS` patients and two classes; if not, the temperature stays as it is and
        the first epoch says why (one patient's slices fit that patient's errors, not the model's: seen on real
        CT, where one validation patient drove T to its cap and flipped the threshold rule's call)."""
        n_patients, n_classes = len(np.unique(patient)), len(np.unique(target))
        enough = n_patients >= MIN_CALIBRATION_PATIENTS and n_classes >= 2
        if not enough and not self._calibration_refused:
            log.warning(
                "calibration: not fitted, the temperature stays 1: the validation slices with a known class come "
                "from %d patient(s) of %d class(es); at least %d patients of 2 classes are needed "
                "(raise data.val_fraction, or calibration=false to silence this)",
                n_patients,
                n_classes,
                MIN_CALIBRATION_PATIENTS,
            )
            self._calibration_refused = True
        return enough

    # ---- the learned rule -----------------------------------------------------------------------
    def mil_input(self, probs: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray | None:
        """(N, F) what the ``mil`` head reads of each slice (calibrated ``probs`` (N, C) or ``embeddings``
        (N, D)); None with ``mil`` off or without the embeddings it reads."""
        if not self.mil or (embeddings is None and self.mil_features == "embeddings"):
            return None
        return slice_features(self.mil_features, probs, embeddings)

    def _enough_for_mil(self, n_patients: int) -> bool:
        """Whether ``mil`` can be fitted and scored on ``n_patients`` validation patients: at least
        :data:`MIN_MIL_PATIENTS`, so that each is scored by a head fitted on others. With fewer, ``vote.rule=mil``
        stops with what to do; otherwise ``mil`` is left out of the rule table (said once)."""
        if n_patients >= MIN_MIL_PATIENTS:
            return True
        message = (
            f"the learned rule mil needs at least {MIN_MIL_PATIENTS} validation patients (each one is scored by a "
            f"head fitted on the others), got {n_patients}"
        )
        if self.rule in LEARNED_RULES:
            raise ConfigError(f"vote.rule={self.rule}: {message}; raise data.val_fraction or use a fixed vote rule")
        if not self._mil_refused:
            log.warning("%s: mil is not scored (vote.mil=false silences this)", message)
            self._mil_refused = True
        return False

    def fit_mil_rule(self, bags: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
        """Fit the head on every validation patient's bag (n_i, D) and class ``labels`` (P,) (kept in
        ``parameters``); return the reported (P,) int64 predictions, cross-fitted (each patient by a head
        fitted on the others)."""
        fit_args = {"num_classes": len(CLASS_NAMES), "slice_features": self.mil_features}
        self.parameters = replace(self.parameters, mil_head=fit_mil(bags, labels, **fit_args))
        return cross_fit_predictions(bags, labels, **fit_args)
