"""Stage-1 pseudo-labels: python -m covidct.training.pseudo_label ckpt_path=<stage-1 checkpoint> input=<dataset root>

Reads the dataset with the checkpoint's preprocessing (through the slice cache stage 1 built), scores
every slice of each sick patient without radiologist slice labels with the stage-1 infected-vs-clean
model, and writes the slices above the threshold as a label array in the dataset's own convention
(see :mod:`covidct.data.pseudo_labels`). Nothing is written for Normal or radiologist-labelled patients.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from covidct.cli import exit_if_keys_missing
from covidct.config import register_resolvers
from covidct.contracts import CLASS_NAMES, CONF_DIR, NORMAL_CLASS
from covidct.errors import ConfigError, CovidCTError

log = logging.getLogger("pseudo_label")
register_resolvers()


def checkpoint_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage1_training_patients(ckpt: dict[str, Any], source: str) -> list[str]:
    """The patients whose slices stage 1 trained on, from the data module's state in the checkpoint."""
    state = ckpt.get("CTDataModule") or {}
    if "trained_on" not in state:
        raise ConfigError(
            f"ckpt_path={source}: the checkpoint does not record its training patients, so stage 2 could not "
            "check that none of its validation patients leaks into training; retrain stage 1 with this covidct"
        )
    return list(state["trained_on"])


def youden_threshold(cache, radiologist: dict, validated_on: list[str], p_infected, source: str) -> tuple[float, str]:
    """``threshold=auto``: the P(infected) that maximises Youden's J (sensitivity + specificity - 1) on the
    labelled slices of stage 1's *validation* patients (radiologist-labelled sick patients' slices, and
    every slice of its Normal validation patients as clean), never on the patients it trained on.
    Returns (threshold, how it was chosen); refuses when those slices lack either class."""
    from torchmetrics.functional.classification import binary_roc

    scores, truth = [], []
    for p in cache.patients:
        if p.patient_id not in validated_on or (p.label != NORMAL_CLASS and p.patient_id not in radiologist):
            continue
        ranks = cache.slice_index[p.offset : p.offset + p.n_slices]
        row = radiologist.get(p.patient_id)
        labels = np.zeros(p.n_slices, dtype=np.int64) if row is None else np.asarray(row)[ranks].astype(np.int64)
        scores.append(p_infected(p))
        truth.append(labels)
    y = np.concatenate(truth) if truth else np.zeros(0, dtype=np.int64)
    if not (y == 1).any() or not (y == 0).any():
        raise ConfigError(
            f"threshold=auto: stage 1's validation patients ({len(validated_on)} in ckpt_path={source}) have no "
            f"{'infected' if not (y == 1).any() else 'clean'} labelled slice to choose a threshold on; give "
            "threshold=<P(infected)>"
        )
    fpr, tpr, thresholds = binary_roc(torch.as_tensor(np.concatenate(scores)), torch.as_tensor(y))
    best = int(torch.argmax(tpr - fpr))
    # the ROC calls a slice positive at score >= threshold, pseudo-labels at score > threshold: one float32 step down
    threshold = float(np.nextafter(np.float32(thresholds[best].item()), np.float32(0.0)))
    sens, spec = float(tpr[best]), 1.0 - float(fpr[best])
    how = (
        f"auto: Youden's J on {len(y)} labelled slices of stage 1's validation patients "
        f"(sensitivity {sens:.3f}, specificity {spec:.3f})"
    )
    return threshold, how


def pseudo_label(cfg: DictConfig) -> Path:
    """Write the pseudo-label folder into ``cfg.paths.output_dir``; returns the label array's path."""
    from covidct.data.cache import build_or_load_cache
    from covidct.data.labels import INFECTED, INFECTION_CLASSES
    from covidct.data.layout import discover_covid_ct_md
    from covidct.data.preprocess import SlicePreprocessor, parse_windows
    from covidct.data.pseudo_labels import preprocessing_of, write_pseudo_labels
    from covidct.models.checkpoint import read_checkpoint
    from covidct.predict.torch_backend import load_checkpoint, slice_probabilities

    source = str(cfg.ckpt_path)
    ckpt = read_checkpoint(source)
    hp = ckpt["hyper_parameters"]
    if tuple(hp.get("class_names", CLASS_NAMES)) != INFECTION_CLASSES:
        raise ConfigError(
            f"ckpt_path={source}: a model of the classes {list(hp.get('class_names', CLASS_NAMES))}, not a stage-1 "
            f"infected-slice model {list(INFECTION_CLASSES)}; train one with python train.py stage=infection"
        )
    threshold = cfg.threshold if cfg.threshold is not None else hp.get("infection_threshold", 0.5)
    if threshold != "auto" and not (isinstance(threshold, int | float) and 0.0 < threshold < 1.0):
        raise ConfigError(f"threshold must be in (0, 1), auto or null, got {threshold!r}")
    trained_on = stage1_training_patients(ckpt, source)
    validated_on = list((ckpt.get("CTDataModule") or {}).get("val_patients", []))
    pre_hp = hp["preprocessing"]
    pre = SlicePreprocessor(parse_windows(pre_hp["windows"]), int(pre_hp["image_size"]), bool(pre_hp.get("lung_crop")))
    del ckpt
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = auto if cfg.device == "auto" else torch.device(cfg.device)
    model, _ = load_checkpoint(source, device)

    patients = discover_covid_ct_md(cfg.input, cfg.slice_labels_file)
    cache = build_or_load_cache(patients, pre, cfg.paths.cache_dir, cfg.cache_workers)
    radiologist = {p.patient_id: p.slice_labels for p in patients if p.slice_labels is not None}

    def p_infected(p) -> np.ndarray:
        """(n,) float32 P(infected) of each cached slice of patient ``p``, head first."""
        images = torch.from_numpy(np.array(cache.images[p.offset : p.offset + p.n_slices]))  # (n, C, S, S) uint8
        return slice_probabilities(model, images, cfg.batch_size)[:, INFECTED]

    threshold_source = "given" if cfg.threshold is not None else "the checkpoint's model.infection_threshold"
    if threshold == "auto":
        threshold, threshold_source = youden_threshold(cache, radiologist, validated_on, p_infected, source)
    threshold = float(threshold)
    log.info("threshold %.3f (%s)", threshold, threshold_source)
    written, summary = [], {}
    for p in cache.patients:
        if p.label == NORMAL_CLASS or p.patient_id in radiologist:
            continue
        infected = p_infected(p)
        row = np.zeros(max(p.series_length, 1), dtype=np.int8)
        row[cache.slice_index[p.offset : p.offset + p.n_slices][infected > threshold]] = 1
        written.append((p.patient_id, p.label, row))
        summary[p.patient_id] = {
            "class": CLASS_NAMES[p.label],
            "series_length": p.series_length,
            "slices": p.n_slices,
            "median_p_infected": round(float(np.median(infected)), 4),
        }
        log.info("%s (%s): %d of %d slices infected", p.patient_id, CLASS_NAMES[p.label], row.sum(), p.n_slices)
    if not written:
        raise ConfigError(
            f"input={cfg.input}: every sick patient has radiologist slice labels; nothing to pseudo-label "
            "(train stage 2 with data.label_mode=paper)"
        )
    meta = {
        "threshold": threshold,
        "threshold_source": threshold_source,
        "checkpoint": str(Path(source).resolve()),
        "checkpoint_sha256": checkpoint_sha256(Path(source)),
        "dataset_root": str(Path(cfg.input).resolve()),
        "preprocessing": preprocessing_of(pre),
        "stage1_train_patients": trained_on,
        "patients": summary,
    }
    return write_pseudo_labels(Path(cfg.paths.output_dir), written, meta)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pseudo_label")
def main(cfg: DictConfig) -> None:
    exit_if_keys_missing(cfg, "pseudo_label", log)
    try:
        path = pseudo_label(cfg)
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message says it all)
    log.info("wrote %s\nstage 2: python train.py data.label_mode=pseudo data.pseudo_labels=%s", path, path)


if __name__ == "__main__":
    from covidct.cli import exit_on_typo

    exit_on_typo("pseudo_label")
    main()
