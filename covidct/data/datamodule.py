"""LightningDataModule: patients -> cached slices -> seeded patient-level split -> DataLoaders.

Every batch is a dict:

* ``image``: uint8 (B, C, S, S), one channel per window (the model converts and normalises);
* ``target``: int64 (B,) slice class, -1 when unknown (``paper`` mode, sick patient without
  slice labels: such slices are never trained on but are still voted at patient level);
* ``patient``: int64 (B,) patient index into :attr:`CTDataModule.patient_ids`;
* ``slice``: int64 (B,) head-first slice index within the patient;
* ``index``: int64 (B,) global row in the cache (unique per slice: used to deduplicate DDP
  padding).

The items and samplers are in :mod:`covidct.data.slice_dataset`, the split and the slice targets in
:mod:`covidct.data.assembly`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from covidct.contracts import CLASS_NAMES as PATIENT_CLASSES
from covidct.contracts import SERIES_COLUMNS, SPLIT_FILE
from covidct.data.assembly import SplitSettings, assemble, no_training_slices
from covidct.data.cache import SliceCache, build_or_load_cache
from covidct.data.dicom import Skipped
from covidct.data.labels import LABEL_MODES, class_names_of
from covidct.data.layout import PatientFolder, discover_covid_ct_md
from covidct.data.preprocess import SlicePreprocessor, Window, parse_windows
from covidct.data.series import (
    AUTO,
    check_min_slices,
    check_series_rule,
    find_shared_series,
    series_cells,
)
from covidct.data.slice_dataset import EpochSampler, PaddedEvalSampler, SliceDataset
from covidct.data.split import check_split
from covidct.data.summary import DataSummary
from covidct.data.synthetic import SyntheticSpec, ensure_dataset
from covidct.errors import ConfigError, DataError
from covidct.io import atomic_write_csv

log = logging.getLogger(__name__)


def check_data_settings(
    root: str | None,
    synthetic: Mapping[str, Any] | None,
    image_size: int,
    label_mode: str,
    batch_size: int,
    val_fraction: float,
    num_folds: int | None,
    fold: int,
    pseudo_labels: str | None = None,
    split_file: str | None = None,
) -> None:
    """Raise :class:`ConfigError` naming the ``data.*`` key of a bad value (before any data is read)."""
    if root is None and synthetic is None:
        raise ConfigError("data.root is not set: give data.root=/path/to/COVID-CT-MD, or use data=synthetic")
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"data.root={root!r} is not a folder; point it at a COVID-CT-MD folder")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32:
        raise ConfigError(f"data.image_size must be an integer >= 32 (px), got {image_size!r}")
    if label_mode not in LABEL_MODES:
        raise ConfigError(f"data.label_mode={label_mode!r} is not known; choose one of {sorted(LABEL_MODES)}")
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
    if (label_mode == "pseudo") != (pseudo_labels is not None):
        raise ConfigError(
            "data.label_mode=pseudo needs data.pseudo_labels=<folder>/Slice-level-labels-pseudo.npy (written by "
            "python -m covidct.training.pseudo_label)"
            if pseudo_labels is None
            else f"data.pseudo_labels is read only with data.label_mode=pseudo (this run: {label_mode}); "
            "set data.label_mode=pseudo, or data.pseudo_labels=null"
        )
    check_split(val_fraction, num_folds, fold, split_file)


@dataclass(frozen=True)
class SliceTable:
    """What callbacks read of the data (instead of the datamodule's and the cache's internals).

    Per patient index: ``patient_ids`` (folder names) and ``patient_labels`` int64 (P,) class. Per
    cache row: ``patient`` int32 (N,), ``rank`` int32 (N,) head-first rank in its series (the label
    column), ``target`` int64 (N,) slice target (-1 unknown), ``images`` uint8 (N, C, S, S) memmap.
    ``val_rows`` int64 (V,): the validation slices' cache rows, sorted. ``windows``: one per channel.
    """

    patient_ids: list[str]
    patient_labels: np.ndarray
    patient: np.ndarray
    rank: np.ndarray
    target: np.ndarray
    images: np.ndarray
    val_rows: np.ndarray
    windows: tuple[Window, ...]


class CTDataModule(pl.LightningDataModule):
    """COVID-CT-MD style data (real, or synthetic generated on first use) as slice batches.

    Args:
        root: COVID-CT-MD style folder; ``None`` to use the synthetic dataset.
        synthetic: :class:`SyntheticSpec` fields for the generated dataset (used when ``root`` is None).
        cache_dir: where generated data and slice caches live (shared by all runs).
        output_dir: run folder for ``data_summary.{txt,json}`` and ``split.csv`` (None: not saved).
        windows: window presets or ``{level, width}`` in HU; one channel each.
        image_size: model input side in px.
        lung_crop: crop each series to the bounding box of its lungs (see :mod:`covidct.data.lung`).
        label_mode: ``paper`` or ``patient`` (see :func:`covidct.data.labels.slice_targets`).
        val_fraction, num_folds, fold, seed: patient-level split (see :func:`train_val_split`).
        batch_size: slices per batch.
        num_workers: DataLoader worker processes; None = auto: 0 without a GPU (reading the cache is
            cheap and workers would take CPU from the model), else min(8, CPUs - 1).
        pin_memory: page-locked batches for faster host-to-GPU copies; None = auto (when CUDA is there).
        prefetch_factor: batches each worker keeps ready (with workers; they persist across epochs).
        balanced_sampler: draw training slices with probability inversely proportional to their
            class frequency (replacement sampling, one epoch = as many slices as the split has).
        train_transforms: albumentations transforms applied to HWC uint8 training images.
        cache_workers: processes that read DICOM while building the cache.
        slice_labels_file: label array file name inside ``root`` (None: the preferred one present).
        pseudo_labels: stage-1 pseudo-label array (see :mod:`covidct.data.pseudo_labels`), read with
            ``label_mode=pseudo``: a training patient without radiologist slice labels takes its row.
        split_file: a fixed split, CSV ``patient,subset`` (train / val / test), instead of ``val_fraction``
            and folds (see :func:`read_split_file`); its test patients are scored once after training.
        series: which axial series of a patient folder is the patient's: ``auto`` (the most slices, then the
            thinnest) or a part of its SeriesDescription / ConvolutionKernel (see :mod:`covidct.data.series`).
        min_slices: a series with fewer usable slices is not a patient (skipped with the reason).
    """

    def __init__(
        self,
        root: str | None = None,
        synthetic: Mapping[str, Any] | None = None,
        cache_dir: str = ".cache/covidct",
        output_dir: str | None = None,
        windows: Sequence[str | Mapping[str, float]] = ("lung",),
        image_size: int = 224,
        lung_crop: bool = False,
        label_mode: str = "paper",
        val_fraction: float = 0.2,
        num_folds: int | None = None,
        fold: int = 0,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        prefetch_factor: int = 4,
        balanced_sampler: bool = False,
        train_transforms: Sequence[A.BasicTransform] | None = None,
        cache_workers: int = 1,
        slice_labels_file: str | None = None,
        pseudo_labels: str | None = None,
        split_file: str | None = None,
        series: str = AUTO,
        min_slices: int = 5,
    ) -> None:
        super().__init__()
        series, min_slices = check_series_rule(series), check_min_slices(min_slices)
        check_data_settings(
            root,
            synthetic,
            image_size,
            label_mode,
            batch_size,
            val_fraction,
            num_folds,
            fold,
            pseudo_labels,
            split_file,
        )
        self.root = root
        self.synthetic = (
            None
            if synthetic is None
            else SyntheticSpec(
                **{
                    k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                    for k, v in synthetic.items()
                }
            )
        )
        self.cache_dir = Path(cache_dir)
        self.output_dir = Path(output_dir) if output_dir else None
        self.preprocessor = SlicePreprocessor(parse_windows(list(windows)), image_size, lung_crop, series, min_slices)
        self.label_mode = label_mode
        self.val_fraction, self.num_folds, self.fold, self.seed = val_fraction, num_folds, fold, seed
        gpu = torch.cuda.is_available()
        self.batch_size = batch_size
        auto_workers = min(8, max((os.cpu_count() or 1) - 1, 0)) if gpu else 0
        self.num_workers = auto_workers if num_workers is None else num_workers
        self.pin_memory = gpu if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.balanced_sampler = balanced_sampler
        self.train_transform = A.Compose(list(train_transforms)) if train_transforms else None
        self.cache_workers = cache_workers
        self.slice_labels_file = slice_labels_file
        self.pseudo_labels = pseudo_labels
        self.split_file = split_file
        self.test_patients = np.zeros(0, dtype=np.int64)
        self.cache: SliceCache | None = None
        self.summary: DataSummary | None = None
        self._prepared: tuple[list[PatientFolder], list[Skipped], SliceCache] | None = None

    # ---- data preparation ---------------------------------------------------------------------
    @property
    def num_channels(self) -> int:
        return len(self.preprocessor.windows)

    @property
    def validates(self) -> bool:
        """False with ``val_fraction=0`` (no folds): every patient trains, nothing is validated."""
        return self.split_file is not None or self.num_folds is not None or self.val_fraction > 0

    @property
    def class_names(self) -> tuple[str, ...]:
        """The slice classes of the targets (``clean, infected`` with ``label_mode=infection``)."""
        return tuple(class_names_of(self.label_mode))

    def data_root(self) -> Path:
        """The dataset folder (the synthetic one is generated on first use)."""
        if self.root is not None:
            return Path(self.root)
        return ensure_dataset(self.cache_dir, self.synthetic)  # type: ignore[arg-type]

    def discover(self, skipped: list[Skipped] | None = None) -> list[PatientFolder]:
        return discover_covid_ct_md(self.data_root(), self.slice_labels_file, skipped)

    def _read(self) -> tuple[list[PatientFolder], list[Skipped], SliceCache]:
        """Discover the patients and build (or open) their slice cache: the one pass over the files."""
        skipped_entries: list[Skipped] = []
        patients = self.discover(skipped_entries)
        return (
            patients,
            skipped_entries,
            build_or_load_cache(patients, self.preprocessor, self.cache_dir, self.cache_workers),
        )

    def prepare_data(self) -> None:
        """Generate (synthetic) data and build the slice cache once; later runs reuse it. Lightning calls
        this on one process per node; ``setup`` in the same process reuses what it found."""
        self._prepared = self._read()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache, split its patients and set every slice's target (:func:`covidct.data.assembly.assemble`),
        and (rank 0) log and save the data summary and ``split.csv``. Once per datamodule."""
        if self.cache is not None:
            return
        patients, skipped_entries, cache = self._prepared or self._read()  # other DDP ranks read here
        self._prepared = None
        shared = find_shared_series(
            [(p.patient_id, str((p.series or {}).get("uid", "")), p.sop_digest) for p in cache.patients]
        )
        if shared:
            raise DataError(f"{self.data_root()}: {shared}.")
        self.cache = cache
        split = SplitSettings(self.val_fraction, self.num_folds, self.fold, self.seed, self.split_file)
        assembly = assemble(patients, cache, self.preprocessor, self.label_mode, split, self.pseudo_labels)
        self.patient_ids, self.patient_labels = assembly.patient_ids, assembly.patient_labels
        self.train_patients, self.val_patients = assembly.train_patients, assembly.val_patients
        self.test_patients = assembly.test_patients  # none without data.split_file
        self.pseudo_labelled, self.targets = assembly.pseudo_labelled, assembly.targets
        self.train_rows, self.val_rows = assembly.train_rows, assembly.val_rows
        if len(self.train_rows) == 0:
            raise ConfigError(no_training_slices(assembly, self.label_mode))
        self.summary = DataSummary.collect(
            root=str(self.data_root().resolve()),
            cache=cache,
            label_mode=self.label_mode,
            targets=self.targets,
            train_patients=self.train_patients,
            val_patients=self.val_patients,
            train_rows=self.train_rows,
            warnings=assembly.label_problems,
            skipped_entries=skipped_entries,
            target_names=self.class_names,
            pseudo_labelled=self.pseudo_labelled,
        )
        if not self._rank_zero():
            return
        log.info("\n%s", self.summary.text())
        if self.output_dir is not None:
            self.summary.save(self.output_dir)
            self.save_split(self.output_dir / SPLIT_FILE)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the split's patients, and the patients whose slices were trained on (the
        pseudo-labeller records stage 1's, so that stage 2 can refuse a leak into its validation patients)."""
        if self.cache is None:
            return {}
        trained_on = np.unique(self.cache.patient[self.train_rows])
        return {
            "trained_on": [self.patient_ids[i] for i in trained_on],
            "train_patients": [self.patient_ids[i] for i in self.train_patients],
            "val_patients": [self.patient_ids[i] for i in self.val_patients],
            "test_patients": [self.patient_ids[i] for i in self.test_patients],
            "label_mode": self.label_mode,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the split is recomputed from the config (and checked by the resume checks)."""

    def _rank_zero(self) -> bool:
        """True outside DDP and on global rank 0: the one process that logs and writes the data summary."""
        return self.trainer is None or self.trainer.is_global_zero

    def save_split(self, path: Path) -> None:
        """Write ``patient,class,subset,n_slices,series_length,order_key,series_uid,series_description,n_series``
        for every patient (atomic)."""
        subset = {int(i): "train" for i in self.train_patients} | {int(i): "val" for i in self.val_patients}
        subset |= {int(i): "test" for i in self.test_patients}
        atomic_write_csv(
            path,
            ["patient", "class", "subset", "n_slices", "series_length", "order_key", *SERIES_COLUMNS],
            [
                (
                    p.patient_id,
                    PATIENT_CLASSES[p.label],
                    subset.get(i, "unused"),
                    p.n_slices,
                    p.series_length,
                    p.order_key,
                    *series_cells(p.series, p.n_series),
                )
                for i, p in enumerate(self.cache.patients)  # type: ignore[union-attr]
            ],
        )

    @property
    def slice_table(self) -> SliceTable:
        """The data's :class:`SliceTable` (after ``setup``)."""
        cache = self.cache
        assert cache is not None, "call setup() first"
        return SliceTable(
            self.patient_ids,
            self.patient_labels,
            cache.patient,
            cache.slice_index,
            self.targets,
            cache.images,
            self.val_rows,
            self.preprocessor.windows,
        )

    @property
    def train_class_counts(self) -> list[int]:
        """Training slices per class (for ``loss.alpha=auto`` and the balanced sampler)."""
        return np.bincount(self.targets[self.train_rows], minlength=len(self.class_names)).tolist()

    # ---- loaders ------------------------------------------------------------------------------
    def _dataset(self, rows: np.ndarray, transform: A.Compose | None) -> SliceDataset:
        cache = self.cache
        assert cache is not None, "call setup() first"
        return SliceDataset(
            cache.path,
            cache.images.shape,
            rows,
            self.targets[rows],
            cache.patient[rows],
            cache.slice_index[rows],
            transform,
        )

    def _loader(self, dataset: SliceDataset, shuffle: bool, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        weights = None
        if self.balanced_sampler:
            counts = np.asarray(self.train_class_counts, dtype=np.float64)
            weights = 1.0 / counts[self.targets[self.train_rows]]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
        epoch = (lambda: self.trainer.current_epoch) if self.trainer is not None else None
        sampler = EpochSampler(len(self.train_rows), self.seed, epoch, weights, world, rank)
        return self._loader(self._dataset(self.train_rows, self.train_transform), shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        if len(self.val_rows) == 0:
            raise ConfigError(
                "No validation patients: every class has a single patient, or data.val_fraction rounds to none. "
                "Raise data.val_fraction, use data.num_folds (k-fold), or add patients."
            )
        dataset = self._dataset(self.val_rows, None)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = PaddedEvalSampler(dataset, shuffle=False) if distributed else None
        return self._loader(dataset, shuffle=False, sampler=sampler)
