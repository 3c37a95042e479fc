"""Patient-level prediction on new DICOM folders with a trained checkpoint (SPGC style: one CSV per test folder).

Accepted inputs:

* one patient folder (DICOM files directly inside)         -> one test set named after the folder;
* a folder of patient folders (one test set)                -> one CSV;
* a folder of test sets (e.g. ``SPGC-Test1/T1-001/*.dcm``)  -> one CSV per test set.

Preprocessing (windows, image size), class names and the vote rule come from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.misc import is_dicom
from torch.utils.data import DataLoader, Dataset

from covidct import NORMAL_CLASS
from covidct.aggregation import GatedAttentionMIL, mil_from_state
from covidct.aggregation import predict as mil_predict
from covidct.calibration import apply_temperature
from covidct.checkpoint import read_checkpoint
from covidct.data.dicom import IGNORED_NAMES, entry_kind, one_line
from covidct.data.labels import INFECTION_CLASSES
from covidct.data.preprocess import SlicePreprocessor, one_thread_per_worker, parse_windows, read_preprocessed
from covidct.errors import ConfigError, CovidCTError, DataError
from covidct.io import atomic_write_csv, atomic_write_text
from covidct.models.classifier import SliceClassifier
from covidct.voting import (
    CENTER_SLICES,
    LEARNED_RULES,
    SLICE_THRESHOLD,
    TOP_K,
    WINDOW_SLICES,
    check_vote_settings,
    vote,
)

log = logging.getLogger(__name__)


@dataclass
class TestSet:
    """A named group of patient folders whose predictions go into one CSV."""

    name: str
    patients: list[Path]


def _has_dicom(folder: Path) -> bool:
    """True if any file directly in ``folder`` is DICOM (checks the 'DICM' preamble, stops at the first)."""
    return any(entry_kind(e) == "file" and e.name not in IGNORED_NAMES and is_dicom(e.path) for e in os.scandir(folder))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_test_sets(input_path: str | Path) -> list[TestSet]:
    """Test sets under ``input_path`` (see the module docstring). Errors before any work is done."""
    root = Path(input_path)
    if not root.exists():
        raise DataError(f"input={root}: does not exist.")
    if not root.is_dir():
        raise DataError(f"input={root}: is a file; give a patient folder or a folder of patient folders.")
    if _has_dicom(root):
        return [TestSet(root.name, [root])]
    # every subfolder of a test set is a patient: one without a readable slice gets a row saying why
    children = _subfolders(root)
    if any(_has_dicom(c) for c in children):
        return [TestSet(root.name, children)]
    sets = []
    for child in children:
        patients = _subfolders(child)
        if any(_has_dicom(p) for p in patients):
            sets.append(TestSet(child.name, patients))
        else:
            log.warning("input: %s holds no patient folder with DICOM files; not a test set, skipped", child)
    if not sets:
        raise DataError(
            f"input={root}: no DICOM file in it, its subfolders or their subfolders. Expected a patient folder "
            "of DICOM slices, a folder of patient folders, or a folder of test sets."
        )
    return sets


@dataclass
class PredictorSettings:
    """What prediction takes from the checkpoint (and what the user overrode)."""

    windows: list
    image_size: int
    class_names: list[str]
    vote_rule: str
    tau: float
    k: int = TOP_K  # topk_mean
    center_slices: int = CENTER_SLICES  # weighted_center
    window_slices: int = WINDOW_SLICES  # weighted_center
    slice_threshold: float = SLICE_THRESHOLD  # threshold
    threshold_tau: float = 0.5  # threshold
    temperature: float = 1.0  # divides the logits (temperature scaling fitted in training)
    tta: bool = False  # predict.py tta=true: mean of each slice's and its horizontal flip's probabilities
    lung_crop: bool = False  # crop each series to its lungs, as the model was trained
    mil_head: GatedAttentionMIL | None = None  # vote_rule mil: the head fitted on the validation patients
    overridden: dict[str, Any] = field(default_factory=dict)

    def vote_parameters(self) -> dict[str, Any]:
        """The keyword arguments of :func:`covidct.voting.vote` besides the rule and tau."""
        return {
            "k": self.k,
            "center_slices": self.center_slices,
            "window_slices": self.window_slices,
            "slice_threshold": self.slice_threshold,
            "threshold_tau": self.threshold_tau,
        }


def load_checkpoint(path: str | Path, device: torch.device) -> tuple[SliceClassifier, PredictorSettings]:
    """Model and settings from a Lightning checkpoint, loaded weights-only (no arbitrary pickle)."""
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    hp.pop("loss", None)  # what the training loss was (recorded for the reader); not needed to predict
    hp.pop("class_counts", None)  # older checkpoints
    pre = hp.pop("preprocessing")
    hp["pretrained"] = False  # the checkpoint brings the trained weights
    model = SliceClassifier(**hp)
    model.load_state_dict(ckpt["state_dict"])
    model.eval().to(device)
    vote_state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("PatientVoteCallback")), {})
    settings = PredictorSettings(
        windows=pre["windows"],
        image_size=int(pre["image_size"]),
        class_names=list(hp["class_names"]),
        vote_rule=pre.get("vote_rule", "majority"),
        tau=float(vote_state.get("tau", 0.5)),
        k=int(vote_state.get("k", TOP_K)),  # older checkpoints: the defaults
        center_slices=int(vote_state.get("center_slices", CENTER_SLICES)),
        # checkpoints from before the winner's 80-slice window: every slice voted
        window_slices=int(vote_state.get("window_slices", 1_000_000)),
        slice_threshold=float(vote_state.get("slice_threshold", SLICE_THRESHOLD)),
        threshold_tau=float(vote_state.get("threshold_tau", 0.5)),
        temperature=float(vote_state.get("temperature", 1.0)),  # older checkpoints: not calibrated
        lung_crop=bool(pre.get("lung_crop", False)),  # older checkpoints: no crop
        mil_head=mil_from_state(vote_state["mil"]) if vote_state.get("mil") else None,  # older: none
    )
    return model, settings


class PatientFolders(Dataset):
    """Reads and preprocesses one whole patient per item (run in DataLoader workers)."""

    def __init__(self, folders: list[Path], preprocessor: SlicePreprocessor) -> None:
        self.folders, self.preprocessor = folders, preprocessor

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, i: int) -> dict[str, Any]:
        one_thread_per_worker()
        folder = self.folders[i]
        try:
            series, _ = read_preprocessed(folder, self.preprocessor)  # a series not cropped is logged there
        except CovidCTError as exc:
            return {"folder": folder, "error": one_line(exc)}
        return {
            "folder": folder,
            "images": torch.from_numpy(np.stack(series.slices)),
            "locations": series.locations,
            "ranks": series.ranks,
            "order_key": series.order_key,
            "order_note": series.order_note,
            "skipped": [f"{s.path.name}: {s.reason}" for s in series.skipped],
        }


def iterate_patients(folders: list[Path], preprocessor: SlicePreprocessor, num_workers: int) -> Iterator[dict]:
    """Preprocessed patients in order; reading overlaps with the caller's compute when workers > 0."""
    loader = DataLoader(
        PatientFolders(folders, preprocessor),
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
    )
    yield from loader


@torch.inference_mode()
def slice_probabilities(model: SliceClassifier, images: torch.Tensor, batch_size: int, tta: bool = False) -> np.ndarray:
    """uint8 (N, C, S, S) -> float32 (N, classes) softmax probabilities, in batches; with ``tta`` the mean
    of the probabilities of each slice and its horizontal flip (test-time augmentation, 2 forward passes)."""
    device = next(model.parameters()).device

    def probs(batch: torch.Tensor) -> torch.Tensor:
        return model(batch).float().softmax(1)

    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].to(device, non_blocking=True)
        p = (probs(batch) + probs(batch.flip(-1))) / 2 if tta else probs(batch)
        out.append(p.cpu())
    return torch.cat(out).numpy()


@torch.inference_mode()
def slice_probabilities_and_embeddings(
    model: SliceClassifier, images: torch.Tensor, batch_size: int, tta: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, S, S) -> float32 (N, classes) softmax probabilities and float32 (N, D) embeddings
    (:meth:`SliceClassifier.features`) from the same forward passes; ``tta`` as in :func:`slice_probabilities`
    (both averaged over each slice and its flip)."""
    device = next(model.parameters()).device
    probs, embeddings = [], []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].to(device, non_blocking=True)
        passes = [model.forward_with_features(b) for b in ((batch, batch.flip(-1)) if tta else (batch,))]
        probs.append(sum(logits.float().softmax(1) for logits, _ in passes).cpu() / len(passes))
        embeddings.append(sum(features.float() for _, features in passes).cpu() / len(passes))
    return torch.cat(probs).numpy(), torch.cat(embeddings).numpy()


def predict_test_set(
    test_set: TestSet,
    model: SliceClassifier,
    settings: PredictorSettings,
    output_dir: Path,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
    cam_slices: int = 0,
) -> tuple[Path, Path]:
    """Write ``<name>.csv`` (one row per patient) and ``<name>_slices.csv`` into ``output_dir``; with
    ``cam_slices`` > 0 also Grad-CAM PNGs of each patient's most decisive slices in ``<name>_cam/<patient>/``."""
    from tqdm import tqdm

    if cam_slices:  # pytorch-grad-cam imports matplotlib, scipy and scikit-learn: only when asked
        from covidct.cam import lung_channel, write_patient_cams
    pre = SlicePreprocessor(parse_windows(settings.windows), settings.image_size, settings.lung_crop)
    names = settings.class_names
    patient_rows, slice_rows = [], []
    items = iterate_patients(test_set.patients, pre, num_workers)
    for item in tqdm(items, total=len(test_set.patients), desc=test_set.name, disable=not progress, unit="patient"):
        pid = item["folder"].name
        if "error" in item:
            log.error("%s: %s", pid, item["error"])
            patient_rows.append([pid, "", *[""] * len(names), "", 0, "", "", "error", item["error"]])
            continue
        embeddings = None
        if settings.vote_rule in LEARNED_RULES:  # mil: the checkpoint's head on the slice embeddings
            probs, embeddings = slice_probabilities_and_embeddings(model, item["images"], batch_size, settings.tta)
        else:
            probs = slice_probabilities(model, item["images"], batch_size, settings.tta)
        probs = apply_temperature(probs, settings.temperature)
        if embeddings is not None:
            pred = int(mil_predict(settings.mil_head, [embeddings])[0])
        else:
            pred = vote(probs, settings.vote_rule, settings.tau, **settings.vote_parameters())
        infected = float(np.mean(probs.argmax(1) != NORMAL_CLASS))
        mean_probs = np.round(probs.mean(0, dtype=np.float64), 4).tolist()
        if cam_slices:
            write_patient_cams(
                model,
                item["images"],
                probs,
                pred,
                names,
                output_dir / f"{test_set.name}_cam" / pid,
                cam_slices,
                lung_channel(settings.windows),
                pid,
            )
        detail = "; ".join(([item["order_note"]] if item["order_note"] else []) + item["skipped"])
        patient_rows.append(
            [
                pid,
                names[pred],
                *mean_probs,
                round(infected, 4),
                len(probs),
                len(item["skipped"]),
                item["order_key"],
                "ok",
                detail,
            ]
        )
        slice_rows += [
            [pid, rank, loc, *np.round(p.astype(np.float64), 4).tolist()]
            for rank, loc, p in zip(item["ranks"], item["locations"], probs, strict=True)
        ]
    patients_csv = atomic_write_csv(
        output_dir / f"{test_set.name}.csv",
        [
            "patient",
            "predicted_class",
            *[f"prob_{n}" for n in names],
            "infected_fraction",
            "n_slices",
            "n_skipped",
            "order_key",
            "status",
            "detail",
        ],
        patient_rows,
    )
    slices_csv = atomic_write_csv(
        output_dir / f"{test_set.name}_slices.csv",
        ["patient", "slice_index", "slice_location", *[f"prob_{n}" for n in names]],
        slice_rows,
    )
    return patients_csv, slices_csv


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda but no CUDA GPU is available here (or torch is a CPU build): use device=cpu or device=auto"
        )
    return torch.device(name)


def check_cam(cfg) -> int:
    """Slices per patient to draw Grad-CAM overlays of: ``cam_slices`` when ``cam=true``, else 0."""
    if not cfg.get("cam", False):
        return 0
    n = cfg.get("cam_slices", 4)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"cam_slices must be an integer >= 1 (with cam=true), got {n!r}")
    return n


def run_prediction(cfg) -> list[Path]:
    """Everything ``predict.py`` does: check input, load the checkpoint, predict each test set."""
    test_sets = find_test_sets(cfg.input)
    chosen = cfg.get("vote") or {}  # vote=<rule>: that file's rule and parameters override the checkpoint's
    rule, k, center_slices, window_slices = (chosen.get(key) for key in ("rule", "k", "center_slices", "window_slices"))
    check_vote_settings(rule, None, k, center_slices, window_slices, cfg.get("slice_threshold"))
    if cfg.tau is not None and not 0.0 <= float(cfg.tau) <= 1.0:
        raise ConfigError(f"tau must be in [0, 1] or null (the checkpoint's), got {cfg.tau}")
    cam_slices = check_cam(cfg)
    device = pick_device(cfg.device)
    model, settings = load_checkpoint(cfg.ckpt_path, device)
    if tuple(settings.class_names) == INFECTION_CLASSES:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a stage-1 infected-slice model (classes {list(INFECTION_CLASSES)}); it "
            "calls slices, not patients. Use it for pseudo-labels (python -m covidct.pseudo_label), and predict "
            "with the stage-2 checkpoint"
        )
    overrides = (
        ("vote_rule", rule),
        ("tau", cfg.tau),
        ("threshold_tau", cfg.tau),
        ("slice_threshold", cfg.get("slice_threshold")),
        ("temperature", None if cfg.get("calibration", True) else 1.0),
        ("k", k),
        ("center_slices", center_slices),
        ("window_slices", window_slices),
    )
    for attr, value in overrides:
        if value is not None:
            settings.overridden[attr] = {"checkpoint": getattr(settings, attr), "used": value}
            setattr(settings, attr, value)
    if settings.vote_rule in LEARNED_RULES and settings.mil_head is None:
        raise ConfigError(
            f"vote rule {settings.vote_rule}: ckpt_path={cfg.ckpt_path} holds no fitted MIL head (a checkpoint from "
            "before the mil rule, or of a run without validation patients); choose another vote=<rule>"
        )
    settings.tta = bool(cfg.get("tta", False))
    output_dir = Path(cfg.paths.output_dir)
    outputs = []
    for test_set in test_sets:
        outputs += predict_test_set(
            test_set, model, settings, output_dir, cfg.batch_size, cfg.num_workers, cfg.progress, cam_slices
        )
    record = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "input": str(Path(cfg.input).resolve()),
        "device": str(device),
        "test_sets": {t.name: len(t.patients) for t in test_sets},
        "cam": cam_slices > 0,
        "cam_slices": cam_slices,
        **{key: value for key, value in settings.__dict__.items() if key != "mil_head"},
        "mil_head": settings.mil_head is not None,
    }
    outputs.append(atomic_write_text(output_dir / "prediction.json", json.dumps(record, indent=1)))
    return outputs
