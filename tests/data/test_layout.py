"""COVID-CT-MD layout and label conventions, proven on the real sample and on written layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from covidct.data.dicom import read_series
from covidct.data.layout import class_of_folder, discover_covid_ct_md
from covidct.errors import DataError
from tests.conftest import write_ct_slice


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("COVID-19 subjects", 0),
        ("covid-19 cases", 0),
        ("COVID-19 Cases", 0),
        ("Cap subjects", 1),
        ("CAP Cases", 1),
        ("Normal subjects", 2),
        ("NORMAL  cases", 2),
        ("Normal", 2),
        ("scans", None),
    ],
)
def test_class_folders_match_case_insensitively(name, label):
    assert class_of_folder(name) == label


@pytest.mark.slow  # whole real patients decoded (~8 s)
def test_real_sample_patients_and_slice_labels(real_sample):
    patients = {p.patient_id: p for p in discover_covid_ct_md(real_sample)}
    assert [(p.patient_id, p.label) for p in patients.values()] == [("P001", 0), ("cap001", 1), ("normal001", 2)]
    expected = {"P001": (148, 80, 0), "cap001": (168, 86, 54)}  # slices, infected, row of the label array
    updated = np.load(real_sample / "Slice-level-labels-updated-1.npy")
    for pid, (n_slices, n_infected, row) in expected.items():
        labels = patients[pid].slice_labels
        assert len(read_series(patients[pid].folder, lambda hu: None).slices) == n_slices
        assert labels.sum() == n_infected and not labels[n_slices:].any()
        np.testing.assert_array_equal(labels, updated[row])  # row position, not the "Label Index" column
    # exact indices: P001's first infected run starts at slice 26, cap001's at 48 (head first)
    assert np.flatnonzero(patients["P001"].slice_labels)[:4].tolist() == [26, 27, 28, 29]
    assert patients["P001"].slice_labels[[25, 124, 125]].tolist() == [0, 1, 0]
    assert np.flatnonzero(patients["cap001"].slice_labels)[[0, -1]].tolist() == [48, 138]
    assert patients["normal001"].slice_labels is None
    assert len(read_series(patients["normal001"].folder, lambda hu: None).slices) == 154


def test_real_sample_prefers_the_corrected_label_file(real_sample):
    old = {p.patient_id: p for p in discover_covid_ct_md(real_sample, "Slice-level-labels.npy")}
    assert old["P001"].slice_labels.sum() == 39  # the Sep 2021 correction changed P001 to 80


def lung_mean_hu(hu: np.ndarray) -> tuple[float, int]:
    """Mean HU inside a rough lung mask (low-density regions inside the body, holes filled)."""
    body = ndi.binary_fill_holes(ndi.binary_opening(hu > -500, iterations=2))
    components, _ = ndi.label(body)
    body = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    lung = ndi.binary_fill_holes(ndi.binary_closing(body & (hu < -500), iterations=8)) & body
    lung = ndi.binary_erosion(lung, iterations=2)
    return (float(hu[lung].mean()) if lung.any() else np.nan), int(lung.sum())


@pytest.mark.slow  # whole real patients decoded (~8 s)
@pytest.mark.parametrize("pid", ["P001", "cap001"])
def test_real_infected_slices_show_denser_lung_than_the_apex(real_sample, pid):
    patient = next(p for p in discover_covid_ct_md(real_sample) if p.patient_id == pid)
    series = read_series(patient.folder, lung_mean_hu)
    means = np.array([m for m, _ in series.slices])
    area = np.array([a for _, a in series.slices])
    infected = patient.slice_labels[: len(means)].astype(bool)
    apex = np.flatnonzero((area >= 5000) & ~infected)[:10]  # first 10 head-first slices with lung in view
    assert apex.max() < np.flatnonzero(infected).min()
    densest = np.sort(means[infected])[-5:]
    assert densest.mean() > means[apex].max()


def test_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        discover_covid_ct_md(tmp_path / "nope")
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        discover_covid_ct_md(tmp_path)


def test_alias_folders_and_label_array_row_mismatch(tmp_path):
    hu = np.full((8, 8), -800, dtype=np.int16)
    for cls, pid in [("COVID-19 Cases", "P7"), ("CAP Cases", "c1"), ("Normal Cases", "n1")]:
        write_ct_slice(tmp_path / cls / pid / "a.dcm", hu, slice_location=0.0)
    assert [p.patient_id for p in discover_covid_ct_md(tmp_path)] == ["P7", "c1", "n1"]
    (tmp_path / "Index.csv").write_text("Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./COVID-19/,P7\n")
    np.save(tmp_path / "Slice-level-labels.npy", np.zeros((2, 200), dtype=np.int32))
    with pytest.raises(DataError, match="does not match the 1 data rows"):
        discover_covid_ct_md(tmp_path)
    np.save(tmp_path / "Slice-level-labels.npy", np.zeros((1, 200), dtype=np.int32))
    (tmp_path / "Index.csv").write_text("Label Index,Diagnosis,Relative Path,Folder/ID\n0,CAP,./CAP/,P7\n")
    with pytest.raises(DataError, match="Index.csv says CAP"):
        discover_covid_ct_md(tmp_path)


def test_a_malformed_index_csv_is_refused_naming_the_line(tmp_path):
    write_ct_slice(tmp_path / "COVID-19 subjects" / "P7" / "a.dcm", np.full((8, 8), -800, np.int16), slice_location=0.0)
    header = "Label Index,Diagnosis,Relative Path,Folder/ID\n"
    for body, expected in [
        ("0,COVID-19,./COVID-19/,P7\n1,CAP\n", r"Index.csv, line 3: fewer fields than the header"),
        ("0,COVID-19,./COVID-19/,P7,extra\n", r"Index.csv, line 2: more fields than the header"),
    ]:
        (tmp_path / "Index.csv").write_text(header + body)
        with pytest.raises(DataError, match=expected):
            discover_covid_ct_md(tmp_path)  # no label array: the Diagnosis cross-check reads it too
    (tmp_path / "Index.csv").write_text("Label Index,Diagnosis\n0,COVID-19\n")
    with pytest.raises(DataError, match="no 'Folder/ID' column"):
        discover_covid_ct_md(tmp_path)


def test_discovery_reads_index_csv_once_for_labels_and_diagnoses(tmp_path, monkeypatch):
    hu = np.full((8, 8), -800, dtype=np.int16)
    for cls, pid in [("COVID-19 subjects", "P1"), ("Cap subjects", "c1"), ("Normal subjects", "n1")]:
        write_ct_slice(tmp_path / cls / pid / "a.dcm", hu, slice_location=0.0)
    (tmp_path / "Index.csv").write_text(
        "Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./COVID-19/,P1\n2,CAP,./CAP/,c1\n"
    )
    labels = np.zeros((2, 200), dtype=np.int32)
    labels[1, 3] = 1
    np.save(tmp_path / "Slice-level-labels.npy", labels)
    opened: list[str] = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    patients = {p.patient_id: p for p in discover_covid_ct_md(tmp_path)}
    assert opened.count("Index.csv") == 1
    assert patients["c1"].slice_labels.tolist()[:5] == [0, 0, 0, 1, 0] and patients["n1"].slice_labels is None
    (tmp_path / "Index.csv").write_text(
        "Label Index,Diagnosis,Relative Path,Folder/ID\n0,Normal,./N/,P1\n1,CAP,./CAP/,c1\n"
    )
    with pytest.raises(DataError, match="Index.csv says Normal"):  # the same rows cross-check the folders
        discover_covid_ct_md(tmp_path)
