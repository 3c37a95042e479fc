"""Backbones, ImageNet weight loading (with a weights file the test writes), the LightningModule."""

from __future__ import annotations

import urllib.error
from functools import partial

import pytest
import torch

from covidct.errors import ConfigError
from covidct.models import backbones
from covidct.models.backbones import BACKBONES, build_backbone, imagenet_weights_path
from covidct.models.classifier import InputAdapter, SliceClassifier
from covidct.models.losses import FocalLoss


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_pretrained_loads_the_file_in_torch_hub_cache(torch_home):
    reference = BACKBONES["resnet18"].builder(weights=None)
    path = imagenet_weights_path("resnet18")
    assert path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_backbone("resnet18", num_classes=3, pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 3
    scratch = build_backbone("resnet18", num_classes=3, pretrained=False)
    assert not torch.equal(scratch.conv1.weight, reference.conv1.weight)


@pytest.mark.slow  # a few seconds: keeps make test-fast under 2 min
def test_missing_weights_stop_with_a_message_saying_where_to_put_them(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as err:
        build_backbone("vgg16", num_classes=3, pretrained=True)
    message = str(err.value)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert str(torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "model.pretrained=false" in message
    with pytest.raises(ConfigError, match="model.weights_path"):
        backbones.load_imagenet_state_dict("vgg16", str(torch_home / "nope.pth"))


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ConfigError, match="resnet18"):
        build_backbone("vgg61", 3)


@pytest.mark.parametrize(
    "name",  # the VGGs take 2-2.5 s each to build: slow, to keep make test-fast under 2 min
    [pytest.param("vgg16", marks=pytest.mark.slow), pytest.param("vgg16_bn", marks=pytest.mark.slow), "resnet18"],
)
def test_heads_have_three_classes(name):
    model = SliceClassifier(backbone=name, in_channels=1)
    out = model(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 3) and out.dtype == torch.float32


def test_input_adapter_normalises_uint8_with_imagenet_statistics():
    images = torch.full((1, 1, 4, 4), 255, dtype=torch.uint8)
    out = InputAdapter(1)(images)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    assert InputAdapter(2)(torch.zeros((1, 2, 4, 4), dtype=torch.uint8)).shape == (1, 3, 4, 4)


@pytest.mark.slow  # a few seconds: keeps make test-fast under 2 min
def test_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = SliceClassifier(
        backbone="resnet18",
        in_channels=1,
        loss=partial(FocalLoss, gamma=2, alpha="auto"),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
    )
    model.criterion.fit_class_counts([10, 10, 20])  # what setup() does with the training split's counts
    images = torch.randint(0, 256, (12, 1, 32, 32), dtype=torch.uint8)
    batch = {"image": images, "target": torch.arange(12) % 3}
    opt = model.configure_optimizers()
    model.log = lambda *a, **k: None  # no trainer attached
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    torch.testing.assert_close(model.criterion.alpha, torch.tensor([0.4, 0.4, 0.2]))
