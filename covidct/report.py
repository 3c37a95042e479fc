"""Run report: confusion matrix, one-vs-rest ROC curves (patient and slice level) and a per-patient
table, as PNGs, a CSV and one self-contained ``report.html`` (images inline, no CSS/JS files).

Pure rendering: everything comes in a :class:`RunReport`; nothing here knows about Lightning.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_roc,
)

from covidct.io import atomic_write_bytes, atomic_write_csv, atomic_write_text  # noqa: E402


@dataclass
class RunReport:
    """What the report shows. P patients, N slices, C classes.

    Attributes:
        patient_scores: float (P, C) mean slice probability per class (the patient-level ROC score).
        slice_labels: int (N,) slice class, -1 = unknown (left out of the slice ROC).
        slice_scores: float (N, C) slice softmax probabilities.
        extra_metrics: shown as they are among the key metrics (e.g. the tuned tau).
        note: one more sentence for the page's introduction.
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
    extra_metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""


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
    int (N,); rows with label -1 are left out."""
    keep = np.asarray(labels) >= 0
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32)[keep])
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


def key_metrics(report: RunReport, patient_roc: Roc, slice_roc: Roc) -> dict[str, float]:
    """Patient accuracy and macro F1 of the vote, macro AUCs and per-class AUCs, plus ``extra_metrics``."""
    c = len(report.class_names)
    p, t = torch.as_tensor(report.patient_preds), torch.as_tensor(report.patient_labels)
    metrics = {
        "patient accuracy": float(multiclass_accuracy(p, t, c, average="micro")),
        "patient macro F1": float(multiclass_f1_score(p, t, c, average="macro")),
        "patient AUC (macro)": patient_roc.macro_auc,
        "slice AUC (macro)": slice_roc.macro_auc,
    }
    for k, name in enumerate(report.class_names):
        metrics[f"patient AUC {name}"] = float(patient_roc.auc[k])
        metrics[f"slice AUC {name}"] = float(slice_roc.auc[k])
    return metrics | report.extra_metrics


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_png(labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """PNG of the confusion matrix (counts; rows = truth, columns = prediction)."""
    c = len(class_names)
    matrix = multiclass_confusion_matrix(torch.as_tensor(preds), torch.as_tensor(labels), c).numpy()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ConfusionMatrixDisplay(matrix, display_labels=list(class_names)).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    return _png(fig)


def roc_png(curves: Roc, class_names: Sequence[str], title: str) -> bytes:
    """PNG of the one-vs-rest ROC curves, the AUC of each class in the legend."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for k, name in enumerate(class_names):
        if np.isnan(curves.auc[k]):
            ax.plot([], [], label=f"{name}: AUC n/a (one kind of sample)")
        else:
            ax.plot(curves.fpr[k], curves.tpr[k], lw=2, label=f"{name}: AUC {curves.auc[k]:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        aspect="equal",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def patient_table(report: RunReport) -> tuple[list[str], list[list[object]]]:
    """Header and one row per patient: id, true, predicted, correct, slices, mean probability per class."""
    names = list(report.class_names)
    header = ["patient", "true_class", "predicted_class", "correct", "n_slices", *[f"mean_prob_{n}" for n in names]]
    rows = [
        [pid, names[t], names[p], bool(t == p), int(n), *np.round(np.asarray(s, dtype=np.float64), 4).tolist()]
        for pid, t, p, n, s in zip(
            report.patients,
            report.patient_labels,
            report.patient_preds,
            report.n_slices,
            report.patient_scores,
            strict=True,
        )
    ]
    return header, rows


STYLE = """body{font-family:sans-serif;margin:2em;color:#222}h1{font-size:1.4em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child{text-align:left}tr.wrong{background:#fde2e2}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs img{max-width:100%;border:1px solid #eee}"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _html_table(header: Sequence[str], rows: Sequence[Sequence[object]], classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        f'<tr class="{cls}">' + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row, cls in zip(rows, list(classes) or [""] * len(rows), strict=True)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def render_html(report: RunReport, metrics: dict[str, float], images: dict[str, bytes]) -> str:
    """The whole report as one HTML page; ``images`` (title -> PNG bytes) are inlined as data URIs."""
    header, rows = patient_table(report)
    wrong = ["" if row[3] else "wrong" for row in rows]
    title = f"Run report: {report.run_name}"
    figures = "".join(
        f"<figure>{_img(png, name)}<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in images.items()
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>Validation patients of the best epoch ({report.best_epoch}), vote rule "
        f"<b>{html.escape(report.vote_rule)}</b>: {len(rows)} patients, {len(report.slice_labels)} slices. "
        "ROC scores: a patient's mean slice probability per class (patient level), each slice's probability "
        "(slice level, slices of unknown class left out); one class against the others. "
        f"{html.escape(report.note)}</p>"
        f"<h2>Key metrics</h2>{_html_table(['metric', 'value'], [[k, v] for k, v in metrics.items()])}"
        f'<h2>Figures</h2><div class="figs">{figures}</div>'
        f"<h2>Patients</h2>{_html_table(header, rows, wrong)}</body></html>"
    )


REPORT_FILES = {
    "confusion matrix": "confusion_matrix.png",
    "ROC, patient level": "roc_patient.png",
    "ROC, slice level": "roc_slice.png",
}


@dataclass
class WrittenReport:
    """What :func:`write_report` wrote: file paths, the metrics, the PNGs by title, the HTML text."""

    paths: dict[str, Path]
    metrics: dict[str, float]
    images: dict[str, bytes]
    html: str


def write_report(report: RunReport, out_dir: str | Path) -> WrittenReport:
    """Write ``confusion_matrix.png``, ``roc_patient.png``, ``roc_slice.png``, ``report_patients.csv``
    and ``report.html`` into ``out_dir`` (each atomically)."""
    out_dir, c = Path(out_dir), len(report.class_names)
    patient_roc = roc(report.patient_scores, report.patient_labels, c)
    slice_roc = roc(report.slice_scores, report.slice_labels, c)
    n_patients, n_slices = len(report.patient_labels), int((np.asarray(report.slice_labels) >= 0).sum())
    images = {
        "confusion matrix": confusion_png(
            report.patient_labels,
            report.patient_preds,
            report.class_names,
            f"Patients ({report.vote_rule} vote), n={n_patients}",
        ),
        "ROC, patient level": roc_png(patient_roc, report.class_names, f"Patient level (mean prob.), n={n_patients}"),
        "ROC, slice level": roc_png(slice_roc, report.class_names, f"Slice level, n={n_slices}"),
    }
    metrics = key_metrics(report, patient_roc, slice_roc)
    paths = {REPORT_FILES[k]: atomic_write_bytes(out_dir / REPORT_FILES[k], png) for k, png in images.items()}
    paths["report_patients.csv"] = atomic_write_csv(out_dir / "report_patients.csv", *patient_table(report))
    text = render_html(report, metrics, images)
    paths["report.html"] = atomic_write_text(out_dir / "report.html", text)
    return WrittenReport(paths, metrics, images, text)
