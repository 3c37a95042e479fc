"""Grad-CAM of the run report's patient calls: every wrong call (up to a cap) and a few right ones per class,
each on the slices that decided it, from the best checkpoint's model.

Which slices, and the Grad-CAM of which class (red: where the model saw that class):

* a sick call (COVID-19, CAP): the slices with the highest probability of the called class; its Grad-CAM;
* a Normal call: the slices with the highest infected probability 1 - P(Normal), the closest the patient came
  to a sick call; the Grad-CAM of each slice's more probable infected class (the evidence that was not enough).

The probabilities are those the vote used (:attr:`RunReport.slice_scores`, after temperature scaling where it
was fitted; a temperature changes no Grad-CAM map). The images carry no text: the page captions them
(:func:`slice_caption`), so a pseudonymized copy of the report names no patient.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from covidct.report.cam import cam_pair, grad_cam, png_bytes, target_layer

if TYPE_CHECKING:
    from covidct.report.metrics import RunReport

NORMAL = "Normal"
#: the folder of the Grad-CAM PNGs, in the run folder next to report.html
CAM_DIR = "report_cam"
#: slices per Grad-CAM forward and backward pass (bounds the memory at large inputs)
CAM_BATCH = 16
#: side in px of each half of a slice's image (the slice, the slice with its map): the input resized
PANEL_MIN, PANEL_MAX = 128, 256


@dataclass
class CamSlice:
    """One slice's Grad-CAM: its position in the patient's series (head first, as in the series figure), the
    class whose map it is, the PNG (uint8 RGB [slice | slice with the map], no text), and whether the map is
    flat (one value: a 1x1 target layer at a small input)."""

    position: int
    cam_class: int
    png: bytes
    flat: bool = False


@dataclass
class CamCall:
    """The Grad-CAM slices of one patient call: ``patient`` indexes :attr:`RunReport.patients`."""

    patient: int
    slices: list[CamSlice]


@dataclass
class CallCams:
    """The report's Grad-CAM section: the calls shown (wrong first), the model's input side, each image
    half's side in px and the side of the target layer's map (e.g. 2 for resnet18 at 64 px), which weights made
    the maps (e.g. "the best checkpoint (epoch004.ckpt)"), how many wrong calls the cap left out, and the
    settings (slices per patient, right calls per class)."""

    calls: list[CamCall]
    input_size: int
    panel_size: int
    map_side: int
    weights: str
    wrong_left_out: int
    slices_per_patient: int
    right_per_class: int


def cam_patients(
    labels: np.ndarray, preds: np.ndarray, scores: np.ndarray, right_per_class: int, max_wrong: int
) -> tuple[list[int], list[int], int]:
    """(wrong calls, right calls, wrong calls left out): patient indices. Wrong: every one up to ``max_wrong``,
    in patient order. Right: per true class the ``right_per_class`` most confident (highest mean probability
    ``scores`` float (P, C) of their class). ``labels``, ``preds``: int (P,)."""
    wrong = np.flatnonzero(preds != labels)
    right: list[int] = []
    for c in np.unique(labels):
        mine = np.flatnonzero((preds == labels) & (labels == c))
        right += mine[np.argsort(-scores[mine, c], kind="stable")][:right_per_class].tolist()
    return wrong[:max_wrong].tolist(), right, max(0, len(wrong) - max_wrong)


def decisive(scores: np.ndarray, call: int, normal: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions int (<= k,), Grad-CAM classes int (<= k,)) of the slices that decided a call, from one
    patient's slice probabilities ``scores`` float (n, C): for a sick call the highest P(call), Grad-CAM of
    the call; for a Normal call the highest 1 - P(Normal), Grad-CAM of each slice's likeliest other class."""
    if call != normal:
        positions = np.argsort(-scores[:, call], kind="stable")[:k]
        return positions, np.full(len(positions), call)
    positions = np.argsort(scores[:, normal], kind="stable")[:k]
    infected = scores[positions].copy()
    infected[:, normal] = -np.inf
    return positions, infected.argmax(axis=1)


def panel_size(input_size: int) -> int:
    """Side in px of each half of a slice's PNG: the input side, within [PANEL_MIN, PANEL_MAX]."""
    return int(np.clip(input_size, PANEL_MIN, PANEL_MAX))


def deciding_slices(report: RunReport, patients: list[int], k: int) -> list[tuple[int, int, int, int]]:
    """(patient, position in its series, index into the report's slices, Grad-CAM class) of the ``k``
    slices that decided each of ``patients``' calls (:func:`decisive`), patient by patient."""
    names = list(report.class_names)
    normal = names.index(NORMAL) if NORMAL in names else len(names) - 1
    picks = []
    for i in patients:
        rows = np.flatnonzero(report.slice_patient == i)
        positions, classes = decisive(report.slice_scores[rows], int(report.patient_preds[i]), normal, k)
        picks += [(i, int(p), int(rows[p]), int(c)) for p, c in zip(positions, classes, strict=True)]
    return picks


def call_cams(
    model: nn.Module,
    report: RunReport,
    images: Callable[[np.ndarray], np.ndarray],
    weights: str,
    channel: int = 0,
    slices_per_patient: int = 2,
    right_per_class: int = 2,
    max_wrong: int = 24,
) -> CallCams | None:
    """Grad-CAM of the report's calls (see the module docstring); None when ``slices_per_patient`` is 0 or
    the report has no slices per patient.

    Args:
        model: the classifier (uint8 (B, C, S, S) -> logits), e.g. the best checkpoint's.
        images: report slice indices int (k,) -> their uint8 images (k, C, S, S) (rows of ``slice_scores``).
        weights: which weights ``model`` holds, for the page.
        channel: the input channel shown in grey (the lung window: :func:`~.cam.lung_channel`).
    """
    if slices_per_patient < 1 or report.slice_patient is None or not len(report.patients):
        return None
    labels, preds = np.asarray(report.patient_labels), np.asarray(report.patient_preds)
    wrong, right, left_out = cam_patients(labels, preds, report.patient_scores, right_per_class, max_wrong)
    picks = deciding_slices(report, wrong + right, slices_per_patient)
    if not picks:
        return None
    index = np.asarray([p[2] for p in picks], dtype=np.int64)
    batch = np.asarray(images(index))
    size, sides, heatmaps = panel_size(batch.shape[-1]), [], []
    hook = target_layer(model).register_forward_hook(lambda module, args, out: sides.append(int(out.shape[-1])))
    try:
        for start in range(0, len(picks), CAM_BATCH):
            chunk = slice(start, start + CAM_BATCH)
            heatmaps.append(grad_cam(model, torch.from_numpy(batch[chunk]), [p[3] for p in picks[chunk]])[0])
    finally:
        hook.remove()
    maps = np.concatenate(heatmaps)
    calls: dict[int, CamCall] = {}
    for (i, position, _, cls), image, heatmap in zip(picks, batch, maps, strict=True):
        png = png_bytes(cam_pair(image[channel], heatmap, size), compression=6)
        flat = bool(heatmap.max() - heatmap.min() < 1e-6)
        calls.setdefault(i, CamCall(i, [])).slices.append(CamSlice(position, cls, png, flat))
    shown = list(calls.values())
    return CallCams(shown, int(batch.shape[-1]), size, sides[0], weights, left_out, slices_per_patient, right_per_class)


# ---- captions ---------------------------------------------------------------------------------------------


def call_caption(report: RunReport, call: CamCall) -> tuple[str, str]:
    """(patient, truth, call and verdict; which slices and maps are shown, and why they explain the call)."""
    names, i, n = list(report.class_names), call.patient, len(call.slices)
    truth, called = names[report.patient_labels[i]], names[report.patient_preds[i]]
    head = f"{report.patients[i]}: true {truth}, called {called} ({'wrong' if truth != called else 'right'})"
    if called == NORMAL:
        return head, (
            f"the {n} slice(s) with the highest infected probability 1 - P(Normal), the closest it came to a sick "
            "call; Grad-CAM of each one's likeliest infected class: the evidence that was not enough"
        )
    return head, f"the {n} slice(s) with the highest P({called}), which made the call; Grad-CAM of {called}"


def input_note(cams: CallCams) -> str:
    """``64 px input, upsampled`` (or ``downsampled``, or nothing more when the image is the input's size)."""
    if cams.panel_size == cams.input_size:
        return f"{cams.input_size} px input"
    return f"{cams.input_size} px input, {'upsampled' if cams.panel_size > cams.input_size else 'downsampled'}"


def slice_caption(report: RunReport, cams: CallCams, call: CamCall, s: CamSlice) -> str:
    """One slice's caption: patient, truth, call, slice position, the mapped class's probability (and, for a
    Normal call, the infected probability), and the input size."""
    names, i = list(report.class_names), call.patient
    rows = np.flatnonzero(report.slice_patient == i)
    p = report.slice_scores[rows[s.position]]
    called, cls = names[report.patient_preds[i]], names[s.cam_class]
    probability = f"P({cls}) {p[s.cam_class]:.2f}"
    if called == NORMAL:
        probability = f"P(infected) {1.0 - p[names.index(NORMAL)]:.2f}, {probability}"
    flat = ""
    if s.flat:  # every value 0
        why = f"no region raised the {cls} score"
        flat = f"; flat map: {'the target layer is 1x1 at this input size' if cams.map_side == 1 else why}"
    return (
        f"{report.patients[i]} (true {names[report.patient_labels[i]]}, called {called}), slice {s.position} of "
        f"{len(rows)} (0 = head): {probability}; Grad-CAM of {cls} ({input_note(cams)}{flat})"
    )


# ---- the page's section -------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    """A file-name-safe version of a patient id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def cam_file(k: int, patient: str, s: CamSlice) -> str:
    """The PNG's path relative to the run folder: ``report_cam/<k>_<patient>_slice<position>.png``."""
    return f"{CAM_DIR}/{k:02d}_{_safe(patient)}_slice{s.position:03d}.png"


def cam_files(report: RunReport) -> dict[str, bytes]:
    """Path relative to the run folder -> PNG bytes of every Grad-CAM image of the report (none without)."""
    cams = report.cams
    if cams is None:
        return {}
    return {
        cam_file(k, report.patients[call.patient], s): s.png for k, call in enumerate(cams.calls) for s in call.slices
    }


def cam_intro(report: RunReport) -> str:
    """The sentences over the section: what is shown, from which weights, and how to read the maps."""
    cams = report.cams
    left_out = ""
    if cams.wrong_left_out:
        left_out = f" ({cams.wrong_left_out} more left out: callbacks.run_report.cam_max_wrong)"
    right = f" and up to {cams.right_per_class} right calls per true class (the most confident)"
    return (
        f"Grad-CAM of every wrong call{left_out}{right if cams.right_per_class else ''}, each on the "
        f"{cams.slices_per_patient} slice(s) that decided it, computed with {cams.weights}. A sick call shows the "
        "slices with the highest probability of the called class; a Normal call the slices with the highest "
        "infected probability (the closest it came to a sick call). Each image: left the slice as the model saw "
        "it (lung window), right the same slice with the map; red: where the model found the class named in the "
        f"caption. The map is the backbone's last feature map, {cams.map_side}x{cams.map_side} at "
        f"{cams.input_size} px input, upsampled: coarse. Probabilities are those the vote used."
    )


def cam_groups(report: RunReport) -> list[tuple[str, list[dict]]]:
    """(heading, figures) of the wrong calls and of the right ones; each figure a dict: ``wrong``, ``caption``,
    ``detail`` (:func:`call_caption`) and ``slices`` (each ``caption``, ``alt``, ``png`` base64, ``width`` and
    ``height`` in px)."""
    cams = report.cams
    if cams is None:
        return []
    groups: dict[bool, list[dict]] = {True: [], False: []}
    for call in cams.calls:
        i = call.patient
        wrong = bool(report.patient_labels[i] != report.patient_preds[i])
        slices = [
            {
                "caption": slice_caption(report, cams, call, s),
                "alt": f"slice {s.position} of {report.patients[i]} beside its Grad-CAM of "
                f"{report.class_names[s.cam_class]}",
                "png": base64.b64encode(s.png).decode("ascii"),
                "width": 2 * cams.panel_size,
                "height": cams.panel_size,
            }
            for s in call.slices
        ]
        head, detail = call_caption(report, call)
        groups[wrong].append({"wrong": wrong, "caption": head, "detail": detail, "slices": slices})
    wrong = [(f"Wrong calls ({len(groups[True])} shown)", groups[True])]  # "none" on the page when empty
    return wrong + ([(f"Right calls ({len(groups[False])} shown)", groups[False])] if groups[False] else [])
