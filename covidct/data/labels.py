"""Slice training targets from patient classes and slice labels (the label modes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from covidct.contracts import CLASS_NAMES, NORMAL_CLASS
from covidct.errors import ConfigError

#: ``paper``: 3 classes from radiologist slice labels; ``patient``: every slice takes its patient's class;
#: ``infection``: 2 classes (stage 1 of two-stage training); ``pseudo``: as ``paper``, with stage 1's
#: pseudo-labels for training patients that have no radiologist labels (stage 2).
LABEL_MODES = ("paper", "patient", "infection", "pseudo")

#: Slice classes of ``label_mode=infection`` (stage 1): index 1 = the slice shows infection.
INFECTION_CLASSES: tuple[str, ...] = ("clean", "infected")
INFECTED = 1

#: Target of a slice whose class is unknown (sick patient without slice labels in ``paper`` mode).
UNKNOWN = -1


def class_names_of(mode: str) -> list[str]:
    """The slice classes a model trained in label ``mode`` predicts (``${classes:${data.label_mode}}``)."""
    if mode not in LABEL_MODES:
        raise ConfigError(f"data.label_mode={mode!r} is not one of {list(LABEL_MODES)}")
    return list(INFECTION_CLASSES if mode == "infection" else CLASS_NAMES)


def slice_targets(
    mode: str,
    patient_labels: Sequence[int],
    slice_labels: Sequence[np.ndarray | None],
    slice_patient: np.ndarray,
    slice_index: np.ndarray,
) -> np.ndarray:
    """Class target of every cached slice.

    Args:
        mode: ``paper``: an infected slice takes its patient's class, every other slice is
            Normal, Normal patients' slices are Normal, and slices of a sick patient without
            slice labels are UNKNOWN (-1: not trained on, not scored at slice level);
            ``patient``: every slice takes its patient's class; ``infection``: 1 (infected) for a
            labelled infected slice, 0 (clean) for every other slice of a labelled patient and every
            slice of a Normal patient, UNKNOWN for sick patients without slice labels; ``pseudo``: as
            ``paper`` (the caller puts pseudo-label rows where radiologist rows are missing).
        patient_labels: class index per patient (P,).
        slice_labels: per patient, int8 (L,) 0/1 head-first labels, or None (see
            :func:`usable_slice_labels`); L exceeds every slice index of the patient.
        slice_patient: int (N,) patient index of each slice.
        slice_index: int (N,) head-first rank of each slice in its patient's whole series.

    Returns:
        int64 (N,) index into :func:`class_names_of` per slice, or UNKNOWN.
    """
    if mode not in LABEL_MODES:
        raise ConfigError(f"data.label_mode={mode!r} is not one of {list(LABEL_MODES)}")
    labels = np.asarray(patient_labels, dtype=np.int64)
    targets = labels[slice_patient]
    if mode == "patient":
        return targets
    infection = mode == "infection"
    clean = 0 if infection else NORMAL_CLASS
    if infection:
        targets = np.zeros_like(targets)  # Normal patients: every slice clean
    for p, row in enumerate(slice_labels):
        if labels[p] == NORMAL_CLASS:
            continue
        mine = slice_patient == p
        if row is None:
            targets[mine] = UNKNOWN
        else:
            infected = np.asarray(row, dtype=bool)[slice_index[mine]]
            targets[mine] = np.where(infected, INFECTED if infection else labels[p], clean)
    return targets


def usable_slice_labels(
    patient_id: str, row: np.ndarray | None, series_length: int, unplaced: Sequence[Mapping[str, str]]
) -> tuple[np.ndarray | None, str | None]:
    """A patient's slice label row if it can be matched to the slices, else (None, why).

    Column i of a label row is the i-th position of the whole series, head first; the cache's slice
    ranks count every position (skipped slices included), so the row is used as it is, unless:

    * a skipped file's position is unknown (``unplaced``: its header is unreadable): any column after
      it may be off by one, so the labels are not used (never guessed);
    * the row marks infected slices at or beyond ``series_length``: the series and the labels
      disagree (files missing, another ordering, or the wrong label file);
    * the series has more positions than the row has columns: the extra slices have no label.

    Args:
        row: int8 (L,) 0/1 labels, zero padded; None when the dataset has none for the patient.
        series_length: positions in the patient's series (kept + skipped with a known position).
        unplaced: ``{"file", "reason"}`` of skipped files whose position is unknown.
    """
    if row is None:
        return None, None
    marked = np.flatnonzero(row)
    if unplaced:
        first = unplaced[0]
        why = (
            f"{len(unplaced)} skipped file(s) of unknown position (first: {Path(first['file']).name}: "
            f"{first['reason']}), so label columns cannot be matched to slices"
        )
    elif len(marked) and marked[-1] >= series_length:
        why = (
            f"the labels mark infected slices up to column {marked[-1]} but the series has {series_length} "
            "slice positions: files missing, another slice order, or the wrong label file"
        )
    elif series_length > len(row):
        why = f"the series has {series_length} slice positions but the label row only {len(row)} columns"
    else:
        return row, None
    return None, f"{patient_id}: slice labels not used: {why}"


def labels_fit(row: np.ndarray, series_length: int) -> bool:
    """True when a label row (int8 (L,) 0/1) can describe a series of ``series_length`` positions: no
    infected column at or beyond its end, and no position beyond the row's columns."""
    marked = np.flatnonzero(row)
    return series_length <= len(row) and not (len(marked) and marked[-1] >= series_length)


def series_of_labels(
    patient_id: str, row: np.ndarray | None, chosen: Mapping[str, object], others: Sequence[Mapping[str, object]]
) -> tuple[np.ndarray | None, str | None]:
    """``row`` if it can belong to the chosen series only, else (None, why naming the series).

    A folder with several axial series (``others``: the other axial series, ``SeriesInfo.as_dict()``)
    gives a label row more than one series it could describe; when another series fits it too
    (:func:`labels_fit`), nothing says which one the radiologists labelled, so the labels are not used.
    Pass ``others=()`` when the user named the series (``data.series``): that settles it.
    """
    if row is None:
        return None, None
    rivals = [s for s in others if labels_fit(row, int(s["n_images"]))]  # type: ignore[call-overload]
    if not rivals:
        return row, None
    names = "; ".join(f"{s['uid']} ({s['n_images']} slices)" for s in rivals)
    return None, (
        f"{patient_id}: slice labels not used: they fit the chosen series {chosen['uid']} ({chosen['n_images']} "
        f"slices) and also {names}; set data.series to the labelled series' description or kernel"
    )
