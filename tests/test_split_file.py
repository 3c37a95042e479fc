"""A fixed split (data.split_file: patient,subset), its refusals, and its test patients scored once."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from covidct.data.split import read_split_file
from covidct.errors import ConfigError, DataError
from tests.conftest import compose_train, tiny

IDS = ["P1", "P2", "P3", "c1", "n1"]


def write(path, rows, header=("patient", "subset")):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_a_split_file_assigns_subsets_and_lists_what_does_not_match(tmp_path):
    path = write(
        tmp_path / "s.csv", [("P1", "train"), ("P2", "Val"), ("c1", "test"), ("gone", "train"), ("n1", "train")]
    )
    subsets, notes = read_split_file(path, IDS)
    assert {k: [IDS[i] for i in v] for k, v in subsets.items()} == {
        "train": ["P1", "n1"],
        "val": ["P2"],
        "test": ["c1"],
    }
    assert all(v.dtype == np.int64 for v in subsets.values())
    assert any("not on disk: gone" in n for n in notes) and any("not in s.csv, not used: P3" in n for n in notes)


@pytest.mark.parametrize(
    ("rows", "header", "expected"),
    [
        ([("P1", "train"), ("P1", "val")], ("patient", "subset"), "line 3: patient 'P1' again"),
        ([("P1", "holdout")], ("patient", "subset"), "line 2: subset 'holdout'"),
        ([("P1", "train")], ("id", "split"), "needs columns patient,subset"),
        ([("P2", "val"), ("gone", "train")], ("patient", "subset"), "no training patient on disk"),
        ([("P1", "train"), ("P2", "val", "test")], ("patient", "subset"), r"line 3: 1 more cell\(s\) than the header"),
        ([("P1", "train"), ("", "train")], ("patient", "subset"), "line 3: no patient"),
    ],
)
def test_a_bad_split_file_is_refused_naming_the_line(tmp_path, rows, header, expected):
    with pytest.raises(DataError, match=expected):
        read_split_file(write(tmp_path / "s.csv", rows, header), IDS)
    with pytest.raises(DataError, match="not found"):
        read_split_file(tmp_path / "none.csv", IDS)


@pytest.mark.parametrize("folds", [["data.num_folds=5"], ["data.num_folds=5", "data.fold=3"], ["data.fold=1"]])
def test_a_split_file_with_fold_settings_is_refused_naming_the_keys(shared_cache, tmp_path, folds):
    from covidct.training.run import instantiate_checked

    split = write(tmp_path / "split.csv", [("P001", "train"), ("P002", "val")])
    cfg = compose_train(tmp_path / "run", [*tiny(shared_cache), f"data.split_file={split}", *folds])
    # before: the fold keys were ignored, so each job of a fold sweep trained on the same split
    with pytest.raises(ConfigError, match=r"data.split_file=.*split.csv fixes the split, so data.num_folds=") as info:
        instantiate_checked(cfg.data, _convert_="all")
    assert "set data.num_folds=null data.fold=0, or data.split_file=null" in str(info.value)


@pytest.mark.slow
def test_test_patients_of_a_split_file_are_scored_once_with_the_best_checkpoint(shared_cache, tmp_path):
    from covidct.training.run import train

    ids = (
        [f"P{i:03d}" for i in range(1, 5)]
        + [f"cap{i:03d}" for i in range(1, 5)]
        + [f"normal{i:03d}" for i in range(1, 5)]
    )
    subset = ["train", "train", "val", "test"] * 3
    split = write(tmp_path / "split.csv", list(zip(ids, subset, strict=True)))
    out = tmp_path / "run"
    result = train(compose_train(out, [*tiny(shared_cache), "logger=none", f"data.split_file={split}"]))
    saved = list(csv.DictReader((out / "split.csv").open()))
    by_subset = {s: sorted(r["patient"] for r in saved if r["subset"] == s) for s in ("train", "val", "test")}
    assert by_subset == {  # the file's split, not a drawn one
        "train": ["P001", "P002", "cap001", "cap002", "normal001", "normal002"],
        "val": ["P003", "cap003", "normal003"],
        "test": ["P004", "cap004", "normal004"],
    }
    tested = list(csv.DictReader((out / "test_patients.csv").open()))
    assert [r["patient"] for r in tested] == ["P004", "cap004", "normal004"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["test/patient/acc"] == result.test["test/patient/acc"]
    rule = metrics["vote_rule"]
    assert result.test["test/patient/acc"] == pytest.approx(
        np.mean([r[f"{rule}_vote"] == r["true_class"] for r in tested])
    )
    assert "test patients (data.split_file" in result.summary(rule)
    # the validation epochs' slice metrics too (every synthetic slice has a known target)
    assert 0.0 <= metrics["test"]["test/slice_acc"] <= 1.0 and "test/slice_f1_macro" in metrics["test"]


def test_test_slice_metrics_leave_out_unknown_targets():
    from covidct.training.held_out_test import slice_metrics

    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])
    targets = np.array([0, 1, 0, -1])  # the third is wrong, the fourth unknown
    metrics = slice_metrics(probs, targets)
    assert metrics["test/slice_acc"] == pytest.approx(2 / 3)
    # F1: class 0 (P 1, R 1/2) 2/3, class 1 1, class 2 (one false positive) 0 -> macro over the 3 classes
    assert metrics["test/slice_f1_macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert slice_metrics(probs, np.full(4, -1)) == {}
