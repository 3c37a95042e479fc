"""Index.csv and the slice label array, on copies of the real sample: a row can never silently lose or
swap a patient's labels (listed twice, an id in another case), ids without a folder are named, and a
label file numpy cannot read safely is refused in one line. Discovery only: no DICOM is decoded."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from covidct.data.layout import discover_covid_ct_md
from covidct.errors import DataError
from tests.data.test_real_series_integrity import P001, copy_sample

LABELS = "Slice-level-labels-updated-1.npy"
P001_INFECTED = 80  # P001's infected slices in the corrected labels (the sample's README)


def index_lines(root) -> list[str]:
    return (root / "Index.csv").read_text().splitlines()


def write_index(root, lines: list[str]) -> None:
    (root / "Index.csv").write_text("\n".join(lines) + "\n")


def test_a_patient_listed_twice_in_index_csv_is_refused_naming_both_lines(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path)
    write_index(root, [*index_lines(root), "80,COVID-19,./COVID-19/,P001"])  # line 81: P001 again
    labels = np.load(root / LABELS)
    np.save(root / LABELS, np.vstack([labels, np.zeros((1, labels.shape[1]), labels.dtype)]))  # its row: all 0

    with pytest.raises(DataError, match=r"Index.csv, lines 2 and 81: patient 'P001' listed twice") as info:
        discover_covid_ct_md(root)  # before: the last row won and P001's 80 infected slices became 0
    assert "keep one row per patient" in str(info.value) and "\n" not in str(info.value)


def test_an_index_id_that_differs_from_its_folder_only_in_case_is_refused(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path)
    lines = index_lines(root)
    assert lines[1] == "0,COVID-19,./COVID-19/,P001"
    write_index(root, [lines[0], "0,COVID-19,./COVID-19/,p001", *lines[2:]])

    with pytest.raises(DataError, match=r"Index.csv, line 2: Folder/ID 'p001'") as info:
        discover_covid_ct_md(root)  # before: P001 silently had no slice labels
    message = str(info.value)
    assert str(root / P001) in message and "rename the folder or edit Index.csv" in message


def test_index_rows_without_a_patient_folder_are_named_in_a_warning(real_sample, tmp_path, caplog):
    root = copy_sample(real_sample, tmp_path)  # only P001 of the 79 Index.csv rows has a folder
    with caplog.at_level(logging.WARNING, logger="covidct.data.layout"):
        (patient,) = discover_covid_ct_md(root)
    assert patient.slice_labels.sum() == P001_INFECTED  # still used: a subset of the dataset is fine
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "78 of 79 rows name a patient with no folder" in message
    assert "'P002', 'P003'" in message and "'P001'" not in message


def test_a_pickled_label_array_is_refused_in_one_line_naming_the_file(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path)
    labels = np.load(root / LABELS)
    np.save(root / LABELS, labels.astype(object), allow_pickle=True)

    with pytest.raises(DataError, match=rf"{LABELS}: not a readable label array") as info:
        discover_covid_ct_md(root)  # before: numpy's ValueError (allow_pickle) as a traceback
    assert "\n" not in str(info.value) and str(root / LABELS) in str(info.value)


def test_a_label_array_of_text_is_refused_naming_its_type(real_sample, tmp_path):
    root = copy_sample(real_sample, tmp_path)
    np.save(root / LABELS, np.load(root / LABELS).astype(str))  # "0"/"1" as text
    with pytest.raises(DataError, match=rf"{LABELS}: slice labels of type <U\d+; save them with numpy.save"):
        discover_covid_ct_md(root)  # before: "must be 0 or 1", though every cell reads 0 or 1
