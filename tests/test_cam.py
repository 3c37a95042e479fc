"""Grad-CAM: target layers, heatmaps on real and synthetic slices, overlays, predict.py cam=true, and the run
report's Grad-CAM section (every wrong call on the slices that decided it)."""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from omegaconf import OmegaConf

from covidct.contracts import CLASS_NAMES, NORMAL_CLASS
from covidct.data.dicom import to_hounsfield
from covidct.data.preprocess import SlicePreprocessor, parse_windows
from covidct.errors import ConfigError
from covidct.models.classifier import SliceClassifier
from covidct.predict.predictor import check_cam
from covidct.report.call_cams import call_cams, cam_patients, decisive
from covidct.report.cam import _warn_flat, decisive_slices, grad_cam, lung_channel, overlay, png_bytes, target_layer
from covidct.report.figures import render_figures
from covidct.report.metrics import score
from covidct.report.page import render_html, write_report
from covidct.training.callbacks.cam_images import pick_slices
from covidct.training.callbacks.run_report import RunReportCallback, best_model
from tests.conftest import run_cli
from tests.test_report import Page, decide_validation


def real_slice(sample: Path, size: int) -> np.ndarray:
    """uint8 (1, size, size) lung window of one slice of the real COVID-19 patient."""
    path = sorted((sample / "COVID-19 subjects" / "P001").glob("*.dcm"))[40]
    return SlicePreprocessor(parse_windows(["lung"]), size)(to_hounsfield(pydicom.dcmread(path)))


@pytest.mark.parametrize(
    ("backbone", "layer_type", "side"),
    [
        ("resnet18", "BasicBlock", 2),
        ("resnet50", "Bottleneck", 2),
        ("efficientnet_b0", "Conv2dNormActivation", 2),
        pytest.param("vgg16", "ReLU", 4, marks=pytest.mark.slow),  # 138M parameters to initialise
    ],
)
def test_target_layer_is_the_last_feature_map(backbone, layer_type, side):
    model = SliceClassifier(backbone=backbone)
    layer = target_layer(model)
    shapes = []
    layer.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    with torch.no_grad():
        model(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    assert type(layer).__name__ == layer_type and shapes[0][-2:] == (side, side)


def test_grad_cam_on_a_real_slice_inside_inference_mode_leaves_the_model_as_it_was(real_sample):
    torch.manual_seed(0)
    model = SliceClassifier(backbone="resnet18").train()
    model.net.bn1.eval()  # a frozen BatchNorm must stay frozen
    accumulated = torch.ones_like(model.net.fc.weight)
    model.net.fc.weight.grad = accumulated
    images = torch.from_numpy(np.stack([real_slice(real_sample, 64)] * 2))
    with torch.inference_mode():
        heatmaps, probs = grad_cam(model, images, [0, 2])
    assert heatmaps.shape == (2, 64, 64) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0 and heatmaps.max() > 0.5
    assert not np.allclose(heatmaps[0], heatmaps[1])  # a different class, a different map
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert model.training and not model.net.bn1.training and model.net.layer1.training
    assert model.net.fc.weight.grad is accumulated and model.net.conv1.weight.grad is None
    with torch.no_grad():  # the probabilities are the eval-mode model's
        np.testing.assert_allclose(probs, model.eval()(images).softmax(1).numpy(), atol=1e-5)


def test_a_1x1_target_layer_gives_flat_maps_and_says_so(caplog):
    _warn_flat.cache_clear()
    heatmaps, _ = grad_cam(SliceClassifier(backbone="resnet18"), torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    assert heatmaps.shape == (2, 32, 32) and not heatmaps.any()
    assert "1x1 at 32 px" in caplog.text


def test_overlay_panel_and_png(real_sample):
    grey = real_slice(real_sample, 64)[0]
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[40:, 40:] = 1.0  # hot in the lower right
    rgb = overlay(grey, heatmap, "P001 slice 40: Grad-CAM COVID-19, p=0.93")
    assert rgb.shape == (28 + 256, 512, 3) and rgb.dtype == np.uint8
    caption, left, right = rgb[:28], rgb[28:, :256], rgb[28:, 256:]
    assert (caption < 128).any() and (caption == 255).mean() > 0.8  # dark text on white
    assert (left[..., 0] == left[..., 1]).all() and (left[..., 1] == left[..., 2]).all()  # grey slice
    np.testing.assert_array_equal(left[..., 0], cv2.resize(grey, (256, 256), interpolation=cv2.INTER_CUBIC))
    hot, cold = right[220:, 220:].astype(int), right[:60, :60].astype(int)
    assert (hot[..., 0] - hot[..., 2]).mean() > 50 and (cold[..., 2] - cold[..., 0]).mean() > 50  # red vs blue
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(png_bytes(rgb), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, rgb)


def test_lung_channel_and_slice_choices():
    assert lung_channel(["mediastinum", "lung"]) == 1 and lung_channel([{"level": 40, "width": 400}]) == 0
    assert lung_channel(parse_windows(["bone", "lung"])) == 1
    probs = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05]])
    assert decisive_slices(probs, 0, 2).tolist() == [3, 1]
    # patients 0 (COVID-19, slices labelled 1 3 4 of 0..4), 1 (Normal), 2 (CAP, no slice labels)
    patients = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    targets = np.array([2, 0, 2, 0, 0, 2, 2, 2, -1, -1])
    picked = pick_slices(patients, targets, np.array([0, 2, 1]), 4)
    assert picked.tolist() == [3, 9, 6]  # one per class (COVID-19, CAP, Normal); only 3 patients


def test_cam_settings_are_checked():
    assert check_cam(OmegaConf.create({"cam": False, "cam_slices": 0})) == 0
    assert check_cam(OmegaConf.create({"cam": True, "cam_slices": 3})) == 3
    with pytest.raises(ConfigError, match="cam_slices must be an integer >= 1"):
        check_cam(OmegaConf.create({"cam": True, "cam_slices": 0}))
    with pytest.raises(ConfigError, match=r"callbacks\.run_report\.cam_max_wrong must be an integer >= 0, got -1"):
        RunReportCallback("unused-run", cam_max_wrong=-1)
    assert RunReportCallback("unused-run", cam_slices_per_patient=0).cam_slices_per_patient == 0  # the section off


@pytest.mark.slow
def test_predict_with_cam_writes_the_most_decisive_slices(trained, shared_cache, tmp_path):
    """Two test sets: the second one's DataLoader workers start after CAM ran in the main process."""
    ckpt, run_dir = trained
    data_root = Path(next(shared_cache.glob("synthetic-*")))
    folders = {p.name: p for p in data_root.glob("*/*") if p.is_dir()}
    val = [r["patient"] for r in csv.DictReader((run_dir / "split.csv").open()) if r["subset"] == "val"]
    for test_set, pid in (("Test1", val[0]), ("Test2", val[1])):
        shutil.copytree(folders[pid], tmp_path / "input" / test_set / pid)
    out = run_cli(
        [
            f"ckpt_path={ckpt}",
            f"input={tmp_path / 'input'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "cam=true",
            "cam_slices=2",
            "progress=false",
            "num_workers=1",
        ],
        tmp_path,
        "predict.py",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = next((tmp_path / "logs" / "predict" / "runs").iterdir())
    record = json.loads((result / "prediction.json").read_text())
    assert record["cam"] is True and record["cam_slices"] == 2
    for test_set in ("Test1", "Test2"):
        slices = list(csv.DictReader((result / f"{test_set}_slices.csv").open()))
        (row,) = csv.DictReader((result / f"{test_set}.csv").open())
        pid, cls = row["patient"], row["predicted_class"]
        pngs = sorted((result / f"{test_set}_cam" / pid).glob("*.png"))
        probs = np.array([float(r[f"prob_{cls}"]) for r in slices])
        second_highest = sorted(probs)[-2]  # the two slices that most support the call (no ties here)
        expected = [i for i, p in enumerate(probs) if p >= second_highest]
        names = [re.fullmatch(rf"slice(\d+)_{cls}_p(\d\.\d\d)\.png", p.name) for p in pngs]
        assert all(names) and sorted(int(m[1]) for m in names) == expected, [p.name for p in pngs]
        for m in names:
            assert abs(float(m[2]) - probs[int(m[1])]) <= 0.0051
        assert cv2.imread(str(pngs[0])).shape == (28 + 256, 512, 3)


# ---- the report's Grad-CAM section (covidct.report.call_cams) ---------------------------------------------------


@dataclass
class CamFigure:
    """One call's figure in the Grad-CAM section: wrong or right, its caption, per slice (caption, img src)."""

    wrong: bool
    caption: str = ""
    slices: list[list[str]] = field(default_factory=list)

    @property
    def patient(self) -> str:
        return self.caption.split(": true ", 1)[0]


class CamFigures(HTMLParser):
    """The ``figure.cam`` elements of a report page (see :class:`CamFigure`)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.figures: list[CamFigure] = []
        self._depth, self._text = 0, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and (a.get("class") or "").split()[:1] == ["cam"]:
            self.figures.append(CamFigure("wrong" in a["class"].split()))
            self._depth = 1
        elif tag == "figure" and self._depth:
            self._depth += 1
            self.figures[-1].slices.append(["", ""])
        elif tag == "img" and self._depth == 2:
            self.figures[-1].slices[-1][1] = a["src"]
        elif tag == "figcaption" and self._depth:
            self._text = []

    def handle_endtag(self, tag):
        if tag == "figcaption" and self._text is not None:
            text, self._text = "".join(self._text), None
            if self._depth == 1:
                self.figures[-1].caption = text
            else:
                self.figures[-1].slices[-1][0] = text
        elif tag == "figure" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def cam_report(report, **settings):
    """``report`` with the Grad-CAM section of a seeded random resnet18 on random 64 px slices."""
    torch.manual_seed(0)
    model = SliceClassifier(backbone="resnet18").eval()
    images = np.random.default_rng(0).integers(0, 256, (len(report.slice_labels), 1, 64, 64), dtype=np.uint8)
    cams = call_cams(model, report, lambda index: images[index], "a test model", **settings)
    return dataclasses.replace(report, cams=cams)


def test_the_slices_and_patients_that_explain_the_calls():
    probs = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.05, 0.05, 0.9], [0.5, 0.1, 0.4]])
    positions, classes = decisive(probs, 0, 2, 2)  # a COVID-19 call: the highest P(COVID-19)
    assert positions.tolist() == [1, 4] and classes.tolist() == [0, 0]
    positions, classes = decisive(probs, 2, 2, 3)  # a Normal call: the highest 1 - P(Normal), their likeliest
    assert positions.tolist() == [1, 2, 4] and classes.tolist() == [0, 1, 0]  # infected class mapped
    assert decisive(probs[:1], 1, 2, 2)[0].tolist() == [0]  # a one-slice series
    labels, preds = np.array([0, 0, 0, 1, 1, 2, 2, 2]), np.array([0, 0, 2, 1, 0, 2, 2, 2])
    scores = np.array([[0.6, 0.2, 0.2], [0.9, 0.05, 0.05], *[[0.3, 0.3, 0.4]] * 3, [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    scores = np.vstack([scores, [[0.1, 0.0, 0.9]]])
    wrong, right, left_out = cam_patients(labels, preds, scores, right_per_class=1, max_wrong=5)
    assert wrong == [2, 4] and right == [1, 3, 7] and left_out == 0  # right: the most confident per class
    assert cam_patients(labels, preds, scores, 0, 1) == ([2], [], 1)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The run report of test_report.py's validation epoch (6 patients, infected_fraction, calibrated)."""
    return decide_validation(tmp_path_factory.mktemp("voted"))[4]


@pytest.mark.slow  # seconds on 2 cores: keeps make test-fast under a minute
def test_the_grad_cam_section_shows_every_wrong_call_on_the_slices_that_decided_it(report, tmp_path):
    written = write_report(cam_report(report), tmp_path)
    figures = CamFigures(written.html).figures
    wrong = [i for i in range(len(report.patients)) if report.patient_labels[i] != report.patient_preds[i]]
    assert wrong and [f.patient for f in figures if f.wrong] == [report.patients[i] for i in wrong]
    assert [f.wrong for f in figures] == sorted((f.wrong for f in figures), reverse=True)  # wrong calls first
    right = [report.patients.index(f.patient) for f in figures if not f.wrong]
    assert right and all(report.patient_labels[i] == report.patient_preds[i] for i in right)
    assert max(np.bincount(report.patient_labels[right])) <= 2
    pngs = []
    for f in figures:
        i = report.patients.index(f.patient)
        truth, call = CLASS_NAMES[report.patient_labels[i]], int(report.patient_preds[i])
        assert f.caption.startswith(f"{f.patient}: true {truth}, called {CLASS_NAMES[call]} (")
        rows = np.flatnonzero(report.slice_patient == i)
        scores = report.slice_scores[rows]
        key = scores[:, call] if call != NORMAL_CLASS else 1.0 - scores[:, NORMAL_CLASS]
        shown = []
        for caption, src in f.slices:
            m = re.search(r"slice (\d+) of (\d+) \(0 = head\): (.*?); Grad-CAM of ", caption)
            shown.append(int(m[1]))
            assert caption.startswith(f"{f.patient} (true {truth}, called {CLASS_NAMES[call]}), slice ")
            assert int(m[2]) == len(rows)
            if call != NORMAL_CLASS:
                assert m[3] == f"P({CLASS_NAMES[call]}) {scores[int(m[1]), call]:.2f}"
            else:
                assert m[3].startswith(f"P(infected) {key[int(m[1])]:.2f}, P(")
            assert re.search(r"\(64 px input, upsampled(; flat map: no region raised the [^ ]+ score)?\)$", caption)
            pngs.append(base64.b64decode(src.split(",", 1)[1]))
        assert sorted(shown) == sorted(np.argsort(-key, kind="stable")[:2].tolist())  # the deciding slices
    assert all(cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR).shape == (128, 256, 3) for p in pngs)
    assert sorted(pngs) == sorted(p.read_bytes() for p in (tmp_path / "report_cam").glob("*.png"))
    assert "computed with a test model" in written.html and "more left out" not in written.html
    assert "last feature map, 2x2 at 64 px input, upsampled" in written.html  # resnet18: 1/32 of the side
    # capped: no wrong call, one right one per class; the page says how many were left out, the old files go
    capped = write_report(cam_report(report, max_wrong=0, right_per_class=1, slices_per_patient=1), tmp_path)
    assert [f.wrong for f in CamFigures(capped.html).figures] == [False] * 3
    assert f"({len(wrong)} more left out: callbacks.run_report.cam_max_wrong)" in capped.html
    assert len(list((tmp_path / "report_cam").glob("*.png"))) == 3
    # off: no section
    assert cam_report(report, slices_per_patient=0).cams is None
    assert 'id="grad-cam"' not in render_html(report, score(report), render_figures(report, score(report)))


@pytest.mark.slow
def test_the_grad_cam_weights_are_the_best_checkpoints(trained):
    ckpt, _ = trained
    live = SliceClassifier(backbone="resnet18", preprocessing={"image_size": 32})
    model, weights = best_model(live, str(ckpt))
    assert model is not live and weights == f"the best checkpoint ({ckpt.name})"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert best_model(live, "") == (live, "the weights at the end of training (no best checkpoint was read)")


@pytest.mark.slow
def test_a_trained_runs_report_shows_the_grad_cam_of_every_wrong_call(trained):
    """The report the session's tiny training wrote at fit end (32 px input: flat maps, and the page says so)."""
    ckpt, run = trained
    text = (run / "report.html").read_text()
    _, rows = Page(text).table_with("patient")
    figures = CamFigures(text).figures
    assert [f.patient for f in figures if f.wrong] == [cells[0] for cls, cells in rows if cls == "wrong"][:24]
    assert len(figures) > 0 and f"computed with the best checkpoint ({ckpt.name})" in text
    captions = [caption for f in figures for caption, _ in f.slices]
    assert all("(32 px input, upsampled; flat map: the target layer is 1x1 at this input size)" in c for c in captions)
    assert len(list((run / "report_cam").glob("*.png"))) == len(captions) == 2 * len(figures)
