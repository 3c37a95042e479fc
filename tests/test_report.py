"""Run report: AUCs against known values, the self-contained HTML, and the callback in a real training."""

from __future__ import annotations

import base64
import csv
import re

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covidct import CLASS_NAMES
from covidct.report import RunReport, roc, write_report
from covidct.training import train
from tests.conftest import compose_train, tiny


def test_auc_of_perfect_constant_and_random_scorers():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    perfect = np.eye(3)[labels] * 0.8 + 0.1
    assert roc(perfect, labels, 3).auc.tolist() == [1.0, 1.0, 1.0]
    constant = roc(np.full((9, 3), 1 / 3), labels, 3)
    assert constant.auc.tolist() == [0.5, 0.5, 0.5]
    np.testing.assert_allclose(constant.fpr[0], [0.0, 1.0])
    np.testing.assert_allclose(constant.tpr[0], [0.0, 1.0])
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(3), size=40)
    labels = rng.integers(0, 3, size=40)
    expected = [roc_auc_score(labels == c, scores[:, c]) for c in range(3)]  # an independent implementation
    np.testing.assert_allclose(roc(scores, labels, 3).auc, expected, atol=1e-6)


def test_auc_is_undefined_for_a_class_without_positives_and_unknown_slices_are_left_out():
    labels = np.array([0, 0, 2, 2, -1])
    scores = np.array([[0.9, 0.0, 0.1], [0.8, 0.1, 0.1], [0.3, 0.1, 0.6], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]])
    curves = roc(scores, labels, 3)
    assert curves.auc[0] == 1.0 and np.isnan(curves.auc[1]) and curves.auc[2] == 1.0 and curves.macro_auc == 1.0
    assert np.isnan(roc(scores[:2], labels[:2], 3).macro_auc)  # one class only: nothing defined


def hand_made_report() -> RunReport:
    labels = np.array([0, 1, 2, 2])
    preds = np.array([0, 2, 2, 2])  # the CAP patient is called Normal
    scores = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    slice_labels = np.repeat(labels, 3)
    slice_scores = np.repeat(scores, 3, axis=0)
    return RunReport(
        run_name="demo <run>",
        class_names=CLASS_NAMES,
        vote_rule="majority",
        best_epoch=2,
        patients=["P1", "cap1", "N1", "N2"],
        patient_labels=labels,
        patient_preds=preds,
        patient_scores=scores,
        n_slices=np.full(4, 3),
        slice_labels=slice_labels,
        slice_scores=slice_scores,
        extra_metrics={"tau (infected fraction)": 0.25},
    )


def test_report_files_and_the_single_page(tmp_path):
    written = write_report(hand_made_report(), tmp_path)
    names = {"confusion_matrix.png", "roc_patient.png", "roc_slice.png", "report_patients.csv", "report.html"}
    assert {p.name for p in tmp_path.iterdir()} == names  # no temporary files left
    page = (tmp_path / "report.html").read_text()
    assert page == written.html and "demo &lt;run&gt;" in page  # escaped
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page  # nothing to fetch
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    for encoded, name in zip(images, ["confusion_matrix.png", "roc_patient.png", "roc_slice.png"], strict=True):
        assert base64.b64decode(encoded) == (tmp_path / name).read_bytes()
        assert cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_COLOR).shape[0] > 200
    assert len(re.findall(r'<tr class="(?:wrong)?"><td>', page)) == 4 + len(written.metrics)
    assert page.count('<tr class="wrong"><td>cap1</td>') == 1
    rows = list(csv.DictReader((tmp_path / "report_patients.csv").open()))
    assert [(r["patient"], r["predicted_class"], r["correct"]) for r in rows] == [
        ("P1", "COVID-19", "True"),
        ("cap1", "Normal", "False"),
        ("N1", "Normal", "True"),
        ("N2", "Normal", "True"),
    ]
    m = written.metrics
    assert m["patient accuracy"] == 0.75 and m["tau (infected fraction)"] == 0.25
    assert m["patient AUC COVID-19"] == 1.0 and m["patient AUC CAP"] == 1.0  # cap1's CAP score 0.3 is the top one
    assert m["patient AUC Normal"] == 1.0 and m["slice AUC (macro)"] == 1.0


@pytest.mark.slow
def test_the_callback_writes_the_report_of_a_real_training_and_logs_it_to_wandb(tmp_path, shared_cache):
    cfg = compose_train(tmp_path, tiny(shared_cache) + ["logger=wandb", "callbacks.cam_images.every_n_epochs=1"])
    train(cfg)
    for name in ("confusion_matrix.png", "roc_patient.png", "roc_slice.png"):
        assert cv2.imread(str(tmp_path / name)).shape[0] > 200
    page = (tmp_path / "report.html").read_text()
    patients = [r["patient"] for r in csv.DictReader((tmp_path / "patients.csv").open())]
    assert all(f"<td>{p}</td>" in page for p in patients) and page.count("data:image/png;base64,") == 3
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = {p.relative_to(run / "files" / "media").parent.as_posix() for p in run.rglob("media/*/*/*")}
    assert {"images/report", "images/val", "html/report"} <= media, media
    history = next(run.glob("run-*.wandb")).read_bytes()
    assert b"report/patient_auc_macro" in history and b"val/grad_cam" in history
