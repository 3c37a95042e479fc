"""What real PACS exports put in a patient folder besides its series, on copies of the real COVID-CT-MD sample:
a second reconstruction, a sagittal reformat, a localizer, one series under two ids, MONOCHROME1, padding,
headers whose rescale is not HU, a series too short to call. None of them may change a label or a call
without a word."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from covidct.data.datamodule import CTDataModule
from covidct.data.dicom import read_series
from covidct.errors import ConfigError, DataError
from covidct.predict.test_sets import find_test_sets
from covidct.training.callbacks.run_report import series_note
from tests.data.test_real_series_integrity import CAP001, P001, copy_sample, head_first_files, set_tags

D40S = "ThorRoutine 2.0 D40s"  # the sample's own series (SeriesDescription; ConvolutionKernel D40s)


def label_row(sample: Path, row: int) -> np.ndarray:
    """The sample's slice labels of Index.csv data row ``row``, read with numpy alone."""
    return np.load(sample / "Slice-level-labels-updated-1.npy")[row].astype(np.int64)


def second_series(
    sources: list[Path], folder: Path, description: str, shift_mm: float = 1.0, **tags: object
) -> list[Path]:
    """Copies of ``sources`` into ``folder`` as another series (new SeriesInstanceUID and SOPInstanceUIDs, its
    own description), ``shift_mm`` apart along z: a second reconstruction of the same scan."""
    uid, written = generate_uid(), []
    for i, src in enumerate(sources):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID, ds.SeriesDescription = uid, description
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SliceLocation = float(ds.SliceLocation) + shift_mm
        ds.ImagePositionPatient = [*list(ds.ImagePositionPatient)[:2], float(ds.ImagePositionPatient[2]) + shift_mm]
        for name, value in tags.items():
            setattr(ds, name, value)
        written.append(folder / f"second_{i:03d}.dcm")
        ds.save_as(written[-1])
    return written


def subset(sample: Path, dst: Path, n: int) -> tuple[Path, list[Path]]:
    """A patient folder ``dst`` with P001's ``n`` head-most slices (fast), and those source files head first."""
    files = head_first_files(sample / P001)[:n]
    dst.mkdir(parents=True)
    for f in files:
        shutil.copy(f, dst / f.name)
    return dst, files


def hu_series(folder: Path, **kwargs) -> np.ndarray:
    return np.stack(read_series(folder, **kwargs).slices)


# ---- 1. one series per patient -----------------------------------------------------------------


def test_a_second_reconstruction_is_not_merged_and_labels_stay_with_the_labelled_series(real_sample, tmp_path, caplog):
    root = copy_sample(real_sample, tmp_path / "root")
    sources = head_first_files(real_sample / P001)
    second_series(sources[::3][:40], root / P001, "ThorRoutine 1.0 B70f", ConvolutionKernel="B70f", SliceThickness=1.0)
    with caplog.at_level(logging.WARNING):
        dm = CTDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"))
        dm.setup("fit")
    patient = dm.cache.patients[0]
    assert (patient.n_slices, patient.series_length, patient.n_series) == (148, 148, 2)
    assert patient.series["description"] == D40S and "most slices (148; next 40)" in patient.series["note"]
    assert [o["n_images"] for o in patient.other_series] == [40] and "B70f" in patient.other_series[0]["description"]
    rows = dm.cache.patient == 0
    infected = label_row(real_sample, 0)[:148].astype(bool)  # the radiologists' row, head first
    np.testing.assert_array_equal(dm.targets[rows], np.where(infected[dm.cache.slice_index[rows]], 0, 2))
    assert "not used: ThorRoutine 1.0 B70f / B70f / 1 mm" in caplog.text  # in the run log
    summary = (tmp_path / "run" / "data_summary.txt").read_text()
    assert "P001: used ThorRoutine 2.0 D40s" in summary and "not used: ThorRoutine 1.0 B70f" in summary
    assert series_note(dm.summary.series).startswith(  # the report's data section
        f"1 patient folder(s) held more than one series: P001 used {D40S} / D40s / 2 mm"
    )
    split = (tmp_path / "run" / "split.csv").read_text().splitlines()
    assert split[0].endswith("series_uid,series_description,n_series") and split[1].endswith(f"{D40S},2")


def test_data_series_names_the_series_by_description_or_kernel(real_sample, tmp_path):
    folder, sources = subset(real_sample, tmp_path / "P001", 12)
    second_series(sources[:6], folder, "Lung 1.0", ConvolutionKernel="B70f")
    assert len(read_series(folder, series="b70F").slices) == 6  # the kernel, any case
    assert len(read_series(folder, series="thorroutine").slices) == 12
    with pytest.raises(DataError, match=r"no axial series has 'B30f'.*ThorRoutine 2.0 D40s.*Lung 1.0 / B70f"):
        read_series(folder, series="B30f")


@pytest.mark.slow  # decodes the real P001 three times
def test_same_length_series_make_labels_ambiguous_unless_data_series_names_one(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path / "root")
    second_series(
        head_first_files(real_sample / P001),
        root / P001,
        "Thin 1.0 B70f",
        shift_mm=0.0,
        SliceThickness=1.0,
        ConvolutionKernel="B70f",
    )
    auto = CTDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), label_mode="paper", val_fraction=0)
    with pytest.raises(ConfigError, match="no training slices") as error:  # P001's labels were its only targets
        auto.setup("fit")
    assert "P001: slice labels not used: they fit the chosen series" in str(error.value)
    assert "set data.series to the labelled series' description or kernel" in str(error.value)
    named = CTDataModule(
        root=str(root), cache_dir=str(tmp_path / "cache"), label_mode="paper", val_fraction=0, series="D40s"
    )
    named.setup("fit")
    assert named.cache.patients[0].series["description"] == D40S
    infected = label_row(real_sample, 0)[:148].astype(bool)
    np.testing.assert_array_equal(named.targets, np.where(infected[named.cache.slice_index], 0, 2))


def test_a_sagittal_reformat_and_a_localizer_are_never_slices(real_sample, tmp_path):
    folder, sources = subset(real_sample, tmp_path / "P001", 12)
    clean = read_series(folder)
    second_series(sources[:3], folder, "Sag MPR", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    scout = pydicom.dcmread(sources[5])  # the same series UID, as some scanners write it
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.SliceLocation = float(scout.SliceLocation) - 0.5  # between two slices: it would shift every rank after it
    scout.save_as(folder / "scout.dcm")
    no_location = pydicom.dcmread(folder / "scout.dcm")
    del no_location.SliceLocation
    no_location.SOPInstanceUID = no_location.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_location.save_as(folder / "scout_no_location.dcm")

    series = read_series(folder)

    assert series.ranks == clean.ranks == list(range(12)) and series.locations == clean.locations
    np.testing.assert_array_equal(np.stack(series.slices), np.stack(clean.slices))
    assert series.skipped == [] and series.unplaced == []
    notes = {o.kind: (o.n_images, o.note) for o in series.other_series}
    assert notes["localizer"][0] == 2 and "ImageType contains LOCALIZER" in notes["localizer"][1]
    assert notes["non-axial"][0] == 3 and "90 degrees from axial" in notes["non-axial"][1]


def test_one_series_under_two_patient_ids_is_refused_naming_both(real_sample, tmp_path):
    root = tmp_path / "root"
    subset(real_sample, root / P001, 12)
    subset(real_sample, root / "Normal subjects" / "normal-copy", 12)  # a copy filed as another patient
    dm = CTDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), label_mode="patient")
    with pytest.raises(DataError, match=r"patients 'P001' and 'normal-copy' hold one series \(SeriesInstanceUID"):
        dm.setup("fit")
    for f in (root / "Normal subjects" / "normal-copy").iterdir():  # a new series UID, the same images
        set_tags(f, SeriesInstanceUID="1.2.3.4")
    dm = CTDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), label_mode="patient")
    with pytest.raises(DataError, match="'P001' and 'normal-copy' hold one series .the same SOPInstanceUIDs"):
        dm.setup("fit")


# ---- 2. test-set layout ------------------------------------------------------------------------


def test_a_stray_file_beside_the_patient_folders_does_not_swallow_the_test_set(real_sample, tmp_path):
    test_set = tmp_path / "Test1"
    for p in (P001, CAP001):
        shutil.copytree(real_sample / p, test_set / p.name)
    shutil.copy(next((real_sample / P001).glob("*.dcm")), test_set / "stray.dcm")
    (test_set / "more patients.zip").write_bytes(b"PK\x03\x04")
    (test_set / ".hidden patient").mkdir()
    [found] = find_test_sets(test_set)
    assert [p.name for p in found.patients] == ["P001", "cap001"]
    assert {s.path.name: s.reason for s in found.skipped} == {
        ".hidden patient": "hidden entry, not read",
        "more patients.zip": "a file beside the patient folders, not a patient folder",
        "stray.dcm": "a DICOM file beside the patient folders, not a patient folder",
    }


# ---- 3. pixel semantics ------------------------------------------------------------------------


def test_monochrome1_does_not_invert_hounsfield_units(real_sample, tmp_path):
    folder, _ = subset(real_sample, tmp_path / "P001", 4)
    original = hu_series(folder)
    for f in folder.iterdir():
        set_tags(f, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_array_equal(hu_series(folder), original)
    assert original.mean() < -500  # a chest slice: mostly air and lung, as read by the untouched files


def test_padding_outside_the_field_of_view_is_air(real_sample, tmp_path):
    folder, _ = subset(real_sample, tmp_path / "P001", 4)
    original = hu_series(folder)
    rows, cols = np.mgrid[:512, :512]
    outside = (rows - 255.5) ** 2 + (cols - 255.5) ** 2 > 250**2
    for f in folder.iterdir():  # signed pixels, -2000 outside the scan circle (declared as padding)
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array.astype(np.int16)
        stored[outside] = -2000
        ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=16)
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue, signed like the pixels
        ds.save_as(f)
    padded = hu_series(folder)
    assert (padded[:, outside] == -1000).all()  # air, not -3024 HU
    np.testing.assert_array_equal(padded[:, ~outside], original[:, ~outside])


@pytest.mark.parametrize(
    ("tags", "reads"),
    [({"RescaleIntercept": 1024}, 1024), ({"RescaleIntercept": 0}, 0), ({"RescaleSlope": 1000}, None)],
)
def test_a_rescale_that_does_not_give_hounsfield_units_skips_the_patient_with_the_reason(
    real_sample, tmp_path, tags, reads
):
    folder, _ = subset(real_sample, tmp_path / "P001", 6)
    for f in folder.iterdir():
        set_tags(f, **tags)
    with pytest.raises(DataError, match=r"air reads (-?\d+) HU after the rescale.*not Hounsfield units") as error:
        read_series(folder)
    if reads is not None:  # the sample's air is stored near 0 (-1024 HU): it reads as the new intercept
        assert abs(int(error.value.args[0].split("air reads ")[1].split(" HU")[0]) - reads) < 30


def test_a_series_shorter_than_min_slices_is_not_a_patient(real_sample, tmp_path):
    folder, _ = subset(real_sample, tmp_path / "P001", 3)
    assert len(read_series(folder).slices) == 3  # the reader alone takes any length
    with pytest.raises(DataError, match=r"3 usable slice\(s\) in series ThorRoutine.*fewer than the 5 a series needs"):
        read_series(folder, min_slices=5)


def test_signed_pixels_declared_unsigned_are_not_read_as_hounsfield_units(real_sample, tmp_path):
    folder, _ = subset(real_sample, tmp_path / "P001", 6)
    for f in folder.iterdir():  # stored as signed HU (intercept 0), as many scanners do; then mislabelled unsigned
        ds = pydicom.dcmread(f)
        ds.set_pixel_data(
            ds.pixel_array.astype(np.int16) - 1024, photometric_interpretation="MONOCHROME2", bits_stored=16
        )
        ds.RescaleIntercept = 0
        ds.save_as(f)
    assert hu_series(folder).max() < 3000  # read as written: plausible
    for f in folder.iterdir():
        set_tags(f, PixelRepresentation=0)
    with pytest.raises(DataError, match=r"air reads \d+ HU after the rescale"):
        read_series(folder)


@pytest.mark.slow
def test_the_predict_csv_names_each_series_and_lists_what_is_not_a_patient(real_sample, tiny_checkpoint, tmp_path):
    import torch

    from covidct.predict.predictor import predict_test_set
    from covidct.predict.torch_backend import load_checkpoint

    test_set = tmp_path / "Test1"
    _, sources = subset(real_sample, test_set / "P001", 12)
    second_series(sources[:6], test_set / "P001", "Sag MPR", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    subset(real_sample, test_set / "P001 again", 12)  # the same series under a second id
    subset(real_sample, test_set / "three slices", 3)
    for f in (test_set / "three slices").iterdir():
        set_tags(f, SeriesInstanceUID=generate_uid(), SOPInstanceUID=generate_uid())
    shutil.copy(sources[0], test_set / "stray.dcm")
    model, settings = load_checkpoint(tiny_checkpoint, torch.device("cpu"))
    settings.min_slices = 5

    patients_csv, _ = predict_test_set(find_test_sets(test_set)[0], model, settings, tmp_path, progress=False)

    rows = {r["patient"]: r for r in csv.DictReader(patients_csv.open())}
    assert rows["P001"]["status"] == "ok" and rows["P001"]["n_slices"] == "12" and rows["P001"]["n_series"] == "1"
    assert rows["P001"]["series_description"] == D40S and rows["P001"]["series_uid"].startswith("1.3.12.2.1107")
    assert "not used: Sag MPR" in rows["P001"]["detail"] and "90 degrees from axial" in rows["P001"]["detail"]
    assert (
        rows["P001 again"]["status"] == "error"
        and "'P001' and 'P001 again' hold one series" in rows["P001 again"]["detail"]
    )
    short = rows["three slices"]
    assert short["status"] == "error" and "fewer than the 5 a series needs" in short["detail"]
    assert rows["stray.dcm"]["status"] == "skipped" and "beside the patient folders" in rows["stray.dcm"]["detail"]
