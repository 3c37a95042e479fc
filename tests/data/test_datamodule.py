"""The LightningDataModule on generated DICOM data and on the real sample."""

from __future__ import annotations

import csv
import json
import os

import albumentations as A
import numpy as np
import pytest
import torch

from covidct.data.datamodule import CTDataModule
from covidct.errors import ConfigError

TINY = {"patients_per_class": [4, 4, 4], "slices_min": 8, "slices_max": 10, "image_size": 64, "seed": 1}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dm-cache")


def make_dm(cache_dir, out=None, **kwargs) -> CTDataModule:
    args = {
        "synthetic": TINY,
        "cache_dir": str(cache_dir),
        "output_dir": out,
        "image_size": 32,
        "val_fraction": 0.25,
        "batch_size": 8,
        "seed": 0,
    } | kwargs
    dm = CTDataModule(**args)
    dm.setup("fit")
    return dm


def test_batches_have_the_documented_shapes_dtypes_and_labels(cache_dir, tmp_path):
    dm = make_dm(cache_dir, str(tmp_path), windows=["lung", "mediastinum"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 2, 32, 32) and batch["image"].dtype == torch.uint8
    for key in ("target", "patient", "slice", "index"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (8,)
    assert set(batch["target"].tolist()) <= {0, 1, 2}
    # each item's target follows the paper's rule from the patient's class and slice label
    patients = dm.discover()
    for t, p, s in zip(batch["target"], batch["patient"], batch["slice"], strict=True):
        patient = patients[int(p)]
        infected = patient.slice_labels is not None and patient.slice_labels[int(s)] == 1
        assert int(t) == (patient.label if infected else 2)
    # the image is the cached slice of that patient and index
    val = next(iter(dm.val_dataloader()))
    row = int(val["index"][0])
    assert torch.equal(val["image"][0], torch.from_numpy(np.array(dm.cache.images[row])))
    assert dm.cache.patient[row] == val["patient"][0] and dm.cache.slice_index[row] == val["slice"][0]


def test_split_has_no_shared_patient_and_is_saved(cache_dir, tmp_path):
    dm = make_dm(cache_dir, str(tmp_path))
    train_p = set(dm.cache.patient[dm.train_rows].tolist())
    val_p = set(dm.cache.patient[dm.val_rows].tolist())
    assert not train_p & val_p and len(val_p) == 3
    with (tmp_path / "split.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["subset"] for r in rows} == {"train", "val"} and len(rows) == 12
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    assert summary["patients"] == {"COVID-19": 4, "CAP": 4, "Normal": 4}
    assert summary["val_patients"] == {"COVID-19": 1, "CAP": 1, "Normal": 1}
    assert summary["train_slices"] == len(dm.train_rows)
    # validation keeps every slice of its patients, in head-first order
    for p in val_p:
        slices = dm.cache.slice_index[dm.val_rows][dm.cache.patient[dm.val_rows] == p]
        assert slices.tolist() == list(range(len(slices)))


def test_patient_mode_and_balanced_sampler(cache_dir):
    dm = make_dm(cache_dir, label_mode="patient", balanced_sampler=True, batch_size=64)
    assert (dm.targets == dm.patient_labels[dm.cache.patient]).all()
    paper = make_dm(cache_dir, balanced_sampler=True, batch_size=512)
    counts = np.bincount(paper.targets[paper.train_rows], minlength=3)
    assert counts[2] > counts[0]  # paper mode: most slices are Normal
    loader = paper.train_dataloader()
    drawn = torch.cat([b["target"] for _ in range(20) for b in loader])
    share = np.bincount(drawn.numpy(), minlength=3) / len(drawn)
    assert np.all(np.abs(share - 1 / 3) < 0.06)  # balanced draws despite the imbalance


def test_augmentation_is_applied_to_training_only_and_seeded(cache_dir):
    flip = [A.HorizontalFlip(p=1.0)]
    plain = make_dm(cache_dir)
    flipped = make_dm(cache_dir, train_transforms=flip)
    i = 0
    a, b = plain.train_dataloader().dataset[i], flipped.train_dataloader().dataset[i]
    assert torch.equal(b["image"], a["image"].flip(-1))
    assert torch.equal(flipped.val_dataloader().dataset[0]["image"], plain.val_dataloader().dataset[0]["image"])


def epoch_batches(loader) -> list[torch.Tensor]:
    return [torch.cat([b["index"].view(-1, 1, 1, 1).expand_as(b["image"]).float(), b["image"].float()]) for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_is_replayed_exactly_by_a_fresh_loader(cache_dir, workers):
    """What resuming at epoch 1 needs: a fresh loader (new workers) draws epoch 1's order and
    augmentation exactly as the loader that went through epoch 0 first (persistent workers)."""
    dm = make_dm(
        cache_dir,
        num_workers=workers,
        balanced_sampler=True,
        train_transforms=[A.Affine(rotate=(-20, 20), p=1.0), A.RandomBrightnessContrast(p=1.0)],
    )
    loader = dm.train_dataloader()
    first, second = epoch_batches(loader), epoch_batches(loader)
    fresh = dm.train_dataloader()
    fresh.sampler.iterations = 1  # as Lightning's restored epoch would say
    replay = epoch_batches(fresh)
    assert len(second) == len(replay) and all(torch.equal(a, b) for a, b in zip(second, replay, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # epochs differ


def test_config_errors_name_the_key(cache_dir):
    with pytest.raises(ConfigError, match="data.root"):
        CTDataModule(root=None, synthetic=None)
    with pytest.raises(ConfigError, match="data.image_size"):
        CTDataModule(synthetic=TINY, image_size="abc")
    with pytest.raises(ConfigError, match="data.label_mode"):
        make_dm(cache_dir, label_mode="slices")


@pytest.mark.slow  # whole real patients decoded (~8 s)
def test_real_sample_through_the_datamodule(real_sample, tmp_path):
    dm = CTDataModule(root=str(real_sample), cache_dir=str(tmp_path), image_size=64, num_folds=3, fold=0, seed=0)
    dm.setup("fit")
    assert dm.patient_ids == ["P001", "cap001", "normal001"]
    assert [p.n_slices for p in dm.cache.patients] == [148, 168, 154]
    assert dm.cache.patients[0].order_key == "SliceLocation"
    targets = {
        pid: np.bincount(dm.targets[dm.cache.patient == i], minlength=3).tolist()
        for i, pid in enumerate(dm.patient_ids)
    }
    assert targets == {"P001": [80, 0, 68], "cap001": [0, 86, 82], "normal001": [0, 0, 154]}
    assert len(set(dm.cache.patient[dm.val_rows].tolist())) == 1
    assert (np.diff(dm.cache.location[dm.cache.patient == 0]) < 0).all()  # head first


def test_loader_settings_are_automatic_without_a_gpu_and_explicit_when_given(cache_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loader = make_dm(cache_dir).train_dataloader()
    assert (loader.num_workers, loader.pin_memory) == (0, False)  # CPU: workers would take the model's cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    dm = make_dm(cache_dir)
    assert dm.num_workers == 3 and dm.pin_memory is True  # a GPU: pinned batches, one core left for the model
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert make_dm(cache_dir).num_workers == 8  # at most 8
    loader = make_dm(cache_dir, num_workers=2, pin_memory=False, prefetch_factor=3).val_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.prefetch_factor, loader.persistent_workers) == (
        2,
        False,
        3,
        True,
    )


def test_slices_are_read_not_mapped_and_equal_the_cache(cache_dir):
    dm = make_dm(cache_dir, train_transforms=None)
    dataset = dm.val_dataloader().dataset
    for i in (0, len(dataset) - 1):
        item = dataset[i]
        assert torch.equal(item["image"], torch.from_numpy(np.array(dm.cache.images[item["index"]])))
    assert dataset._fd is not None and not any(isinstance(v, np.memmap) for v in vars(dataset).values())
