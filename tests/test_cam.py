"""Grad-CAM: target layers, heatmaps on real and synthetic slices, overlays, predict.py cam=true."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from omegaconf import OmegaConf

from covidct.data.dicom import to_hounsfield
from covidct.data.preprocess import SlicePreprocessor, parse_windows
from covidct.errors import ConfigError
from covidct.models.classifier import SliceClassifier
from covidct.predict.predictor import check_cam
from covidct.report.cam import _warn_flat, decisive_slices, grad_cam, lung_channel, overlay, png_bytes, target_layer
from covidct.training.callbacks.cam_images import pick_slices
from tests.conftest import run_cli


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
