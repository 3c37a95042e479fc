"""Messy hospital folders, tried for real: every bad input is read correctly or listed with its reason.

One COVID-CT-MD style dataset holds every kind of bad input of the reliability issue; the data
module must build its cache, train/val split and summary without crashing, and every entry of every
folder must be accounted for (used, skipped with a reason, or ignored with a reason).
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from covidct.data.datamodule import CTDataModule
from covidct.data.dicom import read_series
from tests.conftest import write_ct_slice

NON_ASCII = "Pätient 01 – 北京"  # spaces, accents, a dash and CJK in one folder name
LATIN1_NAME = os.fsdecode(b"sl\xe9ce 7.dcm")  # not valid UTF-8: a Windows CD copied onto Linux


def body(value: int, size: int = 16) -> np.ndarray:
    hu = np.full((size, size), value, dtype=np.int16)
    hu[0, 0] = -1000
    return hu


def good_patient(folder: Path, n: int = 4) -> None:
    for i in range(n):
        write_ct_slice(folder / f"IM{i}.dcm", body(100 * i), slice_location=-5.0 * i)


def plant_bad_files(folder: Path) -> dict[str, str]:
    """Write every bad slice kind into ``folder``; returns file name -> expected reason (substring)."""
    good = write_ct_slice(folder / "trunc.dcm", body(7), slice_location=-100.0)
    good.write_bytes(good.read_bytes()[:-100])  # cut short inside the pixel data (a broken copy)
    (folder / "fake.dcm").write_text("this is a radiology report, not an image\n")
    no_pixels = pydicom.dcmread(write_ct_slice(folder / "nopixels.dcm", body(0), slice_location=-105.0))
    del no_pixels.PixelData
    no_pixels.save_as(folder / "nopixels.dcm")
    write_ct_slice(folder / "mr.dcm", body(0), slice_location=-110.0, modality="MR")
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report_sr.dcm")
    write_ct_slice(folder / "small.dcm", body(0, size=8), slice_location=-115.0)
    write_ct_slice(folder / "unsigned_no_rescale.dcm", body(0) + 1024, slice_location=-120.0, intercept=None)
    write_ct_slice(folder / "dup.dcm", body(999), slice_location=-5.0)  # IM1's position
    huge = pydicom.dcmread(write_ct_slice(folder / "huge.dcm", body(0), slice_location=-125.0))
    huge.Rows = huge.Columns = 60000  # 7.2 GB if decoded as declared
    huge.save_as(folder / "huge.dcm")
    return {
        "trunc.dcm": "less than expected",
        "fake.dcm": "named .dcm but not a DICOM file",
        "nopixels.dcm": "no pixel data",
        "mr.dcm": "Modality MR, not CT",
        "report_sr.dcm": "Modality SR, not CT",
        "small.dcm": "image size 8 x 8 px differs from the series' 16 x 16 px",
        "unsigned_no_rescale.dcm": "Hounsfield units unknown",
        "dup.dcm": "same SliceLocation (-5) as IM1.dcm",
        "huge.dcm": "refused before decoding",
    }


def plant_readable_oddities(folder: Path) -> dict[str, np.ndarray]:
    """Slices that are odd but correct: file name -> the HU they must read as."""
    written = {"signed_no_rescale.dcm": body(-500), "mono1.dcm": body(300), LATIN1_NAME: body(42)}
    write_ct_slice(
        folder / "signed_no_rescale.dcm",
        written["signed_no_rescale.dcm"],
        slice_location=-130.0,
        intercept=None,
        signed=True,
    )
    write_ct_slice(folder / "mono1.dcm", written["mono1.dcm"], slice_location=-135.0, photometric="MONOCHROME1")
    write_ct_slice(folder / LATIN1_NAME, written[LATIN1_NAME], slice_location=-140.0)
    return written


@pytest.fixture
def messy_root(tmp_path) -> Path:
    root = tmp_path / "messy data"
    for cls in ("COVID-19 subjects", "Cap subjects", "Normal subjects"):
        for k in (1, 2):
            good_patient(root / cls / f"{cls.split()[0].lower()}{k:02d}")
    return root


def test_every_bad_slice_kind_is_skipped_with_its_reason_or_read_correctly(messy_root):
    folder = messy_root / "COVID-19 subjects" / NON_ASCII
    good_patient(folder)
    expected = plant_bad_files(folder)
    readable = plant_readable_oddities(folder)
    (folder / "notes.txt").write_text("scanner notes")
    (folder / "loop").symlink_to(folder / "loop")  # a link to itself
    (folder / "localizer").mkdir()

    series = read_series(folder)

    reasons = {s.path.name: s.reason for s in series.skipped}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], reasons[name]
    ignored = {s.path.name: s.reason for s in series.ignored}
    assert ignored == {
        "notes.txt": "not a DICOM file",
        "loop": "broken or looping symbolic link",
        "localizer": "subfolder not read (slices must lie directly in the patient folder)",
    }
    used = {p.name for p in series.paths}
    assert used == {"IM0.dcm", "IM1.dcm", "IM2.dcm", "IM3.dcm", *readable}
    assert used | set(reasons) | set(ignored) == set(os.listdir(folder))  # nothing unaccounted for
    for name, hu in readable.items():
        np.testing.assert_array_equal(series.slices[[p.name for p in series.paths].index(name)], hu)
    assert series.slices[1][1, 1] == 100  # IM1 kept, its duplicate skipped
    assert series.locations == [0.0, -5.0, -10.0, -15.0, -130.0, -135.0, -140.0]  # head first


def test_an_absurd_declared_size_is_refused_before_any_decoding(tmp_path):
    write_ct_slice(tmp_path / "ok.dcm", body(0), slice_location=0.0)
    huge = pydicom.dcmread(write_ct_slice(tmp_path / "huge.dcm", body(0), slice_location=-5.0))
    huge.Rows = huge.Columns = 60000
    huge.save_as(tmp_path / "huge.dcm")
    tracemalloc.start()
    series = read_series(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(series.slices) == 1 and "refused before decoding" in series.skipped[0].reason
    assert peak < 20 * 2**20  # bytes: decoding as declared would allocate 7.2 GB


def test_data_module_survives_the_messy_dataset_and_its_summary_names_every_problem(messy_root, tmp_path):
    folder = messy_root / "COVID-19 subjects" / NON_ASCII
    good_patient(folder)
    expected = plant_bad_files(folder)
    plant_readable_oddities(folder)
    (messy_root / "Normal subjects" / "empty patient").mkdir()
    (messy_root / "Cap subjects" / "loop patient").symlink_to(messy_root / "Cap subjects" / "loop patient")
    (messy_root / "Cap subjects" / "stray file.dcm").write_bytes(b"\0" * 10)
    good_patient(messy_root / "Cap subjects" / ".hidden patient")  # never read, but listed

    dm = CTDataModule(
        root=str(messy_root),
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "run"),
        image_size=32,
        val_fraction=0.5,
        seed=0,
        label_mode="patient",
        min_slices=4,  # the planted patients have 4 slices
    )
    dm.prepare_data()
    dm.setup("fit")

    assert NON_ASCII in dm.patient_ids and "empty patient" not in dm.patient_ids
    assert dm.cache.patients[dm.patient_ids.index(NON_ASCII)].n_slices == 7
    assert len(dm.patient_ids) == 7 and len(dm.train_rows) + len(dm.val_rows) == 6 * 4 + 7
    summary = dm.summary
    assert [(s["patient"], "no readable DICOM slice" in s["reason"]) for s in summary.skipped_patients] == [
        ("empty patient", True)
    ]
    skipped = {Path(s["file"]).name: s["reason"] for s in summary.skipped_files}
    assert set(skipped) == set(expected) | {"loop patient", "stray file.dcm", ".hidden patient"}
    assert "looping symbolic link" in skipped["loop patient"] and "hidden folder" in skipped[".hidden patient"]
    assert "a file where patient folders are expected" in skipped["stray file.dcm"]
    text = (tmp_path / "run" / "data_summary.txt").read_text(encoding="utf-8")
    for reason in [*expected.values(), "skipped patient empty patient"]:
        assert reason in text
    assert (tmp_path / "run" / "data_summary.json").is_file()
    split = (tmp_path / "run" / "split.csv").read_text(encoding="utf-8")
    assert NON_ASCII in split

    again = CTDataModule(
        root=str(messy_root),
        cache_dir=str(tmp_path / "cache"),
        image_size=32,
        val_fraction=0.5,
        label_mode="patient",
        min_slices=4,
    )
    again.setup("fit")  # the cache is found again (its key survives non-UTF-8 file names)
    assert again.cache.path == dm.cache.path
