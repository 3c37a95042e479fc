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
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidct.contracts import CLASS_NAMES, INDEX_FILE
from covidct.data.dicom import IGNORED_NAMES, Skipped, scan_folder
from covidct.errors import DataError

log = logging.getLogger(__name__)

#: Class folder names, matched case-insensitively after collapsing spaces/underscores.
_CLASS_FOLDER = re.compile(r"^(covid-?19|cap|normal)([ _-]+(subjects|cases))?$", re.IGNORECASE)
#: Class word (a class folder's first word, or Index.csv's Diagnosis), lower case -> class index.
_CLASS_OF_WORD = {"covid-19": 0, "covid19": 0, "cap": 1, "normal": 2}

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


@dataclass(frozen=True)
class IndexFile:
    """``Index.csv``, read: its data ``rows`` (dicts keyed by the header, in file order) and the
    physical ``lines`` (1-based) they came from."""

    path: Path
    rows: list[dict[str, str]]
    lines: list[int]

    @property
    def ids(self) -> list[str]:
        """The ``Folder/ID`` of each row, stripped."""
        return [row[_ID_COLUMN].strip() for row in self.rows]


def read_index_file(root: Path) -> IndexFile | None:
    """``root/Index.csv`` with the line of each row; None when absent.

    A file without a ``Folder/ID`` column, a row of another length than the header, or a patient
    listed twice raises :class:`DataError` naming the file and line(s) (each would misalign or
    overwrite label rows)."""
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        return None
    rows, lines = [], []
    with index_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    header = reader.fieldnames or []
    if rows and _ID_COLUMN not in header:
        raise DataError(f"{index_path}: no {_ID_COLUMN!r} column (header: {header}).")
    for line, row in zip(lines, rows, strict=True):
        if None in row or None in row.values():  # csv's markers of a longer or shorter row
            more_or_fewer = "more" if None in row else "fewer"
            raise DataError(
                f"{index_path}, line {line}: {more_or_fewer} fields than the header ({', '.join(header)}); "
                "fix the row, or the label rows would not match the patients."
            )
    index = IndexFile(index_path, rows, lines)
    _refuse_duplicate_ids(index)
    return index


def _refuse_duplicate_ids(index: IndexFile) -> None:
    """Raise :class:`DataError` naming both lines when a ``Folder/ID`` is on two rows (one would win)."""
    first_line: dict[str, int] = {}
    for line, pid in zip(index.lines, index.ids, strict=True):
        if pid and pid in first_line:
            raise DataError(
                f"{index.path}, lines {first_line[pid]} and {line}: patient {pid!r} listed twice, so one row's "
                "slice labels would be lost; keep one row per patient (and delete the same row of the label "
                "array: row r belongs to the r-th data row)."
            )
        first_line.setdefault(pid, line)


def read_index(root: Path) -> list[dict[str, str]] | None:
    """The data rows of ``root/Index.csv`` as dicts keyed by its header, in file order; None when absent.
    Refuses the files :func:`read_index_file` refuses."""
    index = read_index_file(root)
    return None if index is None else index.rows


def load_label_array(path: Path, data: bytes | None = None) -> np.ndarray:
    """A slice label array, int8 (rows, columns) 0/1, from ``path`` (or from ``data``, the file's bytes).

    An unreadable file, a pickled (object) or non-numeric array, another number of dimensions than 2,
    or a value other than 0 and 1 raises :class:`DataError` naming the file."""
    try:
        labels = np.load(path if data is None else io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{path}: not a readable label array ({reason}); save it with numpy.save as 0/1 integers."
        ) from None
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "biuf":
        kind = getattr(labels, "dtype", type(labels).__name__)
        raise DataError(f"{path}: slice labels of type {kind}; save them with numpy.save as 0/1 integers.")
    if labels.ndim != 2:
        raise DataError(f"{path}: shape {labels.shape}; slice labels are (patients, slices), one row per patient.")
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{path}: slice labels must be 0 or 1.")
    return labels.astype(np.int8)


def read_slice_labels(root: Path, label_file: str | None = None) -> dict[str, np.ndarray]:
    """Map patient id -> int8 (200,) slice labels from Index.csv + the label array.

    Returns an empty dict when the dataset ships no label files.
    """
    return _slice_labels(root, label_file, read_index_file(root))


def _slice_labels(root: Path, label_file: str | None, index: IndexFile | None) -> dict[str, np.ndarray]:
    """:func:`read_slice_labels` given Index.csv, read (None: no Index.csv)."""
    array_path = find_label_file(root, label_file)
    if array_path is None:
        return {}
    if index is None:
        raise DataError(f"{root / INDEX_FILE}: missing; it is needed to map rows of {array_path.name} to patients.")
    labels = load_label_array(array_path)
    if labels.shape[0] != len(index.rows):
        raise DataError(
            f"{array_path}: shape {labels.shape} does not match the {len(index.rows)} data rows of {index.path}; "
            "row r of the array must be the r-th data row of Index.csv."
        )
    return dict(zip(index.ids, labels, strict=True))


def _diagnoses(index: IndexFile | None) -> dict[str, int]:
    """Patient id -> class from Index.csv's Diagnosis column (to cross-check folders)."""
    if index is None:
        return {}
    return {
        pid: _CLASS_OF_WORD[row[_DIAGNOSIS_COLUMN].strip().lower()]
        for pid, row in zip(index.ids, index.rows, strict=True)
        if row.get(_DIAGNOSIS_COLUMN, "").strip().lower() in _CLASS_OF_WORD
    }


def _match_index_to_folders(index: IndexFile | None, folders: dict[str, Path]) -> None:
    """Refuse an Index.csv id that names a patient folder in another case (its labels would silently be
    lost); warn, naming them, about ids without a patient folder (a subset of the dataset is fine)."""
    if index is None:
        return
    by_casefold = {pid.casefold(): folder for pid, folder in folders.items()}
    absent = []
    for line, pid in zip(index.lines, index.ids, strict=True):
        if pid in folders:
            continue
        folder = by_casefold.get(pid.casefold())
        if folder is not None:
            raise DataError(
                f"{index.path}, line {line}: Folder/ID {pid!r} matches the patient folder {folder} only "
                "if case is ignored; rename the folder or edit Index.csv so that they are spelt alike "
                "(otherwise its slice labels and diagnosis are not used)."
            )
        absent.append(pid)
    if absent:
        shown = ", ".join(repr(pid) for pid in absent[:10]) + (", ..." if len(absent) > 10 else "")
        log.warning(
            "%s: %d of %d rows name a patient with no folder under %s (%s); their slice labels are not used.",
            index.path,
            len(absent),
            len(index.rows),
            index.path.parent,
            shown,
        )


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
    index = read_index_file(root)  # read once: slice label rows and the diagnoses to cross-check
    slice_labels = _slice_labels(root, label_file, index)
    diagnoses = _diagnoses(index)
    patients: list[PatientFolder] = []
    seen: dict[str, Path] = {}
    for label, class_dir in sorted(class_dirs, key=lambda cd: (cd[0], cd[1].name)):
        files, others = scan_folder(class_dir)  # ``others`` holds the patient folders (and hidden entries)
        visible = [o for o in others if not o.path.name.startswith(".")]
        if skipped is not None:
            skipped += [Skipped(o.path, f"not a patient folder: {o.reason}") for o in visible if not o.path.is_dir()]
            skipped += [Skipped(f, "a file where patient folders are expected") for f in files]
            skipped += [  # a hidden folder may be a patient someone hid, or a tool's: either way, say so
                Skipped(o.path, "a hidden folder, not read as a patient")
                for o in others
                if o.path.name.startswith(".") and o.path.name not in IGNORED_NAMES and o.path.is_dir()
            ]
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
    _match_index_to_folders(index, seen)
    return patients
