"""Find patients in the COVID-CT-MD folder layout and attach their slice labels.

    <root>/COVID-19 subjects/P001/*.dcm      (also "COVID-19 Cases")
    <root>/Cap subjects/cap001/*.dcm         (also "CAP Cases")
    <root>/Normal subjects/normal001/*.dcm   (also "Normal Cases")
    <root>/Index.csv                         Label Index,Diagnosis,Relative Path,Folder/ID
    <root>/Slice-level-labels-updated-1.npy  (rows, 200) 0/1 (or Slice-level-labels.npy)

Row r of the label array belongs to the r-th *data row* of Index.csv (the "Label Index" column
skips values, so it is never used). Column i is the i-th slice in head-first order
(SliceLocation descending). Patient ids are folder names, never DICOM patient tags.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidct import CLASS_NAMES
from covidct.data.dicom import Skipped, scan_folder
from covidct.errors import DataError

log = logging.getLogger(__name__)

#: Class folder names, matched case-insensitively after collapsing spaces/underscores.
_CLASS_FOLDER = re.compile(r"^(covid-?19|cap|normal)([ _-]+(subjects|cases))?$", re.IGNORECASE)
#: Class word (a class folder's first word, or Index.csv's Diagnosis), lower case -> class index.
_CLASS_OF_WORD = {"covid-19": 0, "covid19": 0, "cap": 1, "normal": 2}

INDEX_FILE = "Index.csv"
#: Index.csv's columns, as in the real file; rows are matched by "Folder/ID", never by "Label Index".
INDEX_COLUMNS = ("Label Index", "Diagnosis", "Relative Path", "Folder/ID")
_DIAGNOSIS_COLUMN, _ID_COLUMN = INDEX_COLUMNS[1], INDEX_COLUMNS[3]

#: Label files in order of preference (the authors' Sep 2021 correction first).
SLICE_LABEL_FILES = ("Slice-level-labels-updated-1.npy", "Slice-level-labels.npy")


@dataclass(frozen=True)
class PatientFolder:
    """One patient: folder name as id, class index (None when unknown), optional slice labels.

    ``slice_labels`` is the patient's row of the label array: int8 (200,) 0/1, zero padded,
    column i = i-th slice head first; None when the dataset has no slice labels for the patient.
    """

    patient_id: str
    label: int | None
    folder: Path
    slice_labels: np.ndarray | None = None


def class_of_folder(name: str) -> int | None:
    """Class index for a class folder name ("COVID-19 subjects", "CAP Cases", ...), else None."""
    match = _CLASS_FOLDER.match(" ".join(name.split()))
    return None if match is None else _CLASS_OF_WORD[match.group(1).lower()]


def find_label_file(root: Path, name: str | None = None) -> Path | None:
    """The slice label array to use: ``name`` if given (must exist), else the preferred one present."""
    if name is not None:
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: slice label file not found (data.slice_labels_file={name!r}).")
        return path
    return next((root / n for n in SLICE_LABEL_FILES if (root / n).is_file()), None)


def read_index(root: Path) -> list[dict[str, str]] | None:
    """The data rows of ``root/Index.csv`` as dicts keyed by its header, in file order; None when absent.
    A file without a ``Folder/ID`` column, or with a row of another length than the header, raises
    :class:`DataError` naming the file and line (it would misalign the label rows)."""
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        return None
    with index_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    header = reader.fieldnames or []
    if rows and _ID_COLUMN not in header:
        raise DataError(f"{index_path}: no {_ID_COLUMN!r} column (header: {header}).")
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # csv's markers of a longer or shorter row
            more_or_fewer = "more" if None in row else "fewer"
            raise DataError(
                f"{index_path}, line {line}: {more_or_fewer} fields than the header ({', '.join(header)}); "
                "fix the row, or the label rows would not match the patients."
            )
    return rows


def read_slice_labels(root: Path, label_file: str | None = None) -> dict[str, np.ndarray]:
    """Map patient id -> int8 (200,) slice labels from Index.csv + the label array.

    Returns an empty dict when the dataset ships no label files.
    """
    return _slice_labels(root, label_file, read_index(root))


def _slice_labels(root: Path, label_file: str | None, rows: list[dict[str, str]] | None) -> dict[str, np.ndarray]:
    """:func:`read_slice_labels` given Index.csv's ``rows`` (None: no Index.csv)."""
    array_path = find_label_file(root, label_file)
    index_path = root / INDEX_FILE
    if array_path is None:
        return {}
    if rows is None:
        raise DataError(f"{index_path}: missing; it is needed to map rows of {array_path.name} to patients.")
    labels = np.load(array_path)
    if labels.ndim != 2 or labels.shape[0] != len(rows):
        raise DataError(
            f"{array_path}: shape {labels.shape} does not match the {len(rows)} data rows of {index_path}; "
            "row r of the array must be the r-th data row of Index.csv."
        )
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{array_path}: slice labels must be 0 or 1.")
    return {row[_ID_COLUMN].strip(): labels[r].astype(np.int8) for r, row in enumerate(rows)}


def _diagnoses(rows: list[dict[str, str]] | None) -> dict[str, int]:
    """Patient id -> class from Index.csv's Diagnosis column (to cross-check folders)."""
    return {
        row[_ID_COLUMN].strip(): _CLASS_OF_WORD[row[_DIAGNOSIS_COLUMN].strip().lower()]
        for row in rows or ()
        if row.get(_DIAGNOSIS_COLUMN, "").strip().lower() in _CLASS_OF_WORD
    }


def discover_covid_ct_md(
    root: str | Path, label_file: str | None = None, skipped: list[Skipped] | None = None
) -> list[PatientFolder]:
    """All patients under a COVID-CT-MD style root, sorted by class then patient id.

    Entries of a class folder that are not patient folders (files, broken or looping links) are
    appended to ``skipped`` with the reason, when given. Hidden entries are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data.root does not exist or is not a folder. Set data.root=<COVID-CT-MD folder>.")
    class_dirs = [(class_of_folder(d.name), d) for d in sorted(root.iterdir()) if d.is_dir()]
    class_dirs = [(c, d) for c, d in class_dirs if c is not None]
    if not class_dirs:
        raise DataError(
            f"{root}: no class folders found. Expected folders such as 'COVID-19 subjects', 'Cap subjects', "
            "'Normal subjects' (or '... Cases'), each holding one folder per patient."
        )
    index_rows = read_index(root)  # read once: slice label rows and the diagnoses to cross-check
    slice_labels = _slice_labels(root, label_file, index_rows)
    diagnoses = _diagnoses(index_rows)
    patients: list[PatientFolder] = []
    seen: dict[str, Path] = {}
    for label, class_dir in sorted(class_dirs, key=lambda cd: (cd[0], cd[1].name)):
        files, others = scan_folder(class_dir)  # ``others`` holds the patient folders (and hidden entries)
        visible = [o for o in others if not o.path.name.startswith(".")]
        if skipped is not None:
            skipped += [Skipped(o.path, f"not a patient folder: {o.reason}") for o in visible if not o.path.is_dir()]
            skipped += [Skipped(f, "a file where patient folders are expected") for f in files]
        for folder in sorted(o.path for o in visible if o.path.is_dir()):
            pid = folder.name
            if pid in seen:
                raise DataError(
                    f"{folder}: patient id {pid!r} also in {seen[pid]}; patient folder names must be unique."
                )
            seen[pid] = folder
            if pid in diagnoses and diagnoses[pid] != label:
                raise DataError(
                    f"{folder}: folder says {CLASS_NAMES[label]} but Index.csv says {CLASS_NAMES[diagnoses[pid]]}."
                )
            patients.append(PatientFolder(pid, label, folder, slice_labels.get(pid)))
    if not patients:
        raise DataError(f"{root}: class folders found but no patient folders inside them.")
    return patients
