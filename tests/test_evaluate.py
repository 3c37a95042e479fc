"""covidct.predict.evaluate: metrics against a hand computation, seeded bootstrap CIs, every bad labels file
refused with its row named, and predict.py labels=... end to end."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_f1_score

from covidct.contracts import CLASS_NAMES
from covidct.errors import ConfigError, DataError
from covidct.predict.eval_inputs import read_labels
from covidct.predict.eval_metrics import batch_metrics
from covidct.predict.evaluate import evaluate
from tests.conftest import REPO, run_cli

HEADER = [
    "patient",
    "predicted_class",
    *[f"mean_prob_{c}" for c in CLASS_NAMES],
    "infected_fraction",
    "n_slices",
    "n_skipped",
    "order_key",
    "status",
    "detail",
]
# 10 patients; confusion (rows true, columns predicted) [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
TRUTH = ["COVID-19"] * 4 + ["CAP"] * 3 + ["Normal"] * 3
PRED = ["COVID-19", "COVID-19", "COVID-19", "CAP", "CAP", "CAP", "Normal", "Normal", "Normal", "COVID-19"]


def write_predictions(path: Path, patients: list[str], preds: list[str | None]) -> Path:
    """A predict.py test-set CSV; a None prediction is a row with status error."""
    rows = []
    for pid, pred in zip(patients, preds, strict=True):
        if pred is None:
            rows.append([pid, "", "", "", "", "", 0, "", "", "error", "no readable DICOM slice"])
        else:
            probs = [0.8 if c == pred else 0.1 for c in CLASS_NAMES]
            rows.append([pid, pred, *probs, 0.5, 10, 0, "SliceLocation", "ok", ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([HEADER, *rows])
    return path


def write_labels(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def labels_text(patients: list[str], classes: list[str], header: str = "patient,class") -> str:
    return "\n".join([header, *(f"{p},{c}" for p, c in zip(patients, classes, strict=True))]) + "\n"


def run_folder(tmp_path: Path, sets: dict[str, tuple[list[str], list[str | None]]]) -> Path:
    """A predict.py run folder: one CSV per test set and prediction.json naming them."""
    run = tmp_path / "run"
    for name, (patients, preds) in sets.items():
        write_predictions(run / f"{name}.csv", patients, preds)
    (run / "prediction.json").write_text(json.dumps({"test_sets": {n: len(p) for n, (p, _) in sets.items()}}))
    return run


PATIENTS = [f"T1-{i:03d}" for i in range(1, 11)]


def test_metrics_equal_a_hand_computation(tmp_path):
    preds = write_predictions(tmp_path / "Test1.csv", PATIENTS, PRED)
    labels = write_labels(tmp_path / "labels.csv", labels_text(PATIENTS, TRUTH))
    result = evaluate(preds, labels, tmp_path / "out", resamples=0)
    s = result.scores["Test1"]
    assert list(result.scores) == ["Test1", "overall"] and s.n_patients == 10
    assert s.confusion.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    expected = {
        "accuracy": 0.7,
        "macro_f1": (0.75 + 2 / 3 + 2 / 3) / 3,
        "sensitivity_COVID-19": 3 / 4,
        "sensitivity_CAP": 2 / 3,
        "sensitivity_Normal": 2 / 3,
        "specificity_COVID-19": 5 / 6,
        "specificity_CAP": 6 / 7,
        "specificity_Normal": 6 / 7,
    }
    assert s.values == pytest.approx(expected, abs=1e-6)
    assert result.scores["overall"].values == s.values
    # bootstrap=0: no intervals, written as empty cells
    rows = list(csv.DictReader((tmp_path / "out" / "evaluation.csv").open()))
    assert [(r["test_set"], r["metric"]) for r in rows[:2]] == [("Test1", "accuracy"), ("Test1", "macro_f1")]
    assert float(rows[0]["value"]) == pytest.approx(0.7) and rows[0]["ci_low"] == "" and len(rows) == 16
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["labels_sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert record["scores"]["Test1"]["confusion_matrix"]["counts"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    for name in ("Test1", "overall"):
        assert (tmp_path / "out" / f"confusion_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_macro_f1_follows_torchmetrics_and_undefined_classes_are_marked():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, (50, 12))
    truth[:10] = np.where(truth[:10] == 1, 0, truth[:10])  # CAP absent from some samples
    pred = rng.integers(0, 3, (50, 12))
    values, valid = batch_metrics(truth, pred, 3)
    for b in range(50):
        ref = multiclass_f1_score(torch.from_numpy(pred[b]), torch.from_numpy(truth[b]), 3, average="macro")
        assert values[b, 1] == pytest.approx(float(ref), abs=1e-6)
    assert not valid[:10, 3].any() and valid[:10, 6].all()  # sensitivity_CAP undefined, specificity_CAP fine


def test_bootstrap_ci_covers_the_estimate_and_is_reproducible_with_a_seed(tmp_path):
    t2 = [f"T2-{i:03d}" for i in range(1, 8)]
    run = run_folder(tmp_path, {"Test1": (PATIENTS, PRED), "Test2": (t2, ["CAP"] * 4 + ["Normal"] * 3)})
    truth2 = ["CAP", "CAP", "CAP", "Normal", "Normal", "Normal", "COVID-19"]
    labels = write_labels(tmp_path / "labels.csv", labels_text(PATIENTS + t2, TRUTH + truth2))
    first = evaluate(run, labels, tmp_path / "a", resamples=300, seed=0).scores
    again = evaluate(run, labels, tmp_path / "b", resamples=300, seed=0).scores
    other = evaluate(run, labels, tmp_path / "c", resamples=300, seed=1).scores
    assert list(first) == ["Test1", "Test2", "overall"]
    assert [s.n_patients for s in first.values()] == [10, 7, 17]
    assert first["Test2"].values["accuracy"] == pytest.approx(5 / 7)
    for name, s in first.items():
        for metric, value in s.values.items():
            low, high = s.ci[metric]
            if value is None:
                assert low is None and s.valid_resamples[metric] == 0, (name, metric)
            else:
                assert low <= value <= high, (name, metric, low, value, high)
        assert again[name].ci == s.ci
        assert other[name].ci != s.ci
    a = (tmp_path / "a" / "evaluation.csv").read_text()
    assert a == (tmp_path / "b" / "evaluation.csv").read_text()
    # the accuracy CI is the percentile interval of patients drawn by default_rng(seed), per test set
    truth = np.array([CLASS_NAMES.index(c) for c in TRUTH])
    pred = np.array([CLASS_NAMES.index(c) for c in PRED])
    idx = np.random.default_rng(0).integers(0, 10, (300, 10))
    expected = np.percentile((truth[idx] == pred[idx]).mean(1), [2.5, 97.5])
    assert first["Test1"].ci["accuracy"] == pytest.approx(tuple(expected))
    # Test2 has one COVID-19 patient: its sensitivity counts only the resamples that drew it
    drew = int((np.random.default_rng(0).integers(0, 7, (300, 7)) == 6).any(1).sum())
    assert first["Test2"].valid_resamples["sensitivity_COVID-19"] == drew < 300
    assert first["Test2"].valid_resamples["accuracy"] == 300
    record = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert record["seed"] == 0 and record["bootstrap_resamples"] == 300
    assert record["scores"]["Test2"]["metrics"]["sensitivity_COVID-19"]["valid_resamples"] == drew


@pytest.mark.parametrize(
    "header",
    [
        "patient,class",
        "Patient,Class",
        "patient_id,label",
        "Folder/ID,Diagnosis",
        "Patient ID,diagnosis",
        "\ufeffID,Label",
    ],
)
def test_spgc_header_and_class_spellings_are_accepted(tmp_path, header):
    spellings = ["covid", "Covid-19", "COVID19", "covid_19", "cap", "CAP", "Cap", "normal", "NORMAL", " Normal "]
    path = write_labels(tmp_path / "labels.csv", labels_text(PATIENTS, spellings, header))
    labels = read_labels(path)
    assert [labels.rows[p][0] for p in PATIENTS] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    # extra columns (COVID-CT-MD's Index.csv) are allowed
    index = "Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./COVID-19/,P001\n1,Normal,./Normal/,N001\n"
    assert read_labels(write_labels(tmp_path / "index.csv", index)).rows == {"P001": (0, 2), "N001": (2, 3)}


BAD_LABELS = {
    "unknown class": (
        "patient,class\nT1-001,COVID-19\nT1-002,Pneumonia\nT1-003,flu\n",
        [r"line 3: class 'Pneumonia' of patient 'T1-002'", r"line 4: class 'flu'", "2 bad row"],
    ),
    "duplicate": (
        "patient,class\nT1-001,CAP\nT1-002,CAP\nT1-001,Normal\n",
        [r"line 4: patient 'T1-001' again \(first on line 2\)"],
    ),
    "bad header": ("name,class\nT1-001,CAP\n", [r"line 1: header \['name', 'class'\] has no patient column"]),
    "no header": ("T1-001,CAP\nT1-002,CAP\n", ["line 1: header", "no patient column"]),
    "two patient columns": (
        "patient,Folder/ID,class\nT1-001,T1-001,CAP\n",
        ["line 1", r"2 \(patient, Folder/ID\) patient"],
    ),
    "short row": ("patient,class\nT1-001,CAP\nT1-002\n", ["line 3: 1 cells, the header has 2"]),
    "empty patient": ("patient,class\n,CAP\n", ["line 2: empty patient"]),
    "empty": ("", ["empty"]),
    "header only": ("patient,class\n", ["no rows"]),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_labels_file_is_refused_with_its_row_named(tmp_path, case):
    text, patterns = BAD_LABELS[case]
    path = write_labels(tmp_path / "labels.csv", text)
    with pytest.raises(DataError) as err:
        read_labels(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_missing_and_unknown_patients_are_all_named(tmp_path):
    preds = write_predictions(tmp_path / "Test1.csv", PATIENTS[:4], PRED[:4])
    text = labels_text(["T1-001", "T1-002", "X-1", "X-2"], ["COVID-19"] * 4)
    labels = write_labels(tmp_path / "labels.csv", text)
    with pytest.raises(DataError) as err:
        evaluate(preds, labels, tmp_path / "out", resamples=0)
    message = str(err.value)
    assert (
        "2 predicted patient(s) have no label row: 'T1-003' (Test1.csv line 4); 'T1-004' (Test1.csv line 5)" in message
    )
    assert "2 label row(s) name a patient that was not predicted: line 4 'X-1'; line 5 'X-2'" in message
    assert str(labels) in message and not (tmp_path / "out").exists()  # nothing written
    # more than a handful: the first five, then a count
    many = labels_text([f"X-{i}" for i in range(9)] + PATIENTS[:4], ["CAP"] * 13)
    with pytest.raises(DataError, match=r"9 label row\(s\) .*line 6 'X-4' and 4 more"):
        evaluate(preds, write_labels(tmp_path / "many.csv", many), tmp_path / "out", resamples=0)


def test_partial_labels_score_the_labelled_patients_and_list_the_others(tmp_path):
    """partial=True (predict.py labels=): a label row of a patient not predicted and predicted patients without a
    label row (one of them failed) are left out and listed; the labelled ones are scored."""
    preds = write_predictions(tmp_path / "Test1.csv", PATIENTS[:5], [*PRED[:4], None])
    labels = write_labels(tmp_path / "labels.csv", labels_text(["X-1", *PATIENTS[:3]], ["CAP", *TRUTH[:3]]))
    result = evaluate(preds, labels, tmp_path / "out", resamples=0, partial=True)
    assert result.scores["Test1"].n_patients == 3 and result.scores["Test1"].values["accuracy"] == 1.0
    assert (result.unscored.absent_from_input, result.unscored.without_label) == (["X-1"], ["T1-004", "T1-005"])
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["partial_labels"] is True and record["scores"]["overall"]["scored_as_wrong"] == []
    assert record["unscored"] == {"absent_from_input": ["X-1"], "without_label": ["T1-004", "T1-005"]}
    with pytest.raises(DataError, match=r"none of the 5 predicted patient\(s\) has a label row"):
        evaluate(
            preds, write_labels(tmp_path / "none.csv", labels_text(["X-1"], ["CAP"])), tmp_path / "o", partial=True
        )
    # a labelled patient whose prediction failed is still refused (or scored as wrong with allow_errors)
    failed = write_labels(tmp_path / "failed.csv", labels_text(PATIENTS[3:5], TRUTH[3:5]))
    with pytest.raises(DataError, match="'T1-005' .*allow_errors=true"):
        evaluate(preds, failed, tmp_path / "o", resamples=0, partial=True)


def test_the_class_names_are_read_from_the_mean_probability_columns(tmp_path):
    """The classes of a prediction CSV are its mean_prob_<class> columns (prob_<class> in CSVs written before the
    rename), whatever their names."""
    for prefix in ("mean_prob_", "prob_"):
        path = tmp_path / prefix / "Test1.csv"
        path.parent.mkdir()
        header = ["patient", "predicted_class", f"{prefix}yes", f"{prefix}no", "status", "detail"]
        path.write_text(",".join(header) + "\nA,yes,0.9,0.1,ok,\nB,no,0.2,0.8,ok,\nC,yes,0.6,0.4,ok,\n")
        labels = write_labels(tmp_path / prefix / "labels.csv", labels_text(["A", "B", "C"], ["yes", "no", "no"]))
        result = evaluate(path, labels, tmp_path / prefix / "out", resamples=0)
        assert result.class_names == ["yes", "no"] and result.scores["Test1"].confusion.tolist() == [[1, 0], [1, 1]]


def test_failed_prediction_is_refused_or_scored_as_wrong(tmp_path):
    preds = write_predictions(tmp_path / "Test1.csv", PATIENTS, PRED[:9] + [None])
    labels = write_labels(tmp_path / "labels.csv", labels_text(PATIENTS, TRUTH))
    with pytest.raises(DataError) as err:
        evaluate(preds, labels, tmp_path / "out", resamples=0)
    message = str(err.value)
    assert "'T1-010' (Test1.csv line 11: no readable DICOM slice)" in message and "allow_errors=true" in message
    s = evaluate(preds, labels, tmp_path / "out", resamples=50, allow_errors=True).scores["Test1"]
    assert s.values["accuracy"] == pytest.approx(0.7)  # T1-010 (Normal, predicted COVID-19 before) is wrong either way
    assert s.values["sensitivity_Normal"] == pytest.approx(2 / 3)
    assert s.values["specificity_COVID-19"] == pytest.approx(1.0)  # no longer called COVID-19
    assert s.confusion.tolist() == [[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 2, 1]]
    assert s.scored_as_wrong == ["T1-010"]
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["allow_errors"] is True and record["scores"]["overall"]["scored_as_wrong"] == ["T1-010"]
    assert record["scores"]["Test1"]["confusion_matrix"]["predicted"][-1] == "no prediction"


def test_bad_predictions_and_settings_are_refused(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", labels_text(PATIENTS[:2], TRUTH[:2]))
    slices = tmp_path / "Test1_slices.csv"
    slices.write_text("patient,slice_index,slice_location,prob_COVID-19,prob_CAP,prob_Normal\nT1-001,0,1.0,1,0,0\n")
    with pytest.raises(DataError, match="line 1: no predicted_class, status column"):
        evaluate(slices, labels, tmp_path / "out")
    with pytest.raises(DataError, match="no prediction.json"):
        evaluate(tmp_path, labels, tmp_path / "out")
    # the same patient in two test sets: one label row cannot score both
    run = run_folder(tmp_path, {"A": (PATIENTS[:2], PRED[:2]), "B": (PATIENTS[1:3], PRED[1:3])})
    with pytest.raises(DataError, match=r"B.csv line 2: patient 'T1-002' was also predicted in .*A.csv line 3"):
        evaluate(run, labels, tmp_path / "out")
    preds = write_predictions(tmp_path / "Test1.csv", PATIENTS[:2], PRED[:2])
    for key, kwargs in (
        ("bootstrap", {"resamples": -1}),
        ("seed", {"seed": 1.5}),
        ("allow_errors", {"allow_errors": 1}),
    ):
        with pytest.raises(ConfigError, match=key):
            evaluate(preds, labels, tmp_path / "out", **kwargs)


@pytest.mark.slow
def test_predict_with_labels_writes_the_evaluation(tiny_checkpoint, shared_cache, tmp_path):
    data_root = Path(next(shared_cache.glob("synthetic-*")))
    # two test sets of two classes each (predict.py reads a folder of test sets)
    folders = {
        d.name.removesuffix(" subjects"): sorted(p for p in d.iterdir() if p.is_dir())
        for d in data_root.iterdir()
        if d.is_dir()
    }
    assert sorted(folders) == sorted(["COVID-19", "Cap", "Normal"])
    sets = {
        "Test1": folders["COVID-19"][:2] + folders["Normal"][:2],
        "Test2": folders["Cap"][:2] + folders["Normal"][2:3],
    }
    rows = []
    for name, patients in sets.items():
        for p in patients:
            shutil.copytree(p, tmp_path / "input" / name / p.name)
            rows.append((p.name, p.parent.name.removesuffix(" subjects")))
    labels = write_labels(tmp_path / "labels.csv", "Folder/ID,Diagnosis\n" + "".join(f"{p},{c}\n" for p, c in rows))
    common = [f"ckpt_path={tiny_checkpoint}", f"input={tmp_path / 'input'}", "progress=false", "num_workers=1"]
    out = run_cli(
        [*common, f"labels={labels}", "bootstrap=200", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, "predict.py"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("Test1", "Test2", "overall"):
        assert (run / f"confusion_{name}.png").stat().st_size > 1000
        assert name in out.stdout.splitlines()[1]  # the table's header row
    record = json.loads((run / "evaluation.json").read_text())
    assert record["labels"] == str(labels.resolve()) and record["bootstrap_resamples"] == 200
    assert [record["scores"][n]["n_patients"] for n in ("Test1", "Test2", "overall")] == [4, 3, 7]
    table = list(csv.DictReader((run / "evaluation.csv").open()))
    assert len(table) == 3 * 8 and {r["test_set"] for r in table} == {"Test1", "Test2", "overall"}
    # the evaluate entry point scores the same run folder to the same numbers
    args = [f"predictions={run}", f"labels={labels}", "bootstrap=200", f"hydra.run.dir={tmp_path / 'e'}"]
    again = run_cli(args, REPO, "-m covidct.predict.evaluate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "e" / "evaluation.csv").read_text() == (run / "evaluation.csv").read_text()
    # a bad labels file fails before any prediction work, naming the row
    bad = write_labels(tmp_path / "bad.csv", "patient,class\nT1-001,flu\n")
    out = run_cli([*common, f"labels={bad}", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path, "predict.py")
    assert out.returncode == 1 and "line 2: class 'flu'" in out.stderr
    assert not list((tmp_path / "bad").glob("*.csv"))
