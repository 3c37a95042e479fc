"""The run report's page: one self-contained ``report.html`` (figures inline, no CSS/JS files) that says what a
run decided and why: per validation patient the quantity the vote rule decided on and the threshold it was
compared with, the decision quantity by true class, each patient's infected probability along the series, ROC
curves scored by the rule's own scores (and, named apart, by mean probability), the Grad-CAM of the calls, the
rules compared, calibration, training curves, the data and the run's configuration. It fits a phone: the series
panels reflow, and a figure that would shrink its text under 10 px scrolls sideways instead.

Pure rendering: everything comes in a :class:`~.metrics.RunReport`; nothing here knows about Lightning. The
page is the jinja2 template ``templates/report.html.j2`` (autoescaped: patient ids and run names stay text).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
from markupsafe import Markup

from covidct.contracts import REPORT_FILE
from covidct.io import atomic_write_bytes, atomic_write_text
from covidct.report.call_cams import CAM_DIR, cam_files, cam_groups, cam_intro
from covidct.report.figures import Figures, render_figures
from covidct.report.metrics import RELIABILITY_BINS, RunReport, Scored, class_rates, score
from covidct.report.patient_figures import series_legend, series_title

#: the patient table's columns kept in view while the others scroll sideways: patient, true class, called
STICKY_COLUMNS = 3


def fmt(value: object) -> str:
    """A cell's text: floats to 3 decimals (n/a for NaN), bools yes/no, anything else as ``str``."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return "n/a" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def cell_class(value: object) -> str:
    """``n`` (a number: right-aligned), ``t`` (text: left-aligned) or ``t long`` (a sentence, such as the
    patient table's "why": kept wide enough to read instead of wrapping a word per line)."""
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_):
        return "n"
    return "t long" if len(fmt(value)) > 40 else "t"


TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("covidct.report", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
TEMPLATES.filters.update(fmt=fmt, cell_class=cell_class)


def patient_table(report: RunReport) -> tuple[list[str], list[list[object]]]:
    """Header and one row per patient, wrong calls first (then right ones, each in patient order): id, true
    class, call, why, the rule's quantity and the threshold that decided it (and the threshold rule's slice
    threshold), slices, every rule's reported vote, mean probability per class."""
    names, d = list(report.class_names), report.decisions
    header = ["patient", "true class", "called", "correct"]
    if d is not None:
        header += ["why", d.quantity_name, d.threshold_name]
        if d.patient_slice_threshold is not None:
            header.append("slice threshold")
    rules = list(report.rule_votes)
    header += ["slices", *[f"{r} vote" for r in rules], *[f"mean P({n})" for n in names]]
    rows = []
    right = np.asarray(report.patient_labels) == np.asarray(report.patient_preds)
    for i in np.argsort(right, kind="stable"):
        pid, t, p = report.patients[i], report.patient_labels[i], report.patient_preds[i]
        row: list[object] = [pid, names[t], names[p], bool(t == p)]
        if d is not None:
            row += [d.why[i], float(d.quantity[i]), float(d.threshold[i])]
            if d.patient_slice_threshold is not None:
                row.append(float(d.patient_slice_threshold[i]))
        row += [int(report.n_slices[i]), *[names[report.rule_votes[r][i]] for r in rules]]
        row += [float(s) for s in np.asarray(report.patient_scores[i], dtype=np.float64)]
        rows.append(row)
    return header, rows


def sticky_columns(header: list[str], rows: list[list[object]]) -> list[tuple[float, float]]:
    """(left offset, width) in em of the patient table's first :data:`STICKY_COLUMNS` columns: wide enough for
    their longest text (about 0.62 em a character, plus padding; a header may wrap between words), at most
    16 em (a longer id wraps)."""
    placed, left = [], 0.0
    for k in range(STICKY_COLUMNS):
        longest = max([len(fmt(row[k])) for row in rows] + [len(word) for word in header[k].split()])
        width = round(min(16.0, longest * 0.62 + 1.3), 1)
        placed.append((round(left, 1), width))
        left += width
    return placed


def key_metrics(report: RunReport, scored: Scored) -> list[list[object]]:
    """(metric, value) rows of the page's key metrics."""
    m, d = scored.metrics, report.decisions
    return [
        [f"patient accuracy (vote {report.vote_rule})", m["patient accuracy"]],
        [
            f"its 95% CI, bootstrap over these {len(report.patients)} patients (the best epoch was chosen on them: "
            "an optimistic figure)",
            f"{m['patient accuracy 95% CI low']:.3f}-{m['patient accuracy 95% CI high']:.3f}",
        ],
        *last_epoch_row(report),
        ["patient macro F1", m["patient macro F1"]],
        [
            f"patient AUC (macro), by the rule's scores: {d.scores_name if d else 'not recorded'}",
            m["patient AUC (macro), rule scores"],
        ],
        ["patient AUC (macro), by mean slice probability", m["patient AUC (macro), mean probability"]],
        ["slice AUC (macro)", m["slice AUC (macro)"]],
        *[[k, v] for k, v in report.extra_metrics.items()],
        *[[k, v] for k, v in report.config.items() if k == "class weights (loss.alpha=auto)"],  # run_config's
    ]


def last_epoch_row(report: RunReport) -> list[list[object]]:
    """The last validation epoch's patient accuracy, when it is not the best epoch (from the history)."""
    voted = [h for h in report.history if np.isfinite(h.get("val_patient_acc", np.nan))]
    if not voted or voted[-1].get("epoch") == report.best_epoch:
        return []
    return [[f"patient accuracy of the last epoch ({int(voted[-1]['epoch'])})", voted[-1]["val_patient_acc"]]]


def auc_rows(report: RunReport, scored: Scored) -> list[list[object]]:
    """(scored by, macro AUC, AUC per class) rows: patients by the rule's scores, by mean probability; slices."""
    m, d, names = scored.metrics, report.decisions, list(report.class_names)
    rule, mean = "rule scores", "mean probability"
    return [
        [
            f"patients, by the rule's scores ({d.scores_name if d else 'not recorded'})",
            m[f"patient AUC (macro), {rule}"],
            *[m[f"patient AUC {n}, {rule}"] for n in names],
        ],
        [
            "patients, by mean slice probability",
            m[f"patient AUC (macro), {mean}"],
            *[m[f"patient AUC {n}, {mean}"] for n in names],
        ],
        ["slices", m["slice AUC (macro)"], *[m[f"slice AUC {n}"] for n in names]],
    ]


def calibration_note(metrics: dict[str, float]) -> str:
    """A sentence when temperature scaling made a level's ECE worse (it is fitted on the slices, so the patients'
    mean probabilities can end up less calibrated); "" when every level improved or stayed."""
    worse = [
        f"{level} ({metrics[f'{key} ECE before calibration']:.3f} -> {metrics[f'{key} ECE after calibration']:.3f})"
        for level, key in (("the slices", "slice"), ("the patients' mean probabilities", "patient"))
        if metrics.get(f"{key} ECE after calibration", 0.0) > metrics.get(f"{key} ECE before calibration", 1.0)
    ]
    if not worse:
        return ""
    return (
        f"Calibration made {' and '.join(worse)} worse: T is fitted to the validation slices' log-likelihood, "
        "not to this error, and a patient's mean probability is not what it fits. Read those probabilities as a "
        "ranking, not as a chance; the calls do not change."
    )


def calibration_rows(scored: Scored) -> list[list[object]]:
    """(level, ECE before, ECE after) rows: slices, and patients where recorded."""
    m = scored.metrics
    rows: list[list[object]] = [
        ["slices with a known class", m["slice ECE before calibration"], m["slice ECE after calibration"]]
    ]
    if "patient ECE before calibration" in m:
        rows.append(
            ["patients (mean probability)", m["patient ECE before calibration"], m["patient ECE after calibration"]]
        )
    return rows


def class_rows(report: RunReport) -> list[list[object]]:
    """(class, patients, sensitivity, specificity) rows of the configured rule's calls."""
    sens, spec = class_rates(report)
    counts = np.bincount(report.patient_labels, minlength=len(report.class_names))
    return [[n, int(counts[k]), float(sens[k]), float(spec[k])] for k, n in enumerate(report.class_names)]


def rules_compared(report: RunReport) -> tuple[list[str], list[list], list[str]] | None:
    """(header, rows, row classes: ``marked`` for the configured rule) of the vote rules compared, or None."""
    if report.rules is None:
        return None
    header, rows = report.rules
    return header, rows, ["marked" if row[0] == report.vote_rule else "" for row in rows]


def render_html(report: RunReport, scored: Scored, figures: Figures, links: bool = True) -> str:
    """The whole report as one HTML page: PNGs inlined as data URIs, SVGs inline. ``links``: the run
    folder's files (checkpoint, patients.csv, metrics.json, log) as relative links (off for a copy that
    leaves the run folder, e.g. W&B)."""
    header, rows = patient_table(report)
    cal = report.calibration
    return TEMPLATES.get_template("report.html.j2").render(
        report=report,
        decisions=report.decisions,
        links=report.links if links else {},
        key_metrics=key_metrics(report, scored),
        patients=(header, rows, ["" if row[3] else "wrong" for row in rows]),
        sticky=sticky_columns(header, rows),
        cam_intro=cam_intro(report) if report.cams is not None else "",
        cam_groups=cam_groups(report),
        series_panels=[Markup(svg) for svg in figures.series_panels],
        series_title=series_title(report),
        series_legend=series_legend(report),
        png_min_widths=figures.png_min_widths(),
        class_rows=class_rows(report),
        rules=rules_compared(report),
        auc_rows=auc_rows(report, scored),
        calibration_rows=calibration_rows(scored) if cal is not None and cal.fitted else [],
        calibration_note=calibration_note(scored.metrics) if cal is not None and cal.fitted else "",
        reliability_bins=RELIABILITY_BINS,
        svgs={name: Markup(svg) for name, svg in figures.svgs.items()},  # matplotlib's SVG: its text escaped
        pngs={name: base64.b64encode(png).decode("ascii") for name, png in figures.pngs.items()},
        captions=figures.captions,
    )


@dataclass
class WrittenReport:
    """What :func:`write_report` wrote: file paths, the metrics, the figures (PNG bytes and SVG text by file
    name) with their captions, the HTML text, what it was computed from, and the Grad-CAM images' paths."""

    paths: dict[str, Path]
    metrics: dict[str, float]
    images: dict[str, bytes]
    svgs: dict[str, str]
    captions: dict[str, str]
    html: str
    scored: Scored
    figures: Figures
    cam_paths: list[Path] = field(default_factory=list)


def write_report(report: RunReport, out_dir: str | Path) -> WrittenReport:
    """Write the figures (``confusion_matrix.png``, ``roc_patient.png``, ``roc_slice.png``, and as SVG
    ``decision.svg``, ``series.svg``, ``training.svg``, ``reliability.svg`` where there is something to draw),
    the Grad-CAM images (``report_cam/*.png``, replacing an earlier report's) and ``report.html`` into
    ``out_dir``, each atomically. The per-patient table is ``patients.csv``, which the patient vote writes; the
    page links to it."""
    out_dir = Path(out_dir)
    scored = score(report)
    figures = render_figures(report, scored)
    paths = {name: atomic_write_bytes(out_dir / name, png) for name, png in figures.pngs.items()}
    paths |= {name: atomic_write_text(out_dir / name, svg) for name, svg in figures.svgs.items()}
    cams = cam_files(report)
    for stale in sorted((out_dir / CAM_DIR).glob("*.png")):
        if stale.relative_to(out_dir).as_posix() not in cams:
            stale.unlink()
    cam_paths = [atomic_write_bytes(out_dir / name, png) for name, png in cams.items()]
    text = render_html(report, scored, figures)
    paths[REPORT_FILE] = atomic_write_text(out_dir / REPORT_FILE, text)
    return WrittenReport(
        paths, scored.metrics, figures.pngs, figures.svgs, figures.captions, text, scored, figures, cam_paths
    )
