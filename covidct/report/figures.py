"""Every figure of the run report, drawn with matplotlib, and its caption (:func:`render_figures`).

The standard figures (confusion matrix, ROC curves) are PNG files shown as images; the training curves and the
reliability diagram here and the per-patient figures (:mod:`~.patient_figures`) are SVG inlined in the page
(:mod:`~.svg`), with a hover text on each epoch, bin, patient and slice.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay
from torchmetrics.functional.classification import multiclass_confusion_matrix

from covidct.report.metrics import RELIABILITY_BINS, Reliability, Roc, RunReport, Scored
from covidct.report.patient_figures import decision_caption, decision_svg, series_caption, series_figure
from covidct.report.svg import MIN_TEXT_PX, SvgFigure, canvas, footer, heading, svg_style

#: PNG resolution
DPI = 120
#: the smallest font of a PNG figure, pt (smaller texts are raised to it): at 1:1, 13.3 px at :data:`DPI`
PNG_MIN_FONT_PT = 8.0


# ---- PNG figures ----------------------------------------------------------------------------------------


def _png(fig: plt.Figure, run_name: str) -> bytes:
    """PNG bytes of ``fig`` at :data:`DPI`, its run name in the corner, no text under :data:`PNG_MIN_FONT_PT`."""
    footer(fig, run_name)
    for text in fig.findobj(Text):
        text.set_fontsize(max(text.get_fontsize(), PNG_MIN_FONT_PT))
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


# ---- training curves, reliability ---------------------------------------------------------------------------


@svg_style
def training_svg(report: RunReport) -> str | None:
    """Training curves per epoch: train and validation loss (left), validation patient accuracy of the rule
    (right), the best epoch marked. None without at least one epoch."""
    h = [e for e in report.history if "epoch" in e]
    if not h:
        return None
    epochs = np.asarray([e["epoch"] for e in h], dtype=np.float64)
    curve = {
        k: np.asarray([e.get(k, np.nan) for e in h], dtype=np.float64)
        for k in ("train_loss", "val_loss", "val_patient_acc")
    }
    losses = np.concatenate([curve["train_loss"], curve["val_loss"]])
    top_loss = float(losses[np.isfinite(losses)].max(initial=0.0)) * 1.08 or 1.0
    panels = [
        ("loss", top_loss, [("train_loss", "train loss", "#1f77b4"), ("val_loss", "val loss", "#ff7f0e")]),
        ("patient accuracy", 1.0, [("val_patient_acc", "val patient accuracy", "#2ca02c")]),
    ]
    fig, axes = canvas(820, 300, (70, 36, 40, 84), ncols=2)
    fig.subplots_adjust(wspace=90 / 320)
    svg = SvgFigure(fig, "training curves")
    heading(fig, f"training curves (vote {report.vote_rule})")
    for ax, (ylabel, top, lines) in zip(axes.flat, panels, strict=True):
        ax.set(xlim=(epochs.min() - 0.3, epochs.max() + 0.3), ylim=(0.0, top), xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.grid(axis="y", color="#eee")
        _best_epoch(ax, report.best_epoch)
        for key, label, colour in lines:
            ok = np.isfinite(curve[key])
            ax.plot(epochs[ok], curve[key][ok], color=colour, lw=1.8, label=label)
            dots = ax.scatter(epochs[ok], curve[key][ok], s=12, color=colour, zorder=3)
            svg.mark(
                dots,
                "epochs",
                [f"epoch {int(e)}: {label} {y:.4f}" for e, y in zip(epochs[ok], curve[key][ok], strict=True)],
            )
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.24), ncol=2, frameon=False)
    return svg.render(report.run_name)


def _best_epoch(ax: plt.Axes, best: int | None) -> None:
    if best is None:
        return
    ax.axvline(best, color="#555", lw=1.0, ls=(0, (4, 3)))
    right_half = best > sum(ax.get_xlim()) / 2
    ax.annotate(
        f"best epoch {best}",
        (best, 1),
        xycoords=("data", "axes fraction"),
        xytext=(-3 if right_half else 3, -4),
        textcoords="offset points",
        ha="right" if right_half else "left",
        va="top",
        color="#444",
    )


@svg_style
def reliability_svg(scored: Scored, run_name: str, temperature: float) -> str | None:
    """Reliability diagrams before and after temperature scaling, slices (left) and patients (right): per
    confidence bin the accuracy (bars: grey before, blue after), the diagonal a calibrated model follows."""
    panels = [("slices", scored.slice_reliability), ("patients (mean probability)", scored.patient_reliability)]
    panels = [(name, rel) for name, rel in panels if rel is not None]
    if not panels:
        return None
    fig, axes = canvas(40 + 410 * len(panels), 310, (70, 50, 70, 50), ncols=len(panels))
    fig.subplots_adjust(wspace=110 / 300)
    svg = SvgFigure(fig, "reliability diagram before and after temperature scaling")
    heading(fig, f"reliability before and after temperature scaling (T = {temperature:.3f})")
    for ax, (name, pair) in zip(axes.flat, panels, strict=True):
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"confidence (top class), {name}", ylabel="accuracy")
        ax.grid(color="#eee")
        ax.set_axisbelow(True)
        ax.plot([0, 1], [0, 1], color="#999", lw=1.0, ls=(0, (4, 3)))
        for rel, when, colour, alpha, shift in zip(
            pair, ("before", "after"), ("#999", "#1f77b4"), (0.55, 0.75), (0, 0.5), strict=True
        ):
            _bins(svg, ax, rel, when, colour, alpha, shift)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=2, frameon=False, borderaxespad=0.2)
    return svg.render(run_name)


def _bins(svg: SvgFigure, ax: plt.Axes, rel: Reliability, when: str, colour: str, alpha: float, shift: float) -> None:
    """One bar per non-empty bin at its accuracy, half a bin wide (``shift``: 0 left half, 0.5 right half)."""
    width = 1 / RELIABILITY_BINS
    bins = np.flatnonzero(rel.count)
    left = np.minimum(bins, RELIABILITY_BINS - 1) * width + shift * width
    bars = ax.bar(
        left, rel.accuracy[bins], width / 2, align="edge", color=colour, alpha=alpha, label=f"{when}: ECE {rel.ece:.3f}"
    )
    for bar, b in zip(bars, bins, strict=True):
        tip = f"{when}: {rel.count[b]} in bin {b}, mean confidence {rel.confidence[b]:.3f}, "
        svg.mark(bar, f"bin {when}", [tip + f"accuracy {rel.accuracy[b]:.3f}"])


# ---- every figure, with its caption -------------------------------------------------------------------------


@dataclass
class Figures:
    """The rendered figures of a report: PNG bytes and SVG text by file name, their captions (what each shows,
    for the page and for W&B), how many patients the series figure shows and its panels one ``<svg>`` each
    (the page's grid)."""

    pngs: dict[str, bytes]
    svgs: dict[str, str]
    captions: dict[str, str]
    series_shown: int
    series_panels: list[str]

    def png_min_widths(self) -> dict[str, int]:
        """File name -> the narrowest CSS px width a PNG may be shown at with no text under 10 px."""
        return {name: png_min_width(png) for name, png in self.pngs.items()}


def png_min_width(png: bytes) -> int:
    """The narrowest width (CSS px) a PNG figure of :func:`_png` may be scaled to with no text under
    :data:`~.svg.MIN_TEXT_PX`: its width (read from the PNG header) times that over its smallest font in px."""
    width = struct.unpack(">I", png[16:20])[0]  # IHDR, right after the 8-byte signature and the chunk head
    return math.ceil(width * MIN_TEXT_PX / (PNG_MIN_FONT_PT * DPI / 72))


def render_figures(report: RunReport, scored: Scored, pngs: dict[str, bytes] | None = None) -> Figures:
    """Every figure of the report, and its caption. ``pngs``: the PNGs already rendered (they name no
    patient), reused instead of drawn again."""
    captions = png_captions(report)
    svgs: dict[str, str] = {}
    decision = decision_svg(report)
    if decision is not None:
        svgs["decision.svg"], captions["decision.svg"] = decision, decision_caption(report)
    series = series_figure(report)
    if series is not None:
        svgs["series.svg"], captions["series.svg"] = series.svg, series_caption(report, series.shown)
    training = training_svg(report)
    if training is not None:
        svgs["training.svg"] = training
        captions["training.svg"] = (
            "Train loss (mean over the epoch's batches), validation slice loss (slices with a known class) and "
            f"validation patient accuracy of vote {report.vote_rule} per epoch; dashed: the best epoch "
            f"({report.best_epoch_text}), the one this report shows."
        )
    cal = report.calibration
    rel = reliability_svg(scored, report.run_name, cal.temperature) if cal is not None and cal.fitted else None
    if rel is not None:
        svgs["reliability.svg"] = rel
        captions["reliability.svg"] = (
            f"Reliability of the top-class probability in {RELIABILITY_BINS} equal-width confidence bins "
            f"(the bins of the ECE), before and after dividing the logits by T = {cal.temperature:.3f}: slices "
            "with a known class (left) and patients' mean probabilities against their class (right). A "
            "calibrated model's bars reach the diagonal."
        )
    shown, panels = (series.shown, series.panels) if series is not None else (0, [])
    return Figures(pngs or render_pngs(report, scored), svgs, captions, shown, panels)


def render_pngs(report: RunReport, scored: Scored) -> dict[str, bytes]:
    """``confusion_matrix.png``, ``roc_patient.png`` and ``roc_slice.png`` (bytes)."""
    c, n_patients, n_slices = report.class_names, len(report.patient_labels), _known_slices(report)
    return {
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


def _known_slices(report: RunReport) -> int:
    return int((np.asarray(report.slice_labels) >= 0).sum())


def png_captions(report: RunReport) -> dict[str, str]:
    """The captions of the PNG figures, by file name."""
    scores_name = report.decisions.scores_name if report.decisions is not None else "not recorded"
    return {
        "confusion_matrix.png": f"Confusion matrix of the {len(report.patient_labels)} validation patients, vote "
        f"{report.vote_rule} (rows: true class, columns: call), best epoch {report.best_epoch_text}.",
        "roc_patient.png": f"Patient ROC, one class against the others. Left: scored by the rule's own scores "
        f"({report.vote_rule}: {scores_name}), what the calls are made from. Right: scored by the mean slice "
        "probability, for comparison.",
        "roc_slice.png": f"Slice ROC of the {_known_slices(report)} validation slices with a known class (slices of "
        "unknown class left out), scored by each slice's probability.",
    }
