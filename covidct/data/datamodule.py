"""LightningDataModule: patients -> cached slices -> seeded patient-level split -> DataLoaders.

Every batch is a dict:

* ``image``: uint8 (B, C, S, S), one channel per window (the model converts and normalises);
* ``target``: int64 (B,) slice class, -1 when unknown (``paper`` mode, sick patient without
  slice labels: such slices are never trained on but are still voted at patient level);
* ``patient``: int64 (B,) patient index into :attr:`CTDataModule.patient_ids`;
* ``slice``: int64 (B,) head-first slice index within the patient;
* ``index``: int64 (B,) global row in the cache (unique per slice: used to deduplicate DDP
  padding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from covidct import CLASS_NAMES as PATIENT_CLASSES
from covidct import NORMAL_CLASS
from covidct.data.cache import SliceCache, build_or_load_cache
from covidct.data.dicom import Skipped
from covidct.data.labels import (
    LABEL_MODES,
    UNKNOWN,
    class_names_of,
    series_of_labels,
    slice_targets,
    usable_slice_labels,
)
from covidct.data.layout import PatientFolder, discover_covid_ct_md
from covidct.data.preprocess import SlicePreprocessor, Window, one_thread_per_worker, parse_windows
from covidct.data.pseudo_labels import check_pseudo_labels, read_pseudo_labels
from covidct.data.series import (
    AUTO,
    SERIES_COLUMNS,
    check_min_slices,
    check_series_rule,
    find_shared_series,
    other_axial,
    series_cells,
)
from covidct.data.split import check_split, read_split_file, train_val_split
from covidct.data.summary import DataSummary
from covidct.data.synthetic import SyntheticSpec, ensure_dataset
from covidct.errors import ConfigError, DataError
from covidct.io import atomic_write_csv
from covidct.training.seeding import derive_seed

log = logging.getLogger(__name__)


def to_model_input(image: np.ndarray, transform: A.Compose | None) -> torch.Tensor:
    """uint8 (C, S, S) -> augmented uint8 tensor (C, S, S); albumentations works on HWC."""
    if transform is not None:
        image = transform(image=np.ascontiguousarray(image.transpose(1, 2, 0)))["image"]
        image = image.reshape(image.shape[0], image.shape[1], -1).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(image))


class SliceDataset(Dataset):
    """Slices of the cache selected by ``rows``, with optional albumentations augmentation.

    Each slice is read with one ``pread`` from the cache file, opened lazily in each process (the
    dataset pickles cheaply to workers). Reading instead of memory-mapping keeps the process's
    memory flat: the kernel's page cache holds the data, however large the cache is.
    """

    def __init__(
        self,
        cache_path: Path,
        shape: tuple[int, int, int, int],
        rows: np.ndarray,
        targets: np.ndarray,
        patients: np.ndarray,
        slices: np.ndarray,
        transform: A.Compose | None = None,
    ) -> None:
        self.cache_path, self.shape = cache_path, shape
        self.rows, self.targets, self.patients, self.slices = rows, targets, patients, slices
        self.transform = transform
        self._fd: int | None = None
        self._threads_set = False
        self._seed_key: tuple[int, int] | None = None  # (seed, worker) the transform was last seeded from

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_fd": None}  # each worker opens its own file

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _image(self, row: int) -> np.ndarray:
        """(C, S, S) uint8, a writable array of its own."""
        if self._fd is None:
            self._fd = os.open(self.cache_path / "images.u8", os.O_RDONLY)
        nbytes = int(np.prod(self.shape[1:]))
        data = os.pread(self._fd, nbytes, row * nbytes)
        if len(data) != nbytes:
            raise OSError(f"{self.cache_path / 'images.u8'}: slice {row} is cut short; delete the cache folder")
        return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(self.shape[1:])

    def _seed_transform(self, draw_seed: int | None) -> None:
        """Seed the augmentation from the epoch's seed (given by :class:`EpochSampler`) and the worker id;
        without one, from torch's seed (differs per worker). Reseeds only when either changes."""
        worker = torch.utils.data.get_worker_info()
        key = (torch.initial_seed() if draw_seed is None else draw_seed, worker.id if worker else 0)
        if key != self._seed_key:
            self.transform.set_random_seed(derive_seed(key[0] % 2**63, key[1]))  # type: ignore[union-attr]
            self._seed_key = key

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key`` (an index, or (index, epoch seed) from :class:`EpochSampler`). An index
        ``>= len(self)`` is a padding repeat of item ``i % len(self)`` (see :class:`PaddedEvalSampler`):
        same slice, target -1, so slice metrics and the loss skip it."""
        i, draw_seed = key if isinstance(key, tuple) else (key, None)
        padding = i >= len(self.rows)
        i %= len(self.rows)
        row = int(self.rows[i])
        image = self._image(row)  # (C, S, S) uint8
        if not self._threads_set:
            one_thread_per_worker()
            self._threads_set = True
        if self.transform is not None:
            self._seed_transform(draw_seed)
        return {
            "image": to_model_input(image, self.transform),
            "target": UNKNOWN if padding else int(self.targets[i]),
            "patient": int(self.patients[i]),
            "slice": int(self.slices[i]),
            "index": row,
        }


class EpochSampler(DistributedSampler):
    """Training draws that depend only on (seed, epoch): a permutation of the ``n`` slices, or with
    ``weights`` (n,) ``n`` weighted draws with replacement. Yields (index, epoch seed); the dataset
    seeds its augmentation from the epoch seed. Under DDP each of ``num_replicas`` ranks takes every
    ``num_replicas``-th draw (the draws padded by repeats to a multiple, as DistributedSampler does).

    ``epoch()`` is read when an epoch's iteration starts (None: count the iterations, outside a
    trainer). Lightning restores the epoch from a checkpoint before it starts iterating, so a resumed
    run draws what the uninterrupted run drew. (``set_epoch`` comes too late for that: Lightning makes
    the first iterator of a fit before calling it.) Being a DistributedSampler, Lightning uses it as it
    is instead of wrapping it.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: Callable[[], int] | None,
        weights: np.ndarray | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n, self.epoch_of_trainer, self.iterations = n, epoch, 0
        self.p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch_of_trainer() if self.epoch_of_trainer else self.iterations
        self.iterations += 1
        seed = derive_seed(self.seed, epoch)
        rng = np.random.default_rng(seed)
        draws = rng.permutation(self.n) if self.p is None else rng.choice(self.n, self.n, replace=True, p=self.p)
        draws = np.resize(draws, self.total_size)  # pads with the first draws
        return ((int(i), seed) for i in draws[self.rank : self.total_size : self.num_replicas])


class PaddedEvalSampler(DistributedSampler):
    """Validation under DDP: ``DistributedSampler(shuffle=False)``'s shares (equal lengths, padded with
    repeats of the first slices), but each repeat comes as ``index + len(dataset)``, which
    :class:`SliceDataset` serves with target -1. Slice metrics and the loss then count every slice
    exactly once, as in one process; the patient vote drops repeats by cache row. Lightning keeps a
    DistributedSampler it is given instead of adding its own."""

    def __iter__(self):
        n = len(self.dataset)
        padded = list(range(n)) + [n + i % n for i in range(self.total_size - n)]
        return iter(padded[self.rank : self.total_size : self.num_replicas])


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
        labels_of = {p.patient_id: p.slice_labels for p in patients}
        self.patient_ids = [p.patient_id for p in cache.patients]
        self.patient_labels = np.asarray([p.label for p in cache.patients], dtype=np.int64)
        slice_labels, label_problems = [], []
        for p in cache.patients:  # skipped patients are not in the cache
            row, problem = usable_slice_labels(p.patient_id, labels_of[p.patient_id], p.series_length, p.unplaced)
            if row is not None and self.preprocessor.series == AUTO:  # a named series settles which was labelled
                row, problem = series_of_labels(p.patient_id, row, p.series or {}, other_axial(p.other_series))
            slice_labels.append(row)
            label_problems += [problem] if problem else []
        if self.split_file is None:
            self.train_patients, self.val_patients = train_val_split(
                self.patient_labels, self.val_fraction, self.seed, self.num_folds, self.fold
            )
        else:
            subsets, notes = read_split_file(self.split_file, self.patient_ids)
            self.train_patients, self.val_patients, self.test_patients = (
                subsets["train"],
                subsets["val"],
                subsets["test"],
            )
            label_problems += [f"data.split_file: {note}" for note in notes]
        self.pseudo_labelled = self._add_pseudo_labels(slice_labels) if self.label_mode == "pseudo" else []
        self.targets = slice_targets(
            self.label_mode, self.patient_labels, slice_labels, cache.patient, cache.slice_index
        )
        in_train = np.isin(cache.patient, self.train_patients)
        known = self.targets != UNKNOWN
        self.train_rows = np.flatnonzero(in_train & known)
        self.val_rows = np.flatnonzero(np.isin(cache.patient, self.val_patients))
        if len(self.train_rows) == 0:
            raise ConfigError(self._no_training_slices(label_problems))
        self.summary = DataSummary.collect(
            root=str(self.data_root().resolve()),
            cache=cache,
            label_mode=self.label_mode,
            targets=self.targets,
            train_patients=self.train_patients,
            val_patients=self.val_patients,
            train_rows=self.train_rows,
            warnings=label_problems,
            skipped_entries=skipped_entries,
            target_names=self.class_names,
            pseudo_labelled=self.pseudo_labelled,
        )
        if not self._rank_zero():
            return
        log.info("\n%s", self.summary.text())
        if self.output_dir is not None:
            self.summary.save(self.output_dir)
            self.save_split(self.output_dir / "split.csv")

    def _add_pseudo_labels(self, slice_labels: list[np.ndarray | None]) -> list[int]:
        """Put stage-1 pseudo-label rows (checked by :func:`check_pseudo_labels`) in ``slice_labels`` for the
        sick *training* patients without radiologist labels; returns their patient indices. Radiologist
        labels are never replaced, and validation patients keep UNKNOWN slice targets."""
        cache = self.cache
        assert cache is not None
        pseudo = read_pseudo_labels(self.pseudo_labels)  # type: ignore[arg-type]
        check_pseudo_labels(
            pseudo,
            {p.patient_id: p.series_length for p in cache.patients},
            self.preprocessor,
            [self.patient_ids[i] for i in self.val_patients],
        )
        used = []
        for i in map(int, self.train_patients):
            pid = self.patient_ids[i]
            if slice_labels[i] is None and self.patient_labels[i] != NORMAL_CLASS and pid in pseudo.rows:
                slice_labels[i], _ = usable_slice_labels(pid, pseudo.rows[pid], cache.patients[i].series_length, ())
                used += [i] if slice_labels[i] is not None else []  # counted only when its row is used
        log.info("%d training patients take stage-1 pseudo-labels from %s", len(used), pseudo.path)
        return used

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

    def _no_training_slices(self, label_problems: list[str]) -> str:
        """Why no training slice has a target, and what to change."""
        names = [self.patient_ids[i] for i in self.train_patients]
        text = (
            f"no training slices: the {len(names)} training patient(s) ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}) have no slice with a known target in "
            f"data.label_mode={self.label_mode}"
        )
        if self.label_mode == "paper":
            text += (
                " (slices of a sick patient without usable slice labels are UNKNOWN and not trained on). "
                "Use data.label_mode=patient (every slice takes its patient's class), add Normal patients, "
                "or give slice labels (data.slice_labels_file)"
            )
        return text + ("; " + "; ".join(label_problems) if label_problems else "")

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
