"""The PyTorch side of prediction: load a checkpoint, read patients in DataLoader workers, slice probabilities
(fp32, or bf16 autocast where the hardware has it). :mod:`covidct.predict.predictor` imports this module only for
checkpoints, so predicting with an ONNX export never imports torch."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from covidct.data.preprocess import SlicePreprocessor, one_thread_per_worker
from covidct.errors import ConfigError, DataError
from covidct.hardware import cpu_bf16
from covidct.models.checkpoint import read_checkpoint
from covidct.models.classifier import SliceClassifier
from covidct.patients.parameters import ALL_SLICES, VOTE_KEYS, VoteParameters
from covidct.patients.rules import check_vote_settings
from covidct.predict.settings import PredictorSettings, vote_fields
from covidct.predict.test_sets import read_patient

log = logging.getLogger("covidct.predict.predictor")

#: predict.py precision=...: fp32 (the default), bf16 (autocast; CPUs with AVX-512 BF16 or AMX, or a GPU) or auto
#: (bf16 where the hardware has it natively, else fp32)
PRECISIONS = ("fp32", "bf16", "auto")


def load_checkpoint(path: str | Path, device: torch.device) -> tuple[SliceClassifier, PredictorSettings]:
    """Model and settings from a Lightning checkpoint, loaded weights-only (no arbitrary pickle)."""
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    hp.pop("loss", None)  # what the training loss was (recorded for the reader); not needed to predict
    hp.pop("class_counts", None)  # older checkpoints
    pre = hp.pop("preprocessing")
    vote = checkpoint_vote(ckpt, pre, path)
    hp["pretrained"] = False  # the checkpoint brings the trained weights
    model = SliceClassifier(**hp)
    model.load_state_dict(ckpt["state_dict"])
    model.eval().to(device)
    settings = PredictorSettings(
        windows=pre["windows"],
        image_size=int(pre["image_size"]),
        class_names=list(hp["class_names"]),
        **vote_fields(vote),
        lung_crop=bool(pre.get("lung_crop", False)),  # older checkpoints: no crop
    )
    return model, settings


def checkpoint_vote(ckpt: dict[str, Any], preprocessing: dict[str, Any], path: str | Path) -> VoteParameters:
    """The vote rule, parameters and MIL head a checkpoint records (older checkpoints: the defaults, and every
    slice votes in weighted_center's window, as before it had one); checked
    (:func:`covidct.patients.rules.check_vote_settings`) before any slice is read."""
    state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("PatientVoteCallback")), {})
    defaults = VoteParameters(preprocessing.get("vote_rule", "majority"), window_slices=ALL_SLICES)
    recorded = defaults.to_sidecar() | {key: state[key] for key in VOTE_KEYS if key in state and key != "rule"}
    check_vote_settings(
        **recorded,
        source=f"ckpt_path={path}",
        fix="its vote settings are not ones training writes; predict with the checkpoint as train.py saved it",
        error=DataError,
    )
    return VoteParameters.from_state(state, defaults)


class PatientFolders(Dataset):
    """Reads and preprocesses one whole patient per item (run in DataLoader workers); ``images`` is a
    uint8 (N, C, S, S) tensor (see :func:`covidct.predict.test_sets.read_patient` for the other keys)."""

    def __init__(self, folders: list[Path], preprocessor: SlicePreprocessor) -> None:
        self.folders, self.preprocessor = folders, preprocessor

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, i: int) -> dict[str, Any]:
        one_thread_per_worker()
        item = read_patient(self.folders[i], self.preprocessor)
        if "images" in item:
            item["images"] = torch.from_numpy(item["images"])
        return item


def iterate_patients(folders: list[Path], preprocessor: SlicePreprocessor, num_workers: int) -> Iterator[dict]:
    """Preprocessed patients in order; reading overlaps with the caller's compute when workers > 0."""
    loader = DataLoader(
        PatientFolders(folders, preprocessor),
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
    )
    yield from loader


def bf16_supported(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` runs bfloat16 natively, what it has or lacks, in words)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bfloat16"
    return cpu_bf16()


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to predict in: ``requested`` (fp32 | bf16) when ``device`` has it; bf16 on hardware
    without native bfloat16 falls back to fp32 with a warning."""
    if requested not in PRECISIONS:
        hint = " (int8: export a quantized ONNX model, python -m covidct.predict.export ... quantize=int8)"
        raise ConfigError(
            f"precision={requested!r}: use fp32, bf16 or auto with a checkpoint{hint if requested == 'int8' else ''}"
        )
    if requested == "auto":
        ok, what = bf16_supported(device)
        log.info("precision=auto: %s, so %s", what, "bf16" if ok else "fp32")
        return "bf16" if ok else "fp32"
    if requested == "bf16":
        ok, what = bf16_supported(device)
        if not ok:
            log.warning("precision=bf16: %s; predicting in fp32 instead", what)
            return "fp32"
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` for ``precision`` bf16; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def slice_probabilities(
    model: SliceClassifier, images: torch.Tensor, batch_size: int, tta: bool = False, precision: str = "fp32"
) -> np.ndarray:
    """uint8 (N, C, S, S) -> float32 (N, classes) softmax probabilities, in batches; with ``tta`` the mean
    of the probabilities of each slice and its horizontal flip (test-time augmentation, 2 forward passes);
    ``precision`` bf16: under bfloat16 autocast (probabilities still float32)."""
    device = next(model.parameters()).device
    images = torch.as_tensor(images)

    def probs(batch: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            logits = model(batch)
        return logits.float().softmax(1)

    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].to(device, non_blocking=True)
        p = (probs(batch) + probs(batch.flip(-1))) / 2 if tta else probs(batch)
        out.append(p.cpu())
    return torch.cat(out).numpy()


@torch.inference_mode()
def slice_probabilities_and_embeddings(
    model: SliceClassifier, images: torch.Tensor, batch_size: int, tta: bool = False, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, S, S) -> float32 (N, classes) softmax probabilities and float32 (N, D) embeddings
    (:meth:`SliceClassifier.features`) from the same forward passes; ``tta`` and ``precision`` as in
    :func:`slice_probabilities` (both averaged over each slice and its flip)."""
    device = next(model.parameters()).device
    images = torch.as_tensor(images)
    probs, embeddings = [], []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].to(device, non_blocking=True)
        with autocast(device, precision):
            passes = [model.forward_with_features(b) for b in ((batch, batch.flip(-1)) if tta else (batch,))]
        probs.append(sum(logits.float().softmax(1) for logits, _ in passes).cpu() / len(passes))
        embeddings.append(sum(features.float() for _, features in passes).cpu() / len(passes))
    return torch.cat(probs).numpy(), torch.cat(embeddings).numpy()


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
