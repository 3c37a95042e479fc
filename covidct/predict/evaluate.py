"""Score predictions against ground truth: accuracy, per-class sensitivity / specificity, macro F1,
confusion matrices and 95% bootstrap confidence intervals, per test set and overall.

    python -m covidct.predict.evaluate predictions=<predict.py run folder | one test set's CSV> labels=<csv>
        [bootstrap=2000] [seed=0] [allow_errors=false]

or ``python predict.py ... labels=<csv>``, which scores the CSVs it has just written. Settings in
``conf/evaluate.yaml``. The labels CSV has a patient and a class column (the SPGC / COVID-CT-MD
headers are accepted: ``patient``, ``patient_id``, ``Folder/ID``; ``class``, ``label``, ``Diagnosis``),
class names as in :data:`covidct.CLASS_NAMES` in any case (``covid``, ``covid19`` are COVID-19 too).
Labels and predictions must match one to one: a bad class name, a duplicate row, a predicted patient
without a label, a label without a prediction, or a prediction that failed (status ``error``, unless
``allow_errors=true`` scores it as wrong) is refused with the file and line named; nothing is dropped.

Writes into the run folder: ``evaluation.json`` (every number, the CIs, the labels file and its
SHA-256), ``evaluation.csv`` (test set, metric, value, ci_low, ci_high), ``confusion_<test set>.png``
and ``confusion_overall.png``; prints the table. Metrics are torchmetrics'; the bootstrap resamples
patients with replacement (numpy Generator seeded with ``seed``, the same draws for every run with
that seed), percentile intervals; a per-class metric that a resample leaves undefined (sensitivity
without that class, specificity with only that class) is skipped in that resample, and the number of
resamples that counted is recorded. Macro F1 averages the classes present in the truth or the
predictions (torchmetrics' rule).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from covidct import CLASS_NAMES
from covidct.contracts import CONF_DIR
from covidct.errors import ConfigError, CovidCTError, DataError
from covidct.io import atomic_write_bytes, atomic_write_csv, atomic_write_text, csv_text
from covidct.text_table import format_table

log = logging.getLogger("evaluate")

PATIENT_COLUMNS = ("patient", "patientid", "folder/id", "folderid", "id")
"""Accepted names of the labels' patient column, lower-cased without spaces, '_' and '-'."""
CLASS_COLUMNS = ("class", "label", "diagnosis")
OVERALL = "overall"
NO_PREDICTION = "no prediction"
"""Confusion-matrix column of patients whose prediction failed, scored as wrong (allow_errors=true)."""
SHOWN = 5
"""Problems listed in one error message (then 'and N more')."""


def _norm(text: str) -> str:
    return "".join(ch for ch in text.strip().lower() if ch not in " _-")


def _listing(items: Sequence[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more


def class_aliases(class_names: Sequence[str]) -> dict[str, int]:
    """Normalised spelling -> class index: each name lower-cased without spaces, '_' and '-'
    ('COVID-19' -> 'covid19'), and 'covid' for a COVID class."""
    aliases = {_norm(name): i for i, name in enumerate(class_names)}
    for i, name in enumerate(class_names):
        if _norm(name).startswith("covid"):
            aliases.setdefault("covid", i)
    return aliases


@dataclass
class Labels:
    """The labels file: patient -> (class index, line number); its path and SHA-256."""

    path: Path
    sha256: str
    rows: dict[str, tuple[int, int]]


def _read_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank CSV record of ``path``."""
    if not path.is_file():
        raise DataError(f"{what}={path}: no such file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{what}={path}: cannot be read as UTF-8 text CSV ({exc}).") from exc
    reader = csv.reader(io.StringIO(text))
    rows = []
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((reader.line_num, [csv_text(c) for c in cells]))  # as covidct.io wrote them
    except csv.Error as exc:
        raise DataError(f"{what}={path} line {reader.line_num}: not valid CSV ({exc}).") from exc
    return rows


def _column(path: Path, what: str, line: int, header: list[str], accepted: Sequence[str], kind: str) -> int:
    found = [i for i, name in enumerate(header) if _norm(name) in accepted]
    if len(found) != 1:
        problem = "no" if not found else f"{len(found)} ({', '.join(header[i] for i in found)})"
        raise DataError(
            f"{what}={path} line {line}: header {header} has {problem} {kind} column; it needs exactly one, "
            f"named one of {', '.join(accepted)} (any case; '_', '-' and spaces ignored)."
        )
    return found[0]


def read_labels(path: str | Path, class_names: Sequence[str] = CLASS_NAMES) -> Labels:
    """The labels CSV, checked: header with one patient and one class column, every class known,
    no patient twice, no empty cell. Every bad row is named (up to :data:`SHOWN`) in one DataError."""
    path = Path(path)
    rows = _read_rows(path, "labels")
    if not rows:
        raise DataError(f"labels={path}: empty; expected a header 'patient,class' and one row per patient.")
    line, header = rows[0]
    pcol = _column(path, "labels", line, header, PATIENT_COLUMNS, "patient")
    ccol = _column(path, "labels", line, header, CLASS_COLUMNS, "class")
    aliases = class_aliases(class_names)
    found: dict[str, tuple[int, int]] = {}
    problems = []
    for line, cells in rows[1:]:
        if len(cells) <= max(pcol, ccol):
            problems.append(f"line {line}: {len(cells)} cells, the header has {len(header)}")
            continue
        patient, name = cells[pcol].strip(), cells[ccol].strip()
        if not patient:
            problems.append(f"line {line}: empty patient")
        elif _norm(name) not in aliases:
            known = ", ".join(class_names)
            problems.append(f"line {line}: class {name!r} of patient {patient!r} is not one of {known}")
        elif patient in found:
            problems.append(f"line {line}: patient {patient!r} again (first on line {found[patient][1]})")
        else:
            found[patient] = (aliases[_norm(name)], line)
    if problems:
        raise DataError(
            f"labels={path}: {len(problems)} bad row(s): {_listing(problems)}. Fix or remove these rows (one row "
            f"per patient; classes {' / '.join(class_names)} in any case, '-', '_' and spaces ignored)."
        )
    if not found:
        raise DataError(f"labels={path}: a header but no rows; expected one row per patient.")
    return Labels(path, hashlib.sha256(path.read_bytes()).hexdigest(), found)


@dataclass
class Prediction:
    """One patient row of a predict.py test-set CSV."""

    test_set: str
    patient: str
    predicted: int | None  # class index; None when status is error
    detail: str
    file: Path
    line: int


@dataclass
class Predictions:
    """predict.py's per-patient CSVs: test set name -> file, every row, the class names (CSV order)."""

    source: Path
    files: dict[str, Path]
    rows: list[Prediction]
    class_names: list[str]


def prediction_files(source: str | Path) -> dict[str, Path]:
    """Test set name -> per-patient CSV: the test sets recorded in a run folder's prediction.json, or
    one CSV (named by its stem)."""
    source = Path(source)
    if source.is_file():
        return {source.stem: source}
    if not source.is_dir():
        raise DataError(f"predictions={source}: does not exist; give a predict.py run folder or one test set's CSV.")
    record = source / "prediction.json"
    if not record.is_file():
        raise DataError(
            f"predictions={source}: no prediction.json in it, so not a predict.py run folder; give the run folder "
            "or one test set's CSV."
        )
    try:
        names = list(json.loads(record.read_text())["test_sets"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"predictions={record}: not a predict.py record (no test_sets: {exc}).") from exc
    files = {name: source / f"{name}.csv" for name in names}
    for name, path in files.items():
        if not path.is_file():
            raise DataError(f"predictions={source}: test set {name!r} is in prediction.json but {path} is missing.")
    return files


def read_predictions(source: str | Path) -> Predictions:
    """Every patient row of the prediction CSVs, checked: the columns predict.py writes, status ok or
    error, a known predicted class when ok, no patient twice (also not across test sets)."""
    files = prediction_files(source)
    if OVERALL in files:
        raise DataError(f"predictions={source}: a test set named {OVERALL!r} clashes with the overall scores.")
    rows: list[Prediction] = []
    seen: dict[str, Prediction] = {}
    class_names: list[str] | None = None
    for test_set, path in files.items():
        records = _read_rows(path, "predictions")
        if not records:
            raise DataError(f"predictions={path}: empty; not a predict.py test-set CSV.")
        line, header = records[0]
        missing = [c for c in ("patient", "predicted_class", "status") if c not in header]
        if missing:
            raise DataError(
                f"predictions={path} line {line}: no {', '.join(missing)} column; not a predict.py test-set CSV "
                "(give <test set>.csv, not <test set>_slices.csv)."
            )
        names = [c.removeprefix("prob_") for c in header if c.startswith("prob_")] or list(CLASS_NAMES)
        if class_names is not None and names != class_names:
            raise DataError(f"predictions={path}: classes {names} differ from the other test sets' {class_names}.")
        class_names = names
        col = {c: header.index(c) for c in ("patient", "predicted_class", "status")}
        detail_col = header.index("detail") if "detail" in header else None
        for line, cells in records[1:]:
            if len(cells) != len(header):
                raise DataError(f"predictions={path} line {line}: {len(cells)} cells, the header has {len(header)}.")
            patient, status, name = (cells[col[c]].strip() for c in ("patient", "status", "predicted_class"))
            where = f"predictions={path} line {line}"
            if status == "skipped":  # an entry beside the patient folders (a stray file): not a patient
                continue
            if status not in ("ok", "error"):
                raise DataError(f"{where}: status {status!r} of patient {patient!r} is not ok, error or skipped.")
            if status == "ok" and name not in names:
                raise DataError(f"{where}: predicted class {name!r} of patient {patient!r} is not one of {names}.")
            if patient in seen:
                first = seen[patient]
                raise DataError(
                    f"{where}: patient {patient!r} was also predicted in {first.file} line {first.line}; one "
                    "label cannot score both: evaluate each test set's CSV on its own."
                )
            detail = cells[detail_col].strip() if detail_col is not None else ""
            pred = names.index(name) if status == "ok" else None
            seen[patient] = Prediction(test_set, patient, pred, detail, path, line)
            rows.append(seen[patient])
    return Predictions(Path(source), files, rows, class_names or list(CLASS_NAMES))


def match(labels: Labels, predictions: Predictions, allow_errors: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test set name -> (truth, prediction), int64 (P,) class indices in the prediction CSV's row order;
    a failed prediction (allowed) is K = number of classes, scored as wrong. Refuses (DataError) a
    predicted patient without label, a label without prediction, and failed predictions unless allowed."""
    predicted = {p.patient for p in predictions.rows}
    missing = [f"{p.patient!r} ({p.file.name} line {p.line})" for p in predictions.rows if p.patient not in labels.rows]
    unknown = [f"line {line} {pid!r}" for pid, (_, line) in labels.rows.items() if pid not in predicted]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} predicted patient(s) have no label row: {_listing(missing)}")
        if unknown:
            parts.append(f"{len(unknown)} label row(s) name a patient that was not predicted: {_listing(unknown)}")
        raise DataError(
            f"labels={labels.path}: {'; and '.join(parts)}. Labels and predictions must match one to one: add or "
            f"remove rows, or score the predictions that hold those patients (predictions={predictions.source})."
        )
    failed = [p for p in predictions.rows if p.predicted is None]
    if failed and not allow_errors:
        listed = [f"{p.patient!r} ({p.file.name} line {p.line}: {p.detail or 'no detail'})" for p in failed]
        raise DataError(
            f"predictions={predictions.source}: {len(failed)} patient(s) could not be predicted (status error), so "
            f"cannot be scored: {_listing(listed)}. Fix their folders and predict again, or pass allow_errors=true "
            "to score them as wrong (recorded)."
        )
    k = len(predictions.class_names)
    sets: dict[str, tuple[list[int], list[int]]] = {name: ([], []) for name in predictions.files}
    for p in predictions.rows:
        sets[p.test_set][0].append(labels.rows[p.patient][0])
        sets[p.test_set][1].append(k if p.predicted is None else p.predicted)
    return {name: (np.array(t, np.int64), np.array(q, np.int64)) for name, (t, q) in sets.items() if t}


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


def _num(value: float | None) -> float | str:
    return "" if value is None else round(value, 6)


def _cell(value: float | None, ci: tuple[float | None, float | None]) -> str:
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


@dataclass
class Evaluation:
    """What :func:`evaluate` computed and wrote: scores per test set, then ``overall``."""

    scores: dict[str, Scores]
    class_names: list[str]
    files: list[Path]


def check_settings(resamples: object, seed: object, allow_errors: object = False) -> None:
    """ConfigError unless ``bootstrap`` and ``seed`` are integers >= 0 and ``allow_errors`` a boolean."""
    for key, value in (("bootstrap", resamples), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be an integer >= 0 (bootstrap=0: no intervals), got {value!r}")
    if not isinstance(allow_errors, bool):
        raise ConfigError(f"allow_errors must be true or false, got {allow_errors!r}")


def evaluate(
    predictions: str | Path,
    labels: str | Path,
    output_dir: str | Path,
    resamples: int = 2000,
    seed: int = 0,
    allow_errors: bool = False,
) -> Evaluation:
    """Score ``predictions`` (run folder or CSV) against ``labels``; write evaluation.json / .csv and
    the confusion PNGs into ``output_dir``."""
    check_settings(resamples, seed, allow_errors)
    preds = read_predictions(predictions)
    names = preds.class_names
    label_set = read_labels(labels, names)
    truth_pred = match(label_set, preds, allow_errors)
    k = len(names)
    truth_pred[OVERALL] = (
        np.concatenate([t for t, _ in truth_pred.values()]),
        np.concatenate([p for _, p in truth_pred.values()]),
    )
    failed = {p.patient: p.test_set for p in preds.rows if p.predicted is None}
    scores = {}
    for name, (truth, pred) in truth_pred.items():
        scores[name] = score(truth, pred, k, names, resamples, seed)
        scores[name].scored_as_wrong = [pid for pid, t in failed.items() if name in (t, OVERALL)]
    out = Path(output_dir)
    written = []
    for name, s in scores.items():
        png = confusion_png(s.confusion, names, f"{name} (n={s.n_patients})")
        written.append(atomic_write_bytes(out / f"confusion_{name}.png", png))
    record = {
        "predictions": str(preds.source.resolve()),
        "prediction_files": {n: str(p.resolve()) for n, p in preds.files.items()},
        "labels": str(label_set.path.resolve()),
        "labels_sha256": label_set.sha256,
        "class_names": names,
        "confidence": 0.95,
        "bootstrap_resamples": resamples,
        "seed": seed,
        "allow_errors": allow_errors,
        "scores": {
            name: {
                "n_patients": s.n_patients,
                "scored_as_wrong": s.scored_as_wrong,
                "confusion_matrix": {
                    "true": names,
                    "predicted": names + [NO_PREDICTION] * (s.confusion.shape[1] - k),
                    "counts": s.confusion.tolist(),
                },
                "metrics": {
                    m: {"value": s.values[m], "ci_low": s.ci[m][0], "ci_high": s.ci[m][1], "valid_resamples": n}
                    for m, n in s.valid_resamples.items()
                },
            }
            for name, s in scores.items()
        },
    }
    written.append(atomic_write_text(out / "evaluation.json", json.dumps(record, indent=1) + "\n"))
    rows = [
        [name, s.n_patients, m, _num(s.values[m]), _num(s.ci[m][0]), _num(s.ci[m][1]), s.valid_resamples[m]]
        for name, s in scores.items()
        for m in metric_names(names)
    ]
    header = ["test_set", "n_patients", "metric", "value", "ci_low", "ci_high", "valid_resamples"]
    written.append(atomic_write_csv(out / "evaluation.csv", header, rows))
    return Evaluation(scores, names, written)


def run_evaluation(cfg: DictConfig, predictions: str | Path) -> list[Path]:
    """Evaluate ``predictions`` with ``cfg.labels / bootstrap / seed / allow_errors`` into the run
    folder; print the table. Shared by ``python -m covidct.predict.evaluate`` and ``predict.py labels=...``."""
    resamples, seed = cfg.get("bootstrap", 2000), cfg.get("seed", 0)
    result = evaluate(predictions, cfg.labels, cfg.paths.output_dir, resamples, seed, cfg.get("allow_errors", False))
    what = f"value [95% CI, {resamples} patient resamples, seed {seed}]" if resamples else "value (bootstrap=0)"
    print(f"labels={cfg.labels}: {what}")
    print(format_scores(result.scores, result.class_names), flush=True)
    if wrong := result.scores[OVERALL].scored_as_wrong:
        log.warning("scored as wrong (their prediction failed): %s", ", ".join(wrong))
    return result.files


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def evaluate_app(cfg: DictConfig) -> None:
    missing = [key for key in ("predictions", "labels") if OmegaConf.is_missing(cfg, key)]
    if missing:
        log.error(
            "%s not set: python -m covidct.predict.evaluate predictions=<predict.py run folder | test set CSV> "
            "labels=<patient,class CSV>",
            " and ".join(missing),
        )
        sys.exit(1)
    try:
        written = run_evaluation(cfg, cfg.predictions)
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message names the file and row; no traceback for user errors)
    for path in written:
        log.info("wrote %s", path)


def main() -> None:
    """``python -m covidct.predict.evaluate predictions=<...> labels=<csv> [...]``: process setup, then Hydra."""
    from covidct.config import register_resolvers

    register_resolvers()  # ${run_suffix:} names the run folder
    evaluate_app()


if __name__ == "__main__":
    main()
