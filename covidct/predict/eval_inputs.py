"""Read what an evaluation compares: a labels CSV (patient, class; SPGC / COVID-CT-MD headers accepted) and
predict.py's per-test-set CSVs, and match them one to one (every problem refused with its file and line)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidct.contracts import (
    CLASS_NAMES,
    EVALUATED_COLUMNS,
    PREDICTION_RECORD,
    mean_prob_column,
    patient_csv_name,
    prob_column,
)
from covidct.errors import DataError
from covidct.io import csv_text

PATIENT_COLUMNS = ("patient", "patientid", "folder/id", "folderid", "id")
"""Accepted names of the labels' patient column, lower-cased without spaces, '_' and '-'."""
CLASS_COLUMNS = ("class", "label", "diagnosis")
OVERALL = "overall"
"""The name of the scores over every test set (no test set may have it)."""
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
    record = source / PREDICTION_RECORD
    if not record.is_file():
        raise DataError(
            f"predictions={source}: no prediction.json in it, so not a predict.py run folder; give the run folder "
            "or one test set's CSV."
        )
    try:
        names = list(json.loads(record.read_text())["test_sets"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"predictions={record}: not a predict.py record (no test_sets: {exc}).") from exc
    files = {name: source / patient_csv_name(name) for name in names}
    for name, path in files.items():
        if not path.is_file():
            raise DataError(f"predictions={source}: test set {name!r} is in prediction.json but {path} is missing.")
    return files


def csv_class_names(header: list[str]) -> list[str]:
    """The class names of a patient CSV's header, in order: its ``mean_prob_<class>`` columns (``prob_<class>``
    in CSVs written before the rename), else :data:`~covidct.contracts.CLASS_NAMES`."""
    for prefix in (mean_prob_column(""), prob_column("")):
        if names := [c.removeprefix(prefix) for c in header if c.startswith(prefix)]:
            return names
    return list(CLASS_NAMES)


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
        missing = [c for c in EVALUATED_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"predictions={path} line {line}: no {', '.join(missing)} column; not a predict.py test-set CSV "
                "(give <test set>.csv, not <test set>_slices.csv)."
            )
        names = csv_class_names(header)
        if class_names is not None and names != class_names:
            raise DataError(f"predictions={path}: classes {names} differ from the other test sets' {class_names}.")
        class_names = names
        col = {c: header.index(c) for c in EVALUATED_COLUMNS}
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


@dataclass
class Unscored:
    """The patients an evaluation with partial labels (predict.py ``labels=``) leaves out: ``absent_from_input``,
    label rows whose patient was not predicted (labels file order); ``without_label``, predicted patients (status
    ok or error) without a label row (prediction CSV order)."""

    absent_from_input: list[str]
    without_label: list[str]


def unscored(labels: Labels, predictions: Predictions) -> Unscored:
    """The patients of ``labels`` and ``predictions`` that are not in both (:class:`Unscored`)."""
    predicted = {p.patient for p in predictions.rows}
    return Unscored(
        [pid for pid in labels.rows if pid not in predicted],
        [p.patient for p in predictions.rows if p.patient not in labels.rows],
    )


def _refuse_unmatched(labels: Labels, predictions: Predictions) -> None:
    """DataError naming every predicted patient without a label and every label without a prediction."""
    missing = [f"{p.patient!r} ({p.file.name} line {p.line})" for p in predictions.rows if p.patient not in labels.rows]
    predicted = {p.patient for p in predictions.rows}
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


def match(
    labels: Labels, predictions: Predictions, allow_errors: bool, partial: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test set name -> (truth, prediction), int64 (P,) class indices in the prediction CSV's row order;
    a failed prediction (allowed) is K = number of classes, scored as wrong. Refuses (DataError) failed
    predictions unless allowed, and, unless ``partial``, a predicted patient without label and a label without
    prediction; with ``partial`` those are left out (:func:`unscored` lists them), and refused only when no
    predicted patient has a label."""
    if partial:
        rows = [p for p in predictions.rows if p.patient in labels.rows]
        if not rows:
            raise DataError(
                f"labels={labels.path}: none of the {len(predictions.rows)} predicted patient(s) has a label row "
                f"(e.g. {_listing([repr(p.patient) for p in predictions.rows])}), so nothing can be scored; check "
                "that the labels' patient column names the input's patient folders."
            )
    else:
        _refuse_unmatched(labels, predictions)
        rows = predictions.rows
    failed = [p for p in rows if p.predicted is None]
    if failed and not allow_errors:
        listed = [f"{p.patient!r} ({p.file.name} line {p.line}: {p.detail or 'no detail'})" for p in failed]
        raise DataError(
            f"predictions={predictions.source}: {len(failed)} patient(s) could not be predicted (status error), so "
            f"cannot be scored: {_listing(listed)}. Fix their folders and predict again, or pass allow_errors=true "
            "to score them as wrong (recorded)."
        )
    k = len(predictions.class_names)
    sets: dict[str, tuple[list[int], list[int]]] = {name: ([], []) for name in predictions.files}
    for p in rows:
        sets[p.test_set][0].append(labels.rows[p.patient][0])
        sets[p.test_set][1].append(k if p.predicted is None else p.predicted)
    return {name: (np.array(t, np.int64), np.array(q, np.int64)) for name, (t, q) in sets.items() if t}
