"""The synthetic COVID-CT-MD generator: real DICOM, the real layout and label format, lesions, caching."""

from __future__ import annotations

import csv
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from omegaconf import OmegaConf
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless

from covidct.contracts import CLASS_NAMES
from covidct.data.layout import class_of_folder, read_slice_labels
from covidct.data.synthetic import (
    CLASS_FOLDERS,
    COMPLETE_MARKER,
    MAX_SLICES,
    SyntheticSpec,
    encode_jpeg_lossless,
    ensure_dataset,
    generate_dataset,
    is_complete,
    patient_phantom,
    plan_patients,
    spec_hash,
)
from covidct.data.synthetic import dataset as generation  # where ensure_dataset looks up generate_dataset
from covidct.data.synthetic.dataset import estimate_disk, work_folder
from covidct.data.synthetic.patients import patient_slices
from covidct.errors import ConfigError, DataError
from tests.conftest import REPO, compose_train

SPEC = SyntheticSpec(
    patients_per_class=(3, 3, 2),
    slices_min=16,
    slices_max=24,
    image_size=64,
    labelled_fraction=0.7,
    compressed_fraction=0.4,
    rle_fraction=0.3,
    signed_fraction=0.5,
    seed=1,
)
TINY = SyntheticSpec(patients_per_class=(1, 1, 1), slices_min=8, slices_max=10, image_size=32, seed=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "root", SPEC)


def read_series(folder: Path) -> list[pydicom.Dataset]:
    """All slices of a patient folder, head first (SliceLocation descending)."""
    slices = [pydicom.dcmread(path) for path in folder.glob("*.dcm")]
    return sorted(slices, key=lambda ds: -float(ds.SliceLocation))


def patient_folder(root: Path, label: int, patient_id: str) -> Path:
    return root / CLASS_FOLDERS[label] / patient_id


def index_rows(root: Path) -> list[list[str]]:
    with (root / "Index.csv").open(newline="") as f:
        return list(csv.reader(f))


def expected_stored(label: int, number: int, signed: bool) -> np.ndarray:
    """The stored pixel values the generator must have written: (n, H, W), head first."""
    stored = np.rint(patient_phantom(SPEC, label, number).hu) + 1024
    return stored.astype(np.int16) if signed else np.clip(stored, 0, 4095).astype(np.uint16)


def test_layout_matches_covid_ct_md(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir() if p.is_dir()) == sorted(CLASS_FOLDERS)
    assert sorted(p.name for p in (dataset / "COVID-19 subjects").iterdir()) == ["P001", "P002", "P003"]
    assert sorted(p.name for p in (dataset / "Cap subjects").iterdir()) == ["cap001", "cap002", "cap003"]
    assert sorted(p.name for p in (dataset / "Normal subjects").iterdir()) == ["normal001", "normal002"]
    assert "SYNTHETIC" in (dataset / "README.txt").read_text()
    assert "seed = 1" in (dataset / "README.txt").read_text()
    assert (dataset / COMPLETE_MARKER).is_file()
    assert [class_of_folder(name) for name in CLASS_FOLDERS] == [0, 1, 2], "the reader's class folders"


def test_index_csv_lists_labelled_patients_and_skips_one_label_index(dataset: Path) -> None:
    header, *rows = index_rows(dataset)
    assert header == ["Label Index", "Diagnosis", "Relative Path", "Folder/ID"]
    # labelled_fraction 0.7 of 3 -> the first 2 COVID-19 and the first 2 CAP patients, Normal never
    assert [r[1:] for r in rows] == [
        ["COVID-19", "./COVID-19/", "P001"],
        ["COVID-19", "./COVID-19/", "P002"],
        ["CAP", "./CAP/", "cap001"],
        ["CAP", "./CAP/", "cap002"],
    ]
    label_index = [int(r[0]) for r in rows]
    assert label_index == [0, 1, 3, 4]  # skips one value: index rows by position, not by this column
    assert label_index != list(range(len(rows)))


def test_label_array_marks_one_contiguous_lesion_run_per_patient(dataset: Path) -> None:
    _, *rows = index_rows(dataset)
    labels = np.load(dataset / "Slice-level-labels.npy")
    assert labels.shape == (len(rows), MAX_SLICES) and labels.dtype == np.int32
    assert set(np.unique(labels)) <= {0, 1}
    for row, (_, diagnosis, _, patient_id) in zip(labels, rows, strict=True):
        n = len(list(patient_folder(dataset, CLASS_NAMES.index(diagnosis), patient_id).glob("*.dcm")))
        ones = np.flatnonzero(row)
        assert not row[n:].any(), f"{patient_id}: labels beyond its {n} slices"
        assert np.all(np.diff(ones) == 1), f"{patient_id}: lesion slices {ones} are not contiguous"
        assert 0.3 <= len(ones) / n <= 0.8, f"{patient_id}: {len(ones)} of {n} slices infected"


def test_label_rows_are_the_phantoms_lesion_slices_head_first(dataset: Path) -> None:
    labels = np.load(dataset / "Slice-level-labels.npy")
    for row, (_, diagnosis, _, patient_id) in zip(labels, index_rows(dataset)[1:], strict=True):
        plan = next(p for p in plan_patients(SPEC) if p.patient_id == patient_id)
        assert CLASS_NAMES[plan.label] == diagnosis
        phantom = patient_phantom(SPEC, plan.label, plan.number)
        np.testing.assert_array_equal(row[: len(phantom.hu)], phantom.lesion_slices)
    # the files hold that phantom, head first when sorted by SliceLocation descending
    stored = np.stack([ds.pixel_array for ds in read_series(patient_folder(dataset, 1, "cap001"))])
    plan = next(p for p in plan_patients(SPEC) if p.patient_id == "cap001")
    np.testing.assert_array_equal(stored, expected_stored(1, 1, plan.signed))


def test_files_are_anonymous_ct_dicom_with_plausible_hu(dataset: Path) -> None:
    for plan in plan_patients(SPEC):
        series = read_series(patient_folder(dataset, plan.label, plan.patient_id))
        first = series[0]
        assert first.file_meta.MediaStorageSOPClassUID == CTImageStorage == first.SOPClassUID
        assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
        assert first.Modality == "CT" and first.PatientID == "ANONYMOUS" and first.PatientName == "ANONYMOUS"
        assert (first.Rows, first.Columns) == (SPEC.image_size, SPEC.image_size)
        assert first.RescaleIntercept == -1024 and first.RescaleSlope == 1
        assert first.PhotometricInterpretation == "MONOCHROME2" and first.BitsAllocated == 16
        assert len({ds.SOPInstanceUID for ds in series}) == len(series)
        assert len({ds.SeriesInstanceUID for ds in series}) == 1
        z = [float(ds.SliceLocation) for ds in series]
        assert z == [float(ds.ImagePositionPatient[2]) for ds in series]
        spacing = set(np.round(np.diff(z), 3))
        assert len(spacing) == 1 and -5.0 <= spacing.pop() <= -2.0, "evenly spaced, head first"
        hu = np.stack([ds.pixel_array for ds in series]).astype(np.float32) - 1024
        assert -1200 <= hu.min() < -950, "air outside the body"
        assert 400 < hu.max() <= 1300, "bone"
        assert -900 < np.median(hu[:, hu.shape[1] // 2]) < 100
        assert ((hu > -950) & (hu < -700)).mean() > 0.03, "lung tissue"


def test_storage_variants_and_lossless_compression(dataset: Path) -> None:
    syntaxes = set()
    for plan in plan_patients(SPEC):
        series = read_series(patient_folder(dataset, plan.label, plan.patient_id))
        assert {ds.file_meta.TransferSyntaxUID for ds in series} == {plan.transfer_syntax}
        syntaxes.add(plan.transfer_syntax)
        first = series[0]
        if plan.signed:
            assert (first.PixelRepresentation, first.BitsStored) == (1, 16)
            assert first.pixel_array.dtype == np.int16
            assert min(ds.pixel_array.min() for ds in series) < 0, "noisy air below -1024 HU"
        else:
            assert (first.PixelRepresentation, first.BitsStored, first.HighBit) == (0, 12, 11)
        if plan.transfer_syntax == JPEGLosslessSV1:
            assert not plan.signed, "JPEG series are unsigned 12-bit, like the real data"
        if plan.transfer_syntax != ExplicitVRLittleEndian:
            stored = np.stack([ds.pixel_array for ds in series])
            np.testing.assert_array_equal(stored, expected_stored(plan.label, plan.number, plan.signed))
    assert syntaxes == {JPEGLosslessSV1, RLELossless, ExplicitVRLittleEndian}
    assert str(JPEGLosslessSV1) == "1.2.840.10008.1.2.4.70"
    assert any(p.signed for p in plan_patients(SPEC)) and not all(p.signed for p in plan_patients(SPEC))


def test_jpeg_lossless_encoder_is_bit_exact_on_full_16_bit_range() -> None:
    rng = np.random.default_rng(0)
    steps = rng.choice([-1, 0, 1], 40 * 40) * 2 ** rng.integers(0, 16, 40 * 40)  # |diff| of every bit length
    images = [
        (np.cumsum(steps) % 2**16).astype(np.uint16).reshape(40, 40),
        rng.integers(0, 2**16, (37, 53)).astype(np.uint16),  # odd sizes, large differences
        np.zeros((8, 8), np.uint16),  # first difference -32768: category 16
        np.full((5, 9), 65535, np.uint16),
    ]
    for image in images:
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pydicom.encaps.encapsulate([encode_jpeg_lossless(image)])
        np.testing.assert_array_equal(ds.pixel_array, image)


def test_file_names_and_instance_numbers_do_not_give_slice_order(dataset: Path) -> None:
    reversed_instances = 0
    for plan in plan_patients(SPEC):
        folder = patient_folder(dataset, plan.label, plan.patient_id)
        by_location = [Path(ds.filename).name for ds in read_series(folder)]
        number = [int(re.fullmatch(r"[0-9A-F]{8}-SYNT_(\d+)\.dcm", name).group(1)) for name in by_location]
        assert sorted(number) == list(range(1, len(number) + 1))
        assert number != sorted(number) and number != sorted(number, reverse=True)
        instances = [int(ds.InstanceNumber) for ds in read_series(folder)]
        reversed_instances += instances[0] == len(instances)
    assert 0 < reversed_instances < len(plan_patients(SPEC))


def test_lesions_lie_in_the_lungs_and_raise_their_density() -> None:
    spec = SyntheticSpec(slices_min=24, slices_max=40, image_size=64, seed=3)
    rises = {0: [], 1: []}
    for label in (0, 1):
        for number in range(1, 7):
            phantom = patient_phantom(spec, label, number)
            assert not (phantom.lesion & ~phantom.lung).any()
            infected = phantom.lesion_slices
            area = phantom.lung.sum(axis=(1, 2))
            large = area >= 0.3 * area.max()  # compare like with like: not the tiny apex / base slices
            mean_lung = (phantom.hu * phantom.lung).sum(axis=(1, 2)) / np.maximum(area, 1)
            if (~infected & large).any():
                rises[label].append(mean_lung[infected & large].mean() - mean_lung[~infected & large].mean())
            lesion_hu = phantom.hu[phantom.lesion].mean()
            clean_lung_hu = phantom.hu[phantom.lung & ~phantom.lesion].mean()
            assert lesion_hu - clean_lung_hu > (150 if label == 0 else 400)
            if label == 0:  # COVID-19: bilateral
                columns = np.flatnonzero(phantom.lesion.any(axis=(0, 1)))
                assert columns.min() < spec.image_size / 2 < columns.max()
    assert len(rises[0]) >= 3 and len(rises[1]) >= 3, rises
    assert min(rises[0]) > 10, f"COVID-19 lesion slices barely denser: {rises[0]}"
    assert min(rises[1]) > 50 and np.mean(rises[1]) > 2 * np.mean(rises[0]), rises


def test_normal_patients_have_no_lesion(dataset: Path) -> None:
    for number in (1, 2):
        assert not patient_phantom(SPEC, 2, number).lesion.any()
    assert all(row[1] != "Normal" for row in index_rows(dataset)[1:])


def test_same_spec_gives_identical_files_other_seed_differs(tmp_path: Path) -> None:
    a, b = generate_dataset(tmp_path / "a", TINY), generate_dataset(tmp_path / "b", TINY)
    c = generate_dataset(tmp_path / "c", replace(TINY, seed=6))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    pixels = [np.stack([ds.pixel_array for ds in read_series(root / "COVID-19 subjects" / "P001")]) for root in (a, c)]
    assert pixels[0].shape != pixels[1].shape or not np.array_equal(*pixels)


def test_ensure_dataset_generates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_dataset(tmp_path, TINY)
    assert root == tmp_path / f"synthetic-{spec_hash(TINY)}"
    assert (root / COMPLETE_MARKER).is_file() and (root / "Index.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name], "no temporary folder left behind"
    mtime = (root / COMPLETE_MARKER).stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("generated again")

    for name in ("_generate", "_fill", "plan_patients", "generate_dataset"):
        monkeypatch.setattr(generation, name, fail)
    assert ensure_dataset(tmp_path, TINY) == root
    assert (root / COMPLETE_MARKER).stat().st_mtime_ns == mtime
    assert spec_hash(replace(TINY, seed=6)) != spec_hash(TINY)


def test_ensure_dataset_never_takes_an_unfinished_folder(tmp_path: Path) -> None:
    root = tmp_path / f"synthetic-{spec_hash(TINY)}"
    (root / "COVID-19 subjects").mkdir(parents=True)  # e.g. a copy that was interrupted
    (root / "Index.csv").write_text("partial")
    leftover = tmp_path / f".{root.name}.tmp-crashed"  # a crashed generation's temporary folder
    (leftover / "Cap subjects").mkdir(parents=True)
    assert ensure_dataset(tmp_path, TINY) == root
    assert (root / COMPLETE_MARKER).is_file()
    assert (root / "Index.csv").read_text().startswith("Label Index")
    assert len(list((root / "Normal subjects" / "normal001").glob("*.dcm"))) >= TINY.slices_min
    assert leftover.is_dir(), "another caller's temporary folder is not touched"


def test_ensure_dataset_loser_of_a_race_uses_the_winners_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / f"synthetic-{spec_hash(TINY)}"
    real_fill = generation._fill

    def fill_while_another_caller_finishes_first(work: Path, spec: SyntheticSpec, progress: bool) -> None:
        real_fill(work, spec, progress)
        monkeypatch.setattr(generation, "_fill", real_fill)
        generate_dataset(root, spec)  # the other caller: finds every patient made, moves the dataset first
        (root / "winner").write_text("")

    monkeypatch.setattr(generation, "_fill", fill_while_another_caller_finishes_first)
    assert ensure_dataset(tmp_path, TINY) == root
    assert (root / "winner").is_file() and (root / COMPLETE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name], "no work folder left behind"


def test_generate_dataset_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("")
    with pytest.raises(DataError, match=str(tmp_path)):
        generate_dataset(tmp_path, TINY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("slices_max", 601),
        ("slices_min", 3),
        ("slices_min", 60),  # > slices_max
        ("image_size", 16),
        ("labelled_fraction", 1.5),
        ("compressed_fraction", -0.1),
        ("rle_fraction", "half"),
        ("patients_per_class", (1, -1, 1)),
        ("patients_per_class", (1, 1)),
        ("seed", -1),
        ("labelled_per_class", (1, 1, 1)),  # Normal patients have no slice labels
        ("labelled_per_class", (21, 0, 0)),  # more than the 20 COVID-19 patients
        ("labelled_per_class", (1, 1)),
        ("labelled_per_class", (1, -1, 0)),
        ("workers", 0),
        ("workers", 1.5),
    ],
)
def test_bad_spec_raises_config_error_naming_the_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"data\.synthetic\.{field}="):
        SyntheticSpec(**{field: value})


def test_spec_accepts_a_list_of_counts_as_hydra_gives_it() -> None:
    spec = SyntheticSpec(patients_per_class=[2, 1, 0])  # type: ignore[arg-type]
    assert spec.patients_per_class == (2, 1, 0)
    assert [p.patient_id for p in plan_patients(spec)] == ["P001", "P002", "cap001"]


def test_patient_shift_zero_keeps_the_hash_and_a_shift_moves_each_patients_hu() -> None:
    import hashlib
    import json
    from dataclasses import asdict

    from covidct.data.synthetic.spec import GENERATOR_VERSION

    new_fields = ("patient_shift", "labelled_per_class", "workers")
    old = {k: v for k, v in asdict(TINY).items() if k not in new_fields}  # the payload before these fields
    payload = json.dumps({**old, "generator_version": GENERATOR_VERSION}, sort_keys=True)
    assert spec_hash(TINY) == hashlib.sha256(payload.encode()).hexdigest()[:12]
    shifted = replace(TINY, patient_shift=100)
    assert spec_hash(shifted) != spec_hash(TINY)
    offsets = []
    for label, number in ((0, 1), (1, 1), (2, 1)):
        plain, moved = patient_phantom(TINY, label, number), patient_phantom(shifted, label, number)
        np.testing.assert_array_equal(plain.lesion, moved.lesion)  # the same anatomy and lesions
        diff = moved.hu - plain.hu
        assert abs(diff.mean()) <= 100 + 1 and diff.std() <= 50 + 1
        offsets.append(diff.mean())
    assert np.ptp(offsets) > 1.0  # each patient its own scanner
    with pytest.raises(ConfigError, match=r"data\.synthetic\.patient_shift="):
        SyntheticSpec(patient_shift=-1)


def test_equal_specs_share_a_hash_whatever_the_number_types() -> None:
    assert spec_hash(SyntheticSpec(labelled_fraction=1)) == spec_hash(SyntheticSpec(labelled_fraction=1.0))
    assert spec_hash(SyntheticSpec(patients_per_class=[20, 20, 20])) == spec_hash(SyntheticSpec())  # type: ignore[arg-type]


# ---- the real dataset's size: experiment=full_scale, per-class labels, parallel and resumable generation ----

#: every storage variant, labelled patients per class, a scanner per patient; 7 patients at 64 px
SCALED = SyntheticSpec(
    patients_per_class=(3, 2, 2),
    slices_min=12,
    slices_max=20,
    image_size=64,
    labelled_per_class=(2, 1, 0),
    compressed_fraction=0.4,
    rle_fraction=0.3,
    signed_fraction=0.5,
    patient_shift=50,
    seed=4,
    workers=1,
)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_specs_keep_their_dataset_folder_names() -> None:
    # the hashes of these specs before labelled_per_class and workers existed: their cached datasets stay valid
    assert spec_hash(SyntheticSpec()) == "bd97b319ef77"  # the demo's 60 patients
    assert spec_hash(SyntheticSpec(patients_per_class=(40, 40, 40), patient_shift=300)) == "8f9bd81a4c59"
    assert spec_hash(SPEC) == "6f60a0c6e358" and spec_hash(TINY) == "6bcc44b77db0"
    # ... and the YAML still gives them: the default data group and experiment=patient_shift
    conf = OmegaConf.load(REPO / "conf" / "data" / "synthetic.yaml").synthetic
    shift = OmegaConf.merge(conf, OmegaConf.load(REPO / "conf" / "experiment" / "patient_shift.yaml").data.synthetic)
    for node, expected in ((conf, "bd97b319ef77"), (shift, "8f9bd81a4c59")):
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in OmegaConf.to_container(node).items()}
        assert spec_hash(SyntheticSpec(**fields)) == expected
    # workers is how, not what; labelled_per_class is part of what
    assert spec_hash(replace(SPEC, workers=1)) == spec_hash(replace(SPEC, workers=7)) == spec_hash(SPEC)
    assert spec_hash(replace(SPEC, labelled_per_class=(2, 2, 0))) != spec_hash(SPEC)


def test_full_scale_experiment_has_the_real_datasets_shape(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=full_scale"])
    syn = cfg.data.synthetic
    assert list(syn.patients_per_class) == [169, 60, 76] and list(syn.labelled_per_class) == [54, 25, 0]
    assert (syn.image_size, syn.slices_min, syn.slices_max) == (512, 130, 300)
    assert syn.patient_shift > 0 and 0 < syn.compressed_fraction < 1 and syn.workers >= 1
    assert cfg.model.backbone == "resnet18" and not cfg.model.pretrained  # the demo's model, on a CPU
    assert (cfg.data.image_size, cfg.trainer.max_epochs, cfg.data.label_mode) == (128, 1, "paper")
    spec = SyntheticSpec(**{k: tuple(v) if OmegaConf.is_list(v) else v for k, v in syn.items()})
    plans = plan_patients(spec)
    assert [sum(p.label == c for p in plans) for c in range(3)] == [169, 60, 76]
    assert [sum(p.labelled and p.label == c for p in plans) for c in range(3)] == [54, 25, 0]
    assert {p.transfer_syntax for p in plans} == {JPEGLosslessSV1, RLELossless, ExplicitVRLittleEndian}
    lengths = [patient_slices(spec, p.label, p.number) for p in plans]
    assert 130 <= min(lengths) and max(lengths) <= 300 and 200 < np.mean(lengths) < 230
    needed, slices = estimate_disk(spec)
    assert slices == sum(lengths) and 20e9 < needed < 40e9  # ~65,500 slices of 512 x 512


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("scaled") / "root", SCALED, progress=False)


def test_labelled_per_class_labels_the_first_patients_of_each_class(scaled: Path) -> None:
    _, *rows = index_rows(scaled)
    assert [r[3] for r in rows] == ["P001", "P002", "cap001"]  # 2 COVID-19, 1 CAP, no Normal
    labels = read_slice_labels(scaled)
    assert sorted(labels) == ["P001", "P002", "cap001"]
    for plan in plan_patients(SCALED):
        n = len(list(patient_folder(scaled, plan.label, plan.patient_id).glob("*.dcm")))
        assert SCALED.slices_min <= n <= SCALED.slices_max and n == patient_slices(SCALED, plan.label, plan.number)
        if plan.labelled:
            assert labels[plan.patient_id][:n].any() and not labels[plan.patient_id][n:].any()
    assert SyntheticSpec(labelled_per_class=[0, 20, 0]).labelled_per_class == (0, 20, 0)  # type: ignore[arg-type]


@pytest.mark.slow  # seconds on 2 cores: keeps make test-fast under a minute
def test_series_longer_than_200_slices_widen_the_label_array(tmp_path: Path) -> None:
    spec = SyntheticSpec(patients_per_class=(1, 1, 1), slices_min=230, slices_max=240, image_size=32, seed=2)
    root = generate_dataset(tmp_path / "root", spec, progress=False)
    labels = np.load(root / "Slice-level-labels.npy")
    lengths = [patient_slices(spec, label, 1) for label in (0, 1)]
    assert labels.shape == (2, max(lengths))  # at least 200 columns, as the real array, and every slice
    for row, n in zip(read_slice_labels(root).values(), lengths, strict=True):
        assert row[:n].any() and not row[n:].any()


@pytest.mark.slow  # seconds on 2 cores: keeps make test-fast under a minute
def test_the_number_of_workers_does_not_change_a_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pools: list[int] = []
    real_pool = generation.worker_pool
    monkeypatch.setattr(generation, "worker_pool", lambda n, *a: pools.append(n) or real_pool(n, *a))
    one = ensure_dataset(tmp_path / "one", SCALED, progress=False)
    assert pools == []  # workers=1: this process
    two = ensure_dataset(tmp_path / "two", replace(SCALED, workers=2), progress=False)
    assert pools == [2], "the patients were made by 2 processes"
    assert one.name == two.name
    assert tree_bytes(one) == tree_bytes(two)


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_interrupted_generation_resumes_with_the_patients_not_yet_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scaled: Path
) -> None:
    spec = replace(SCALED, workers=2)
    root = tmp_path / f"synthetic-{spec_hash(spec)}"
    work = work_folder(root)
    real_write = generation.write_series

    def write_then_crash_on_cap002(folder: Path, *args: object) -> None:
        real_write(folder, *args)
        if folder.name == "cap002":
            raise RuntimeError("interrupted")  # e.g. a full disk, Ctrl-C: the slices written so far stay

    monkeypatch.setattr(generation, "write_series", write_then_crash_on_cap002)  # the forked workers too
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_dataset(tmp_path, spec, progress=False)
    monkeypatch.setattr(generation, "write_series", real_write)
    assert not root.exists() and not is_complete(root)
    done = sorted(p.name for p in (work / "dataset").glob("*/*"))
    assert "cap002" not in done and [p.name for p in work.glob("tmp-*")] == [], "the scratch folder is removed"
    assert not (work / "dataset" / "Index.csv").exists()
    # a killed generation leaves its half-written patient in its scratch folder; and a finished patient is lost
    killed = work / f"tmp-{socket.gethostname()}-{dead_pid()}-x1y2"
    (killed / "P003").mkdir(parents=True)
    (killed / "P003" / "half.dcm").write_bytes(b"\0" * 100)
    live = work / f"tmp-{socket.gethostname()}-{os.getpid()}-busy"  # a live process's: left alone
    live.mkdir()
    lost = done.pop(0)
    shutil.rmtree(next((work / "dataset").glob(f"*/{lost}")))
    before = {pid: mtimes(next((work / "dataset").glob(f"*/{pid}"))) for pid in done}

    made: list[str] = []
    real_make = generation._make_patient

    def make_and_record(work: Path, scratch: Path, spec: SyntheticSpec, plan: object) -> None:
        made.append(plan.patient_id)  # type: ignore[attr-defined]
        assert not killed.exists() and live.is_dir(), "a dead process's scratch folder is removed first"
        real_make(work, scratch, spec, plan)

    monkeypatch.setattr(generation, "_make_patient", make_and_record)
    assert ensure_dataset(tmp_path, replace(spec, workers=1), progress=False) == root  # the same dataset
    assert is_complete(root) and not work.exists() and not killed.exists()
    everyone = [p.patient_id for p in plan_patients(spec)]
    assert sorted(made) == sorted(set(everyone) - set(done)) and lost in made and "cap002" in made
    for pid, times in before.items():  # the finished patients were not written again
        assert mtimes(next(root.glob(f"*/{pid}"))) == times, pid
    assert tree_bytes(root) == tree_bytes(scaled), "the same files as a generation in one go"


def test_an_unfinished_generation_of_another_spec_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = generation.write_series

    def crash_on_cap001(folder: Path, *args: object) -> None:
        if folder.name == "cap001":
            raise RuntimeError("interrupted")
        real_write(folder, *args)

    monkeypatch.setattr(generation, "write_series", crash_on_cap001)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_dataset(tmp_path / "root", replace(TINY, workers=1), progress=False)
    monkeypatch.setattr(generation, "write_series", real_write)
    assert (work_folder(tmp_path / "root") / "dataset" / "COVID-19 subjects" / "P001").is_dir()
    other = replace(TINY, seed=6)  # the same folder name, another dataset: its P001 is not the seed-5 one
    root = generate_dataset(tmp_path / "root", other, progress=False)
    assert tree_bytes(root) == tree_bytes(generate_dataset(tmp_path / "fresh", other, progress=False))


def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_patients_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full_at_cap001(folder: Path, *args: object) -> None:
        if folder.name == "cap001":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(folder, *args)

    real_write = generation.write_series
    monkeypatch.setattr(generation, "write_series", disk_full_at_cap001)
    with pytest.raises(DataError, match=r"disk filled up.*paths\.cache_dir.*rerun"):
        ensure_dataset(tmp_path, replace(TINY, workers=1), progress=False)
    root = tmp_path / f"synthetic-{spec_hash(TINY)}"
    assert (work_folder(root) / "dataset" / "COVID-19 subjects" / "P001").is_dir() and not root.exists()


def test_two_callers_at_once_share_the_work_and_both_get_the_dataset(tmp_path: Path) -> None:
    spec = replace(TINY, workers=1)
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(ensure_dataset(tmp_path / "cache", spec, progress=False))
        except BaseException as exc:  # any error, reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    root = tmp_path / "cache" / f"synthetic-{spec_hash(spec)}"
    assert errors == [] and results == [root, root] and is_complete(root)
    assert tree_bytes(root) == tree_bytes(generate_dataset(tmp_path / "alone", spec, progress=False))


def test_a_disk_too_small_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scaled: Path
) -> None:
    needed, slices = estimate_disk(SCALED)
    on_disk = sum(p.stat().st_size for p in scaled.rglob("*.dcm"))
    assert on_disk <= needed <= 2 * on_disk, "an upper bound, not a wild one"
    assert slices == sum(len(list(folder.glob("*.dcm"))) for folder in scaled.glob("*/*"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=needed - 1))
    with pytest.raises(DataError) as refused:
        ensure_dataset(tmp_path, SCALED, progress=False)
    message = str(refused.value)
    assert str(tmp_path) in message and "paths.cache_dir" in message and "data.synthetic.patients_per_class" in message
    assert f"{needed / 1e6:.1f} MB" in message and f"{(needed - 1) / 1e6:.1f} MB free" in message
    assert f"{slices} slices of 64 x 64 px" in message
    root = tmp_path / f"synthetic-{spec_hash(SCALED)}"
    assert not root.exists() and list((work_folder(root) / "dataset").iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=needed))
    assert is_complete(ensure_dataset(tmp_path, SCALED, progress=False))


def test_generation_shows_a_progress_bar_over_patients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_dataset(tmp_path / "root", TINY)
    err = capsys.readouterr().err
    assert "synthetic data" in err and "3/3" in err and "patient" in err
    generate_dataset(tmp_path / "quiet", TINY, progress=False)
    assert "synthetic data" not in capsys.readouterr().err
