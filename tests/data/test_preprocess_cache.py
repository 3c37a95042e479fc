"""Windowing, resizing, the slice cache (reuse, invalidation, atomicity), labels and splits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from covidct.data.cache import build_or_load_cache, open_cache
from covidct.data.labels import UNKNOWN, slice_targets, usable_slice_labels
from covidct.data.layout import PatientFolder, discover_covid_ct_md
from covidct.data.preprocess import SlicePreprocessor, Window, parse_windows
from covidct.data.split import stratified_folds, train_val_split
from covidct.data.synthetic import SyntheticSpec, ensure_dataset
from covidct.errors import ConfigError
from tests.conftest import REPO, write_ct_slice


def test_lung_window_maps_hu_linearly_to_uint8():
    lung = Window(-600, 1500)
    hu = np.array([-2000, -1350, -600, 150, 3000], dtype=np.float32)
    np.testing.assert_array_equal(lung.apply(hu), [0, 0, 128, 255, 255])  # -600 -> 127.5 rounds to 128


def test_windows_from_config_and_errors():
    assert parse_windows(["lung", {"level": 40, "width": 400}]) == (Window(-600, 1500), Window(40, 400))
    with pytest.raises(ConfigError, match=r"data.windows\[0\]"):
        parse_windows(["lungs"])
    with pytest.raises(ConfigError, match="width must be > 0"):
        parse_windows([{"level": 0, "width": 0}])


def test_preprocessor_resizes_and_stacks_one_channel_per_window():
    hu = np.full((64, 64), -1000, dtype=np.float32)
    hu[16:48, 16:48] = 40.0
    out = SlicePreprocessor(parse_windows(["lung", "mediastinum"]), 32)(hu)
    assert out.shape == (2, 32, 32) and out.dtype == np.uint8
    assert out[0, 16, 16] == Window(-600, 1500).apply(np.float32(40)) and out[1, 0, 0] == 0
    assert out[1, 16, 16] == 128  # 40 HU is the mediastinal window's centre


def make_patients(root, n_slices=(3, 2)) -> list[PatientFolder]:
    patients = []
    for p, n in enumerate(n_slices):
        folder = root / f"p{p}"
        for i in range(n):
            write_ct_slice(
                folder / f"{i}.dcm", np.full((16, 16), -900 + 100 * i + p, dtype=np.int16), slice_location=float(i)
            )
        patients.append(PatientFolder(f"p{p}", p, folder))
    return patients


def test_cache_content_order_reuse_and_invalidation(tmp_path):
    patients = make_patients(tmp_path / "data")
    pre = SlicePreprocessor(parse_windows(["lung"]), 8)
    cache = build_or_load_cache(patients, pre, tmp_path / "cache")
    assert cache.images.shape == (5, 1, 8, 8) and cache.images.dtype == np.uint8
    assert cache.patient.tolist() == [0, 0, 0, 1, 1] and cache.slice_index.tolist() == [0, 1, 2, 0, 1]
    assert cache.location.tolist() == [2.0, 1.0, 0.0, 1.0, 0.0]  # head first
    expected = Window(-600, 1500).apply(np.float32(-900 + 200))  # p0's head-most slice: i=2
    assert cache.images[0, 0, 4, 4] == expected
    # reuse: same folder, no rebuild
    again = build_or_load_cache(patients, pre, tmp_path / "cache")
    assert again.path == cache.path and len(list((tmp_path / "cache").iterdir())) == 1
    # a setting change -> a new cache; a file change -> a new cache
    assert build_or_load_cache(patients, SlicePreprocessor(pre.windows, 16), tmp_path / "cache").path != cache.path
    f = patients[1].folder / "0.dcm"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    rebuilt = build_or_load_cache(patients, pre, tmp_path / "cache")
    assert rebuilt.path not in (cache.path,) and len(list((tmp_path / "cache").iterdir())) == 3


def test_interrupted_build_is_not_taken_for_a_cache(tmp_path):
    patients = make_patients(tmp_path / "data")
    pre = SlicePreprocessor(parse_windows(["lung"]), 8)
    cache = build_or_load_cache(patients, pre, tmp_path / "cache")
    # a damaged cache: the folder exists but lacks its manifest
    (cache.path / "manifest.json").unlink()
    rebuilt = build_or_load_cache(patients, pre, tmp_path / "cache")
    assert (rebuilt.path / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]  # no temp leftovers


BUILD_CACHE = """
import sys
from pathlib import Path
from covidct.data.cache import build_or_load_cache
from covidct.data.layout import discover_covid_ct_md
from covidct.data.preprocess import SlicePreprocessor, parse_windows
build_or_load_cache(discover_covid_ct_md(sys.argv[1]), SlicePreprocessor(parse_windows(["lung"]), 128), sys.argv[2])
"""


@pytest.mark.slow
def test_a_cache_build_killed_part_way_is_never_used_and_is_rebuilt(tmp_path, caplog):
    root = ensure_dataset(
        tmp_path / "gen",
        SyntheticSpec(
            patients_per_class=(3, 3, 3), slices_min=24, slices_max=24, image_size=256, compressed_fraction=1.0
        ),
    )
    cache_dir = tmp_path / "cache"
    env = dict(os.environ)
    builder = subprocess.Popen([sys.executable, "-c", BUILD_CACHE, str(root), str(cache_dir)], cwd=REPO, env=env)
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size for p in cache_dir.glob(".slices-*.tmp-*/images.u8")):  # first patient written
        assert builder.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.01)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    left = list(cache_dir.iterdir())
    assert len(left) == 1 and ".tmp-" in left[0].name  # only the half-written build: no cache folder

    patients = discover_covid_ct_md(root)
    pre = SlicePreprocessor(parse_windows(["lung"]), 128)
    with caplog.at_level("WARNING"):
        cache = build_or_load_cache(patients, pre, cache_dir)
    assert any("killed before it finished" in r.message for r in caplog.records)
    assert [p.name for p in cache_dir.iterdir()] == [cache.path.name]  # the leftover is gone
    reference = build_or_load_cache(patients, pre, tmp_path / "reference")
    np.testing.assert_array_equal(np.asarray(cache.images), np.asarray(reference.images))
    assert len(cache.images) == 9 * 24

    # a cache whose image file was cut short afterwards (disk full, copy interrupted) is rebuilt too
    with open(cache.path / "images.u8", "r+b") as f:
        f.truncate(1000)
    with caplog.at_level("WARNING"):
        again = build_or_load_cache(patients, pre, cache_dir)
    assert any("incomplete" in r.message for r in caplog.records)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(reference.images))


def test_cache_with_worker_processes_equals_single_process(tmp_path):
    patients = make_patients(tmp_path / "data", (4, 3, 2))
    pre = SlicePreprocessor(parse_windows(["lung", "bone"]), 8)
    one = build_or_load_cache(patients, pre, tmp_path / "a", workers=1)
    two = build_or_load_cache(patients, pre, tmp_path / "b", workers=2)
    np.testing.assert_array_equal(np.asarray(one.images), np.asarray(two.images))
    np.testing.assert_array_equal(one.location, open_cache(two.path).location)


def test_cache_records_and_warns_about_skipped_files(tmp_path, caplog):
    patients = make_patients(tmp_path / "data")
    (patients[0].folder / "bad.dcm").write_bytes((patients[0].folder / "0.dcm").read_bytes()[:-40])
    (patients[0].folder / "notes.txt").write_text("x")
    with caplog.at_level("WARNING"):
        cache = build_or_load_cache(patients, SlicePreprocessor(parse_windows(["lung"]), 8), tmp_path / "cache", 2)
    assert [r.message.count("bad.dcm") for r in caplog.records] == [1]  # once, from the main process
    assert cache.patients[0].n_slices == 3 and len(cache.patients[0].ignored) == 1
    assert cache.patients[0].skipped[0]["file"].endswith("bad.dcm")


def test_paper_and_patient_label_modes():
    patient_labels = [0, 1, 2, 0]  # last: COVID-19 without slice labels
    slice_labels = [np.array([0, 1, 1, 0], np.int8), np.array([1, 0, 0, 0], np.int8), None, None]
    slice_patient = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    slice_index = np.array([0, 1, 2, 0, 1, 0, 1, 0])
    paper = slice_targets("paper", patient_labels, slice_labels, slice_patient, slice_index)
    assert paper.tolist() == [2, 0, 0, 1, 2, 2, 2, UNKNOWN]
    patient = slice_targets("patient", patient_labels, slice_labels, slice_patient, slice_index)
    assert patient.tolist() == [0, 0, 0, 1, 1, 2, 2, 0]
    with pytest.raises(ConfigError, match="data.label_mode"):
        slice_targets("slice", patient_labels, slice_labels, slice_patient, slice_index)


def test_slice_labels_are_used_only_when_they_fit_the_series():
    row = np.array([0, 1, 1, 0, 0, 0], np.int8)  # zero padded to 6 columns
    assert usable_slice_labels("a", row, 4, [])[0] is row
    assert usable_slice_labels("a", None, 4, []) == (None, None)
    unplaced = [{"file": "/d/a/x.dcm", "reason": "unreadable DICOM: EOFError"}]
    labels, why = usable_slice_labels("a", row, 4, unplaced)
    assert labels is None
    assert why.startswith("a: slice labels not used: 1 skipped file(s) of unknown position (first: x.dcm")
    labels, why = usable_slice_labels("b", row, 2, [])  # marks column 2 of a 2-slice series
    assert labels is None and "up to column 2 but the series has 2 slice positions" in why
    labels, why = usable_slice_labels("c", row, 7, [])
    assert labels is None and "7 slice positions but the label row only 6 columns" in why


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat([0, 1, 2], [20, 10, 5])
    train, val = train_val_split(labels, 0.2, seed=3)
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [4, 2, 1]
    assert np.array_equal(val, train_val_split(labels, 0.2, seed=3)[1])
    assert not np.array_equal(val, train_val_split(labels, 0.2, seed=4)[1])


def test_kfold_covers_every_patient_once_and_balances_classes():
    labels = np.repeat([0, 1, 2], [11, 7, 5])
    folds = stratified_folds(labels, 5, seed=0)
    vals = [train_val_split(labels, 0.2, 0, num_folds=5, fold=k)[1] for k in range(5)]
    assert sorted(np.concatenate(vals).tolist()) == list(range(len(labels)))
    for c in range(3):
        counts = np.bincount(folds[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    with pytest.raises(ConfigError, match="data.fold"):
        train_val_split(labels, 0.2, 0, num_folds=5, fold=5)
