"""Label assembly: which cached patients train, validate or test (the seeded split, its folds, or a split
file), and the target of every cached slice (radiologist slice labels, stage-1 pseudo-labels or the patient's
class, per ``data.label_mode``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from covidct.contracts import NORMAL_CLASS
from covidct.data.cache import SliceCache
from covidct.data.labels import UNKNOWN, series_of_labels, slice_targets, usable_slice_labels
from covidct.data.layout import PatientFolder
from covidct.data.preprocess import SlicePreprocessor
from covidct.data.pseudo_labels import check_pseudo_labels, read_pseudo_labels
from covidct.data.series import AUTO, other_axial
from covidct.data.split import read_split_file, train_val_split

log = logging.getLogger("covidct.data.datamodule")


@dataclass(frozen=True)
class SplitSettings:
    """The ``data.*`` keys of the patient split: ``val_fraction``, ``num_folds``, ``fold``, ``seed`` (see
    :func:`covidct.data.split.train_val_split`), or ``split_file`` (a fixed CSV split, which overrides them)."""

    val_fraction: float
    num_folds: int | None
    fold: int
    seed: int
    split_file: str | None = None


@dataclass(frozen=True)
class Assembly:
    """The split and the slice targets of a cache. Per patient index: ``patient_ids`` (folder names),
    ``patient_labels`` int64 (P,). ``train_patients``, ``val_patients``, ``test_patients``: int64 patient
    indices. ``pseudo_labelled``: the training patients whose targets are stage-1 pseudo-labels. Per cache row:
    ``targets`` int64 (N,) slice target (-1 unknown). ``train_rows`` int64: the training slices with a known
    target; ``val_rows`` int64: every validation slice (sorted cache rows). ``label_problems``: one line per
    label row not used (and per note of the split file)."""

    patient_ids: list[str]
    patient_labels: np.ndarray
    train_patients: np.ndarray
    val_patients: np.ndarray
    test_patients: np.ndarray
    pseudo_labelled: list[int]
    targets: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    label_problems: list[str]


def assemble(
    patients: Sequence[PatientFolder],
    cache: SliceCache,
    preprocessor: SlicePreprocessor,
    label_mode: str,
    split: SplitSettings,
    pseudo_labels: str | None = None,
) -> Assembly:
    """Split the cache's patients and give each cached slice its target (``patients``: the discovered
    folders with their slice label rows; patients skipped by the cache are left out)."""
    patient_ids = [p.patient_id for p in cache.patients]
    patient_labels = np.asarray([p.label for p in cache.patients], dtype=np.int64)
    slice_labels, label_problems = matched_slice_labels(patients, cache, preprocessor.series)
    if split.split_file is None:
        train, val = train_val_split(patient_labels, split.val_fraction, split.seed, split.num_folds, split.fold)
        test = np.zeros(0, dtype=np.int64)
    else:
        subsets, notes = read_split_file(split.split_file, patient_ids)
        train, val, test = subsets["train"], subsets["val"], subsets["test"]
        label_problems += [f"data.split_file: {note}" for note in notes]
    pseudo_labelled = []
    if label_mode == "pseudo":
        assert pseudo_labels is not None  # check_data_settings: label_mode=pseudo needs data.pseudo_labels
        pseudo_labelled = add_pseudo_labels(
            slice_labels, pseudo_labels, cache, preprocessor, patient_labels, train, val
        )
    targets = slice_targets(label_mode, patient_labels, slice_labels, cache.patient, cache.slice_index)
    train_rows = np.flatnonzero(np.isin(cache.patient, train) & (targets != UNKNOWN))
    val_rows = np.flatnonzero(np.isin(cache.patient, val))
    return Assembly(
        patient_ids, patient_labels, train, val, test, pseudo_labelled, targets, train_rows, val_rows, label_problems
    )


def matched_slice_labels(
    patients: Sequence[PatientFolder], cache: SliceCache, series_rule: str
) -> tuple[list[np.ndarray | None], list[str]]:
    """Per cached patient, its slice label row (int per series position) when it can be matched to the
    cached series, else None; and one line per row not used, saying why."""
    labels_of = {p.patient_id: p.slice_labels for p in patients}
    slice_labels, label_problems = [], []
    for p in cache.patients:  # skipped patients are not in the cache
        row, problem = usable_slice_labels(p.patient_id, labels_of[p.patient_id], p.series_length, p.unplaced)
        if row is not None and series_rule == AUTO:  # a named series settles which was labelled
            row, problem = series_of_labels(p.patient_id, row, p.series or {}, other_axial(p.other_series))
        slice_labels.append(row)
        label_problems += [problem] if problem else []
    return slice_labels, label_problems


def add_pseudo_labels(
    slice_labels: list[np.ndarray | None],
    pseudo_labels: str,
    cache: SliceCache,
    preprocessor: SlicePreprocessor,
    patient_labels: np.ndarray,
    train_patients: np.ndarray,
    val_patients: np.ndarray,
) -> list[int]:
    """Put stage-1 pseudo-label rows (checked by :func:`check_pseudo_labels`) in ``slice_labels`` for the
    sick *training* patients without radiologist labels; returns their patient indices. Radiologist
    labels are never replaced, and validation patients keep UNKNOWN slice targets."""
    patient_ids = [p.patient_id for p in cache.patients]
    pseudo = read_pseudo_labels(pseudo_labels)
    check_pseudo_labels(
        pseudo,
        {p.patient_id: p.series_length for p in cache.patients},
        preprocessor,
        [patient_ids[i] for i in val_patients],
    )
    used = []
    for i in map(int, train_patients):
        pid = patient_ids[i]
        if slice_labels[i] is None and patient_labels[i] != NORMAL_CLASS and pid in pseudo.rows:
            slice_labels[i], _ = usable_slice_labels(pid, pseudo.rows[pid], cache.patients[i].series_length, ())
            used += [i] if slice_labels[i] is not None else []  # counted only when its row is used
    log.info("%d training patients take stage-1 pseudo-labels from %s", len(used), pseudo.path)
    return used


def no_training_slices(assembly: Assembly, label_mode: str) -> str:
    """Why no training slice has a target, and what to change."""
    names = [assembly.patient_ids[i] for i in assembly.train_patients]
    text = (
        f"no training slices: the {len(names)} training patient(s) ({', '.join(names[:5])}"
        f"{', ...' if len(names) > 5 else ''}) have no slice with a known target in "
        f"data.label_mode={label_mode}"
    )
    if label_mode == "paper":
        text += (
            " (slices of a sick patient without usable slice labels are UNKNOWN and not trained on). "
            "Use data.label_mode=patient (every slice takes its patient's class), add Normal patients, "
            "or give slice labels (data.slice_labels_file)"
        )
    problems = assembly.label_problems
    return text + ("; " + "; ".join(problems) if problems else "")
