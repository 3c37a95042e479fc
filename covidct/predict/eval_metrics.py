"""The numbers of an evaluation: accuracy, macro F1, per-class sensitivity / specificity (torchmetrics) with
percentile bootstrap 95% CIs over patients, confusion matrices (counts and PNG) and the printed table."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from covidct.text_table import format_table

NO_PREDICTION = "no prediction"
"""Confusion-matrix column of patients whose prediction failed, scored as wrong (allow_errors=true)."""


def metric_names(class_names: Sequence[str]) -> list[str]:
    """accuracy, macro_f1, sensitivity_<class>..., specificity_<class>... (the rows of the outputs)."""
    return (
        ["accuracy", "macro_f1"] + [f"sensitivity_{c}" for c in class_names] + [f"specificity_{c}" for c in class_names]
    )


def batch_metrics(truth: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Metrics of B patient samples at once (torchmetrics, ``multidim_average='samplewise'``).

    Args:
        truth: int64 (B, P) true class indices in [0, k).
        pred: int64 (B, P) predicted class indices in [0, k]; k = no prediction (counted as wrong).
        k: number of classes.

    Returns:
        values: float64 (B, M), the M = 2 + 2k metrics in :func:`metric_names` order.
        valid: bool (B, M), False where a metric is undefined in that sample (sensitivity of a class
        absent from it, specificity of a class that is all of it).
    """
    import torch
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_recall,
        multiclass_specificity,
    )

    num = k + 1 if (pred == k).any() else k
    t, p = torch.from_numpy(truth), torch.from_numpy(pred)
    kw = {"num_classes": num, "multidim_average": "samplewise", "validate_args": False}
    accuracy = multiclass_accuracy(p, t, average="micro", **kw).numpy()
    f1 = multiclass_f1_score(p, t, average=None, **kw).numpy()[:, :k]
    sensitivity = multiclass_recall(p, t, average=None, **kw).numpy()[:, :k]
    specificity = multiclass_specificity(p, t, average=None, **kw).numpy()[:, :k]
    classes = np.arange(k)
    true_counts = (truth[..., None] == classes).sum(1)  # (B, k)
    present = (true_counts + (pred[..., None] == classes).sum(1)) > 0  # torchmetrics' macro: tp + fp + fn > 0
    macro_f1 = (f1 * present).sum(1) / present.sum(1)
    values = np.column_stack([accuracy, macro_f1, sensitivity, specificity]).astype(np.float64)
    always = np.ones((len(truth), 2), bool)
    valid = np.column_stack([always, true_counts > 0, true_counts < truth.shape[1]])
    return values, valid


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """int64 (k, k) counts, rows true, columns predicted; (k, k + 1) with a 'no prediction' column
    when some prediction failed."""
    import torch
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    num = k + 1 if (pred == k).any() else k
    return multiclass_confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), num).numpy()[:k]


@dataclass
class Scores:
    """One test set's (or the overall) scores."""

    n_patients: int
    values: dict[str, float | None]
    ci: dict[str, tuple[float | None, float | None]]
    valid_resamples: dict[str, int]
    confusion: np.ndarray
    scored_as_wrong: list[str] = field(default_factory=list)


def score(truth: np.ndarray, pred: np.ndarray, k: int, class_names: Sequence[str], resamples: int, seed: int) -> Scores:
    """Point estimates and percentile 95% CIs of ``resamples`` bootstrap samples of the patients
    (a fresh ``numpy.random.default_rng(seed)``: reproducible, independent of other test sets)."""
    names = metric_names(class_names)
    values, valid = batch_metrics(truth[None], pred[None], k)
    point = {m: (float(values[0, j]) if valid[0, j] else None) for j, m in enumerate(names)}
    ci: dict[str, tuple[float | None, float | None]] = dict.fromkeys(names, (None, None))
    counts = dict.fromkeys(names, 0)
    if resamples:
        idx = np.random.default_rng(seed).integers(0, len(truth), size=(resamples, len(truth)))
        boot, ok = batch_metrics(truth[idx], pred[idx], k)
        for j, m in enumerate(names):
            counts[m] = int(ok[:, j].sum())
            if counts[m]:
                low, high = np.percentile(boot[ok[:, j], j], [2.5, 97.5])
                ci[m] = (float(low), float(high))
    return Scores(len(truth), point, ci, counts, confusion_matrix(truth, pred, k))


def confusion_png(matrix: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """PNG of a confusion matrix: int (k, k or k + 1) counts in the cells, rows true, columns predicted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = list(class_names) + [NO_PREDICTION] * (matrix.shape[1] - len(class_names))
    fig = Figure(figsize=(1.3 * len(columns) + 1.6, 1.2 * len(class_names) + 1.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    for (i, j), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        ax.text(j, i, str(count), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(class_names)), list(class_names))
    ax.set(title=title, xlabel="predicted", ylabel="true")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _cell(value: float | None, ci: tuple[float | None, float | None]) -> str:
    """A table cell: 'value [low, high]' (3 decimals), 'value' without an interval, 'n/a' when undefined."""
    if value is None:
        return "n/a"
    if ci[0] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_scores(scores: dict[str, Scores], class_names: Sequence[str]) -> str:
    """Aligned table: one row per metric, one column per test set and overall ('value [95% CI]')."""
    header = ["metric", *scores]
    rows = [["patients", *(s.n_patients for s in scores.values())]]
    rows += [[m, *(_cell(s.values[m], s.ci[m]) for s in scores.values())] for m in metric_names(class_names)]
    return format_table(header, rows)
