"""Run report: AUCs and calibration bins against known values, every patient's decision on the page and in
patients.csv (the one per-patient CSV), the figures, the training curves kept across a resume, and the
callback in a real training logged to W&B."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import cv2
import matplotlib.figure
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from covidct.contracts import CLASS_NAMES, NORMAL_CLASS
from covidct.patients.aggregation import GatedAttentionMIL, predict_proba
from covidct.patients.calibration import expected_calibration_error
from covidct.patients.decisions import mil_details
from covidct.patients.explanations import patient_decisions, slice_groups
from covidct.patients.tuning import leave_one_out_predictions
from covidct.patients.voting import infected_share, vote_shares
from covidct.report import patient_figures
from covidct.report.figures import DPI, PNG_MIN_FONT_PT, render_figures, render_pngs
from covidct.report.metrics import reliability, roc, score
from covidct.report.page import calibration_note, render_html, write_report
from covidct.report.patient_figures import decision_svg, series_svg
from covidct.report.svg import smallest_font
from covidct.training.callbacks.patient_vote import PatientVoteCallback
from covidct.training.callbacks.run_report import RunReportCallback, report_from_votes
from covidct.training.run import train
from tests.conftest import compose_train, tiny

NORMAL = CLASS_NAMES[NORMAL_CLASS]


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


def test_reliability_bins_are_those_of_the_calibration_error():
    # 4 slices at confidence 0.9, half right: one bin, accuracy 0.5, ECE |0.5 - 0.9| = 0.4
    probs = np.array([[0.9, 0.05, 0.05]] * 4)
    rel = reliability(probs, np.array([0, 0, 1, 2]))
    (b,) = np.flatnonzero(rel.count)
    assert b == 13 and rel.count[b] == 4 and rel.accuracy[b] == 0.5 and rel.ece == pytest.approx(0.4)
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(3, 0.4), size=300)
    labels = np.where(rng.random(300) < 0.1, -1, rng.integers(0, 3, size=300))
    rel = reliability(probs, labels)
    assert rel.count.sum() == (labels >= 0).sum()
    assert rel.ece == pytest.approx(expected_calibration_error(probs, labels), abs=1e-6)  # torchmetrics' value


# ---- a validation epoch decided for real (PatientVoteCallback.decide) -------------------------------------


def validation(seed: int = 0) -> dict:
    """6 patients (2 per class, 12-19 slices, head first): sick ones with a run of infected slices whose
    radiologist labels are known (patient 4's are not: -1), Normal ones with noise."""
    rng = np.random.default_rng(seed)
    probs, patient, labels, targets = [], [], [], []
    for p in range(6):
        c = p % 3
        n = int(rng.integers(12, 20))
        infected = np.zeros(n, bool)
        if c != NORMAL_CLASS:
            start = int(rng.integers(2, n - 6))
            infected[start : start + int(rng.integers(3, 7))] = True
        logits = rng.normal(0, 0.6, (n, 3))
        logits[:, NORMAL_CLASS] += 1.5
        logits[infected, c] += 2.5 + rng.normal(0, 0.5, infected.sum())
        pr = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        probs.append(pr)
        patient += [p] * n
        labels.append(c)
        targets.append(np.full(n, -1) if p == 4 else np.where(infected, c, NORMAL_CLASS))
    probs = np.concatenate(probs).astype(np.float32)
    return {
        "index": np.arange(len(probs)),
        "patient": np.asarray(patient),
        "probs": probs,
        "patient_ids": ["P<1>", "P2", "N&3", "P4", "C5", "N6"],  # escaping is checked
        "patient_labels": np.asarray(labels),
        "targets": np.concatenate(targets),
    }


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
    """(callback, votes, targets, run folder, report, written report) of :func:`decide_validation`."""
    return decide_validation(tmp_path_factory.mktemp("report"))


def decide_validation(out: Path) -> tuple:
    """(callback, votes, targets, run folder, report, written report) of one validation epoch voted with
    infected_fraction, tau tuned and calibration on; patients.csv and the report written into ``out``."""
    v = validation()
    cb = PatientVoteCallback("infected_fraction", output_dir=str(out), mil=False)
    votes = cb.decide(3, v["index"], v["patient"], v["probs"], v["patient_ids"], v["patient_labels"], v["targets"])
    assert votes.temperature == cb.parameters.temperature != 1.0 and votes.mil is None  # by decide (no embeddings)
    cb.write_patients_csv(votes)
    history = [
        {"epoch": 0, "train_loss": 1.1, "val_loss": 1.0, "val_patient_acc": 0.33},
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.8, "val_patient_acc": float("nan")},
        {"epoch": 3, "train_loss": 0.5, "val_loss": 0.6, "val_patient_acc": 0.83},
    ]
    report = report_from_votes(
        votes,
        v["targets"],
        "run <x>",
        cb,
        history=history,
        title="demo · resnet18 · vote infected_fraction",
        links={"patients.csv": "patients.csv", "train.log": "train.log"},
        config={"experiment": "demo", "seed": "42"},
    )
    written = write_report(report, out)
    return cb, votes, v["targets"], out, report, written


class Page(HTMLParser):
    """The tables (rows of cell texts, with each row's class), the inline SVG figures, images and links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[tuple[str, list[str]]]] = []
        self.svgs: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.meta: list[dict] = []
        self._cell: list[str] | None = None
        self._svg_depth = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self._svg_depth += 1
            if self._svg_depth == 1:
                self.svgs.append(a.get("aria-label", "") if a.get("role") == "img" else "")
        elif self._svg_depth:
            return
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append((a.get("class") or "", []))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "meta":
            self.meta.append(a)

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg_depth -= 1
        elif tag in ("td", "th") and self._cell is not None and not self._svg_depth:
            self.tables[-1][-1][1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None and not self._svg_depth:
            self._cell.append(data)

    def table_with(self, first_header: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
        (table,) = [t for t in self.tables if t and t[0][1] and t[0][1][0] == first_header]
        return table[0][1], table[1:]


def test_the_headline_accuracy_comes_with_its_interval_and_the_last_epoch_beside_the_chosen_one(decided):
    _, votes, _, _, report, written = decided
    header, rows = Page(written.html).table_with("metric")
    cells = {r[1][0]: r[1][1] for r in rows}
    accuracy = float(cells["patient accuracy (vote infected_fraction)"])
    ((label, interval),) = [(k, v) for k, v in cells.items() if k.startswith("its 95% CI")]
    assert "bootstrap over these 6 patients" in label and "chosen on them" in label
    low, high = map(float, interval.split("-"))
    assert 0.0 <= low <= accuracy <= high <= 1.0 and high - low >= 1 / 6  # 6 patients: wide
    assert not any(k.startswith("patient accuracy of the last epoch") for k in cells)  # best = last (epoch 3)
    later = dataclasses.replace(report, history=[*report.history, {"epoch": 5, "val_patient_acc": 0.5}])
    _, later_rows = Page(render_html(later, score(later), render_figures(later, score(later)))).table_with("metric")
    assert [r[1] for r in later_rows if r[1][0].startswith("patient accuracy of the last")] == [
        ["patient accuracy of the last epoch (5)", "0.500"]
    ]


def test_every_patient_row_states_the_quantity_the_rule_decided_on(decided):
    cb, votes, _, out, report, written = decided
    page = Page(written.html)
    header, rows = page.table_with("patient")
    assert header[:8] == ["patient", "true class", "called", "correct", "why", "infected fraction", "tau", "slices"]
    assert [f"{r} vote" for r in votes.predictions] == header[8 : 8 + len(votes.predictions)]
    ids = [r[1][0] for r in rows]
    assert sorted(ids) == sorted(["P<1>", "P2", "N&3", "P4", "C5", "N6"])  # real ids, escaped and read back
    assert [cls for cls, _ in rows] == sorted((cls for cls, _ in rows), key=lambda cls: cls != "wrong")
    rows = [rows[ids.index(v.patient)] for v in votes.patients]  # back in patient order
    d = patient_decisions(votes, cb)
    # the tau each patient was called with is the one tuned on the other patients: it reproduces the call
    taus = np.asarray([float(r[1][6]) for r in rows])
    fractions = np.asarray([float(r[1][5]) for r in rows])
    loo = leave_one_out_predictions(fractions, [v.infected_class for v in votes.patients], votes.labels)
    np.testing.assert_array_equal(loo, votes.predicted)
    for (cls, cells), v, called, tau in zip(rows, votes.patients, votes.predicted, taus, strict=True):
        assert float(cells[5]) == pytest.approx(v.infected_fraction, abs=5e-4)  # 3 decimals, always
        assert re.fullmatch(r"\d\.\d{3}", cells[5]) and re.fullmatch(r"\d\.\d{3}", cells[6])
        assert cells[2] == CLASS_NAMES[called] and (cls == "wrong") == (cells[2] != cells[1])
        assert (v.infected_fraction > tau) == (called != NORMAL_CLASS)  # the row explains its own call
        assert f"fraction {cells[5]}" in cells[4] and f"tau {cells[6]}" in cells[4] and cells[4].endswith(cells[2])
        assert cells[8 + list(votes.predictions).index("infected_fraction")] == cells[2]
    np.testing.assert_allclose(taus, d.threshold, atol=5e-4)
    assert any(cls == "wrong" for cls, _ in rows)  # this validation has a wrong call to explain
    # figures: PNGs inline (the files' bytes), SVGs inline as images; the ROC is named by the rule's scores
    assert page.svgs == [
        "infected fraction by true class, threshold drawn",
        *[f"{report.patients[i]}: infected probability along the series" for i in patient_figures.series_order(report)],
        "reliability diagram before and after temperature scaling",
        "training curves",
    ]
    pngs = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert pngs == [(out / n).read_bytes() for n in ("confusion_matrix.png", "roc_patient.png", "roc_slice.png")]
    assert all(cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR).shape[0] > 400 for p in pngs)
    for name in ("decision.svg", "reliability.svg", "training.svg"):
        assert (out / name).read_text() in written.html
    assert all(panel in written.html for panel in written.figures.series_panels)
    assert all(
        panel.split("<title>", 1)[1][:40] in written.svgs["series.svg"] for panel in written.figures.series_panels
    )
    _, auc_rows = page.table_with("AUC, scored by")
    assert auc_rows[0][1][0] == "patients, by the rule's scores (share of slice votes (Normal: 1 - infected fraction))"
    assert auc_rows[1][1][0] == "patients, by mean slice probability"
    shares = np.stack([vote_shares(g) for g in slice_groups(votes)])
    expected = [roc_auc_score(votes.labels == c, shares[:, c]) for c in range(3)]
    assert [float(x) for x in auc_rows[0][1][2:]] == pytest.approx(expected, abs=5e-4)
    assert "by the rule's own scores (infected_fraction: share of slice votes" in written.captions["roc_patient.png"]
    # the decision figure: one dot per patient (its hover text names it), with the tau line; the series: one
    # panel per patient
    decision = written.svgs["decision.svg"]
    dots = [html.unescape(t) for t in re.findall(r"<title>([^<]*): true ", decision)]
    assert decision.count('class="patients"') == 1 and sorted(dots) == sorted(report.patients)
    assert f"tau {votes.tau:.3f}" in decision
    assert all(
        f"&gt; {CLASS_NAMES[p]}" in decision for p, t in zip(votes.predicted, votes.labels, strict=True) if p != t
    )
    series = written.svgs["series.svg"]
    assert series.count('class="infected"') == 6 and series.count("labelled Normal</title>") > 0
    assert series.count("labelled") - 2 == int((report.slice_labels >= 0).sum())  # one mark per known slice
    assert len(re.findall(r"<title>slice \d+: labelled ", series)) == int((report.slice_labels >= 0).sum())
    assert len(re.findall(r"<title>slice \d+: P\(infected\) ", series)) == len(report.slice_labels)  # every dot
    # the rest of the page: key metrics with 3 decimals, viewport, a scrolling patient table, no "None"
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in page.meta
    assert '<div class="wrap"><table class="patients"><thead><tr><th>patient</th>' in written.html
    assert page.links == ["patients.csv", "train.log"]
    assert "None" not in re.sub(r"<svg.*?</svg>", "", written.html, flags=re.S)
    _, key = page.table_with("metric")
    assert all(re.fullmatch(r"\d\.\d{3}(-\d\.\d{3})?", cells[1]) for _, cells in key)  # a value or an interval
    assert "<h1>demo · resnet18 · vote infected_fraction</h1>" in written.html and "run run &lt;x&gt;" in written.html
    # ids and the run name are text everywhere: the tables, the captions and the figures (hover texts, titles)
    assert not [raw for raw in ("P<1>", "N&3", "run <x>") if raw in written.html]


def test_patients_csv_is_the_one_per_patient_table_with_the_decision_columns(decided):
    cb, votes, _, out, report, written = decided
    assert sorted(p.name for p in out.glob("*.csv")) == ["patients.csv"]
    rows = list(csv.DictReader((out / "patients.csv").open()))
    d = patient_decisions(votes, cb)
    assert [r["patient"] for r in rows] == [v.patient for v in votes.patients]
    for i, r in enumerate(rows):
        assert r["decision"] == d.why[i] and float(r["decision_quantity"]) == round(d.quantity[i], 4)
        assert float(r["decision_threshold"]) == round(d.threshold[i], 4)
        assert [float(r[f"score_{c}"]) for c in CLASS_NAMES] == pytest.approx(d.scores[i], abs=1e-4)
        for rule, preds in votes.predictions.items():  # the reported votes: what the rule accuracies count
            assert r[f"{rule}_vote"] == CLASS_NAMES[preds[i]]
        assert r["predicted_class"] == r["infected_fraction_vote"] and r["correct"] == str(
            r["predicted_class"] == r["true_class"]
        )
    accuracy = {rule: np.mean([r[f"{rule}_vote"] == r["true_class"] for r in rows]) for rule in votes.predictions}
    assert accuracy == pytest.approx({rule: votes.metrics[f"rules/{rule}/acc"] for rule in votes.predictions})


def test_the_calibration_section_shows_ece_before_and_after_from_the_bins(decided):
    _, votes, targets, _, report, written = decided
    cal = report.calibration
    assert cal.fitted and cal.temperature == votes.temperature != 1.0
    # the slices before scaling, recovered from the calibrated ones: what decide() calibrated from
    np.testing.assert_allclose(cal.slice_before, validation()["probs"], atol=2e-5)
    m = written.metrics
    assert m["slice ECE before calibration"] == pytest.approx(votes.metrics["calibration/slice_ece_before"], abs=1e-5)
    assert m["slice ECE after calibration"] == pytest.approx(votes.metrics["calibration/slice_ece_after"], abs=1e-5)
    assert m["patient ECE after calibration"] == pytest.approx(votes.metrics["calibration/patient_ece_after"], abs=1e-5)
    _, rows = Page(written.html).table_with("level")
    assert rows[0][1] == [
        "slices with a known class",
        f"{m['slice ECE before calibration']:.3f}",
        f"{m['slice ECE after calibration']:.3f}",
    ]
    off = dataclasses.replace(report, calibration=dataclasses.replace(cal, fitted=False))
    text = render_html(off, score(off), render_figures(off, score(off), pngs=written.images))
    assert "calibration=false" in text and "reliability diagram" not in text
    # a level that got worse is said in words, with its figures; none when every level improved
    worse = m["patient ECE after calibration"] > m["patient ECE before calibration"]
    assert ("the patients' mean probabilities (" in html.unescape(written.html)) == worse
    said = calibration_note(
        {
            "slice ECE before calibration": 0.066,
            "slice ECE after calibration": 0.031,
            "patient ECE before calibration": 0.241,
            "patient ECE after calibration": 0.335,
        }
    )
    assert said.startswith("Calibration made the patients' mean probabilities (0.241 -> 0.335) worse: ")
    assert "the slices" not in said and "the calls do not change" in said
    better = {"slice ECE before calibration": 0.1, "slice ECE after calibration": 0.05}
    assert calibration_note(better) == ""


def test_threshold_and_argmax_rules_explain_their_calls_and_none_prints_no_none(decided):
    _, votes, _, _, report, written = decided
    # the same validation epoch, read as if vote=threshold: its leave-one-out (slice threshold, tau) per patient
    as_threshold = dataclasses.replace(votes, rule="threshold")
    d = patient_decisions(as_threshold, PatientVoteCallback("threshold", mil=False))
    groups = slice_groups(votes)
    for g, t, share, tau, called in zip(
        groups, d.patient_slice_threshold, d.quantity, d.threshold, as_threshold.predicted, strict=True
    ):
        assert share == infected_share(g, t) and (share > tau) == (called != NORMAL_CLASS)
    assert np.allclose(d.scores.sum(axis=1), 1.0) and d.slice_threshold is not None
    threshold_report = dataclasses.replace(
        report, vote_rule="threshold", patient_preds=as_threshold.predicted, decisions=d
    )
    series = series_svg(threshold_report)[0]
    assert series.count('class="slice-threshold"') == len(groups)  # each patient's own slice threshold
    # argmax rules: the sick margin's sign is the call, the scores' argmax the class
    for rule in ("majority", "mean_prob", "weighted_center", "topk_mean"):
        as_rule = dataclasses.replace(votes, rule=rule)
        d = patient_decisions(as_rule, PatientVoteCallback(rule, mil=False))
        for margin, scores, called in zip(d.quantity, d.scores, as_rule.predicted, strict=True):
            if abs(margin) > 1e-9:  # at 0 the tie rule decides
                assert (margin > 0) == (called != NORMAL_CLASS) and scores.argmax() == called
        assert decision_svg(dataclasses.replace(report, vote_rule=rule, patient_preds=as_rule.predicted, decisions=d))
    # a report without a best epoch or training curves never prints "None"
    bare = dataclasses.replace(report, best_epoch=None, history=[])
    text = render_html(bare, score(bare), render_figures(bare, score(bare), pngs=written.images))
    assert "None" not in re.sub(r"<svg.*?</svg>", "", text, flags=re.S)
    assert "best epoch (not recorded)" in text and "No per-epoch values recorded" in text


def test_the_series_figure_caps_its_panels_misclassified_first_and_says_so(decided, monkeypatch):
    _, votes, _, _, report, written = decided
    monkeypatch.setattr(patient_figures, "MAX_SERIES_PANELS", 2)
    page = render_figures(report, score(report), pngs=written.images)
    wrong = [v.patient for v, p, t in zip(votes.patients, votes.predicted, votes.labels, strict=True) if p != t]
    series = page.svgs["series.svg"]
    titles = re.findall(r'<g class="panel-title wrong"><text [^>]*class="([^"]+)"[^>]*>([^<]+): ', series)
    assert page.series_shown == 2 and series.count('class="infected"') == 2
    assert [html.unescape(t) for _, t in titles] == wrong[:2]  # the misclassified patients come first, in bold
    assert all(re.search(r"\." + cls + r"\{font-weight: 700", series) for cls, _ in titles)
    assert (
        "2 of 6 validation patients shown" in page.captions["series.svg"]
        and "4 more in patients.csv" in page.captions["series.svg"]
    )


def test_mil_details_show_the_attention_and_the_in_sample_probabilities(decided):
    _, votes, _, _, report, _ = decided
    torch.manual_seed(0)
    head = GatedAttentionMIL(8, num_classes=3).eval()
    patient = votes.slice_patient
    embeddings = np.random.default_rng(0).normal(size=(len(patient), 8)).astype(np.float32)
    details = mil_details(head, patient, embeddings)
    bags = [embeddings[patient == p] for p in np.unique(patient)]
    np.testing.assert_allclose(details.probs, predict_proba(head, bags), atol=1e-6)
    np.testing.assert_allclose([details.attention[patient == p].sum() for p in np.unique(patient)], 1.0, atol=1e-5)
    as_mil = dataclasses.replace(votes, rule="mil", mil=details, predictions={**votes.predictions, "mil": votes.labels})
    d = patient_decisions(as_mil, PatientVoteCallback("mil"))
    np.testing.assert_allclose(d.scores, details.probs, atol=1e-6)
    assert d.quantity_name == "sick margin" and all(
        w.startswith("cross-fitted head; head fitted on all") for w in d.why
    )
    mil_report = dataclasses.replace(report, vote_rule="mil", decisions=d, mil_attention=details.attention)
    assert series_svg(mil_report)[0].count('class="attention"') == len(bags)  # the attention per panel
    assert mil_details(None, patient, embeddings) is None and mil_details(head, patient, None) is None


def test_training_curves_survive_a_checkpoint_and_record_the_epoch_mean_train_loss():
    cb = RunReportCallback("/tmp/unused-run")
    batch = {"image": torch.zeros(3, 1, 4, 4)}
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, callback_metrics={})
    cb.on_train_epoch_start(trainer, None)
    cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, batch, 0)
    cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(2.0)}, {"image": torch.zeros(1, 1, 4, 4)}, 1)
    trainer.callback_metrics = {"val/loss": torch.tensor(0.9), "val/patient/acc": torch.tensor(0.5)}
    cb.on_validation_end(trainer, None)
    assert cb.history == [{"epoch": 0, "train_loss": 1.25, "val_loss": pytest.approx(0.9), "val_patient_acc": 0.5}]
    buffer = io.BytesIO()
    torch.save(cb.state_dict(), buffer)
    buffer.seek(0)
    resumed = RunReportCallback("/tmp/unused-run")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # what a resume restores
    trainer.current_epoch, trainer.callback_metrics = 1, {}
    resumed.on_train_epoch_start(trainer, None)
    resumed.on_validation_end(trainer, None)  # an epoch without batches or metrics: NaN, not a crash
    assert [e["epoch"] for e in resumed.history] == [0, 1] and np.isnan(resumed.history[1]["train_loss"])
    trainer.sanity_checking = True
    resumed.on_validation_end(trainer, None)
    assert len(resumed.history) == 2


# ---- the page on any screen: the patient table's sticky columns, figures that reflow or scroll ------------------


def smallest_text_px(svg: str) -> float:
    """The smallest font (CSS px) of an inline ``<svg>`` shown at its ``min-width``: matplotlib's font sizes are
    in its viewBox units, scaled by min-width over the viewBox width."""
    root = re.match(r"<svg [^>]*>", svg)[0]
    view_width = float(re.search(r'viewBox="0 0 ([\d.]+) ', root)[1])
    shown = float(re.search(r'style="min-width:(\d+)px"', root)[1])
    return min(float(size) for size in re.findall(r"font-size: ([\d.]+)px", svg)) * shown / view_width


def test_the_patient_table_lists_wrong_calls_first_with_patient_truth_and_call_kept_in_view(decided):
    *_, written = decided
    css = written.html[written.html.index("<style>") : written.html.index("</style>")]
    _, rows = Page(written.html).table_with("patient")
    classes = [cls for cls, _ in rows]
    assert "wrong" in classes and classes == sorted(classes, key=lambda cls: cls != "wrong")  # wrong rows first
    sticky = re.findall(
        r"table\.patients tr>:nth-child\((\d)\)\{position:sticky;z-index:1;left:([\d.]+)em;box-sizing:border-box;"
        r"width:([\d.]+)em",
        css,
    )
    assert [int(k) for k, _, _ in sticky] == [1, 2, 3]  # patient, true class, called
    lefts, widths = [float(left) for _, left, _ in sticky], [float(w) for _, _, w in sticky]
    assert lefts == pytest.approx([0.0, widths[0], widths[0] + widths[1]])  # side by side, none under another
    for k, width in enumerate(widths):  # each as wide as its longest text (~0.55 em a character at least)
        assert width >= 0.55 * max(len(cells[k]) for _, cells in rows) + 1.0
    assert "table.patients td:nth-child(-n+3){background:#fff}" in css  # opaque: the other columns pass under
    assert "table.patients tr.wrong td:nth-child(-n+3){background:#fde2e2}" in css
    narrow = css[css.index("@media (max-width:600px){") :]
    assert "table.patients tr>:nth-child(n+2){position:static" in narrow  # a phone keeps only the patient in view


def test_on_a_narrow_screen_the_series_panels_reflow_and_no_chart_text_shrinks_under_10_px(decided, monkeypatch):
    _, _, _, _, report, written = decided
    css = written.html[written.html.index("<style>") : written.html.index("</style>")]
    column = int(
        re.search(r"\.panels\{display:grid;grid-template-columns:repeat\(auto-fill,minmax\((\d+)px,1fr\)\)", css)[1]
    )
    phone = 420 - 2 * 0.6 * 16  # a 420 px window less the page's side padding under 600 px
    assert column <= phone < 2 * column and 2 * column + 12 <= 600  # one panel per row at 420 px, two at 600 px
    assert ".cams{grid-template-columns:1fr}" in css[css.index("@media (max-width:600px){") :]
    panels = written.figures.series_panels
    assert len(panels) == len(report.patients)
    assert all(int(re.search(r'style="min-width:(\d+)px"', p)[1]) <= column for p in panels)
    inline = re.findall(r'<svg xmlns="http://www.w3.org/2000/svg".*?</svg>', written.html, flags=re.S)
    assert len(inline) == 3 + len(panels) and all(smallest_text_px(svg) >= 10.0 - 1e-6 for svg in inline)
    # the PNG figures: drawn with no text under 8 pt, so at their min-width no text is under 10 px
    sizes: list[float] = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda fig, *a, **k: (sizes.append(smallest_font(fig)), savefig(fig, *a, **k)),
    )
    pngs = render_pngs(report, score(report))
    assert len(sizes) == 3 and min(sizes) >= PNG_MIN_FONT_PT
    for name, png in pngs.items():
        width = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape[1]
        shown = int(re.search(rf'<img alt="{name}" style="min-width:(\d+)px"', written.html)[1])
        assert shown < width and PNG_MIN_FONT_PT * DPI / 72 * shown / width >= 10.0 - 1e-6


@pytest.mark.slow
def test_the_callback_writes_the_report_of_a_real_training_and_logs_it_to_wandb(tmp_path, shared_cache):
    overrides = tiny(shared_cache) + ["logger=[wandb,csv]", "trainer.max_epochs=2"]  # Grad-CAM: at fit end
    result = train(compose_train(tmp_path, overrides))
    for name in ("confusion_matrix.png", "roc_patient.png", "roc_slice.png"):
        assert cv2.imread(str(tmp_path / name)).shape[0] > 400
    html_text = (tmp_path / "report.html").read_text()
    page = Page(html_text)
    patients = list(csv.DictReader((tmp_path / "patients.csv").open()))
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["patients.csv", "split.csv"]
    header, rows = page.table_with("patient")
    assert header[5:7] == ["infected fraction", "tau"]  # the demo's rule, infected_fraction
    assert sorted(r[1][0] for r in rows) == sorted(p["patient"] for p in patients)
    by_id = {p["patient"]: p for p in patients}
    for _, cells in rows:
        p = by_id[cells[0]]
        assert cells[4] == p["decision"] and float(cells[5]) == pytest.approx(float(p["decision_quantity"]), abs=5e-4)
    cams = list((tmp_path / "report_cam").glob("*.png"))  # the Grad-CAM section's images, inline too
    assert len(page.svgs) == 3 + len(patients) and len(cams) > 0 and len(page.images) == 3 + len(cams)
    for link in page.links:  # relative links to files of the run folder: checkpoint, patients.csv, metrics.json ...
        assert (tmp_path / link).is_file(), link
    assert Path(result.best_checkpoint).name in " ".join(page.links) and "metrics.json" in page.links
    _, config = page.table_with("setting")
    config = dict(c for _, c in config)
    assert config["experiment"] == "demo" and config["model"] == "resnet18 (from scratch)" and config["seed"] == "42"
    assert "trainer.max_epochs=2" in config["overrides"] and config["loss"].startswith("FocalLoss")
    assert re.fullmatch(r"([0-9a-f]{40}( \+ uncommitted changes)?|unknown)", config["git commit"])
    _, data = page.table_with("split")
    assert [cells[0] for _, cells in data] == ["all", "train", "validation"] and data[2][1][4] == str(len(patients))
    # the training curves: every epoch, kept in the checkpoint, equal to what Lightning logged
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    history = next(v for k, v in state.items() if k.startswith("RunReportCallback"))["history"]
    logged = [r for r in csv.DictReader(next(tmp_path.glob("csv/version_*/metrics.csv")).open())]
    train_loss = [float(r["train/loss_epoch"]) for r in logged if r.get("train/loss_epoch")]
    val_acc = [float(r["val/patient/acc"]) for r in logged if r.get("val/patient/acc")]
    assert [e["epoch"] for e in history] == [0, 1]
    assert [e["train_loss"] for e in history] == pytest.approx(train_loss, rel=1e-5)
    assert [e["val_patient_acc"] for e in history] == pytest.approx(val_acc)
    assert f"best epoch {result.best_epoch}" in (tmp_path / "training.svg").read_text()
    # W&B: each figure and number once, in the run's summary, with captions; the page without local links
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = {p.relative_to(run / "files" / "media").as_posix() for p in run.rglob("media/*/*/*")}
    for stem in ("confusion_matrix", "roc_patient", "roc_slice"):
        assert any(m.startswith(f"images/report/{stem}_summary_") for m in media), media
    for stem in ("html", "decision", "series", "training", "reliability"):
        assert any(m.startswith(f"html/report/{stem}_summary_") for m in media), media
    (logged_page,) = [p for p in run.rglob("media/html/report/html_summary_*.html")]
    assert "<a href" not in logged_page.read_text() and "infected fraction" in logged_page.read_text()
    records = next(run.glob("run-*.wandb")).read_bytes()  # summary and history records
    for key in ("report/patient_auc_macro_rule_scores", "report/slice_ece_after_calibration", "report/html"):
        assert key.encode() in records, key
    assert b"Patient ROC, one class against the others" in records and b"val/grad_cam" in records
