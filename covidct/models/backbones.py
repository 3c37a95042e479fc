"""torchvision backbones with a new classification head, and explicit ImageNet weight loading.

Weights are never downloaded silently and never silently skipped: ``pretrained=True`` loads the
torchvision ImageNet file from torch hub's cache (``$TORCH_HOME/hub/checkpoints``), downloading it
there if the network allows; if neither works the run stops with a message that says which file
to put where, or to set ``model.pretrained=false``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from covidct.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """A torchvision builder, its ImageNet weights, and how to swap its last layer."""

    builder: Callable[..., nn.Module]
    weights: tvm.WeightsEnum
    replace_head: Callable[[nn.Module, int], None]


def _vgg_head(model: nn.Module, num_classes: int) -> None:
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)


def _resnet_head(model: nn.Module, num_classes: int) -> None:
    model.fc = nn.Linear(model.fc.in_features, num_classes)


def _efficientnet_head(model: nn.Module, num_classes: int) -> None:
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1, _vgg_head),
    "vgg16_bn": BackboneSpec(tvm.vgg16_bn, tvm.VGG16_BN_Weights.IMAGENET1K_V1, _vgg_head),
    "resnet18": BackboneSpec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, _resnet_head),
    "resnet50": BackboneSpec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, _resnet_head),
    "efficientnet_b0": BackboneSpec(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, _efficientnet_head),
    # the SPGC 2021 winner's network (experiment=spgc_winner)
    "efficientnet_b5": BackboneSpec(tvm.efficientnet_b5, tvm.EfficientNet_B5_Weights.IMAGENET1K_V1, _efficientnet_head),
}


def imagenet_weights_path(name: str) -> Path:
    """Where torch hub keeps (or expects) the ImageNet weights file of backbone ``name``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(BACKBONES[name].weights.url).name


def load_imagenet_state_dict(name: str, weights_path: str | None = None) -> dict[str, torch.Tensor]:
    """ImageNet state dict from ``weights_path``, else torch hub's cache, else a download into it.

    Raises ConfigError saying which file to put where when none of these works.
    """
    spec = BACKBONES[name]
    path = Path(weights_path) if weights_path else imagenet_weights_path(name)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if weights_path:
        raise ConfigError(f"model.weights_path={weights_path}: file not found.")
    try:
        return spec.weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # no network, proxy, bad hash...
        raise ConfigError(
            f"model.pretrained=true but the ImageNet weights for {name} could not be loaded ({exc}).\n"
            f"  Download {spec.weights.url}\n  and put it at {path}\n"
            f"  (or set model.weights_path=<file>), or train from scratch with model.pretrained=false."
        ) from exc


def build_backbone(name: str, num_classes: int, pretrained: bool = False, weights_path: str | None = None) -> nn.Module:
    """A torchvision classifier ``name`` with a ``num_classes`` head; ImageNet weights if ``pretrained``."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone={name!r} is not known; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    model = spec.builder(weights=None)
    if pretrained:
        model.load_state_dict(load_imagenet_state_dict(name, weights_path))
        log.info("Loaded ImageNet weights for %s", name)
    spec.replace_head(model, num_classes)
    return model
