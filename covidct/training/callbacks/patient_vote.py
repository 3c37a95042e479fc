"""Gather every validation slice's probabilities, vote per patient, log patient-level metrics.

Every rule of :data:`covidct.patients.voting.VOTE_RULES` is scored every validation epoch on the same slice
probabilities, as ``rules/<rule>/<metric>`` scalars (any logger; the names: :mod:`covidct.metric_names`)
and a per-rule table (rule, accuracy, macro F1, sensitivity per class): logged at INFO as aligned text
and, with a WandbLogger, as the ``wandb.Table`` ``rules/table`` (rank 0 only). Each patient's slices
are voted in position order (head first: the cache stores them so and ``index`` is the cache row).

``infected_fraction`` (Normal if at most ``tau`` of the slices look infected, else the majority among
the infected slices) tunes ``tau`` on the validation patients; it is stored in the checkpoint (this
callback's state) for prediction. The *reported* accuracy of this rule is leave-one-patient-out: each
patient is scored with a tau tuned on the other validation patients, so the figure is not fitted to
the patient it scores. ``threshold`` tunes its slice threshold and its tau together
(:func:`~covidct.patients.voting.tune_threshold`), reported leave-one-patient-out the same way. The other rules
have no fitted parameter.

``mil`` (:mod:`covidct.patients.aggregation`) is learned: a gated attention MIL head over what the slice model says
of each slice (``mil_features``, :mod:`covidct.patients.mil_features`: the embeddings its ``validation_step``
returns as ``embedding``, or its calibrated log probabilities), trained on the validation patients' classes (every
patient, its slices labelled or not). Its reported predictions are cross-fitted (each patient scored by
a head fitted on the other validation patients: stratified 5-fold, leave-one-out up to 10 patients); the
head fitted on all of them is stored in the checkpoint for predict.py. It is not fitted on the training
patients, whose embeddings the slice model has learnt by heart (they would not transfer).

The chosen ``rule`` is also logged as ``val/patient/acc``, the metric checkpointing monitors.
Under DDP the slices of all ranks are gathered and deduplicated by their global index (the
DistributedSampler pads with repeats), so every rank computes the same patient metrics.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_recall,
    multiclass_specificity,
)

from covidct import CLASS_NAMES
from covidct.errors import ConfigError
from covidct.io import atomic_write_csv
from covidct.metric_names import (
    PATIENT_ACC,
    PATIENT_F1,
    calibration_metric,
    class_slug,
    rule_metric,
    vote_parameter,
)
from covidct.patients.aggregation import GatedAttentionMIL, cross_fit_predictions, fit_mil, mil_from_state, mil_state
from covidct.patients.calibration import (
    T_MAX,
    T_MIN,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from covidct.patients.mil_features import DEFAULT_MIL_FEATURES, check_mil_features, slice_features
from covidct.patients.voting import (
    CENTER_SLICES,
    LEARNED_RULES,
    SLICE_THRESHOLD,
    TOP_K,
    VOTE_RULES,
    WINDOW_SLICES,
    PatientVote,
    check_vote_settings,
    group_slices,
    infected_class,
    infected_fraction,
    leave_one_out_predictions,
    leave_one_out_threshold_predictions,
    tune_tau,
    tune_threshold,
    vote_patients,
)
from covidct.text_table import format_table

log = logging.getLogger(__name__)
#: fewest validation patients (of at least two classes) whose slices a temperature is fitted on
MIN_CALIBRATION_PATIENTS = 4
#: the learned rule ``mil`` is fitted and scored (cross-fitted) from this many validation patients on
MIN_MIL_PATIENTS = 2
# The patient metrics are computed from all ranks' gathered slices, so every rank logs the same values
# and syncing them would only cost collectives: Lightning's hint to log them with sync_dist is noise.
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self.log\('(val/patient|rules|vote|calibration)/",
    category=PossibleUserWarning,
)


def patient_metrics(preds: np.ndarray, labels: np.ndarray, class_names=CLASS_NAMES) -> dict[str, Any]:
    """Accuracy, macro F1, per-class sensitivity and specificity, confusion matrix (rows = truth)."""
    p, t, c = torch.as_tensor(preds), torch.as_tensor(labels), len(class_names)
    sens = multiclass_recall(p, t, c, average=None)
    spec = multiclass_specificity(p, t, c, average=None)
    metrics: dict[str, Any] = {
        "acc": float(multiclass_accuracy(p, t, c, average="micro")),
        "f1_macro": float(multiclass_f1_score(p, t, c, average="macro")),
    }
    for k, name in enumerate(class_names):
        metrics[f"sensitivity_{class_slug(name)}"] = float(sens[k])
        metrics[f"specificity_{class_slug(name)}"] = float(spec[k])
    metrics["confusion"] = multiclass_confusion_matrix(p, t, c).numpy()
    return metrics


def rules_text(columns: list[str], rows: list[list], marked: str | None = None) -> str:
    """:func:`rules_table` as aligned text, numbers to 3 decimals; rule ``marked`` is starred."""
    header = ["  " + columns[0], *(c.replace("sensitivity ", "sens ") for c in columns[1:])]
    body = [[("* " if r[0] == marked else "  ") + r[0], *(f"{v:.3f}" for v in r[1:])] for r in rows]
    return format_table(header, body)


def rules_table(metrics_by_rule: dict[str, dict[str, Any]], class_names=CLASS_NAMES) -> tuple[list[str], list[list]]:
    """Columns and one row per rule: rule, patient accuracy, macro F1, sensitivity of each class
    (``metrics_by_rule``: rule -> :func:`patient_metrics`)."""
    columns = ["rule", "acc", "f1_macro", *[f"sensitivity {name}" for name in class_names]]
    keys = ["acc", "f1_macro", *[f"sensitivity_{class_slug(name)}" for name in class_names]]
    rows = [[rule, *(float(m[k]) for k in keys)] for rule, m in metrics_by_rule.items()]
    return columns, rows


@dataclass(frozen=True)
class ValidationVotes:
    """One validation epoch's patient decisions: what ``patients.csv``, the run report, the W&B tables
    and the run summary read (the callback's ``best`` holds the best epoch's).

    ``predictions[rule]`` (P,) are the *reported* predictions: for ``infected_fraction`` with a tuned
    tau, each patient decided by a tau tuned on the other patients (leave-one-out); for ``mil`` (present
    when the model gave embeddings), each patient decided by a head fitted on the other patients; every other entry
    equals ``patients[i].rule_votes[rule]``, which for ``infected_fraction`` uses ``tau`` tuned on all
    of them. After a resume the best epoch of the earlier run has ``metrics`` and ``confusion`` only.

    ``temperature`` (the one ``slice_probs`` were divided by) and ``mil`` (:class:`MilDetails`) are what the
    run report shows beyond the calls (:func:`report_fields`); None where they were not recorded.
    :func:`patient_decisions` says per patient what the configured rule decided on.
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

    @property
    def score(self) -> float:
        return self.metrics[PATIENT_ACC]

    @property
    def predicted(self) -> np.ndarray:
        """(P,) the configured rule's reported predictions."""
        return self.predictions[self.rule]


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


class PatientVoteCallback(pl.Callback):
    """Patient-level voting and metrics on the validation set.

    Reads the data's :class:`~covidct.data.datamodule.SliceTable` (``trainer.datamodule.slice_table``)
    and publishes the best epoch's :class:`ValidationVotes` as ``best`` and on the LightningModule as
    ``pl_module.patient_votes`` (read by the report and W&B callbacks).

    Args:
        rule: one of :data:`~covidct.patients.voting.VOTE_RULES`; drives ``val/patient/acc``.
        tau: fixed infected-fraction threshold; None = tuned on the validation patients.
        output_dir: where ``patients.csv`` of the best epoch is written (None: not written).
        k: ``topk_mean``'s slices averaged per class.
        center_slices: ``weighted_center``'s central slices that count fully.
        window_slices: ``weighted_center``'s central slices that vote at all.
        slice_threshold: ``threshold``'s infected probability above which a slice is infected; None = tuned
            with its tau (a fixed ``tau`` is then that rule's tau too).
        calibration: fit a temperature on the validation slices with a known target every epoch
            (:mod:`covidct.patients.calibration`) and vote on the calibrated probabilities; stored for predict.py.
        from_ckpt: take tau, the threshold rule's parameters and the temperature from this checkpoint's
            vote state, fixed (nothing is tuned): e.g. a k-fold run's best fold, for a run on every
            patient (``data.val_fraction=0``), which has no validation patients to tune them on.
        mil: fit and score the learned ``mil`` rule every epoch; always on when ``rule`` is ``mil``.
        mil_features: what the ``mil`` head reads of each slice: ``embeddings`` (the model's ``embedding``
            outputs) or ``log_probs`` (its calibrated log probabilities); see :mod:`covidct.patients.mil_features`.
    """

    def __init__(
        self,
        rule: str = "infected_fraction",
        tau: float | None = None,
        output_dir: str | None = None,
        k: int = TOP_K,
        center_slices: int = CENTER_SLICES,
        window_slices: int = WINDOW_SLICES,
        slice_threshold: float | None = None,
        calibration: bool = True,
        from_ckpt: str | None = None,
        mil: bool = True,
        mil_features: str = DEFAULT_MIL_FEATURES,
    ):
        check_vote_settings(rule, tau, k, center_slices, window_slices, slice_threshold)
        try:
            self.mil_features = check_mil_features(mil_features)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if rule in LEARNED_RULES and from_ckpt is not None:
            raise ConfigError(
                f"vote.rule={rule} with vote.from_ckpt: the MIL head is fitted on the outputs of the model it "
                "belongs to, so another run's head cannot be reused; without validation patients use a fixed rule"
            )
        if from_ckpt is not None:
            tau, slice_threshold, calibration = self._fixed_parameters(from_ckpt)
        self.rule, self.fixed_tau, self.k = rule, tau, k
        self.fixed_slice_threshold = slice_threshold
        #: threshold rule's (slice_threshold, tau): the latest tuned (or fixed) ones, predict.py's
        self.slice_threshold = SLICE_THRESHOLD if slice_threshold is None else float(slice_threshold)
        self.threshold_tau = 0.5 if tau is None else float(tau)
        self.calibration = calibration
        self._calibration_refused = False  # warned that there are too few validation patients to calibrate on
        self._mil_refused = False  # warned that there are too few validation patients to score mil on
        self.temperature = 1.0 if from_ckpt is None else self._source_temperature  # predict.py divides by it
        self.from_ckpt = from_ckpt
        if from_ckpt is not None:
            self.threshold_tau = self._source_threshold_tau
        self.center_slices, self.window_slices = center_slices, window_slices
        self.output_dir = Path(output_dir) if output_dir else None
        self.tau = 0.5 if tau is None else float(tau)  # the latest tuned (or the fixed) tau: predict.py's
        self.best: ValidationVotes | None = None
        self.rule_table: tuple[list[str], list[list]] = ([], [])  # the last epoch's rules_table
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.mil = mil or rule in LEARNED_RULES
        self.mil_head: GatedAttentionMIL | None = None  # fitted on every validation patient: predict.py's

    def _fixed_parameters(self, source: str) -> tuple[float, float, bool]:
        """(tau, slice_threshold, calibration=False) from ``source``'s vote state; its temperature and the
        threshold rule's tau are kept in ``_source_temperature`` and ``_source_threshold_tau``.
        A checkpoint without a vote state is refused, naming ``vote.from_ckpt``."""
        from covidct.models.checkpoint import read_checkpoint

        ckpt = read_checkpoint(source, key="vote.from_ckpt")
        state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("PatientVoteCallback")), None)
        if not state:
            raise ConfigError(
                f"vote.from_ckpt={source}: the checkpoint has no patient vote state (a stage-1 model, or not "
                "written by train.py); give a checkpoint of a run with validation patients"
            )
        self._source_temperature = float(state.get("temperature", 1.0))
        self._source_threshold_tau = float(state.get("threshold_tau", state["tau"]))
        return float(state["tau"]), float(state.get("slice_threshold", SLICE_THRESHOLD)), False

    def parameters_source(self) -> str:
        """Where the vote parameters a checkpoint stores come from, with their values (for the run summary)."""
        values = (
            f"tau {self.tau:.3f}, threshold rule slice {self.slice_threshold:.3f} / share {self.threshold_tau:.3f}, "
            f"temperature {self.temperature:.3f}"
        )
        if self.from_ckpt:
            return f"from vote.from_ckpt={self.from_ckpt} ({values})"
        return (
            f"the rules' defaults, nothing tuned without validation patients ({values}); "
            "vote.from_ckpt=<checkpoint> takes a validated run's"
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.patient_votes = self.best  # a resumed run's best so far (restored before fit starts)

    # ---- collection ---------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        embedding = outputs.get("embedding") if self.mil and self.mil_features == "embeddings" else None
        self._batches.append(
            (
                batch["index"].detach(),
                batch["patient"].detach(),
                outputs["probs"].detach(),
                None if embedding is None else embedding.detach().float(),
            )
        )

    def gather(self, trainer: pl.Trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """All ranks' (index (N,), patient (N,), probs (N, C), embeddings (N, D) float32 or None when the
        model gave none, ``mil`` is off or reads no embeddings), each slice exactly once, by index."""
        columns = [torch.cat([b[k] for b in self._batches]) for k in range(3)]
        if all(b[3] is not None for b in self._batches):
            columns.append(torch.cat([b[3] for b in self._batches]))
        if trainer.world_size > 1:  # equal lengths per rank: DistributedSampler pads
            columns = [trainer.strategy.all_gather(t).flatten(0, 1) for t in columns]
        index, *arrays = deduplicate(*columns)
        arrays = [a.cpu().numpy() for a in arrays]
        return index.cpu().numpy(), arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None

    # ---- voting -------------------------------------------------------------------------------
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
        rule once per patient and score each rule; with ``mil`` on (and ``embeddings`` where it reads them),
        fit and score ``mil`` too.

        ``index`` (N,) cache rows sorted (so each patient's slices are head first), ``patient`` (N,)
        patient index, ``probs`` (N, C), ``targets`` (N,) slice targets (-1 unknown; None: none known),
        ``embeddings`` (N, D) float32 slice embeddings or None; ``patient_ids`` / ``patient_labels`` (all
        patients,)."""
        if embeddings is None and self.rule in LEARNED_RULES and self.mil_features == "embeddings":
            raise ConfigError(
                f"vote.rule={self.rule} needs slice embeddings, but the model's validation_step returned no "
                "'embedding': use SliceClassifier (covidct.models.classifier), vote.mil_features=log_probs or a "
                "fixed vote rule"
            )
        calibration = self.calibrate(probs, patient, patient_labels, targets)
        probs = apply_temperature(probs, self.temperature)
        order = np.argsort(patient, kind="stable")  # by patient, each patient's slices still head first
        ids = np.asarray(patient_ids, dtype=object)[patient[order]]
        groups = group_slices(ids, probs[order])
        number = {pid: i for i, pid in enumerate(patient_ids)}
        labels = np.asarray(patient_labels)[[number[pid] for pid in groups]]
        fractions = np.asarray([infected_fraction(p) for p in groups.values()])
        infected = np.asarray([infected_class(p) for p in groups.values()])
        if self.fixed_tau is None:
            self.tau = tune_tau(fractions, infected, labels)
        self.tune_threshold_rule(list(groups.values()), labels)
        votes = vote_patients(
            ids,
            probs[order],
            self.tau,
            k=self.k,
            center_slices=self.center_slices,
            window_slices=self.window_slices,
            slice_threshold=self.slice_threshold,
            threshold_tau=self.threshold_tau,
        )
        predictions = {rule: np.asarray([v.rule_votes[rule] for v in votes]) for rule in VOTE_RULES}
        if self.fixed_tau is None:  # report a figure that is not fitted to the patient it scores
            predictions["infected_fraction"] = leave_one_out_predictions(fractions, infected, labels)
        if self.fixed_tau is None or self.fixed_slice_threshold is None:
            predictions["threshold"] = self.leave_one_out_threshold(list(groups.values()), labels)
        mil_input = None  # (N, F) what the mil head reads of each slice, in the given order
        if self.mil and (embeddings is not None or self.mil_features != "embeddings"):
            mil_input = slice_features(self.mil_features, probs, embeddings)
        if mil_input is not None and self._enough_for_mil(len(labels)):
            predictions["mil"] = self.fit_mil_rule(list(group_slices(ids, mil_input[order]).values()), labels)
        metrics_by_rule = {rule: patient_metrics(preds, labels) for rule, preds in predictions.items()}
        metrics = {
            PATIENT_ACC: metrics_by_rule[self.rule]["acc"],
            PATIENT_F1: metrics_by_rule[self.rule]["f1_macro"],
        }
        metrics |= {
            rule_metric(rule, k): v for rule, m in metrics_by_rule.items() for k, v in m.items() if k != "confusion"
        }
        metrics |= calibration
        metrics[vote_parameter("tau")] = self.tau
        metrics[vote_parameter("threshold_slice_threshold")] = self.slice_threshold
        metrics[vote_parameter("threshold_tau")] = self.threshold_tau
        tuned = np.asarray([v.rule_votes["infected_fraction"] for v in votes])
        metrics[rule_metric("infected_fraction", "acc_at_tuned_tau")] = float(np.mean(tuned == labels))
        self.rule_table = rules_table(metrics_by_rule)
        return ValidationVotes(
            epoch,
            self.rule,
            self.tau,
            self.fixed_tau is None,
            votes,
            labels,
            predictions,
            metrics,
            metrics_by_rule[self.rule]["confusion"],
            index,
            patient,
            probs,
            **report_fields(self, patient, mil_input),  # run report: temperature, MIL attention (report_fields)
        )

    def calibrate(
        self, probs: np.ndarray, patient: np.ndarray, patient_labels: np.ndarray, targets: np.ndarray | None
    ) -> dict[str, float]:
        """Fit ``temperature`` on the slices with a known target (unless ``calibration`` is off); returns the
        ``calibration/*`` metrics: the temperature, ECE and NLL before and after at slice level (when any
        slice has a known target) and ECE at patient level (each patient's mean slice probabilities against
        its class)."""
        known = np.full(len(probs), -1) if targets is None else np.asarray(targets)
        if self.calibration and self._enough_to_calibrate(patient[known >= 0], known[known >= 0]):
            self.temperature = fit_temperature(probs, known)
            if self.temperature in (T_MIN, T_MAX):
                log.warning(
                    "calibration: the fitted temperature hit its bound (%g): the model is confidently wrong on the "
                    "validation slices or they are too few to calibrate on; its probabilities are %s. "
                    "calibration=false keeps them raw",
                    self.temperature,
                    "flattened" if self.temperature == T_MAX else "sharpened",
                )
        after = apply_temperature(probs, self.temperature)
        patients = np.unique(patient)
        labels = np.asarray(patient_labels)[patients]
        mean_of = lambda p: np.stack([p[patient == i].mean(axis=0) for i in patients])  # noqa: E731
        metrics = {
            calibration_metric("temperature"): self.temperature,
            calibration_metric("patient_ece_before"): expected_calibration_error(mean_of(probs), labels),
            calibration_metric("patient_ece_after"): expected_calibration_error(mean_of(after), labels),
        }
        if (known >= 0).any():
            for name, p in (("before", probs), ("after", after)):
                metrics[calibration_metric(f"slice_ece_{name}")] = expected_calibration_error(p, known)
                metrics[calibration_metric(f"slice_nll_{name}")] = nll(p, known)
        return metrics

    def _enough_to_calibrate(self, patient: np.ndarray, target: np.ndarray) -> bool:
        """Whether the slices with a known target (``patient``, ``target``: (K,) int) come from at least
        :data:`MIN_CALIBRATION_PATIENTS` patients and two classes; if not, the temperature stays 1 and the
        first epoch says why (one patient's slices fit that patient's errors, not the model's: seen on real
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

    def tune_threshold_rule(self, groups: list[np.ndarray], labels: np.ndarray) -> None:
        """Fit the threshold rule's (slice_threshold, tau) on the validation ``groups`` (per patient (n, C)),
        each unless fixed by the config."""
        if self.fixed_slice_threshold is None or self.fixed_tau is None:
            self.slice_threshold, self.threshold_tau = tune_threshold(
                groups, labels, slice_threshold=self.fixed_slice_threshold, tau=self.fixed_tau
            )

    def leave_one_out_threshold(self, groups: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
        """The threshold rule's reported predictions: each patient decided by parameters tuned on the others."""
        return leave_one_out_threshold_predictions(
            groups, labels, slice_threshold=self.fixed_slice_threshold, tau=self.fixed_tau
        )

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
        """Fit ``mil_head`` on every validation patient's bag (n_i, D) and class ``labels`` (P,); return the
        reported (P,) int64 predictions, cross-fitted (each patient by a head fitted on the others)."""
        fit_args = {"num_classes": len(CLASS_NAMES), "slice_features": self.mil_features}
        self.mil_head = fit_mil(bags, labels, **fit_args)
        return cross_fit_predictions(bags, labels, **fit_args)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._batches:
            return
        table = trainer.datamodule.slice_table
        index, patient, probs, embeddings = self.gather(trainer)
        targets = table.target[index] if len(table.target) else None
        result = self.decide(
            trainer.current_epoch, index, patient, probs, table.patient_ids, table.patient_labels, targets, embeddings
        )
        pl_module.log_dict(result.metrics, sync_dist=False)  # identical on every rank by construction
        if trainer.is_global_zero:
            self.log_rule_table(trainer, len(result.labels))
        if self.best is None or result.score > self.best.score:
            self.best = result
            pl_module.patient_votes = result
            if trainer.is_global_zero:
                self.write_patients_csv(result)

    def log_rule_table(self, trainer: pl.Trainer, n_patients: int) -> None:
        """The epoch's per-rule table: INFO text, and ``rules/table`` to every WandbLogger (call on rank 0)."""
        columns, rows = self.rule_table
        log.info(
            "Patient rules, epoch %d, %d validation patients (* = vote.rule, logged as val/patient/acc):\n%s",
            trainer.current_epoch,
            n_patients,
            rules_text(columns, rows, marked=self.rule),
        )
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_table(key="rules/table", columns=columns, data=rows)

    # ---- outputs ------------------------------------------------------------------------------
    def write_patients_csv(self, result: ValidationVotes) -> None:
        """``patients.csv``: one row per validation patient of the best epoch (atomic): what the configured
        rule decided on (:func:`patient_decisions`) and every rule's reported vote (:func:`patients_table`)."""
        if self.output_dir is None:
            return
        atomic_write_csv(self.output_dir / "patients.csv", *patients_table(result, patient_decisions(result, self)))

    def state_dict(self) -> dict[str, Any]:
        # the best epoch's metrics and confusion too: a resumed run (ckpt_path, SLURM requeue) that does
        # not improve on it still reports them. k, center_slices and window_slices are read by predict.py; on resume the
        # config's values (like its rule) win. The vote rule itself is the model's (hyper_parameters).
        best = self.best
        return {
            "tau": self.tau,
            "slice_threshold": self.slice_threshold,
            "threshold_tau": self.threshold_tau,
            "temperature": self.temperature,
            "k": self.k,
            "center_slices": self.center_slices,
            "window_slices": self.window_slices,
            # the latest epoch's MIL head (plain tensors and numbers); with vote.rule=mil the checkpoint
            # monitor saves the best epoch, so a best checkpoint holds the head of its own epoch
            "mil": None if self.mil_head is None else mil_state(self.mil_head),
            "best": None if best is None else best.score,
            "best_epoch": None if best is None else best.epoch,
            "best_summary": {} if best is None else {k: float(v) for k, v in best.metrics.items()},
            "best_confusion": None if best is None else best.confusion.tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tau = float(state_dict["tau"])
        self.slice_threshold = float(state_dict.get("slice_threshold", self.slice_threshold))  # older: none
        self.threshold_tau = float(state_dict.get("threshold_tau", self.threshold_tau))
        self.temperature = float(state_dict.get("temperature", 1.0))
        if state_dict.get("mil"):  # older checkpoints: none
            self.mil_head = mil_from_state(state_dict["mil"])
        if state_dict.get("best") is None:
            return
        metrics = dict(state_dict.get("best_summary") or {PATIENT_ACC: state_dict["best"]})  # older: no summary
        confusion = state_dict.get("best_confusion")
        empty = np.zeros(0, dtype=np.int64)
        self.best = ValidationVotes(
            int(state_dict["best_epoch"]),
            self.rule,
            self.tau,
            self.fixed_tau is None,
            [],
            empty,
            {},
            metrics,
            empty.reshape(0, 0) if confusion is None else np.asarray(confusion, dtype=np.int64),
            empty,
            empty,
            np.zeros((0, len(CLASS_NAMES)), dtype=np.float32),
        )


# ---- what patients.csv and the run report show beyond the calls --------------------------------------


@dataclass(frozen=True)
class MilDetails:
    """The ``mil`` head fitted on every validation patient (``PatientVoteCallback.mil_head``), applied to
    them: in-sample, unlike the reported ``mil`` calls, which are cross-fitted.

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
    patients = np.unique(patient)
    probs = np.zeros((len(patients), head.init_args["num_classes"]), dtype=np.float32)
    attention = np.zeros(len(patient), dtype=np.float32)
    head.eval()
    with torch.inference_mode():
        for i, p in enumerate(patients):
            rows = np.flatnonzero(patient == p)
            x = head.features(torch.as_tensor(np.asarray(features[rows], dtype=np.float32))).unsqueeze(0)
            logits, weights = head.forward_padded(x, torch.ones(x.shape[:2], dtype=torch.bool))
            probs[i] = logits.softmax(dim=1)[0].numpy()
            attention[rows] = weights[0].numpy()
    return MilDetails(probs, attention)


def report_fields(callback: PatientVoteCallback, patient: np.ndarray, mil_input: np.ndarray | None) -> dict[str, Any]:
    """The :class:`ValidationVotes` fields that ``decide`` records for the run report: the ``temperature`` the
    slice probabilities were divided by, and ``mil`` (:func:`mil_details` of the epoch's fitted head on
    ``mil_input`` (N, F), what it reads of each slice)."""
    return {"temperature": float(callback.temperature), "mil": mil_details(callback.mil_head, patient, mil_input)}


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
        scores: (P, C) float64 the rule's per-class scores (:func:`~covidct.patients.voting.rule_scores`; the ``mil``
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


def patient_decisions(votes: ValidationVotes, vote: PatientVoteCallback) -> PatientDecisions:
    """Per patient of ``votes``, the quantity ``votes.rule`` decided on, the threshold that decided it, the
    rule's class scores and one sentence saying why, recomputed from the slice probabilities with ``vote``'s
    settings (k, central slices, fixed or tuned tau and slice threshold). Leave-one-out parameters are
    those :func:`~covidct.patients.voting.leave_one_out_predictions` and
    :func:`~covidct.patients.voting.leave_one_out_threshold_predictions` decide by, so every sentence agrees with the
    reported call."""
    from covidct import NORMAL_CLASS
    from covidct.patients.voting import (
        RULE_SCORES,
        infected_share,
        leave_one_out_taus,
        leave_one_out_threshold_parameters,
        rule_scores,
        sick_margin,
        tune_threshold,
    )

    groups, labels, rule = slice_groups(votes), votes.labels, votes.rule
    n, called = len(groups), [CLASS_NAMES[c] for c in votes.predicted]
    sick = [c for c in range(len(CLASS_NAMES)) if c != NORMAL_CLASS]
    everyone = list(range(len(CLASS_NAMES)))
    fractions = np.asarray([v.infected_fraction for v in votes.patients], dtype=np.float64)
    sick_class = np.asarray([v.infected_class for v in votes.patients])
    taus = leave_one_out_taus(fractions, sick_class, labels) if votes.tau_tuned else np.full(n, votes.tau)
    threshold_tuned = vote.fixed_tau is None or vote.fixed_slice_threshold is None
    if threshold_tuned and n:
        t_all, share_tau = tune_threshold(
            groups, labels, slice_threshold=vote.fixed_slice_threshold, tau=vote.fixed_tau
        )
    else:
        t_all, share_tau = vote.slice_threshold, vote.threshold_tau
    params = {"k": vote.k, "center_slices": vote.center_slices, "window_slices": vote.window_slices}
    slice_threshold = patient_slice_threshold = None
    if rule in LEARNED_RULES:
        mil = votes.mil
        scores = mil.probs.astype(np.float64) if mil is not None else np.full((n, len(CLASS_NAMES)), np.nan)
    else:
        scores = np.asarray([rule_scores(g, rule, slice_threshold=t_all, **params) for g in groups]).reshape(n, -1)
    if rule == "infected_fraction":
        names, quantity, threshold, threshold_all = ("infected fraction", "tau"), fractions, taus, votes.tau
        parameters = (
            f"tau {votes.tau:.3f} tuned on all validation patients; each patient is called with a tau tuned on the "
            "other validation patients (leave-one-out), the tau column"
            if votes.tau_tuned
            else f"tau fixed at {votes.tau:.3f} (vote.tau)"
        )
        why = []
        for v, f, tau, name in zip(votes.patients, fractions, taus, called, strict=True):
            infected = int(v.n_slices - v.votes[NORMAL_CLASS])
            head = f"{infected} of {v.n_slices} slices infected (argmax not Normal): fraction {f:.3f}"
            tie = " (a tie: the higher summed probability wins)" if _tied(v.votes[sick]) else ""
            why.append(
                f"{head} > tau {tau:.3f}; the infected slices vote {_class_list(v.votes, sick, 'd')}{tie}: {name}"
                if f > tau
                else f"{head} <= tau {tau:.3f}: {name}"
            )
    elif rule == "threshold":
        slice_threshold = t_all
        per_patient = (
            leave_one_out_threshold_parameters(
                groups, labels, slice_threshold=vote.fixed_slice_threshold, tau=vote.fixed_tau
            )
            if threshold_tuned
            else np.tile([t_all, share_tau], (n, 1))
        ).reshape(n, 2)
        patient_slice_threshold, threshold, threshold_all = per_patient[:, 0], per_patient[:, 1], share_tau
        quantity = np.asarray([infected_share(g, t) for g, t in zip(groups, patient_slice_threshold, strict=True)])
        names = ("infected share", "tau")
        parameters = (
            f"slice threshold {t_all:.3f} and tau {share_tau:.3f} tuned on all validation patients; each patient is "
            "called with both tuned on the other validation patients (leave-one-out), the slice threshold and tau "
            "columns"
            if threshold_tuned
            else f"slice threshold {t_all:.3f} and tau {share_tau:.3f} fixed"
        )
        why = []
        for g, t, s, tau, name in zip(groups, patient_slice_threshold, quantity, threshold, called, strict=True):
            above = (1.0 - g[:, NORMAL_CLASS]) > t
            head = f"{int(above.sum())} of {len(g)} slices with P(infected) > {t:.3f}: share {s:.3f}"
            mean = (g[above] if above.any() else g).mean(axis=0)
            why.append(
                f"{head} > tau {tau:.3f}; mean P over them {_class_list(mean, sick, '.3f')}: {name}"
                if s > tau
                else f"{head} <= tau {tau:.3f}: {name}"
            )
    else:
        names, threshold_all = ("sick margin", "threshold"), 0.0
        quantity = np.asarray([sick_margin(s, NORMAL_CLASS) for s in scores]) if n else np.zeros(0)
        threshold = np.zeros(n)
        what = {
            "majority": "slice votes",
            "mean_prob": "mean P",
            "weighted_center": f"weighted vote shares (central {vote.center_slices} of {vote.window_slices} slices)",
            "topk_mean": f"mean of the top {vote.k} P",
            "mil": "head fitted on all validation patients: P",
        }[rule]
        parameters = (
            "an argmax rule: the class with the highest score wins (sick margin = best sick class's score - "
            "Normal's; > 0 calls the patient sick)"
            + (
                "; the reported calls are cross-fitted (each patient by a head fitted on the other patients), "
                "the probabilities shown are the head fitted on all of them (in-sample)"
                if rule in LEARNED_RULES
                else ""
            )
        )
        why = []
        for i, (v, name) in enumerate(zip(votes.patients, called, strict=True)):
            if rule == "majority":
                tie = " (a tie: the higher summed probability wins)" if _tied(v.votes) else ""
                text = f"{what} {_class_list(v.votes, everyone, 'd')}{tie}"
            elif rule == "mil" and votes.mil is None:
                text = "cross-fitted head (probabilities not recorded)"
            else:
                text = f"{what} {_class_list(scores[i], everyone, '.3f')}"
            if rule == "mil" and votes.mil is not None:
                text = f"cross-fitted head; {text}"
            why.append(f"{text}: {name}")
    return PatientDecisions(
        rule=rule,
        quantity_name=names[0],
        threshold_name=names[1],
        quantity=np.asarray(quantity, dtype=np.float64),
        threshold=np.asarray(threshold, dtype=np.float64),
        threshold_all=float(threshold_all),
        parameters=parameters,
        scores=np.asarray(scores, dtype=np.float64),
        scores_name=RULE_SCORES[rule],
        why=why,
        slice_threshold=slice_threshold,
        patient_slice_threshold=patient_slice_threshold,
        infected_fraction_tau=taus,
        window=(vote.center_slices, vote.window_slices) if rule == "weighted_center" else None,
    )


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
