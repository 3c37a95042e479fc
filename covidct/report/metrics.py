"""What the run report shows, and what it computes from it: :class:`RunReport` (the best validation epoch's
patients, slices, decisions, calibration and training history), one-vs-rest ROC curves, reliability bins and
the key metrics (:func:`score`). No drawing and no HTML here: :mod:`~.figures` draws, :mod:`~.page` writes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
    multiclass_recall,
    multiclass_roc,
    multiclass_specificity,
)

from covidct.patients.metrics import accuracy_interval

if TYPE_CHECKING:
    from covidct.patients.explanations import PatientDecisions
    from covidct.report.call_cams import CallCams

#: equal-width confidence bins of the reliability diagram (as ``expected_calibration_error``)
RELIABILITY_BINS = 15


@dataclass
class Calibration:
    """Temperature scaling of the best epoch: ``temperature`` T the slice logits were divided by, whether it
    was ``fitted`` (``calibration=true``), and ``slice_before`` (N, C) float the slice probabilities before
    (the report's ``slice_scores`` are after)."""

    temperature: float
    fitted: bool
    slice_before: np.ndarray


@dataclass
class RunReport:
    """What the report shows. P patients, N slices, C classes.

    Attributes:
        run_name: the run folder's name (shown under the title, and on every figure).
        patient_scores: float (P, C) mean slice probability per class.
        slice_labels: int (N,) slice class, -1 = unknown (left out of the slice ROC).
        slice_scores: float (N, C) slice softmax probabilities (calibrated: those the rules voted on).
        slice_patient: int (N,) index into ``patients`` of each slice, each patient's slices head first.
        decisions: what the rule decided each patient on (:class:`PatientDecisions`).
        rule_votes: rule -> (P,) int every rule's reported call.
        rules: (header, rows) the vote rules compared on the same slices.
        calibration: the temperature scaling of the slice probabilities, or None.
        mil_attention: (N,) float the MIL head's attention weight of each slice, or None.
        history: per validation epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_patient_acc`` (missing: NaN).
        data: (header, rows) patients and slices per class and split.
        data_note: one more line under the data table.
        config: what the run was (experiment, overrides, model, loss, seed, git commit), shown as they are.
        links: label -> path relative to the report (best checkpoint, patients.csv, metrics.json, log).
        title: experiment, model and rule; empty: the rule alone.
        extra_metrics: shown as they are among the key metrics (e.g. the tuned tau).
        note: one more sentence for the page's introduction.
        cams: Grad-CAM of the calls (:func:`~.call_cams.call_cams`), or None (not computed, or switched off).
    """

    run_name: str
    class_names: Sequence[str]
    vote_rule: str
    best_epoch: int | None
    patients: Sequence[str]
    patient_labels: np.ndarray
    patient_preds: np.ndarray
    patient_scores: np.ndarray
    n_slices: np.ndarray
    slice_labels: np.ndarray
    slice_scores: np.ndarray
    slice_patient: np.ndarray | None = None
    decisions: PatientDecisions | None = None
    rule_votes: dict[str, np.ndarray] = field(default_factory=dict)
    rules: tuple[list[str], list[list]] | None = None
    calibration: Calibration | None = None
    mil_attention: np.ndarray | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    data: tuple[list[str], list[list]] | None = None
    data_note: str = ""
    config: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    title: str = ""
    extra_metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    cams: CallCams | None = None

    @property
    def heading(self) -> str:
        return self.title or f"Run report: vote {self.vote_rule}"

    @property
    def best_epoch_text(self) -> str:
        return "not recorded" if self.best_epoch is None else str(self.best_epoch)


@dataclass
class Roc:
    """One-vs-rest ROC per class: fpr[c], tpr[c] float arrays; auc (C,) NaN where a class has no
    positive or no negative sample (undefined)."""

    fpr: list[np.ndarray]
    tpr: list[np.ndarray]
    auc: np.ndarray

    @property
    def macro_auc(self) -> float:
        """Mean AUC over the classes where it is defined (NaN if none)."""
        defined = self.auc[~np.isnan(self.auc)]
        return float(defined.mean()) if defined.size else float("nan")


def roc(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> Roc:
    """One-vs-rest ROC curves and AUCs (torchmetrics) of ``scores`` float (N, C) against ``labels``
    int (N,); rows with label -1 or a NaN score are left out."""
    scores = np.asarray(scores, dtype=np.float32).reshape(len(labels), num_classes)
    keep = (np.asarray(labels) >= 0) & ~np.isnan(scores).any(axis=1)
    s = torch.as_tensor(scores[keep])
    t = torch.as_tensor(np.asarray(labels, dtype=np.int64)[keep])
    positives = torch.bincount(t, minlength=num_classes)
    defined = ((positives > 0) & (positives < len(t))).numpy()
    if not defined.any():
        return Roc([np.zeros(0)] * num_classes, [np.zeros(0)] * num_classes, np.full(num_classes, np.nan))
    with warnings.catch_warnings():  # a class without positives or negatives: NaN below
        warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
        fpr, tpr, _ = multiclass_roc(s, t, num_classes)
        auc = multiclass_auroc(s, t, num_classes, average=None).numpy().astype(np.float64)
    return Roc([f.numpy() for f in fpr], [r.numpy() for r in tpr], np.where(defined, auc, np.nan))


@dataclass
class Reliability:
    """Top-label reliability of (N, C) probabilities against (N,) classes, in ``RELIABILITY_BINS`` equal-width
    confidence bins binned as torchmetrics' calibration error does (bin i holds confidences in
    (i/B, (i+1)/B]; B + 1 bins, the last for confidence exactly 1): ``confidence`` and ``accuracy`` (B + 1,)
    mean per bin (0 where empty), ``count`` (B + 1,) int, ``ece`` the expected calibration error (L1)."""

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    ece: float


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = RELIABILITY_BINS) -> Reliability:
    """:class:`Reliability` of ``probs`` (N, C) against ``labels`` (N,); rows with label -1 are left out.
    Computed in float32 like :func:`covidct.patients.calibration.expected_calibration_error`, whose value ``ece`` is."""
    known = np.asarray(labels) >= 0
    p = np.asarray(probs, dtype=np.float32)[known]
    if not len(p):
        empty = np.zeros(n_bins + 1)
        return Reliability(empty, empty, empty.astype(np.int64), float("nan"))
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == np.asarray(labels)[known]).astype(np.float32)
    edges = np.linspace(0, 1, n_bins + 1, dtype=np.float32)
    index = np.searchsorted(edges, confidence, side="right") - 1
    count = np.bincount(index, minlength=n_bins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.nan_to_num(np.bincount(index, confidence, n_bins + 1) / count)
        accuracy = np.nan_to_num(np.bincount(index, correct, n_bins + 1) / count)
    ece = float(np.sum(np.abs(accuracy - mean_conf) * count / count.sum()))
    return Reliability(mean_conf, accuracy, count, ece)


def class_rates(report: RunReport) -> tuple[np.ndarray, np.ndarray]:
    """(C,) sensitivity and (C,) specificity of the configured rule's calls per class."""
    p, t, c = torch.as_tensor(report.patient_preds), torch.as_tensor(report.patient_labels), len(report.class_names)
    sens = multiclass_recall(p, t, c, average=None).numpy().astype(np.float64)
    spec = multiclass_specificity(p, t, c, average=None).numpy().astype(np.float64)
    return sens, spec


@dataclass
class Scored:
    """Everything the report computes from a :class:`RunReport`."""

    rule_roc: Roc | None  # the patient ROC scored by the rule's scores (None: not recorded)
    mean_roc: Roc  # the patient ROC scored by mean slice probability
    slice_roc: Roc
    metrics: dict[str, float]
    slice_reliability: tuple[Reliability, Reliability] | None  # (before, after)
    patient_reliability: tuple[Reliability, Reliability] | None


def score(report: RunReport) -> Scored:
    """ROC curves, key metrics and reliability of ``report``."""
    c = len(report.class_names)
    d = report.decisions
    rule_roc = roc(d.scores, report.patient_labels, c) if d is not None and not np.isnan(d.scores).all() else None
    mean_roc = roc(report.patient_scores, report.patient_labels, c)
    slice_roc = roc(report.slice_scores, report.slice_labels, c)
    p, t = torch.as_tensor(report.patient_preds), torch.as_tensor(report.patient_labels)
    pairs = np.asarray(report.patient_labels, dtype=np.int64) * c + np.asarray(report.patient_preds, dtype=np.int64)
    low, high = accuracy_interval(np.bincount(pairs, minlength=c * c).reshape(c, c))
    metrics = {
        "patient accuracy": float(multiclass_accuracy(p, t, c, average="micro")),
        "patient accuracy 95% CI low": low,
        "patient accuracy 95% CI high": high,
        "patient macro F1": float(multiclass_f1_score(p, t, c, average="macro")),
        "patient AUC (macro), rule scores": rule_roc.macro_auc if rule_roc else float("nan"),
        "patient AUC (macro), mean probability": mean_roc.macro_auc,
        "slice AUC (macro)": slice_roc.macro_auc,
    }
    for k, name in enumerate(report.class_names):
        metrics[f"patient AUC {name}, rule scores"] = float(rule_roc.auc[k]) if rule_roc else float("nan")
        metrics[f"patient AUC {name}, mean probability"] = float(mean_roc.auc[k])
        metrics[f"slice AUC {name}"] = float(slice_roc.auc[k])
    slice_rel = patient_rel = None
    cal = report.calibration
    if cal is not None:
        slice_rel = (
            reliability(cal.slice_before, report.slice_labels),
            reliability(report.slice_scores, report.slice_labels),
        )
        before_means = _patient_means(cal.slice_before, report)
        if before_means is not None:
            patient_rel = (
                reliability(before_means, report.patient_labels),
                reliability(report.patient_scores, report.patient_labels),
            )
        metrics["temperature"] = cal.temperature
        metrics["slice ECE before calibration"] = slice_rel[0].ece
        metrics["slice ECE after calibration"] = slice_rel[1].ece
        if patient_rel is not None:
            metrics["patient ECE before calibration"] = patient_rel[0].ece
            metrics["patient ECE after calibration"] = patient_rel[1].ece
    return Scored(rule_roc, mean_roc, slice_roc, metrics | report.extra_metrics, slice_rel, patient_rel)


def _patient_means(slice_probs: np.ndarray, report: RunReport) -> np.ndarray | None:
    """(P, C) each patient's mean of ``slice_probs`` (N, C); None without ``slice_patient``."""
    if report.slice_patient is None:
        return None
    return np.stack([slice_probs[report.slice_patient == i].mean(axis=0) for i in range(len(report.patients))])
