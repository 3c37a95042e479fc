"""Grad-CAM (pytorch-grad-cam) of a :class:`~covidct.models.classifier.SliceClassifier` and PNG overlays.

Grad-CAM weighs the activation maps of a late convolutional layer by the mean gradient of one class
score: red where the model looked for that class. The maps are coarse (the target layer is 1/16 or
1/32 of the input side) and upsampled to the slice size; the overlay puts them on the lung-window
grey image the model saw.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from covidct.data.preprocess import PRESET_WINDOWS, Window, parse_windows
from covidct.errors import ConfigError
from covidct.io import atomic_write_bytes

log = logging.getLogger(__name__)


def target_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads for ``model`` (a SliceClassifier, or its ``net``):

    * resnet18 / resnet50: the last residual block (``layer4[-1]``, 1/32 of the input side);
    * vgg16 / vgg16_bn: the ReLU after the last convolution, before the last max-pool (1/16);
    * efficientnet_b0: the last 1x1 conv block (``features[-1]``, 1/32).
    """
    net = getattr(model, "net", model)
    if hasattr(net, "layer4"):
        return net.layer4[-1]
    if hasattr(net, "features"):
        features = net.features
        if isinstance(features[-1], nn.MaxPool2d):  # VGG
            return features[-2]
        return features[-1]  # EfficientNet
    raise ConfigError(f"Grad-CAM: no target layer known for backbone {type(net).__name__}")


def lung_channel(windows: Sequence) -> int:
    """Index of the lung window among the model's input channels; 0 without one. ``windows``: the
    config's (``data.windows``: names or {level, width}) or :class:`Window` objects."""
    lung = Window(*PRESET_WINDOWS["lung"])
    parsed = windows if all(isinstance(w, Window) for w in windows) else parse_windows(list(windows))
    return next((i for i, w in enumerate(parsed) if w == lung), 0)


@contextmanager
def cv2_single_threaded() -> Iterator[None]:
    """Keep OpenCV's thread pool idle in this process (pytorch-grad-cam resizes and colours with OpenCV).
    A pool started here would hang DataLoader workers forked later, in their ``cv2.setNumThreads``
    (seen in predict.py: the second test set's workers never started)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


@contextmanager
def gradients_enabled(model: nn.Module) -> Iterator[None]:
    """Let Grad-CAM run a backward pass anywhere (inside ``torch.inference_mode`` too) with no parameter
    gradients (:func:`grad_cam` starts the graph at the target layer's output), then put the model back:
    each module's train/eval mode and the parameters' ``requires_grad`` and ``.grad`` (e.g. an accumulation)."""
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    grads, wanted = [p.grad for p in params], [p.requires_grad for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, g, w in zip(params, grads, wanted, strict=True):
            p.grad = g
            p.requires_grad_(w)
        for m, training in modes.items():
            m.training = training


def _graph_from_here(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook: the target layer's output (a leaf: no parameter needs a gradient) starts the autograd
    graph, so the backward pass ends there instead of going on through the whole backbone."""
    output.requires_grad_(True)


@functools.cache
def _warn_flat(size: int) -> None:
    log.warning(
        "Grad-CAM: the target layer is 1x1 at %d px input, so every map is flat (all blue); "
        "it needs a larger data.image_size (64 px or more)",
        size,
    )


@cv2_single_threaded()
def grad_cam(
    model: nn.Module, images: torch.Tensor, classes: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of uint8 ``images`` (N, C, S, S) for ``classes`` (N ints; None = each slice's argmax).

    Returns (heatmaps float32 (N, S, S) in [0, 1], softmax probabilities float32 (N, classes)).
    The model is left as it was (mode, gradients).
    """
    layer = target_layer(model)
    with gradients_enabled(model):
        start = layer.register_forward_hook(_graph_from_here)  # before GradCAM's hooks, which need the graph
        cam = GradCAM(model=model, target_layers=[layer])
        try:
            targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
            heatmaps = cam(images.detach().clone(), targets=targets)
            probs = cam.outputs.detach().float().softmax(1).cpu().numpy()
            if cam.activations_and_grads.activations[0].shape[-2:] == (1, 1):
                _warn_flat(images.shape[-1])
        finally:
            cam.activations_and_grads.release()  # hooks off; not `with`, which hides IndexError
            start.remove()
    return heatmaps, probs


@cv2_single_threaded()
def cam_pair(grey: np.ndarray, heatmap: np.ndarray, size: int) -> np.ndarray:
    """uint8 grey (S, S) + heatmap float (S, S) in [0, 1] -> uint8 RGB (size, 2 * size, 3):
    [slice | slice with the JET-coloured heatmap] (red = high), each resized to ``size`` px (cubic up,
    area down)."""
    shrink = size < grey.shape[0]
    grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    heatmap = np.clip(cv2.resize(heatmap.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR), 0, 1)
    base = np.repeat(grey[:, :, None], 3, axis=2)
    cam = show_cam_on_image(base.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=0.6)
    return np.hstack([base, cam])


def overlay(grey: np.ndarray, heatmap: np.ndarray, caption: str, size: int = 256) -> np.ndarray:
    """uint8 grey (S, S) + heatmap float (S, S) in [0, 1] -> uint8 RGB (28 + size, 2 * size, 3):
    a caption line over :func:`cam_pair`, each side upsampled to ``size`` px (at least S) so a 64 px
    slice stays readable."""
    panel = cam_pair(grey, heatmap, max(size, grey.shape[0]))
    return np.vstack([caption_bar(caption, panel.shape[1]), panel])


def caption_bar(text: str, width: int, height: int = 28) -> np.ndarray:
    """uint8 RGB (height, width, 3): black ``text`` on white, shrunk to fit the width."""
    bar = np.full((height, width, 3), 255, np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.55
    text_width = cv2.getTextSize(text, font, scale, 1)[0][0]
    scale *= min(1.0, (width - 8) / max(text_width, 1))
    cv2.putText(bar, text, (4, height - 9), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


@cv2_single_threaded()
def png_bytes(rgb: np.ndarray, compression: int = 3) -> bytes:
    """uint8 RGB (H, W, 3) -> PNG file bytes (``compression``: zlib level 0-9, OpenCV's default 3)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("OpenCV could not encode the PNG")
    return buf.tobytes()


def decisive_slices(probs: np.ndarray, cls: int, k: int) -> np.ndarray:
    """Indices of the ``k`` slices of ``probs`` (n, C) with the highest probability of ``cls``, best first."""
    return np.argsort(-probs[:, cls], kind="stable")[:k]


def _safe(name: str) -> str:
    """A file-name-safe version of a class or patient name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_patient_cams(
    model: nn.Module,
    images: torch.Tensor,
    probs: np.ndarray,
    cls: int,
    class_names: Sequence[str],
    out_dir: Path,
    n_slices: int = 4,
    channel: int = 0,
    patient: str = "",
) -> list[Path]:
    """Grad-CAM of class ``cls`` on one patient's ``n_slices`` most decisive slices, as PNGs.

    Args:
        images: uint8 (n, C, S, S) the patient's slices, head first (as predicted).
        probs: float (n, classes) their softmax probabilities.
        cls: the patient's predicted class (the CAM target and the slice ranking).
        out_dir: the patient's folder; files ``slice<index>_<class>_p<prob>.png``.
        channel: input channel shown as the grey image (see :func:`lung_channel`).
    """
    picked = decisive_slices(probs, cls, n_slices)
    heatmaps, _ = grad_cam(model, images[torch.as_tensor(picked)], [cls] * len(picked))
    name, paths = class_names[cls], []
    for i, heatmap in zip(picked, heatmaps, strict=True):
        p = float(probs[i, cls])
        rgb = overlay(images[i, channel].numpy(), heatmap, f"{patient} slice {i}: Grad-CAM {name}, p={p:.2f}")
        paths.append(atomic_write_bytes(out_dir / f"slice{i:03d}_{_safe(name)}_p{p:.2f}.png", png_bytes(rgb)))
    return paths
