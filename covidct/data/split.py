"""Patient-level stratified splits: no patient is ever on both sides."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidct.errors import ConfigError, DataError
from covidct.io import csv_text


def stratified_folds(labels: Sequence[int], num_folds: int, seed: int) -> np.ndarray:
    """Fold number (int64 (P,), 0..num_folds-1) of each patient, classes spread evenly over folds."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    start = 0  # rotate so small classes do not all land in fold 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        folds[members] = (start + np.arange(len(members))) % num_folds
        start = (start + len(members)) % num_folds
    return folds


def check_split(val_fraction: float, num_folds: int | None, fold: int, split_file: str | None = None) -> None:
    """Raise :class:`ConfigError` naming ``data.val_fraction`` / ``data.num_folds`` / ``data.fold`` /
    ``data.split_file`` when the split settings are impossible (``val_fraction`` must be in [0, 1) without
    folds; 0 = train on every patient, no validation) or contradict each other (a ``split_file`` fixes
    the split, so fold keys would be ignored and a fold sweep would repeat one split)."""
    if split_file is not None and (num_folds is not None or fold != 0):
        raise ConfigError(
            f"data.split_file={split_file} fixes the split, so data.num_folds={num_folds} and data.fold={fold} "
            "would be ignored; set data.num_folds=null data.fold=0, or data.split_file=null to draw folds"
        )
    if num_folds is None:
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(
                f"data.val_fraction must be in [0, 1) (0: train on every patient, no validation), got {val_fraction}"
            )
    elif num_folds < 2 or not 0 <= fold < num_folds:
        raise ConfigError(
            f"k-fold needs data.num_folds >= 2 and 0 <= data.fold < data.num_folds, "
            f"got num_folds={num_folds}, fold={fold}"
        )


def train_val_split(
    labels: Sequence[int],
    val_fraction: float,
    seed: int,
    num_folds: int | None = None,
    fold: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of patients, stratified by class and seeded.

    With ``num_folds`` set, validation is fold ``fold`` of a stratified k-fold split; otherwise
    each class contributes round(val_fraction * n) patients to validation (at least one when the
    class has two or more patients and val_fraction > 0).
    """
    labels = np.asarray(labels)
    check_split(val_fraction, num_folds, fold)
    if num_folds is not None:
        folds = stratified_folds(labels, num_folds, seed)
        return np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(members)))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.extend(members[:n_val].tolist())
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


SUBSETS = ("train", "val", "test")


def _read_split_rows(path: Path) -> dict[str, str]:
    """Patient -> subset from the split CSV at ``path``; raises :class:`DataError` naming the line of a
    row with more cells than the header or no patient, an unknown subset or a patient listed twice."""
    subset_of: dict[str, str] = {}
    seen: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        if not {"patient", "subset"} <= set(header):
            raise DataError(
                f"data.split_file={path}: needs columns patient,subset (found: {', '.join(header) or 'none'})"
            )
        for raw in reader:
            line = reader.line_num
            if None in raw:  # csv's marker of a row longer than the header
                raise DataError(
                    f"{path}, line {line}: {len(raw[None])} more cell(s) than the header ({', '.join(header)}); "
                    "give one patient,subset per row (quote a cell that holds a comma)"
                )
            row = {k.strip().lower(): csv_text((v or "").strip()) for k, v in raw.items()}  # split.csv's own cells
            if not row["patient"]:
                raise DataError(f"{path}, line {line}: no patient; give one patient,subset per row")
            pid, subset = row["patient"], row["subset"].lower()
            if subset not in SUBSETS:
                raise DataError(
                    f"{path}, line {line}: subset {row['subset']!r} of {pid!r} is not one of {', '.join(SUBSETS)}"
                )
            if pid in seen:
                raise DataError(
                    f"{path}, line {line}: patient {pid!r} again (first on line {seen[pid]}); one subset per patient"
                )
            seen[pid], subset_of[pid] = line, subset
    return subset_of


def read_split_file(path: str | Path, patient_ids: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """A fixed split from a CSV ``patient,subset`` (subset: train, val or test), e.g. an official one.

    Args:
        path: the CSV (``data.split_file``).
        patient_ids: (P,) the patients found on disk.

    Returns:
        ``{"train": int64 indices, "val": ..., "test": ...}`` into ``patient_ids``, and notes listing the
        patients of the file that are not on disk and the patients on disk that are not in the file
        (not used). A missing file or column, a row of more cells than the header or without a patient,
        an unknown subset and a patient in two rows raise :class:`DataError` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.split_file={path}: not found; give a CSV with columns patient,subset")
    subset_of = _read_split_rows(path)
    index = {pid: i for i, pid in enumerate(patient_ids)}
    absent = [pid for pid in subset_of if pid not in index]
    unlisted = [pid for pid in patient_ids if pid not in subset_of]
    notes = []
    if absent:
        notes.append(f"{len(absent)} patient(s) of {path.name} not on disk: {', '.join(absent[:10])}")
    if unlisted:
        notes.append(f"{len(unlisted)} patient(s) on disk not in {path.name}, not used: {', '.join(unlisted[:10])}")
    subsets = {
        s: np.asarray(sorted(index[p] for p, sub in subset_of.items() if sub == s and p in index), dtype=np.int64)
        for s in SUBSETS
    }
    if not len(subsets["train"]):
        raise DataError(f"data.split_file={path}: no training patient on disk")
    return subsets, notes
