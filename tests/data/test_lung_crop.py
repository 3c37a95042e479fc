"""data.lung_crop: the HU lung mask, the series box, the crop in the cache and in prediction, the
fallback to the full slice when no lung is found (synthetic phantoms, written DICOM, the real sample)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from omegaconf import OmegaConf

from covidct.data.cache import build_or_load_cache, cache_key
from covidct.data.dicom import list_files, read_series
from covidct.data.layout import PatientFolder, discover_covid_ct_md
from covidct.data.lung import Box, full_box, lung_box, lung_mask, mask_box, series_box
from covidct.data.preprocess import NO_LUNG, SlicePreprocessor, parse_windows, read_preprocessed
from covidct.data.summary import DataSummary
from covidct.data.synthetic import SyntheticSpec, ensure_dataset, make_phantom
from covidct.errors import ConfigError
from covidct.models.checkpoint import check_resume_settings
from covidct.predict.torch_backend import PatientFolders
from tests.conftest import write_ct_slice

PLAIN = SlicePreprocessor(parse_windows(["lung", "mediastinum"]), 32)
CROP = SlicePreprocessor(PLAIN.windows, PLAIN.image_size, lung_crop=True)


# ---- the mask and the box ------------------------------------------------------------------------
def test_lung_mask_finds_the_phantom_lungs():
    phantom = make_phantom(np.random.default_rng(3), 12, 128, "CAP")  # consolidation: the hard case
    for hu, truth in zip(phantom.hu, phantom.lung, strict=True):
        mask = lung_mask(hu)
        assert mask.shape == hu.shape and mask.dtype == bool
        if not truth.any():
            continue
        overlap = (mask & truth).sum() / (mask | truth).sum()
        assert overlap > 0.7, overlap  # dense lesions are not air: they may drop out of the mask
        found, expected = mask_box(mask), mask_box(truth)
        assert found is not None and expected is not None
        assert max(abs(a - b) for a, b in zip(vars(found).values(), vars(expected).values(), strict=True)) <= 2
    boxes = [lung_box(hu) for hu in phantom.hu]
    box = series_box(boxes, (128, 128))
    truth_boxes = [b for b in map(mask_box, phantom.lung) if b is not None]
    assert box is not None and all(box.contains(b) for b in truth_boxes)
    assert box.height < 128 * 0.8  # the lungs are wider than deep: the crop removes rows


@pytest.mark.parametrize("hu", [-1000.0, 0.0, 40.0], ids=["air", "water", "soft tissue"])
def test_no_lung_on_a_uniform_slice(hu):
    slice_ = np.full((96, 80), hu, dtype=np.float32)
    assert not lung_mask(slice_).any() and lung_box(slice_) is None


def test_air_outside_the_body_is_not_lung():
    hu = np.full((128, 128), -1000.0, dtype=np.float32)
    hu[20:108, 10:118] = 40.0  # a body ...
    hu[40:90, 25:55] = -850.0  # ... with one lung in it
    hu[0:10, :] = -1000.0
    assert lung_box(hu) == Box(40, 90, 25, 55)
    hu[40:90, 25:55] = 40.0
    assert lung_box(hu) is None  # only the air around the body is left


def test_series_box_is_the_union_plus_margin_clipped():
    boxes = [None, Box(40, 60, 30, 50), Box(50, 80, 20, 45), None]
    assert series_box(boxes, (100, 200), margin=0.1) == Box(30, 90, 0, 70)  # 10 rows, 20 cols of margin
    assert series_box([Box(0, 100, 0, 200)], (100, 200)) == full_box((100, 200))  # clipped to the slice
    assert series_box([None, None], (100, 200)) is None


# ---- the cache, the summary and prediction (synthetic) ----------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[PatientFolder]:
    spec = SyntheticSpec(patients_per_class=(1, 1, 1), slices_min=10, slices_max=12, image_size=128, seed=11)
    return discover_covid_ct_md(ensure_dataset(tmp_path_factory.mktemp("lung_gen"), spec))


def test_cache_with_lung_crop_records_a_box_and_crops(synthetic, tmp_path):
    assert cache_key(synthetic, PLAIN) != cache_key(synthetic, CROP)
    cropped = build_or_load_cache(synthetic, CROP, tmp_path)
    plain = build_or_load_cache(synthetic, PLAIN, tmp_path)
    assert cropped.path != plain.path and cropped.images.shape == plain.images.shape
    for patient in cropped.patients:
        crop = patient.lung_crop
        assert crop is not None and crop["note"] == "" and crop["slice_shape"] == [128, 128]
        top, bottom, left, right = crop["box"]
        assert 0 <= top < bottom <= 128 and 0 <= left < right <= 128
        assert (bottom - top) * (right - left) < 0.8 * 128 * 128, crop  # smaller than the slice
        assert 0 < crop["lung_slices"] <= patient.n_slices
    assert all(p.lung_crop is None for p in plain.patients)
    assert not np.array_equal(cropped.images, plain.images)  # the crop changes the pixels
    manifest = json.loads((cropped.path / "manifest.json").read_text())
    assert manifest["patients"][0]["lung_crop"] == cropped.patients[0].lung_crop


def test_without_lung_crop_the_slices_are_as_before(synthetic):
    folder = synthetic[0].folder
    before = np.stack(read_series(folder, PLAIN).slices)  # how the cache read slices until lung_crop
    series, crop = read_preprocessed(folder, PLAIN)
    assert crop is None and np.stack(series.slices).tobytes() == before.tobytes()


def test_prediction_crops_as_the_cache_does(synthetic, tmp_path):
    cache = build_or_load_cache(synthetic, CROP, tmp_path)
    for i, patient in enumerate(cache.patients):
        item = PatientFolders([p.folder for p in synthetic], CROP)[i]
        block = cache.images[patient.offset : patient.offset + patient.n_slices]
        assert item["images"].numpy().tobytes() == np.asarray(block).tobytes()


def write_no_lung_patient(folder: Path, hu: float) -> PatientFolder:
    """Three 64 x 64 slices of a body of ``hu`` (a disc) in air: no air inside a body anywhere."""
    rows, cols = np.mgrid[:64, :64]
    image = np.where((rows - 31.5) ** 2 + (cols - 31.5) ** 2 < 28**2, hu, -1000).astype(np.int16)
    for i in range(3):
        write_ct_slice(folder / f"{i}.dcm", image, slice_location=float(i))
    return PatientFolder(folder.name, 2, folder)


def test_a_series_without_lung_keeps_the_full_slice_and_says_why(tmp_path, caplog):
    patients = [write_no_lung_patient(tmp_path / "water", 0), write_no_lung_patient(tmp_path / "air", -1000)]
    with caplog.at_level("WARNING"):
        cache = build_or_load_cache(patients, CROP, tmp_path / "cache")
    expected = {"box": [0, 64, 0, 64], "slice_shape": [64, 64], "lung_slices": 0, "note": NO_LUNG}
    assert [p.lung_crop for p in cache.patients] == [expected, expected]
    assert sum(NO_LUNG in r.message for r in caplog.records) == 2  # into the run log
    np.testing.assert_array_equal(cache.images, build_or_load_cache(patients, PLAIN, tmp_path / "cache").images)
    n = len(cache.patient)
    summary = DataSummary.collect(
        root=str(tmp_path),
        cache=cache,
        label_mode="patient",
        targets=np.full(n, 2),
        train_patients=np.array([0]),
        val_patients=np.array([1]),
        train_rows=np.flatnonzero(cache.patient == 0),
        warnings=[],
    )
    assert summary.warnings == [f"water: {NO_LUNG}", f"air: {NO_LUNG}"]
    assert summary.series[0]["lung_crop"] == expected
    text = summary.text()
    assert "lung crop: 0 of 2 series cropped" in text and f"WARNING water: {NO_LUNG}" in text
    assert "water: rows 0:64, cols 0:64 of 64 x 64; lung on 0 of 3 slices (not cropped: no lung found)" in text


def test_resume_refuses_another_lung_crop():
    cfg = OmegaConf.create(
        {"data": {"windows": ["lung"], "image_size": 32, "lung_crop": True}, "model": {"backbone": "r"}}
    )
    older = {"hyper_parameters": {"backbone": "r", "preprocessing": {"windows": ["lung"], "image_size": 32}}}
    with pytest.raises(ConfigError, match="data.lung_crop: checkpoint False, this run True"):
        check_resume_settings(older, cfg, "last.ckpt")
    older["hyper_parameters"]["preprocessing"]["lung_crop"] = True
    check_resume_settings(older, cfg, "last.ckpt")  # a checkpoint without label_mode / vote_rule: not compared


# ---- the real sample --------------------------------------------------------------------------
def test_a_real_series_made_lungless_falls_back(real_sample, tmp_path):
    """Real headers and sizes, pixels replaced by a body of soft tissue (40 HU) in air: read, not cropped,
    no crash."""
    source = discover_covid_ct_md(real_sample)[0].folder
    folder = tmp_path / "P001-no-lung"
    folder.mkdir()
    for path in list_files(source)[:3]:
        ds = pydicom.dcmread(path)
        rows, cols = np.mgrid[: ds.Rows, : ds.Columns]
        body = (rows - ds.Rows / 2) ** 2 + (cols - ds.Columns / 2) ** 2 < (0.45 * ds.Rows) ** 2
        stored = (np.where(body, 40, -1000) - float(ds.RescaleIntercept)).astype(np.uint16)
        ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=12)
        ds.save_as(folder / path.name)
    series, crop = read_preprocessed(folder, CROP, warn=False)
    assert crop is not None and crop.note == NO_LUNG and crop.box == full_box((512, 512)) and crop.lung_slices == 0
    assert len(series.slices) == 3 and series.slices[0].shape == (2, 32, 32)


@pytest.fixture(scope="module")
def real_masks(real_sample) -> dict[str, tuple[PatientFolder, list[np.ndarray], list[int]]]:
    """Patient id -> (patient, bool (512, 512) lung mask per slice head first, series ranks), for the
    sample's patients with slice labels (P001, cap001): ~5 s each."""
    out = {}
    for patient in discover_covid_ct_md(real_sample):
        if patient.slice_labels is not None:
            series = read_series(patient.folder, lung_mask)
            out[patient.patient_id] = (patient, series.slices, series.ranks)
    assert set(out) == {"P001", "cap001"}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pid", ["P001", "cap001"])
def test_real_box_covers_the_lungs_of_every_labelled_infected_slice(real_masks, pid):
    patient, masks, ranks = real_masks[pid]
    shape = masks[0].shape
    box = series_box([mask_box(m) for m in masks], shape)
    assert box is not None and box.height * box.width < 0.75 * shape[0] * shape[1]  # a real crop
    infected = [i for i, rank in enumerate(ranks) if patient.slice_labels[rank] == 1]
    assert len(infected) > 40  # P001: 80, cap001: 86
    for i in infected:
        found = mask_box(masks[i])
        assert found is not None, f"{pid} slice {ranks[i]}: labelled infected, no lung found"
        assert box.contains(found), (pid, ranks[i], found, box)


@pytest.mark.slow
def test_real_cache_build_and_prediction_crop_alike(real_sample, real_masks, tmp_path):
    """The cache's box is the box of the masks above; prediction reads the same bytes."""
    p001 = next(p for p in discover_covid_ct_md(real_sample) if p.patient_id == "P001")
    cache = build_or_load_cache([p001], CROP, tmp_path)
    _, masks, _ = real_masks["P001"]
    box = series_box([mask_box(m) for m in masks], masks[0].shape)
    assert box is not None
    assert cache.patients[0].lung_crop == {
        "box": [box.top, box.bottom, box.left, box.right],
        "slice_shape": [512, 512],
        "lung_slices": sum(m.any() for m in masks),
        "note": "",
    }
    item = PatientFolders([p001.folder], CROP)[0]
    assert item["images"].numpy().tobytes() == np.asarray(cache.images).tobytes()
