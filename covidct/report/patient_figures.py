"""The per-patient figures of the run report (inline SVG, :mod:`~.svg`), and their captions: the decision plot
(each validation patient's decision quantity against the rule's threshold) and the series small multiples (each
patient's infected probability along its series, with the radiologist's slice labels, thresholds, voting window
and MIL attention): one SVG per patient, which the page lays out in a grid that reflows with the window, and all
of them in one figure for ``series.svg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text

from covidct.report.metrics import RunReport
from covidct.report.svg import PX, SvgFigure, canvas, heading, stack_svgs, svg_style

if TYPE_CHECKING:
    from covidct.patients.explanations import PatientDecisions

#: validation patients drawn in the series small multiples (misclassified first); the caption says how many
MAX_SERIES_PANELS = 24
NORMAL = "Normal"
CLASS_COLOURS = ("#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd")  # COVID-19, CAP, Normal, ...
WRONG, RIGHT, MUTED = "#d0021b", "#34495e", "#888"
LABELLED_INFECTED, LABELLED_CLEAN = "#333333", "#cccccc"


# ---- the decision plot ----------------------------------------------------------------------------------


@svg_style
def decision_svg(report: RunReport) -> str | None:
    """Each validation patient's decision quantity (y) by true class (x), dark if called right, red if
    wrong (with its id), the threshold tuned on all patients as a line and, where a patient was decided by
    its own (leave-one-out) threshold, that threshold as a short dash beside it. None without quantities."""
    d = report.decisions
    if d is None or np.isnan(d.quantity).all():
        return None
    names, q = list(report.class_names), d.quantity
    lo, hi = (0.0, 1.0) if d.rule in ("infected_fraction", "threshold") else _span(d)
    pad = (hi - lo) * 0.06
    fig, axes = canvas(150 + 150 * len(names), 330, (70, 34, 80, 66))
    ax, svg = axes[0, 0], SvgFigure(fig, f"{d.quantity_name} by true class, threshold drawn")
    ax.set(xlim=(-0.5, len(names) - 0.5), ylim=(lo - pad, hi + pad), xlabel="true class", ylabel=d.quantity_name)
    ax.set_xticks(range(len(names)), names)
    ax.grid(axis="y", color="#eee")
    ax.set_axisbelow(True)
    heading(fig, f"{d.quantity_name} per validation patient (vote {d.rule}), by true class")
    _threshold_line(ax, d)
    order, x = _positions(report)
    own = not np.allclose(d.threshold, d.threshold_all)
    if own:
        ax.scatter(x, d.threshold[order], marker="_", s=120, color="#777", linewidths=1.5, zorder=2)
    right = report.patient_preds[order] == report.patient_labels[order]
    dots = ax.scatter(x, q[order], s=28, c=[RIGHT if r else WRONG for r in right], edgecolors="#fff", zorder=3)
    svg.mark(dots, "patients", [_patient_tip(report, i) for i in order])
    wrong = [
        (xi, q[i], f"{report.patients[i]} -> {names[report.patient_preds[i]]}")
        for xi, i, r in zip(x, order, right, strict=True)
        if not r
    ]
    _wrong_labels(ax, wrong)
    legend = "dark: called right, red: called wrong (id -> call)"
    if own:
        legend += "; short dash: the patient's own leave-one-out threshold"
    fig.text(70 * PX / fig.get_figwidth(), 14 * PX / fig.get_figheight(), legend, color="#444")
    return svg.render(report.run_name)


def _span(d: PatientDecisions) -> tuple[float, float]:
    """(low, high) y range of a sick margin: every quantity and threshold, at least [-0.1, 0.1]."""
    q, t = d.quantity, d.threshold
    values = np.concatenate([q[~np.isnan(q)], t[~np.isnan(t)], [d.threshold_all]])
    return min(-0.1, float(values.min())), max(0.1, float(values.max()))


def _threshold_line(ax: plt.Axes, d: PatientDecisions) -> None:
    """The threshold tuned on (or fixed for) all patients, dashed and named, with which side is sick."""
    ax.axhline(d.threshold_all, color="#555", lw=1.2, ls=(0, (5, 2.5)))
    ax.annotate(
        f"{d.threshold_name} {d.threshold_all:.3f}",
        (1, d.threshold_all),
        xycoords=("axes fraction", "data"),
        xytext=(3, 0),
        textcoords="offset points",
        va="center",
    )
    line_at = ax.transAxes.inverted().transform(ax.transData.transform((0, d.threshold_all)))[1]
    for y, hint in ((0.96, "sick"), (0.02, NORMAL)):
        if abs(y - line_at) > 0.07:  # not over the threshold's label
            ax.text(1.0, y, f" {hint}", transform=ax.transAxes, color=MUTED, va="center")


def _positions(report: RunReport) -> tuple[np.ndarray, np.ndarray]:
    """(patients with a quantity, int (M,); their x, float (M,)): by true class, within a class by quantity,
    spread over the class's x +- 0.25."""
    q, order, x = report.decisions.quantity, [], []
    for c in range(len(report.class_names)):
        members = np.flatnonzero((report.patient_labels == c) & ~np.isnan(q))
        order += list(members[np.argsort(q[members], kind="stable")])
        x += [c + (0.0 if len(members) == 1 else (j / (len(members) - 1) - 0.5) * 0.5) for j in range(len(members))]
    return np.asarray(order, dtype=np.int64), np.asarray(x, dtype=np.float64)


def _patient_tip(report: RunReport, i: int) -> str:
    d, names = report.decisions, list(report.class_names)
    return (
        f"{report.patients[i]}: true {names[report.patient_labels[i]]}, called {names[report.patient_preds[i]]}; "
        f"{d.quantity_name} {d.quantity[i]:.3f}, {d.threshold_name} {d.threshold[i]:.3f}"
    )


def _wrong_labels(ax: plt.Axes, labels: list[tuple[float, float, str]]) -> None:
    """Write each (x, y, text) right of its dot, moved up until it sits on no label written before."""
    to_px = 96 / ax.figure.dpi  # display units -> CSS pixels
    placed: list[tuple[float, float]] = []
    points = [(*(ax.transData.transform((x, y)) * to_px), x, y, t) for x, y, t in labels]
    for px, py, x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        lift = 0.0
        while any(abs(px - qx) < 6.0 * len(text) and abs(py + lift - qy) < 12 for qx, qy in placed):
            lift += 12
        placed.append((px, py + lift))
        ax.annotate(
            text,
            (x, y),
            xytext=(5, lift * 0.75),
            textcoords="offset points",
            va="center",
            color=WRONG,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 0.3},
        )


# ---- the series small multiples ---------------------------------------------------------------------------


def series_order(report: RunReport) -> list[int]:
    """Patients in the series small multiples: misclassified first, then by true class, then by id."""
    wrong = report.patient_preds != report.patient_labels
    return sorted(
        range(len(report.patients)), key=lambda i: (not wrong[i], report.patient_labels[i], report.patients[i])
    )


#: one patient's panel of the series small multiples, CSS px: (width, height), and the plot area's (left, top,
#: right, bottom) margins: a 206 x 94 px plot area
SERIES_PANEL, SERIES_BOX = (268, 166), (44, 40, 18, 32)
#: the series figure's heading and legend band (series.svg), CSS px high
SERIES_HEAD = 70


@dataclass
class Series:
    """The series small multiples: ``panels``, one ``<svg>`` per patient shown (the page lays them out in a
    grid that reflows with the window), ``svg`` all of them in one figure under its heading and legend
    (``series.svg``), ``shown`` the number of patients drawn."""

    panels: list[str]
    svg: str
    shown: int


def series_figure(report: RunReport, max_panels: int | None = None) -> Series | None:
    """Small multiples, one panel per validation patient (at most ``max_panels``, default
    :data:`MAX_SERIES_PANELS`, in :func:`series_order`): the infected probability 1 - P(Normal) of each slice
    along the series (head left, feet right), dots coloured by the slice's argmax class, the radiologist's
    slice labels where known as a strip above (dark infected, light clean), the threshold rule's slice
    threshold, ``weighted_center``'s voting window and the MIL attention where recorded. None without
    ``slice_patient``."""
    if report.slice_patient is None or not len(report.patients):
        return None
    shown = series_order(report)[: MAX_SERIES_PANELS if max_panels is None else max_panels]
    normal = _normal_class(report)
    panels = [series_panel_svg(report, i, normal) for i in shown]
    cols = min(4, len(shown))
    head = series_head_svg(report, 4 * SERIES_PANEL[0])  # the legend's width, whatever the columns
    combined = stack_svgs(head, panels, cols, "infected probability along each validation patient's series")
    return Series(panels, combined, len(shown))


def series_svg(report: RunReport, max_panels: int | None = None) -> tuple[str, int] | None:
    """(``series.svg``, patients drawn) of :func:`series_figure`; None without ``slice_patient``."""
    series = series_figure(report, max_panels)
    return None if series is None else (series.svg, series.shown)


def series_title(report: RunReport) -> str:
    title = "infected probability 1 - P(Normal) along each validation patient's series"
    if report.mil_attention is not None:
        title += "; purple: the MIL head's attention per slice (scaled to its maximum)"
    return title


def series_legend(report: RunReport) -> list[tuple[str, str, str]]:
    """(shape ``dot`` or ``bar``, colour, text) of each key of the series figure, for the page's legend."""
    dots = [
        ("dot", CLASS_COLOURS[c % len(CLASS_COLOURS)], f"slice argmax {n}") for c, n in enumerate(report.class_names)
    ]
    return dots + [
        ("bar", LABELLED_INFECTED, "labelled infected"),
        ("bar", LABELLED_CLEAN, "labelled clean (strip above the panel; none: unknown)"),
    ]


@svg_style
def series_panel_svg(report: RunReport, i: int, normal: int) -> str:
    """Patient ``i``'s panel of the series small multiples as an ``<svg>`` of :data:`SERIES_PANEL` px."""
    fig, axes = canvas(*SERIES_PANEL, SERIES_BOX)
    svg = SvgFigure(fig, f"{report.patients[i]}: infected probability along the series")
    _series_panel(svg, axes[0, 0], report, i, normal)
    return svg.render("")


@svg_style
def series_head_svg(report: RunReport, width: float) -> str:
    """The heading and legend band over the panels in ``series.svg``, ``width`` px wide, the run's name."""
    fig = plt.figure(figsize=(width * PX, SERIES_HEAD * PX))
    svg = SvgFigure(fig, "series figure heading and legend")
    heading(fig, series_title(report))
    _series_legend(fig, list(report.class_names))
    return svg.render(report.run_name)


def _normal_class(report: RunReport) -> int:
    names = list(report.class_names)
    return names.index(NORMAL) if NORMAL in names else len(names) - 1


def _series_legend(fig: plt.Figure, names: list[str]) -> None:
    dots = [
        Line2D([], [], ls="", marker="o", ms=5, color=CLASS_COLOURS[c % len(CLASS_COLOURS)], label=f"slice argmax {n}")
        for c, n in enumerate(names)
    ]
    strip = [
        Patch(color=LABELLED_INFECTED, label="labelled infected"),
        Patch(color=LABELLED_CLEAN, label="labelled clean (strip above the panel; none: unknown)"),
    ]
    top = 1 - 24 * PX / fig.get_figheight()
    fig.legend(
        handles=dots + strip,
        loc="upper left",
        bbox_to_anchor=(0, top),
        ncol=len(dots) + 2,
        frameon=False,
        handlelength=1.2,
        columnspacing=1.5,
    )


def _series_panel(svg: SvgFigure, ax: plt.Axes, report: RunReport, i: int, normal: int) -> None:
    """Patient ``i``'s panel: its slices' infected probability, labels, thresholds, window and attention."""
    names, d = list(report.class_names), report.decisions
    rows_i = np.flatnonzero(report.slice_patient == i)
    n, x = len(rows_i), np.arange(len(rows_i))
    ax.set(xlim=(-0.5, max(n - 0.5, 0.5)), ylim=(-0.03, 1.03), xticks=[0, n - 1] if n > 1 else [0], yticks=[0, 0.5, 1])
    ax.grid(axis="y", color="#eee")
    ax.set_axisbelow(True)
    ax.set_xlabel("slice (head -> feet)", loc="right", color=MUTED, labelpad=1)
    right = report.patient_preds[i] == report.patient_labels[i]
    title = f"{report.patients[i]}: {names[report.patient_labels[i]]}, called {names[report.patient_preds[i]]}"
    title = ax.set_title(
        title, loc="left", pad=10, color="#222" if right else WRONG, weight="normal" if right else "bold"
    )
    _fit_title(title, ax)
    svg.mark(title, "panel-title" if right else "panel-title wrong")
    if d is not None and d.window is not None and n:
        _window(ax, n, d.window)
    if report.mil_attention is not None and report.mil_attention[rows_i].max(initial=0) > 0:
        att = report.mil_attention[rows_i]
        svg.mark(ax.plot(x, att / att.max(), color="#9467bd", lw=1.0, alpha=0.7)[0], "attention")
    if d is not None and d.patient_slice_threshold is not None:
        svg.mark(ax.axhline(d.patient_slice_threshold[i], color="#555", lw=1.0, ls=(0, (4, 3))), "slice-threshold")
    labels = report.slice_labels[rows_i]
    known = np.flatnonzero(labels >= 0)
    if len(known):
        colours = [LABELLED_CLEAN if labels[j] == normal else LABELLED_INFECTED for j in known]
        strip = ax.broken_barh([(j - 0.5, 1) for j in known], (1.05, 0.06), facecolors=colours, clip_on=False)
        svg.mark(strip, "slice-labels", [f"slice {j}: labelled {names[labels[j]]}" for j in known])
    infected = 1.0 - report.slice_scores[rows_i, normal]
    svg.mark(ax.plot(x, infected, color="#555", lw=1.2)[0], "infected")
    argmax = report.slice_scores[rows_i].argmax(axis=1)
    colours = [CLASS_COLOURS[a % len(CLASS_COLOURS)] for a in argmax]
    dots = ax.scatter(x, infected, s=7, c=colours, zorder=3, clip_on=False, linewidths=0)
    svg.mark(
        dots, "slices", [f"slice {j}: P(infected) {v:.3f}, argmax {names[argmax[j]]}" for j, v in enumerate(infected)]
    )


def _fit_title(title: Text, ax: plt.Axes, smallest: float = 7.5) -> None:
    """Start a panel's title at the figure's left edge (over the y tick labels) and shrink its font, down to
    ``smallest`` pt, until it fits the panel: each panel is an SVG of its own, which clips what sticks out."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    left = ax.transAxes.inverted().transform((4 * fig.dpi / 96, 0))[0]  # 4 CSS px in from the edge
    title.set_x(left)
    room = fig.get_figwidth() * fig.dpi - 4 * fig.dpi / 96 * 2
    while title.get_window_extent(renderer).width > room and title.get_fontsize() > smallest:
        title.set_fontsize(max(smallest, title.get_fontsize() - 0.25))


def _window(ax: plt.Axes, n: int, window: tuple[int, int]) -> None:
    """Shade weighted_center's voting window (light) and central slices (darker) of an ``n``-slice series."""
    from covidct.patients.voting import central_mask

    for size, opacity in ((window[1], 0.07), (window[0], 0.12)):
        mask = np.flatnonzero(central_mask(n, size))
        ax.axvspan(mask[0] - 0.5, mask[-1] + 0.5, color="#000", alpha=opacity, lw=0)


def decision_caption(report: RunReport) -> str:
    d = report.decisions
    return (
        f"Each validation patient's {d.quantity_name}, the quantity vote {report.vote_rule} decides on, by "
        f"true class; above the dashed line ({d.threshold_name} {d.threshold_all:.3f}, tuned on or fixed "
        "for all validation patients) a patient is called sick. Dark: called right; red: called wrong, with "
        "its call. Hover a dot for its figures."
    )


def series_caption(report: RunReport, shown: int) -> str:
    d, total = report.decisions, len(report.patients)
    more = total - shown
    parts = [
        "Infected probability 1 - P(Normal) of every slice along each patient's series, head left, feet right; "
        "dots coloured by the slice's argmax class; strip above: the radiologist's slice labels where known "
        f"(dark: infected, light: clean; none: unknown). {shown} of {total} validation patients"
        + (
            f" shown (the first {shown}: misclassified first, then by class; {more} more in patients.csv)."
            if more
            else "."
        )
    ]
    if d is not None and d.slice_threshold is not None:
        parts.append(" Dashed: the slice threshold that decided the patient.")
    if report.mil_attention is not None:
        parts.append(" Purple: the MIL head's attention per slice (scaled to its maximum).")
    if report.vote_rule == "weighted_center":
        parts.append(" Shaded: the weighted_center voting window and its central slices.")
    return "".join(parts)
