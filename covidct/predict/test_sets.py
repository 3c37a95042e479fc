"""Test sets: find them under ``predict.py input=`` (one patient folder, a folder of patient folders, or a
folder of test sets) and read each patient folder into preprocessed uint8 slices, without torch (shared by the
checkpoint's DataLoader and the ONNX process pool)."""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.misc import is_dicom

from covidct.data.dicom import IGNORED_NAMES, Skipped, entry_kind, one_line
from covidct.data.preprocess import SlicePreprocessor, read_preprocessed
from covidct.data.series import other_axial, series_line
from covidct.errors import CovidCTError, DataError
from covidct.processes import worker_pool

#: why an entry was not read (the patient CSV's detail, prediction.json's input_skipped)
HIDDEN = "hidden entry, not read"
NOT_A_TEST_SET = "holds no patient folder with DICOM files; not a test set"
INSIDE_PATIENT = "a subfolder of the patient folder, not read (a patient's slices are the files directly in it)"
#: what the one-line input summary calls each reason (any other: not a patient folder)
SHORT_REASONS = {
    HIDDEN: "hidden",
    NOT_A_TEST_SET: "without patient folders",
    INSIDE_PATIENT: "inside the patient folder",
}


@dataclass
class TestSet:
    """A named group of patient folders whose predictions go into one CSV; ``skipped``: the entries beside
    them that are not patient folders (stray files, archives, hidden folders), each with why."""

    name: str
    patients: list[Path]
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class InputScan:
    """What ``predict.py input=`` holds: its test sets, and ``skipped``, the entries outside every test set
    that are not read (stray files beside the test sets, subfolders without patient folders), each with why."""

    root: Path
    test_sets: list[TestSet]
    skipped: list[Skipped] = field(default_factory=list)

    def summary(self) -> str:
        """One line, e.g. ``input /x: 2 test sets, 31 patient folders; 1 entry skipped (1 not a patient folder),
        listed in the CSVs (status skipped)``."""
        inside = [s for t in self.test_sets for s in t.skipped]
        counts = Counter(SHORT_REASONS.get(s.reason, "not a patient folder") for s in [*inside, *self.skipped])
        patients = sum(len(t.patients) for t in self.test_sets)
        line = f"input {self.root}: {_count(len(self.test_sets), 'test set')}, {_count(patients, 'patient folder')}"
        if not counts:
            return f"{line}; nothing skipped"
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
        places = (("the CSVs (status skipped)", inside), ("prediction.json (input_skipped)", self.skipped))
        where = [place for place, listed in places if listed]
        entries = _count(len(inside) + len(self.skipped), "entry", "entries")
        return f"{line}; {entries} skipped ({kinds}), listed in {' and '.join(where)}"


def _count(n: int, one: str, many: str = "") -> str:
    """``1 test set``, ``2 test sets``."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def _has_dicom(folder: Path) -> bool:
    """True if any file directly in ``folder`` is DICOM (checks the 'DICM' preamble, stops at the first)."""
    return any(entry_kind(e) == "file" and e.name not in IGNORED_NAMES and is_dicom(e.path) for e in os.scandir(folder))


def _entries(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """The visible subfolders of ``folder`` (sorted), and every other entry with why it is not a patient."""
    folders, others = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path, kind = Path(entry.path), entry_kind(entry)
        if entry.name in IGNORED_NAMES:
            continue  # OS droppings (.DS_Store, Thumbs.db, DICOMDIR): never a patient, never worth a row
        if entry.name.startswith("."):
            others.append(Skipped(path, HIDDEN))
        elif kind == "dir":
            folders.append(path)
        elif kind == "file":
            what = "a DICOM file" if is_dicom(path) else "a file"
            others.append(Skipped(path, f"{what} beside the patient folders, not a patient folder"))
        else:
            others.append(Skipped(path, "a broken link or special file, not a patient folder"))
    return folders, others


def scan_input(input_path: str | Path) -> InputScan:
    """The test sets under ``input_path`` (see the module docstring) and what is not read. Errors before any
    work is done; logs nothing (predict.py logs :meth:`InputScan.summary`).

    ``input`` is one patient folder when it holds DICOM files and no subfolder with DICOM files; else its
    subfolders are patients (a test set) when any holds DICOM files; else its subfolders are test sets.
    Entries beside the patient folders (a stray ``.dcm``, a ``.zip``, a hidden folder) are listed in the
    test set's ``skipped``, those beside the test sets in the scan's: never read as a patient, never dropped
    without a word."""
    root = Path(input_path)
    if not root.exists():
        raise DataError(f"input={root}: does not exist.")
    if not root.is_dir():
        raise DataError(f"input={root}: is a file; give a patient folder or a folder of patient folders.")
    children, stray = _entries(root)
    # every subfolder of a test set is a patient: one without a readable slice gets a row saying why
    if any(_has_dicom(c) for c in children):
        return InputScan(root, [TestSet(root.name, children, stray)])
    if _has_dicom(root):
        inside = [s for s in stray if not s.reason.startswith("a DICOM file")] + [
            Skipped(c, INSIDE_PATIENT) for c in children
        ]
        return InputScan(root, [TestSet(root.name, [root], inside)])
    sets, outside = [], list(stray)
    for child in children:
        patients, others = _entries(child)
        if any(_has_dicom(p) for p in patients):
            sets.append(TestSet(child.name, patients, others))
        else:
            outside.append(Skipped(child, NOT_A_TEST_SET))
    if not sets:
        raise DataError(
            f"input={root}: no DICOM file in it, its subfolders or their subfolders. Expected a patient folder "
            "of DICOM slices, a folder of patient folders, or a folder of test sets."
        )
    return InputScan(root, sets, sorted(outside, key=lambda s: s.path.name))


def find_test_sets(input_path: str | Path) -> list[TestSet]:
    """The test sets of :func:`scan_input` (what is not read beside them is not reported)."""
    return scan_input(input_path).test_sets


def read_patient(folder: Path, preprocessor: SlicePreprocessor) -> dict[str, Any]:
    """One patient folder read and preprocessed: ``images`` uint8 (N, C, S, S) in slice order (head first),
    ``locations``, ``ranks``, ``order_key``, ``order_note``, ``skipped`` (one line per unreadable slice),
    ``series`` (the series read, ``SeriesInfo.as_dict()``), ``n_series``, ``series_notes`` (one line per series
    when the folder held more than one), ``sop_digest``; or
    ``error`` (one line) when no slice could be used. Shared by the DataLoader (checkpoint) and the process
    pool (ONNX) readers."""
    try:
        series, _ = read_preprocessed(folder, preprocessor)  # a series not cropped is logged there
    except CovidCTError as exc:
        return {"folder": folder, "error": one_line(exc)}
    chosen = series.series.as_dict() if series.series else None
    others = [s.as_dict() for s in series.other_series]
    return {
        "folder": folder,
        "images": np.stack(series.slices),
        "locations": series.locations,
        "ranks": series.ranks,
        "order_key": series.order_key,
        "order_note": series.order_note,
        "skipped": [f"{s.path.name}: {s.reason}" for s in series.skipped],
        "series": chosen,
        "n_series": 1 + len(other_axial(others)),
        "series_notes": ([f"used {series_line(chosen)}"] if others and chosen else [])
        + [f"not used: {series_line(o)}" for o in others],
        "sop_digest": series.sop_digest,
    }


def _reader_process() -> None:
    """A reader process resizes with one OpenCV thread: the processes already run in parallel."""
    import cv2

    cv2.setNumThreads(1)


def read_patients(folders: list[Path], preprocessor: SlicePreprocessor, num_workers: int) -> Iterator[dict]:
    """:func:`read_patient` of each folder, in order, without torch: ``num_workers`` processes read ahead
    (at most two patients each) while the caller computes; 0 reads in this process."""
    if not num_workers:
        yield from (read_patient(f, preprocessor) for f in folders)
        return
    pool = worker_pool(num_workers, _reader_process)  # they die with this process, even after kill -9
    try:
        pending: deque[Future] = deque()
        todo = iter(folders)
        for folder in todo:
            pending.append(pool.submit(read_patient, folder, preprocessor))
            if len(pending) >= 2 * num_workers:
                break
        while pending:
            item = pending.popleft().result()
            folder = next(todo, None)
            if folder is not None:
                pending.append(pool.submit(read_patient, folder, preprocessor))
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
