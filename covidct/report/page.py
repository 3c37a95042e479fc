"""Run report: one self-contained ``report.html`` (figures inline, no CSS/JS files) that says what a run
decided and why: per validation patient the quantity the vote rule decided on and the threshold it was
compared with, the decision quantity by true class, each patient's infected probability along the
series, ROC curves scored by the rule's own scores (and, named apart, by mean probability), the rules
compared, calibration, training curves, the data and the run's configuration.

Pure rendering: everything comes in a :class:`RunReport`; nothing here knows about Lightning. The
standard figures (confusion matrix, ROC curves) are matplotlib PNGs; the per-patient figures (decision
strip, series small multiples), the training curves and the reliability diagram are drawn as inline SVG
(vector: sharp at any zoom; and a panel per patient costs microseconds instead of matplotlib's tenths
of a second).
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
    multiclass_recall,
    multiclass_roc,
    multiclass_specificity,
)

from covidct.io import atomic_write_bytes, atomic_write_text  # noqa: E402

if TYPE_CHECKING:
    from covidct.training.callbacks.patient_vote import PatientDecisions

#: validation patients drawn in the series small multiples (misclassified first); the page says how many
MAX_SERIES_PANELS = 24
#: equal-width confidence bins of the reliability diagram (as ``expected_calibration_error``)
RELIABILITY_BINS = 15
#: PNG resolution
DPI = 120
NORMAL = "Normal"


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
    metrics = {
        "patient accuracy": float(multiclass_accuracy(p, t, c, average="micro")),
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


# ---- matplotlib figures (PNG) ---------------------------------------------------------------------------


def _png(fig: plt.Figure, run_name: str) -> bytes:
    fig.text(0.995, 0.005, run_name, ha="right", va="bottom", fontsize=6.5, color="#777")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def confusion_png(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str], title: str, run_name: str = ""
) -> bytes:
    """PNG of the confusion matrix (counts; rows = truth, columns = prediction)."""
    c = len(class_names)
    matrix = multiclass_confusion_matrix(torch.as_tensor(preds), torch.as_tensor(labels), c).numpy()
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    fig.subplots_adjust(left=0.2, right=0.96, bottom=0.16, top=0.9)
    ConfusionMatrixDisplay(matrix, display_labels=list(class_names)).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=9.5)
    return _png(fig, run_name)


def _roc_axes(ax: plt.Axes, curves: Roc, class_names: Sequence[str], title: str) -> None:
    for k, name in enumerate(class_names):
        if np.isnan(curves.auc[k]):
            ax.plot([], [], label=f"{name}: AUC n/a (one kind of sample)")
        else:
            ax.plot(curves.fpr[k], curves.tpr[k], lw=2, label=f"{name}: AUC {curves.auc[k]:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9.5)
    ax.legend(loc="lower right", fontsize=7.5)


def roc_png(curves: Roc, class_names: Sequence[str], title: str, run_name: str = "") -> bytes:
    """PNG of the one-vs-rest ROC curves, the AUC of each class in the legend."""
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.14, top=0.92)
    _roc_axes(ax, curves, class_names, title)
    return _png(fig, run_name)


def patient_roc_png(
    rule_roc: Roc | None, mean_roc: Roc, class_names: Sequence[str], rule_title: str, mean_title: str, run_name: str
) -> bytes:
    """PNG of the patient ROC curves side by side: scored by the rule's own scores (left) and by the mean
    slice probability (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 4.6))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.92, wspace=0.28)
    if rule_roc is None:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "the rule's scores were not recorded", ha="center", va="center")
        axes[0].set_title(rule_title, fontsize=9.5)
    else:
        _roc_axes(axes[0], rule_roc, class_names, rule_title)
    _roc_axes(axes[1], mean_roc, class_names, mean_title)
    return _png(fig, run_name)


# ---- SVG figures ------------------------------------------------------------------------------------------

CLASS_COLOURS = ("#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd")  # COVID-19, CAP, Normal, ...
WRONG, RIGHT, MUTED = "#d0021b", "#34495e", "#888"
LABELLED_INFECTED, LABELLED_CLEAN = "#333333", "#cccccc"


def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


class Svg:
    """A small SVG canvas: shapes in pixel coordinates, each with an optional tooltip (``<title>``)."""

    def __init__(self, width: float, height: float) -> None:
        self.width, self.height, self.parts = width, height, []

    def _tip(self, tip: str | None) -> str:
        return f"<title>{html.escape(tip)}</title>" if tip else ""

    def line(self, x1, y1, x2, y2, stroke="#000", width=1.0, dash: str | None = None) -> None:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" stroke="{stroke}" '
            f'stroke-width="{width}"{d}/>'
        )

    def polyline(self, xs, ys, stroke="#000", width=1.5, fill="none", opacity: float = 1.0) -> None:
        points = " ".join(f"{_n(x)},{_n(y)}" for x, y in zip(xs, ys, strict=True))
        self.parts.append(
            f'<polyline points="{points}" fill="{fill}" stroke="{stroke}" stroke-width="{width}" opacity="{opacity}"/>'
        )

    def circle(self, x, y, r, fill, tip: str | None = None, stroke: str = "none") -> None:
        self.parts.append(
            f'<circle cx="{_n(x)}" cy="{_n(y)}" r="{r}" fill="{fill}" stroke="{stroke}">{self._tip(tip)}</circle>'
        )

    def rect(self, x, y, w, h, fill, opacity: float = 1.0, tip: str | None = None, stroke: str = "none") -> None:
        self.parts.append(
            f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(max(w, 0))}" height="{_n(max(h, 0))}" fill="{fill}" '
            f'opacity="{opacity}" stroke="{stroke}">{self._tip(tip)}</rect>'
        )

    def text(
        self, x, y, s: str, size=11, anchor="start", fill="#222", weight: str | None = None, halo: bool = False
    ) -> None:
        w = f' font-weight="{weight}"' if weight else ""
        if halo:  # a white outline under the glyphs: readable over lines and dots
            w += ' stroke="#fff" stroke-width="3" paint-order="stroke"'
        self.parts.append(
            f'<text x="{_n(x)}" y="{_n(y)}" font-size="{size}" text-anchor="{anchor}" fill="{fill}"{w}>'
            f"{html.escape(s)}</text>"
        )

    def render(self, title: str) -> str:
        """The ``<svg>`` element (role img, named by ``title``)."""
        t = html.escape(title)
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{t}" viewBox="0 0 {_n(self.width)} '
            f'{_n(self.height)}" width="{_n(self.width)}" font-family="sans-serif"><title>{t}</title>'
            + "".join(self.parts)
            + "</svg>"
        )


@dataclass
class Axes:
    """A plot area of an :class:`Svg`: data (x, y) within ``xlim`` x ``ylim`` -> pixels inside the box."""

    svg: Svg
    left: float
    top: float
    width: float
    height: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def x(self, v: float) -> float:
        lo, hi = self.xlim
        return self.left + (v - lo) / ((hi - lo) or 1.0) * self.width

    def y(self, v: float) -> float:
        lo, hi = self.ylim
        return self.top + self.height - (v - lo) / ((hi - lo) or 1.0) * self.height

    def frame(
        self,
        xticks: Sequence[float] = (),
        yticks: Sequence[float] = (),
        xlabel: str = "",
        ylabel: str = "",
        fmt: str = "{:g}",
        xtick_labels: Sequence[str] | None = None,
        size: float = 10,
    ) -> None:
        s, bottom = self.svg, self.top + self.height
        s.rect(self.left, self.top, self.width, self.height, "none", stroke="#bbb")
        for i, v in enumerate(xticks):
            s.line(self.x(v), bottom, self.x(v), bottom + 3, "#888")
            label = xtick_labels[i] if xtick_labels is not None else fmt.format(v)
            s.text(self.x(v), bottom + 4 + size, label, size=size, anchor="middle", fill="#444")
        for v in yticks:
            s.line(self.left - 3, self.y(v), self.left, self.y(v), "#888")
            s.line(self.left, self.y(v), self.left + self.width, self.y(v), "#eee")
            s.text(self.left - 5, self.y(v) + size / 3, fmt.format(v), size=size, anchor="end", fill="#444")
        if xlabel:
            s.text(self.left + self.width / 2, bottom + 2 * size + 10, xlabel, size=size + 1, anchor="middle")
        if ylabel:
            s.parts.append(
                f'<text transform="translate({_n(self.left - 3.6 * size)},{_n(self.top + self.height / 2)}) '
                f'rotate(-90)" font-size="{size + 1}" text-anchor="middle" fill="#222">{html.escape(ylabel)}</text>'
            )


def _footer(svg: Svg, run_name: str) -> None:
    svg.text(svg.width - 4, svg.height - 4, run_name, size=9, anchor="end", fill="#999")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values within [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def decision_svg(report: RunReport) -> str | None:
    """Each validation patient's decision quantity (y) by true class (x), blue if called right, red if
    wrong (with its id), the threshold tuned on all patients as a line and, where a patient was decided by
    its own (leave-one-out) threshold, that threshold as a short dash beside it. None without quantities."""
    d = report.decisions
    if d is None or np.isnan(d.quantity).all():
        return None
    names, q = list(report.class_names), d.quantity
    values = np.concatenate([q[~np.isnan(q)], d.threshold[~np.isnan(d.threshold)], [d.threshold_all]])
    if d.rule in ("infected_fraction", "threshold"):
        lo, hi = 0.0, 1.0
    else:
        lo, hi = min(-0.1, float(values.min())), max(0.1, float(values.max()))
    pad = (hi - lo) * 0.06
    svg = Svg(150 + 150 * len(names), 330)
    ax = Axes(svg, 70, 34, 140 * len(names), 230, (-0.5, len(names) - 0.5), (lo - pad, hi + pad))
    ax.frame(
        range(len(names)),
        _ticks(lo, hi),
        xlabel="true class",
        ylabel=d.quantity_name,
        xtick_labels=names,
    )
    svg.text(ax.left, 20, f"{d.quantity_name} per validation patient (vote {d.rule}), by true class", size=12)
    y_line = ax.y(d.threshold_all)
    svg.line(ax.left, y_line, ax.left + ax.width, y_line, "#555", 1.2, dash="6 3")
    svg.text(
        ax.left + ax.width + 4,
        y_line + 4,
        f"{d.threshold_name} {d.threshold_all:.3f}",
        size=10,
        fill="#333",
    )
    for y, hint in ((ax.top + 10, "sick"), (ax.top + ax.height - 2, NORMAL)):
        if abs(y - 4 - y_line) > 14:  # not over the threshold's label
            svg.text(ax.left + ax.width + 4, y, hint, size=10, fill=MUTED)
    own = not np.allclose(d.threshold, d.threshold_all)
    labels: list[tuple[float, float, str]] = []  # the wrong calls' (x, y, text), drawn last
    for c in range(len(names)):
        members = np.flatnonzero((report.patient_labels == c) & ~np.isnan(q))
        members = members[np.argsort(q[members], kind="stable")]
        for j, i in enumerate(members):
            offset = 0.0 if len(members) == 1 else (j / (len(members) - 1) - 0.5) * 0.5
            x, y = ax.x(c + offset), ax.y(q[i])
            right = report.patient_preds[i] == report.patient_labels[i]
            called = names[report.patient_preds[i]]
            tip = (
                f"{report.patients[i]}: true {names[c]}, called {called}; {d.quantity_name} {q[i]:.3f}, "
                f"{d.threshold_name} {d.threshold[i]:.3f}"
            )
            if own:
                svg.line(x - 7, ax.y(d.threshold[i]), x + 7, ax.y(d.threshold[i]), "#777", 1.5)
            svg.circle(x, y, 4.5, RIGHT if right else WRONG, tip=tip, stroke="#fff")
            if not right:
                labels.append((x + 7, y + 4, f"{report.patients[i]} -> {called}"))
    placed: list[tuple[float, float]] = []  # (x, y) of the labels drawn: a label never sits on another
    for x, y, text in sorted(labels, key=lambda t: (t[0], -t[1])):
        while any(abs(x - px) < 6.0 * len(text) and abs(y - py) < 11 for px, py in placed):
            y -= 11
        placed.append((x, y))
        svg.text(x, y, text, size=9.5, fill=WRONG, halo=True)
    legend = "dark: called right, red: called wrong (id -> call)"
    if own:
        legend += "; short dash: the patient's own leave-one-out threshold"
    svg.text(ax.left, svg.height - 18, legend, size=10, fill="#444")
    _footer(svg, report.run_name)
    return svg.render(f"{d.quantity_name} by true class, threshold drawn")


def series_order(report: RunReport) -> list[int]:
    """Patients in the series small multiples: misclassified first, then by true class, then by id."""
    wrong = report.patient_preds != report.patient_labels
    return sorted(
        range(len(report.patients)), key=lambda i: (not wrong[i], report.patient_labels[i], report.patients[i])
    )


def series_svg(report: RunReport, max_panels: int | None = None) -> tuple[str, int] | None:
    """Small multiples, one panel per validation patient (at most ``max_panels``, default
    :data:`MAX_SERIES_PANELS`, in :func:`series_order`):
    the infected probability 1 - P(Normal) of each slice along the series (head left, feet right), dots
    coloured by the slice's argmax class, the radiologist's slice labels where known as a strip above
    (red infected, green clean), the threshold rule's slice threshold, ``weighted_center``'s voting
    window and the MIL attention where recorded. Returns (SVG, panels drawn); None without ``slice_patient``."""
    if report.slice_patient is None or not len(report.patients):
        return None
    names = list(report.class_names)
    normal = names.index(NORMAL) if NORMAL in names else len(names) - 1
    shown = series_order(report)[: MAX_SERIES_PANELS if max_panels is None else max_panels]
    cols = min(4, len(shown))
    pw, ph, gap_x, gap_y, top = 250, 150, 18, 16, 46
    rows = math.ceil(len(shown) / cols)
    svg = Svg(24 + cols * (pw + gap_x), top + rows * (ph + gap_y) + 40)
    heading = "infected probability 1 - P(Normal) along each validation patient's series"
    if report.mil_attention is not None:
        heading += "; purple: the MIL head's attention per slice (scaled to its maximum)"
    svg.text(12, 18, heading, size=12)
    legend_x = 12.0
    for c, name in enumerate(names):
        svg.circle(legend_x + 4, 32, 3.5, CLASS_COLOURS[c % len(CLASS_COLOURS)])
        svg.text(legend_x + 11, 36, f"slice argmax {name}", size=10)
        legend_x += 30 + 6.2 * len(f"slice argmax {name}")
    svg.rect(legend_x, 27, 10, 8, LABELLED_INFECTED)
    svg.text(legend_x + 14, 36, "labelled infected", size=10)
    svg.rect(legend_x + 122, 27, 10, 8, LABELLED_CLEAN)
    svg.text(legend_x + 136, 36, "labelled clean (strip above the panel; none: unknown)", size=10)
    d = report.decisions
    for k, i in enumerate(shown):
        rows_i = np.flatnonzero(report.slice_patient == i)
        n = len(rows_i)
        left = 44 + (k % cols) * (pw + gap_x)
        y0 = top + (k // cols) * (ph + gap_y) + 24
        ax = Axes(svg, left, y0, pw - 44, ph - 56, (-0.5, max(n - 0.5, 0.5)), (0.0, 1.0))
        ax.frame((0, n - 1) if n > 1 else (0,), (0, 0.5, 1), size=9)
        right = report.patient_preds[i] == report.patient_labels[i]
        title = f"{report.patients[i]}: {names[report.patient_labels[i]]}, called {names[report.patient_preds[i]]}"
        svg.text(left, y0 - 12, title, size=10.5, fill="#222" if right else WRONG, weight=None if right else "bold")
        if d is not None and d.window is not None and n:
            _window(ax, n, d.window)
        if report.mil_attention is not None:
            att = report.mil_attention[rows_i]
            if att.max() > 0:
                xs = [ax.x(j) for j in range(n)]
                svg.polyline(xs, [ax.y(a / att.max()) for a in att], stroke="#9467bd", width=1.0, opacity=0.7)
        if d is not None and d.patient_slice_threshold is not None:
            t = d.patient_slice_threshold[i]
            svg.line(ax.left, ax.y(t), ax.left + ax.width, ax.y(t), "#555", 1.0, dash="4 3")
        infected = 1.0 - report.slice_scores[rows_i, normal]
        labels = report.slice_labels[rows_i]
        cell = ax.width / max(n, 1)
        for j, lab in enumerate(labels):
            if lab >= 0:
                colour = LABELLED_CLEAN if lab == normal else LABELLED_INFECTED
                svg.rect(ax.x(j) - cell / 2, ax.top - 7, cell, 5, colour, tip=f"slice {j}: labelled {names[lab]}")
        svg.polyline([ax.x(j) for j in range(n)], [ax.y(v) for v in infected], stroke="#555", width=1.2)
        argmax = report.slice_scores[rows_i].argmax(axis=1)
        for j, v in enumerate(infected):
            svg.circle(
                ax.x(j),
                ax.y(v),
                2.2,
                CLASS_COLOURS[argmax[j] % len(CLASS_COLOURS)],
                tip=f"slice {j}: P(infected) {v:.3f}, argmax {names[argmax[j]]}",
            )
        svg.text(ax.left + ax.width, ax.top + ax.height + 24, "slice (head -> feet)", size=9, anchor="end", fill=MUTED)
    _footer(svg, report.run_name)
    return svg.render("infected probability along each validation patient's series"), len(shown)


def _window(ax: Axes, n: int, window: tuple[int, int]) -> None:
    """Shade weighted_center's voting window (light) and central slices (darker) of an ``n``-slice series."""
    from covidct.patients.voting import central_mask

    for size, opacity in ((window[1], 0.07), (window[0], 0.12)):
        mask = np.flatnonzero(central_mask(n, size))
        x0, x1 = ax.x(mask[0] - 0.5), ax.x(mask[-1] + 0.5)
        ax.svg.rect(x0, ax.top, x1 - x0, ax.height, "#000", opacity)


def training_svg(report: RunReport) -> str | None:
    """Training curves per epoch: train and validation loss (left), validation patient accuracy of the rule
    (right), the best epoch marked. None without at least one epoch."""
    h = [e for e in report.history if "epoch" in e]
    if not h:
        return None
    epochs = np.asarray([e["epoch"] for e in h], dtype=np.float64)

    def series(key: str) -> np.ndarray:
        return np.asarray([e.get(key, np.nan) for e in h], dtype=np.float64)

    svg = Svg(820, 300)
    svg.text(12, 18, f"training curves (vote {report.vote_rule})", size=12)
    xlim = (float(epochs.min()) - 0.3, float(epochs.max()) + 0.3)
    xt = _ticks(float(epochs.min()), float(epochs.max()), min(8, len(epochs)))
    xt = [t for t in xt if float(t).is_integer()] or [float(epochs.min())]
    losses = np.concatenate([series("train_loss"), series("val_loss")])
    finite = losses[np.isfinite(losses)]
    top_loss = float(finite.max()) * 1.08 if finite.size else 1.0
    panels = [
        (
            "loss",
            (0.0, top_loss or 1.0),
            [("train_loss", "train loss", "#1f77b4"), ("val_loss", "val loss", "#ff7f0e")],
        ),
        ("patient accuracy", (0.0, 1.0), [("val_patient_acc", "val patient accuracy", "#2ca02c")]),
    ]
    for p, (ylabel, ylim, lines) in enumerate(panels):
        ax = Axes(svg, 70 + p * 410, 36, 320, 200, xlim, ylim)
        ax.frame(xt, _ticks(*ylim), xlabel="epoch", ylabel=ylabel, fmt="{:g}")
        if report.best_epoch is not None:
            bx = ax.x(report.best_epoch)
            svg.line(bx, ax.top, bx, ax.top + ax.height, "#555", 1.0, dash="4 3")
            right_half = bx > ax.left + ax.width / 2
            svg.text(
                bx - 3 if right_half else bx + 3,
                ax.top + 11,
                f"best epoch {report.best_epoch}",
                size=9.5,
                anchor="end" if right_half else "start",
                fill="#444",
            )
        for j, (key, label, colour) in enumerate(lines):
            v = series(key)
            ok = np.isfinite(v)
            if ok.sum() > 1:
                svg.polyline([ax.x(e) for e in epochs[ok]], [ax.y(y) for y in v[ok]], stroke=colour, width=1.8)
            for e, y in zip(epochs[ok], v[ok], strict=True):
                svg.circle(ax.x(e), ax.y(y), 2.8, colour, tip=f"epoch {int(e)}: {label} {y:.4f}")
            lx, ly = ax.left + 8 + 150 * j, ax.top + ax.height + 48
            svg.line(lx, ly - 4, lx + 16, ly - 4, colour, 2)
            svg.text(lx + 20, ly, label, size=10)
    _footer(svg, report.run_name)
    return svg.render("training curves")


def reliability_svg(scored: Scored, run_name: str, temperature: float) -> str | None:
    """Reliability diagrams before and after temperature scaling, slices (left) and patients (right): per
    confidence bin the accuracy (bars: grey before, blue after), the diagonal a calibrated model follows."""
    panels = [("slices", scored.slice_reliability), ("patients (mean probability)", scored.patient_reliability)]
    panels = [(name, rel) for name, rel in panels if rel is not None]
    if not panels:
        return None
    svg = Svg(40 + 410 * len(panels), 330)
    svg.text(12, 18, f"reliability before and after temperature scaling (T = {temperature:.3f})", size=12)
    for p, (name, (before, after)) in enumerate(panels):
        ax = Axes(svg, 70 + p * 410, 50, 300, 210, (0.0, 1.0), (0.0, 1.0))
        ax.frame(_ticks(0, 1), _ticks(0, 1), xlabel=f"confidence (top class), {name}", ylabel="accuracy")
        svg.line(ax.x(0), ax.y(0), ax.x(1), ax.y(1), "#999", 1.0, dash="4 3")
        width = ax.width / RELIABILITY_BINS
        for rel, colour, opacity, shift in ((before, "#999", 0.55, 0.0), (after, "#1f77b4", 0.75, 0.5)):
            for b in range(len(rel.count)):
                if rel.count[b]:
                    x = ax.x(min(b, RELIABILITY_BINS - 1) / RELIABILITY_BINS) + shift * width
                    tip = (
                        f"{'after' if shift else 'before'}: {rel.count[b]} in bin {b}, mean confidence "
                        f"{rel.confidence[b]:.3f}, accuracy {rel.accuracy[b]:.3f}"
                    )
                    svg.rect(x, ax.y(rel.accuracy[b]), width / 2, ax.y(0) - ax.y(rel.accuracy[b]), colour, opacity, tip)
        svg.rect(ax.left, ax.top - 14, 10, 8, "#999", 0.55)
        svg.text(ax.left + 14, ax.top - 6, f"before: ECE {before.ece:.3f}", size=10)
        svg.rect(ax.left + 130, ax.top - 14, 10, 8, "#1f77b4", 0.75)
        svg.text(ax.left + 144, ax.top - 6, f"after: ECE {after.ece:.3f}", size=10)
    _footer(svg, run_name)
    return svg.render("reliability diagram before and after temperature scaling")


# ---- HTML ---------------------------------------------------------------------------------------------------

STYLE = """body{font-family:sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.45em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0}.wrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}th{background:#f2f2f2;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.t{text-align:left}
td.long{min-width:22em}
tr.wrong{background:#fde2e2}tr.marked{font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}.figs img,svg{max-width:100%;height:auto}
figcaption{font-size:.88em;color:#444;max-width:900px}code{background:#f5f5f5;padding:0 3px}"""


def fmt(value: object) -> str:
    """A cell's text: floats to 3 decimals (n/a for NaN), bools yes/no, anything else as ``str``."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return "n/a" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _cell_class(value: object) -> str:
    """``n`` (a number: right-aligned), ``t`` (text: left-aligned) or ``t long`` (a sentence, such as the
    patient table's "why": kept wide enough to read instead of wrapping a word per line)."""
    if _is_number(value):
        return "n"
    return "t long" if len(fmt(value)) > 40 else "t"


def html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    classes: Sequence[str] = (),
    wrap: bool = False,
) -> str:
    """A table: numbers right-aligned (class ``n``), text left-aligned (class ``t``), all escaped; ``classes``
    per row; ``wrap``: inside a horizontally scrolling box (wide tables on narrow windows)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        (f'<tr class="{cls}">' if cls else "<tr>")
        + "".join(f'<td class="{_cell_class(v)}">{html.escape(fmt(v))}</td>' for v in row)
        + "</tr>"
        for row, cls in zip(rows, list(classes) or [""] * len(rows), strict=True)
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="wrap">{table}</div>' if wrap else table


def patient_table(report: RunReport) -> tuple[list[str], list[list[object]]]:
    """Header and one row per patient: id, true class, call, why, the rule's quantity and the threshold that
    decided it (and the threshold rule's slice threshold), slices, every rule's reported vote, mean
    probability per class."""
    names, d = list(report.class_names), report.decisions
    header = ["patient", "true class", "called", "correct"]
    if d is not None:
        header += ["why", d.quantity_name, d.threshold_name]
        if d.patient_slice_threshold is not None:
            header.append("slice threshold")
    rules = list(report.rule_votes)
    header += ["slices", *[f"{r} vote" for r in rules], *[f"mean P({n})" for n in names]]
    rows = []
    for i, (pid, t, p) in enumerate(zip(report.patients, report.patient_labels, report.patient_preds, strict=True)):
        row: list[object] = [pid, names[t], names[p], bool(t == p)]
        if d is not None:
            row += [d.why[i], float(d.quantity[i]), float(d.threshold[i])]
            if d.patient_slice_threshold is not None:
                row.append(float(d.patient_slice_threshold[i]))
        row += [int(report.n_slices[i]), *[names[report.rule_votes[r][i]] for r in rules]]
        row += [float(s) for s in np.asarray(report.patient_scores[i], dtype=np.float64)]
        rows.append(row)
    return header, rows


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _figure(content: str, caption: str) -> str:
    return f"<figure>{content}<figcaption>{html.escape(caption)}</figcaption></figure>"


@dataclass
class Page:
    """The rendered figures of a report: PNGs and SVGs by file name, with their captions."""

    pngs: dict[str, bytes]
    svgs: dict[str, str]
    captions: dict[str, str]
    series_shown: int


def render_figures(report: RunReport, scored: Scored, pngs: dict[str, bytes] | None = None) -> Page:
    """Every figure of the report, and its caption (what it shows, for the page and for W&B). ``pngs``: the
    PNGs already rendered (they name no patient), reused instead of drawn again."""
    c, d = report.class_names, report.decisions
    n_patients = len(report.patient_labels)
    n_slices = int((np.asarray(report.slice_labels) >= 0).sum())
    scores_name = d.scores_name if d is not None else "not recorded"
    captions = {
        "confusion_matrix.png": f"Confusion matrix of the {n_patients} validation patients, vote {report.vote_rule} "
        f"(rows: true class, columns: call), best epoch {report.best_epoch_text}.",
        "roc_patient.png": f"Patient ROC, one class against the others. Left: scored by the rule's own scores "
        f"({report.vote_rule}: {scores_name}), what the calls are made from. Right: scored by the mean slice "
        "probability, for comparison.",
        "roc_slice.png": f"Slice ROC of the {n_slices} validation slices with a known class (slices of unknown "
        "class left out), scored by each slice's probability.",
    }
    pngs = pngs or {
        "confusion_matrix.png": confusion_png(
            report.patient_labels,
            report.patient_preds,
            c,
            f"Patients ({report.vote_rule} vote), n={n_patients}",
            report.run_name,
        ),
        "roc_patient.png": patient_roc_png(
            scored.rule_roc,
            scored.mean_roc,
            c,
            f"Patients by the rule's scores ({report.vote_rule}), n={n_patients}",
            f"Patients by mean slice probability, n={n_patients}",
            report.run_name,
        ),
        "roc_slice.png": roc_png(scored.slice_roc, c, f"Slices, n={n_slices}", report.run_name),
    }
    svgs: dict[str, str] = {}
    decision = decision_svg(report)
    if decision is not None:
        svgs["decision.svg"] = decision
        captions["decision.svg"] = (
            f"Each validation patient's {d.quantity_name}, the quantity vote {report.vote_rule} decides on, by "
            f"true class; above the dashed line ({d.threshold_name} {d.threshold_all:.3f}, tuned on or fixed "
            "for all validation patients) a patient is called sick. Dark: called right; red: called wrong, with "
            "its call. Hover a dot for its figures."
        )
    series = series_svg(report)
    shown = 0
    if series is not None:
        svgs["series.svg"], shown = series
        more = len(report.patients) - shown
        captions["series.svg"] = (
            f"Infected probability 1 - P(Normal) of every slice along each patient's series, head left, feet "
            f"right; dots coloured by the slice's argmax class; strip above: the radiologist's slice labels "
            f"where known (dark: infected, light: clean; none: unknown). {shown} of {len(report.patients)} "
            "validation patients"
            + (
                f" shown (the first {shown}: misclassified first, then by class; {more} more in patients.csv)."
                if more
                else "."
            )
            + (
                " Dashed: the slice threshold that decided the patient."
                if d is not None and d.slice_threshold is not None
                else ""
            )
            + (
                " Purple: the MIL head's attention per slice (scaled to its maximum)."
                if report.mil_attention is not None
                else ""
            )
            + (
                " Shaded: the weighted_center voting window and its central slices."
                if report.vote_rule == "weighted_center"
                else ""
            )
        )
    training = training_svg(report)
    if training is not None:
        svgs["training.svg"] = training
        captions["training.svg"] = (
            "Train loss (mean over the epoch's batches), validation slice loss (slices with a known class) and "
            f"validation patient accuracy of vote {report.vote_rule} per epoch; dashed: the best epoch "
            f"({report.best_epoch_text}), the one this report shows."
        )
    if report.calibration is not None and report.calibration.fitted:
        rel = reliability_svg(scored, report.run_name, report.calibration.temperature)
        if rel is not None:
            svgs["reliability.svg"] = rel
            captions["reliability.svg"] = (
                f"Reliability of the top-class probability in {RELIABILITY_BINS} equal-width confidence bins "
                f"(the bins of the ECE), before and after dividing the logits by T = "
                f"{report.calibration.temperature:.3f}: slices with a known class (left) and patients' mean "
                "probabilities against their class (right). A calibrated model's bars reach the diagonal."
            )
    return Page(pngs, svgs, captions, shown)


def render_html(report: RunReport, scored: Scored, page: Page, links: bool = True) -> str:
    """The whole report as one HTML page: PNGs inlined as data URIs, SVGs inline. ``links``: the run
    folder's files (checkpoint, patients.csv, metrics.json, log) as relative links (off for a copy that
    leaves the run folder, e.g. W&B)."""
    names, d, m = list(report.class_names), report.decisions, scored.metrics
    header, rows = patient_table(report)
    wrong = ["" if row[3] else "wrong" for row in rows]
    title = report.heading
    out = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">run {html.escape(report.run_name)}; validation patients of the best epoch '
        f"({html.escape(report.best_epoch_text)}): {len(rows)} patients, {len(report.slice_labels)} slices</p>",
    ]
    if links and report.links:
        items = " · ".join(
            f'<a href="{html.escape(path)}">{html.escape(label)}</a>' for label, path in report.links.items()
        )
        out.append(f"<p>Files: {items}</p>")
    if report.note:
        out.append(f"<p>{html.escape(report.note)}</p>")
    key = [
        [f"patient accuracy (vote {report.vote_rule})", m["patient accuracy"]],
        ["patient macro F1", m["patient macro F1"]],
        [
            f"patient AUC (macro), by the rule's scores: {d.scores_name if d else 'not recorded'}",
            m["patient AUC (macro), rule scores"],
        ],
        ["patient AUC (macro), by mean slice probability", m["patient AUC (macro), mean probability"]],
        ["slice AUC (macro)", m["slice AUC (macro)"]],
        *[[k, v] for k, v in report.extra_metrics.items()],
    ]
    out.append(f"<h2>Key metrics</h2>{html_table(['metric', 'value'], key)}")
    out.append("<h2>How the patients were called</h2>")
    if d is not None:
        out.append(
            f"<p>Vote <b>{html.escape(report.vote_rule)}</b>: a patient is called sick when its "
            f"<b>{html.escape(d.quantity_name)}</b> is above the <b>{html.escape(d.threshold_name)}</b>; "
            f"{html.escape(d.parameters)}. The patient table gives each patient's figures and why.</p>"
        )
    for name in ("decision.svg", "series.svg"):
        if name in page.svgs:
            out.append(_figure(page.svgs[name], page.captions[name]))
    out.append(
        "<h2>Patients</h2><p>One row per validation patient (red: called wrong). The same rows, with every "
        "figure to 4 decimals, are in <code>patients.csv</code>.</p>"
    )
    out.append(html_table(header, rows, wrong, wrap=True))
    sens, spec = class_rates(report)
    counts = np.bincount(report.patient_labels, minlength=len(names))
    out.append(
        f"<h2>Per class (vote {html.escape(report.vote_rule)})</h2>"
        + html_table(
            ["class", "patients", "sensitivity", "specificity"],
            [[n, int(counts[k]), float(sens[k]), float(spec[k])] for k, n in enumerate(names)],
        )
    )
    if report.rules is not None:
        rh, rr = report.rules
        marked = ["marked" if r[0] == report.vote_rule else "" for r in rr]
        out.append(
            "<h2>Vote rules compared</h2><p>Every rule on the same slice probabilities (bold: the configured rule). "
            "Tuned rules (infected_fraction, threshold) are scored leave-one-patient-out, mil cross-fitted.</p>"
            + html_table(rh, rr, marked, wrap=True)
        )
    auc_rows = [
        [
            f"patients, by the rule's scores ({d.scores_name if d else 'not recorded'})",
            m["patient AUC (macro), rule scores"],
            *[m[f"patient AUC {n}, rule scores"] for n in names],
        ],
        [
            "patients, by mean slice probability",
            m["patient AUC (macro), mean probability"],
            *[m[f"patient AUC {n}, mean probability"] for n in names],
        ],
        ["slices", m["slice AUC (macro)"], *[m[f"slice AUC {n}"] for n in names]],
    ]
    out.append("<h2>ROC and confusion matrix</h2>" + html_table(["AUC, scored by", "macro", *names], auc_rows))
    figs = "".join(_figure(_img(png, name), page.captions[name]) for name, png in page.pngs.items())
    out.append(f'<div class="figs">{figs}</div>')
    out.append("<h2>Calibration</h2>")
    cal = report.calibration
    if cal is None:
        out.append("<p>Not recorded.</p>")
    elif not cal.fitted:
        out.append(
            "<p>No temperature was fitted (<code>calibration=false</code>): the probabilities are the raw ones.</p>"
        )
    else:
        cal_rows = [
            ["slices with a known class", m["slice ECE before calibration"], m["slice ECE after calibration"]],
            *(
                [
                    [
                        "patients (mean probability)",
                        m["patient ECE before calibration"],
                        m["patient ECE after calibration"],
                    ]
                ]
                if "patient ECE before calibration" in m
                else []
            ),
        ]
        out.append(
            f"<p>Temperature T = {cal.temperature:.3f} fitted on the validation slices with a known class "
            "(the logits are divided by T; no slice's argmax changes). Expected calibration error (top class, "
            f"{RELIABILITY_BINS} bins):</p>" + html_table(["level", "ECE before", "ECE after"], cal_rows)
        )
        if "reliability.svg" in page.svgs:
            out.append(_figure(page.svgs["reliability.svg"], page.captions["reliability.svg"]))
    out.append("<h2>Training</h2>")
    if "training.svg" in page.svgs:
        out.append(_figure(page.svgs["training.svg"], page.captions["training.svg"]))
    else:
        out.append("<p>No per-epoch values recorded.</p>")
    if report.data is not None:
        out.append("<h2>Data</h2>" + html_table(*report.data, wrap=True))
        if report.data_note:
            out.append(f"<p>{html.escape(report.data_note)}</p>")
    if report.config:
        out.append(
            "<h2>Run configuration</h2>" + html_table(["setting", "value"], list(report.config.items()), wrap=True)
        )
    out.append("</body></html>")
    return "".join(out)


@dataclass
class WrittenReport:
    """What :func:`write_report` wrote: file paths, the metrics, the figures (PNG bytes and SVG text by file
    name) with their captions, the HTML text, and what it was computed from."""

    paths: dict[str, Path]
    metrics: dict[str, float]
    images: dict[str, bytes]
    svgs: dict[str, str]
    captions: dict[str, str]
    html: str
    scored: Scored
    page: Page


def write_report(report: RunReport, out_dir: str | Path) -> WrittenReport:
    """Write the figures (``confusion_matrix.png``, ``roc_patient.png``, ``roc_slice.png``, and as SVG
    ``decision.svg``, ``series.svg``, ``training.svg``, ``reliability.svg`` where there is something to draw)
    and ``report.html`` into ``out_dir``, each atomically. The per-patient table is ``patients.csv``, which
    the patient vote writes; the page links to it."""
    out_dir = Path(out_dir)
    scored = score(report)
    page = render_figures(report, scored)
    paths = {name: atomic_write_bytes(out_dir / name, png) for name, png in page.pngs.items()}
    paths |= {name: atomic_write_text(out_dir / name, svg) for name, svg in page.svgs.items()}
    text = render_html(report, scored, page)
    paths["report.html"] = atomic_write_text(out_dir / "report.html", text)
    return WrittenReport(paths, scored.metrics, page.pngs, page.svgs, page.captions, text, scored, page)
