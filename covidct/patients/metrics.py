"""Patient-level metrics of a rule's calls, and the per-rule comparison table (torch / torchmetrics)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_recall,
    multiclass_specificity,
)

from covidct.contracts import CLASS_NAMES, class_slug

BOOTSTRAP_RESAMPLES = 2000


def accuracy_interval(
    confusion: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the patient accuracy of ``confusion`` (int (C, C) counts, rows =
    truth): patients resampled with replacement ``resamples`` times from ``numpy.random.default_rng(seed)``, as
    predict.py's evaluation resamples them (:func:`covidct.predict.eval_metrics.score`)."""
    confusion = np.asarray(confusion)
    correct = np.repeat([True, False], [np.trace(confusion), confusion.sum() - np.trace(confusion)])
    if not len(correct):
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(correct), size=(resamples, len(correct)))
    low, high = np.percentile(correct[idx].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def patient_metrics(preds: np.ndarray, labels: np.ndarray, class_names=CLASS_NAMES) -> dict[str, Any]:
    """Accuracy, macro F1, per-class sensitivity and specificity (floats), and ``confusion`` (C, C) int64
    (rows = truth) of the calls ``preds`` (P,) int against ``labels`` (P,) int."""
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


def rules_table(metrics_by_rule: dict[str, dict[str, Any]], class_names=CLASS_NAMES) -> tuple[list[str], list[list]]:
    """Columns and one row per rule: rule, patient accuracy, macro F1, sensitivity of each class
    (``metrics_by_rule``: rule -> :func:`patient_metrics`)."""
    columns = ["rule", "acc", "f1_macro", *[f"sensitivity {name}" for name in class_names]]
    keys = ["acc", "f1_macro", *[f"sensitivity_{class_slug(name)}" for name in class_names]]
    rows = [[rule, *(float(m[k]) for k in keys)] for rule, m in metrics_by_rule.items()]
    return columns, rows
