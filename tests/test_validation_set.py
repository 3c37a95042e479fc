"""``make predict-demo``'s input: a run's validation patients linked as a test set, scored by predict.py with the
run's best checkpoint (covidct/training/validation_set.py)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from covidct.errors import DataError
from covidct.training.validation_set import finished_run, link_validation_patients
from tests.conftest import run_cli


@pytest.mark.slow
def test_the_validation_patients_of_the_newest_finished_run_are_predicted_and_scored(tmp_path, trained):
    best, run = trained
    runs = tmp_path / "runs"
    copy = shutil.copytree(run, runs / "2026-01-01_00-00-00_aaaaaa", ignore=shutil.ignore_patterns("wandb"))
    failed = runs / "2026-01-02_00-00-00_bbbbbb-failed"  # newer, but not finished: never picked
    failed.mkdir()
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    assert finished_run(runs) == copy

    args = link_validation_patients(copy)
    with (run / "split.csv").open(newline="") as f:
        val = {r["patient"]: r["class"] for r in csv.DictReader(f) if r["subset"] == "val"}
    assert args[0] == f"ckpt_path={best}"
    linked = copy / "validation"
    assert args[1] == f"input={linked}" and sorted(p.name for p in linked.iterdir()) == sorted(val)
    assert all(p.is_symlink() and any(p.resolve().glob("*.dcm")) for p in linked.iterdir())  # to the DICOM folders
    with (copy / "validation_labels.csv").open(newline="") as f:
        assert {r["patient"]: r["class"] for r in csv.DictReader(f)} == val

    predict_args = [*args, f"hydra.run.dir={tmp_path / 'pred'}", "progress=false", "num_workers=1"]
    out = run_cli(predict_args, tmp_path, "predict.py")
    assert out.returncode == 0, out.stderr[-3000:]
    evaluation = json.loads((tmp_path / "pred" / "evaluation.json").read_text())
    overall = evaluation["scores"]["overall"]
    assert overall["n_patients"] == len(val) and 0 <= overall["metrics"]["accuracy"]["value"] <= 1
    assert "accuracy" in out.stdout  # the table is printed


def test_a_folder_without_a_finished_run_says_so(tmp_path):
    with pytest.raises(DataError, match="no finished training run here"):
        finished_run(tmp_path)
