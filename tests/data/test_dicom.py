"""Reading slices to HU and series to head-first order, on real and written DICOM files."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from covidct.data.dicom import read_series, to_hounsfield
from covidct.errors import DataError
from tests.conftest import write_ct_slice


def ramp(value: int) -> np.ndarray:
    hu = np.full((8, 8), value, dtype=np.int16)
    hu[0, 0] = -1000
    return hu


def test_hu_applies_rescale_and_defaults(tmp_path):
    hu = np.arange(-1000, 1000, 2000 / 64).reshape(8, 8).round()
    ds = pydicom.dcmread(write_ct_slice(tmp_path / "a.dcm", hu))
    np.testing.assert_array_equal(to_hounsfield(ds), hu.astype(np.float32))
    assert to_hounsfield(ds).dtype == np.float32
    # no rescale tags: stored values are taken as they are
    ds = pydicom.dcmread(write_ct_slice(tmp_path / "b.dcm", hu + 1024, intercept=None, slope=None))
    np.testing.assert_array_equal(to_hounsfield(ds), hu + 1024)
    # slope 2: stored values are half
    ds = pydicom.dcmread(write_ct_slice(tmp_path / "c.dcm", hu, slope=2.0))
    np.testing.assert_allclose(to_hounsfield(ds), hu, atol=1.0)


def test_monochrome1_is_a_display_step_that_does_not_invert_hounsfield_units(tmp_path):
    hu = ramp(400)  # the same stored values read the same HU whatever PhotometricInterpretation says
    ds = pydicom.dcmread(write_ct_slice(tmp_path / "m1.dcm", hu, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(to_hounsfield(ds), hu)


def test_jpeg2000_ct_decodes_bit_exact_to_the_uncompressed_original():
    plain = to_hounsfield(pydicom.dcmread(get_testdata_file("693_UNCR.dcm")))
    j2k = to_hounsfield(pydicom.dcmread(get_testdata_file("693_J2KR.dcm")))
    assert j2k.shape == (512, 512)
    np.testing.assert_array_equal(j2k, plain)
    # outside the scan circle the file stores its PixelPaddingValue -2000 (-3024 through the rescale): air
    raw = pydicom.dcmread(get_testdata_file("693_UNCR.dcm")).pixel_array
    assert raw[0, 0] == -2000 and plain[0, 0] == -1000.0
    assert plain[raw != -2000].min() == -1024.0  # inside the circle, untouched


def test_rle_and_jpeg_lossless_decode():
    plain = to_hounsfield(pydicom.dcmread(get_testdata_file("MR_small.dcm")))
    np.testing.assert_array_equal(to_hounsfield(pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))), plain)
    ll = to_hounsfield(pydicom.dcmread(get_testdata_file("JPEG-LL.dcm")))  # JPEG Lossless SV1, like the real data
    assert ll.shape == (1024, 256) and ll.max() == 278


def test_real_slice_is_jpeg_lossless_and_hu_plausible(real_sample):
    path = next((real_sample / "COVID-19 subjects" / "P001").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    hu = to_hounsfield(ds)
    assert hu.shape == (512, 512)
    assert hu.min() >= -1100 and -1100 < np.median(hu) < 200  # air and body, nothing absurd
    assert hu.max() > 300  # bone


def test_series_sorted_by_slice_location_descending_not_by_name(tmp_path):
    # names sort 1, 10, 2 as strings; locations put them in another order again
    for name, loc, inst in [("s_1.dcm", -20.0, 3), ("s_10.dcm", 10.0, 1), ("s_2.dcm", 0.0, 2)]:
        write_ct_slice(tmp_path / name, ramp(int(loc)), slice_location=loc, position_z=-loc, instance_number=inst)
    series = read_series(tmp_path)
    assert series.order_key == "SliceLocation"
    assert series.locations == [10.0, 0.0, -20.0]
    assert [p.name for p in series.paths] == ["s_10.dcm", "s_2.dcm", "s_1.dcm"]
    assert [int(s[1, 1]) for s in series.slices] == [10, 0, -20]


def test_series_falls_back_to_position_then_instance_number(tmp_path):
    a, b = tmp_path / "pos", tmp_path / "inst"
    for name, z, inst in [("x.dcm", 5.0, 2), ("y.dcm", 15.0, 3), ("z.dcm", 10.0, 1)]:
        write_ct_slice(a / name, ramp(int(z)), position_z=z)
        write_ct_slice(b / name, ramp(inst), instance_number=inst)
    assert read_series(a).order_key == "ImagePositionPatient"
    assert read_series(a).locations == [15.0, 10.0, 5.0]  # z grows towards the head: head first
    assert read_series(b).order_key == "InstanceNumber"
    assert [int(s[1, 1]) for s in read_series(b).slices] == [1, 2, 3]


def test_series_without_any_ordering_tag_is_an_error_naming_the_folder(tmp_path):
    write_ct_slice(tmp_path / "a.dcm", ramp(0))
    write_ct_slice(tmp_path / "b.dcm", ramp(1), slice_location=3.0)
    with pytest.raises(DataError, match=str(tmp_path)):
        read_series(tmp_path)


def test_non_dicom_ignored_and_corrupt_dicom_skipped_with_warning(tmp_path, caplog):
    for i in range(3):
        write_ct_slice(tmp_path / f"{i}.dcm", ramp(i), slice_location=float(i))
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "notes.txt").write_text("scanned on tuesday")
    good = (tmp_path / "2.dcm").read_bytes()
    (tmp_path / "broken.dcm").write_bytes(good[: len(good) - 60])  # pixel data cut short
    with caplog.at_level(logging.WARNING):
        series = read_series(tmp_path)
    assert len(series.slices) == 3
    assert {s.path.name for s in series.ignored} == {".DS_Store", "Thumbs.db", "notes.txt"}
    assert [s.path.name for s in series.skipped] == ["broken.dcm"]
    assert "broken.dcm" in caplog.text


def test_folder_with_no_readable_slice_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no readable DICOM slice"):
        read_series(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        read_series(tmp_path / "missing")


def test_convert_is_applied_per_slice(tmp_path):
    for i in range(2):
        write_ct_slice(tmp_path / f"{i}.dcm", ramp(100 * i), slice_location=float(i))
    series = read_series(tmp_path, lambda hu: float(hu.mean()))
    assert all(isinstance(s, float) for s in series.slices)
