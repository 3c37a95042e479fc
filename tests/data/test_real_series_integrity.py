"""Data integrity on real CT: the shared COVID-CT-MD sample, copied and mutated one tag or one file at a
time. A skipped slice never shifts the labels of the others; shared, missing or absurd positions never
wipe or scramble a series; headers that would change pixel values are refused with their reason."""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragments

from covidct.data.cache import build_or_load_cache
from covidct.data.datamodule import CTDataModule
from covidct.data.dicom import read_series
from covidct.data.labels import UNKNOWN
from covidct.data.layout import discover_covid_ct_md
from covidct.data.preprocess import SlicePreprocessor, parse_windows
from covidct.errors import ConfigError, DataError

P001 = Path("COVID-19 subjects") / "P001"
CAP001 = Path("Cap subjects") / "cap001"
PRE = SlicePreprocessor(parse_windows(["lung"]), 32)


def head_first_files(folder: Path) -> list[Path]:
    """The folder's files sorted by SliceLocation descending, read here with pydicom alone."""
    files = sorted(folder.glob("*.dcm"))
    return sorted(files, key=lambda f: -float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation))


def copy_sample(sample: Path, dst: Path, patients: tuple[Path, ...] = (P001,), labels: bool = True) -> Path:
    """A COVID-CT-MD root in ``dst`` with copies of ``patients`` (and Index.csv + slice labels)."""
    for p in patients:
        shutil.copytree(sample / p, dst / p)
    if labels:
        for name in ("Index.csv", "Slice-level-labels-updated-1.npy"):
            shutil.copy(sample / name, dst / name)
    return dst


def scramble_payload(path: Path, seed: int = 0) -> None:
    """Overwrite a JPEG-Lossless slice's compressed bytes with noise (the file stays valid DICOM)."""
    ds = pydicom.dcmread(path)
    fragment = bytearray(list(generate_fragments(ds.PixelData))[-1])
    fragment[200:] = np.random.default_rng(seed).integers(0, 256, len(fragment) - 200, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([bytes(fragment)], has_bot=False)
    ds.save_as(path)


def set_tags(path: Path, **tags: object) -> None:
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that nan and inf are not valid DS values: the point here
        for name, value in tags.items():
            setattr(ds, name, value)
        ds.save_as(path)


def datamodule(root: Path, tmp_path: Path, **kwargs) -> CTDataModule:
    dm = CTDataModule(
        root=str(root),
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "run"),
        image_size=32,
        val_fraction=0.5,
        **kwargs,
    )
    dm.setup("fit")
    return dm


# ---- 1. labels stay with their slice ------------------------------------------------------------


@pytest.mark.slow  # whole real patients through the cache (5-10 s each)
def test_a_skipped_slice_does_not_shift_the_labels_of_the_others(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path / "data")
    ordered = head_first_files(root / P001)
    location_rank = {
        round(float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation), 3): i for i, f in enumerate(ordered)
    }
    scramble_payload(ordered[20])  # head-first slice 20 no longer decodes
    labels = np.load(real_sample / "Slice-level-labels-updated-1.npy")[0]  # P001 is the first row of Index.csv

    dm = datamodule(root, tmp_path)

    patient = dm.cache.patients[0]
    assert (patient.patient_id, patient.n_slices, patient.series_length) == ("P001", 147, 148)
    assert [Path(s["file"]).name for s in patient.skipped] == [ordered[20].name]
    rows = np.flatnonzero(dm.cache.patient == 0)
    ranks = [location_rank[round(float(loc), 3)] for loc in dm.cache.location[rows]]  # independent of the cache
    assert 20 not in ranks and dm.cache.slice_index[rows].tolist() == ranks
    expected = np.where(labels[ranks] == 1, 0, 2)  # paper mode: infected -> COVID-19, clean -> Normal
    np.testing.assert_array_equal(dm.targets[rows], expected)


@pytest.mark.slow  # whole real patients through the cache (5-10 s each)
def test_a_skipped_file_of_unknown_position_makes_the_labels_unusable_not_guessed(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path / "data", (P001, CAP001))
    victim = head_first_files(root / P001)[40]
    victim.write_bytes(victim.read_bytes()[:300])  # cut inside the header: position unreadable

    dm = datamodule(root, tmp_path)

    p001, cap = dm.patient_ids.index("P001"), dm.patient_ids.index("cap001")
    assert (dm.targets[dm.cache.patient == p001] == UNKNOWN).all()
    assert (dm.targets[dm.cache.patient == cap] != UNKNOWN).all()  # the other patient's labels are used
    warning = next(w for w in dm.summary.warnings if w.startswith("P001"))
    assert "slice labels not used" in warning and victim.name in warning
    text = (tmp_path / "run" / "data_summary.txt").read_text()
    assert f"WARNING {warning}" in text


@pytest.mark.slow  # whole real patients through the cache (5-10 s each)
def test_labels_that_do_not_fit_the_series_are_not_used_and_the_summary_says_so(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path / "data", (P001, CAP001))
    for f in head_first_files(root / P001)[100:]:  # the labels mark slices up to column 124
        f.unlink()

    dm = datamodule(root, tmp_path)

    assert (dm.targets[dm.cache.patient == dm.patient_ids.index("P001")] == UNKNOWN).all()
    assert any(
        "P001: slice labels not used: the labels mark infected slices up to column 124 but the series "
        "has 100 slice positions" in w
        for w in dm.summary.warnings
    )


# ---- 2. positions --------------------------------------------------------------------------------


def first_slices(real_sample: Path, dst: Path, n: int = 20) -> list[Path]:
    """Copies of P001's ``n`` head-most slices, head first."""
    dst.mkdir(parents=True)
    return [Path(shutil.copy(f, dst / f.name)) for f in head_first_files(real_sample / P001)[:n]]


def test_a_slice_location_shared_by_every_slice_falls_back_to_the_patient_position(real_sample, tmp_path):
    files = first_slices(real_sample, tmp_path / "P001")
    for f in files:
        set_tags(f, SliceLocation="-100.0")  # a scanner that writes the table position into SliceLocation

    series = read_series(tmp_path / "P001", PRE)

    assert len(series.slices) == 20 and series.skipped == []
    assert series.order_key == "ImagePositionPatient" and "SliceLocation is the same (100)" in series.order_note
    assert series.paths == files  # P001's z and SliceLocation agree: the same head-first order
    assert series.ranks == list(range(20))


def test_a_true_duplicate_is_dropped_only_when_every_key_agrees(real_sample, tmp_path):
    files = first_slices(real_sample, tmp_path / "P001", 6)
    shutil.copy(files[2], tmp_path / "P001" / "copy.dcm")  # the same slice twice
    set_tags(files[4], SliceLocation=pydicom.dcmread(files[3]).SliceLocation)  # shared location, other z

    series = read_series(tmp_path / "P001", PRE)

    assert [s.path.name for s in series.skipped] == ["copy.dcm"] and "same SliceLocation" in series.skipped[0].reason
    assert series.paths == files and series.ranks == list(range(6)) and series.series_length == 6


@pytest.mark.parametrize("broken", ["nan", "inf", "1e300"])
def test_a_non_finite_or_absurd_slice_location_is_not_used_and_the_note_says_why(real_sample, tmp_path, broken):
    files = first_slices(real_sample, tmp_path / "P001", 8)
    set_tags(files[3], SliceLocation=broken)

    series = read_series(tmp_path / "P001", PRE)

    assert series.paths == files and series.order_key == "ImagePositionPatient"
    assert "SliceLocation not finite or beyond 100000 mm on 1 of 8 slices" in series.order_note


@pytest.mark.slow  # whole real patients through the cache (5-10 s each)
def test_the_data_summary_and_split_name_the_key_that_ordered_each_series(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path / "data", (P001, CAP001), labels=False)
    for f in (root / CAP001).iterdir():
        set_tags(f, SliceLocation="0")

    dm = datamodule(root, tmp_path, label_mode="patient")

    assert dm.summary.slice_order == {"SliceLocation": 1, "ImagePositionPatient": 1}
    text = (tmp_path / "run" / "data_summary.txt").read_text()
    assert re.search(r"\n  patients, slices ordered by +SliceLocation=1  ImagePositionPatient=1\n", text)
    assert re.search(r"\n  patients, all slices labelled +COVID-19=1  CAP=1  Normal=0\n", text)
    assert "cap001: SliceLocation is the same (0) on every slice; ordered by ImagePositionPatient" in text
    split = (tmp_path / "run" / "split.csv").read_text().splitlines()
    assert "series_length,order_key," in split[0] and any(
        r.startswith("cap001,CAP,") and ",168,ImagePositionPatient,1.3.12.2.1107" in r for r in split
    )


# ---- 3. headers that change pixel values --------------------------------------------------------


@pytest.mark.parametrize("slope", ["0", "nan"])
def test_a_broken_rescale_slope_skips_the_slice_with_its_reason(real_sample, tmp_path, slope):
    files = first_slices(real_sample, tmp_path / "P001", 4)
    set_tags(files[1], RescaleSlope=slope)

    series = read_series(tmp_path / "P001", PRE)

    assert [s.path.name for s in series.skipped] == [files[1].name]
    assert f"RescaleSlope {slope}" in series.skipped[0].reason and "not a usable rescale" in series.skipped[0].reason
    assert series.ranks == [0, 2, 3] and series.series_length == 4  # its place is kept


@pytest.mark.slow  # whole real patients through the cache (5-10 s each)
def test_a_mostly_undecodable_series_is_an_error_not_a_remnant(real_sample, tmp_path):
    root = tmp_path / "data"
    files = first_slices(real_sample, root / P001, 20)
    shutil.copytree(real_sample / CAP001, root / CAP001)
    for i, f in enumerate(files[:15]):
        scramble_payload(f, seed=i)

    with pytest.raises(DataError, match=r"P001: 15 of 20 CT slices cannot be decoded .*the limit is 50%"):
        read_series(root / P001, PRE)
    cache = build_or_load_cache(discover_covid_ct_md(root), PRE, tmp_path / "cache")
    assert [p.patient_id for p in cache.patients] == ["cap001"]  # P001 is not voted on a 5-slice remnant
    assert cache.skipped_patients[0]["patient"] == "P001" and "cannot be decoded" in cache.skipped_patients[0]["reason"]
    for f in files[15:19]:
        f.unlink()  # 15 of 16 fail: still an error; 1 of 5 after restoring: fine
    for f, original in zip(files[:11], head_first_files(real_sample / P001)[:11], strict=True):
        shutil.copy(original, f)
    series = read_series(root / P001, PRE)
    assert len(series.slices) == 12 and len(series.skipped) == 4


def test_a_pixel_data_element_that_cannot_be_parsed_gets_its_real_reason(real_sample, tmp_path, caplog):
    files = first_slices(real_sample, tmp_path / "P001", 3)
    raw = bytearray(files[1].read_bytes())
    start = raw.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData: scramble from its fragments on
    raw[start + 16 :] = np.random.default_rng(0).integers(0, 256, len(raw) - start - 16, dtype=np.uint8).tobytes()
    files[1].write_bytes(bytes(raw))

    with caplog.at_level(logging.INFO):
        series = read_series(tmp_path / "P001", PRE)

    reason = series.skipped[0].reason
    assert reason.startswith("pixel data cannot be parsed (") and "no pixel data" not in reason
    assert "Traceback" not in caplog.text and "\n" not in reason


def test_windows_with_a_non_finite_level_or_width_are_refused_naming_the_key():
    for window in ({"level": float("nan"), "width": 1500.0}, {"level": -600.0, "width": float("inf")}):
        with pytest.raises(ConfigError, match=r"data.windows\[1\]"):
            parse_windows(["lung", window])


# ---- 5. a damaged slice table is rebuilt; no training slice is a clear error ----------------------


@pytest.mark.slow  # whole real patients through the cache (5-10 s each)
def test_a_damaged_slice_table_is_rebuilt(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path / "data", (CAP001,), labels=False)
    patients = discover_covid_ct_md(root)
    first = build_or_load_cache(patients, PRE, tmp_path / "cache")
    (first.path / "slices.npz").write_bytes(b"PK\x03\x04 not really a zip")

    again = build_or_load_cache(patients, PRE, tmp_path / "cache")

    assert again.path == first.path and len(again.images) == 168
    assert again.slice_index.tolist() == list(range(168))


@pytest.mark.slow  # whole real patients through the cache (5-10 s each)
def test_no_training_slices_is_a_clear_error_naming_the_label_mode(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path / "data", (P001, CAP001), labels=False)
    with pytest.raises(ConfigError, match=r"no training slices: .* data.label_mode=paper .* data.label_mode=patient"):
        datamodule(root, tmp_path)
