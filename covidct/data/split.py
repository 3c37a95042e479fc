"""Patient-level stratified splits: no patient is ever on both sides."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidct.errors import ConfigError


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


def check_split(val_fraction: float, num_folds: int | None, fold: int) -> None:
    """Raise :class:`ConfigError` naming ``data.val_fraction`` / ``data.num_folds`` / ``data.fold`` when
    the split settings are impossible (``val_fraction`` must be in [0, 1) without folds; 0 = train on every
    patient, no validation)."""
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
