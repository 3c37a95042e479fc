"""Slice training targets from patient classes and slice labels (the label modes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidct import NORMAL_CLASS
from covidct.errors import ConfigError

LABEL_MODES = ("paper", "patient")

#: Target of a slice whose class is unknown (sick patient without slice labels in ``paper`` mode).
UNKNOWN = -1


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
            ``patient``: every slice takes its patient's class.
        patient_labels: class index per patient (P,).
        slice_labels: per patient, int8 (>= n_slices,) 0/1 head-first labels, or None.
        slice_patient: int (N,) patient index of each slice.
        slice_index: int (N,) head-first index of each slice within its patient.

    Returns:
        int64 (N,) class index per slice, or UNKNOWN.
    """
    if mode not in LABEL_MODES:
        raise ConfigError(f"data.label_mode={mode!r} is not one of {list(LABEL_MODES)}")
    labels = np.asarray(patient_labels, dtype=np.int64)
    targets = labels[slice_patient]
    if mode == "patient":
        return targets
    for p, row in enumerate(slice_labels):
        if labels[p] == NORMAL_CLASS:
            continue
        mine = slice_patient == p
        if row is None:
            targets[mine] = UNKNOWN
        else:
            infected = np.asarray(row, dtype=bool)[slice_index[mine]]
            targets[mine] = np.where(infected, labels[p], NORMAL_CLASS)
    return targets


def check_label_lengths(patient_ids: Sequence[str], n_slices: Sequence[int], slice_labels) -> list[str]:
    """Warnings for label rows that mark slices beyond a patient's slice count (a sign of a
    wrong ordering, a missing file or the wrong label file)."""
    problems = []
    for pid, n, row in zip(patient_ids, n_slices, slice_labels, strict=True):
        if row is not None and np.asarray(row)[n:].any():
            problems.append(
                f"{pid}: slice labels mark infected slices beyond its {n} slices "
                f"(last labelled index {int(np.flatnonzero(row).max())}); slices missing or wrong label file?"
            )
    return problems
