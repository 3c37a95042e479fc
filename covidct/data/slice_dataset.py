"""Cached slices as torch items: :class:`SliceDataset` (one ``pread`` per slice, seeded augmentation) and its
samplers, :class:`EpochSampler` (training draws fixed by seed and epoch) and :class:`PaddedEvalSampler`
(DDP validation in which every slice counts once)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from covidct.data.labels import UNKNOWN
from covidct.data.preprocess import one_thread_per_worker
from covidct.seeding import derive_seed


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
