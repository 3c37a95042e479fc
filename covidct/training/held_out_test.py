"""The test patients of a fixed split (``data.split_file``), scored once after training with the best
checkpoint, through predict.py's own path (the checkpoint's weights, temperature and vote parameters),
with the validation epochs' metrics: every rule's patient metrics and the slice accuracy and macro F1.

Not ``trainer.test``: the test figure must be what predict.py would give for those patients (the best
checkpoint's own vote state, calibration and MIL head), not the state of the callbacks at the last epoch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from covidct.contracts import CLASS_NAMES, TEST_PATIENTS_FILE, rule_metric
from covidct.data.datamodule import CTDataModule
from covidct.io import atomic_write_csv
from covidct.patients.calibration import apply_temperature
from covidct.patients.metrics import patient_metrics
from covidct.patients.mil_features import slice_features
from covidct.patients.rules import LEARNED_RULES, VOTE_RULES, vote_with
from covidct.predict.predictor import mil_decision
from covidct.predict.torch_backend import load_checkpoint, slice_probabilities_and_embeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestScores:
    """Every rule's patient metrics on the test patients (``test_rules/<rule>/<metric>``), the configured
    rule's under ``test/patient/acc``, and ``test/slice_acc`` / ``test/slice_f1_macro`` over the test slices
    with a known target (as ``val/slice_acc`` / ``val/slice_f1_macro``; absent when none is known)."""

    checkpoint: str
    n_patients: int
    metrics: dict[str, float]


def score_test_patients(ckpt_path: str, datamodule: CTDataModule, rule: str, output_dir: Path) -> TestScores:
    """Vote every rule on each test patient's slices with the checkpoint (``mil`` too when it holds a
    fitted head), write ``test_patients.csv`` (patient, truth, every rule's vote) into ``output_dir``, and
    return the metrics."""
    model, settings = load_checkpoint(ckpt_path, torch.device("cpu"))
    cache, parameters = datamodule.cache, settings.vote
    assert cache is not None
    rules = VOTE_RULES + (LEARNED_RULES if settings.mil_head is not None else ())
    votes, labels, rows = {r: [] for r in rules}, [], []
    slice_probs, slice_targets = [], []
    for i in map(int, datamodule.test_patients):
        p = cache.patients[i]
        images = torch.from_numpy(np.array(cache.images[p.offset : p.offset + p.n_slices]))  # (n, C, S, S) head first
        probs, embeddings = slice_probabilities_and_embeddings(model, images, 64)
        probs = apply_temperature(probs, settings.temperature)
        slice_probs.append(probs)
        slice_targets.append(datamodule.targets[p.offset : p.offset + p.n_slices])
        mine = {r: vote_with(replace(parameters, rule=r), probs) for r in VOTE_RULES}
        if settings.mil_head is not None:  # what predict.py gives the head: its features of the calibrated slices
            mine["mil"] = mil_decision(
                settings.mil_head, slice_features(settings.mil_head.slice_features, probs, embeddings)
            )
        for r, c in mine.items():
            votes[r].append(c)
        labels.append(int(datamodule.patient_labels[i]))
        rows.append([p.patient_id, CLASS_NAMES[labels[-1]], *(CLASS_NAMES[mine[r]] for r in rules)])
    metrics: dict[str, Any] = {}
    for r in rules:
        m = patient_metrics(np.asarray(votes[r]), np.asarray(labels))
        metrics |= {rule_metric(r, k, "test"): float(v) for k, v in m.items() if k != "confusion"}
    metrics["test/patient/acc"] = metrics[rule_metric(rule, "acc", "test")]
    if slice_probs:
        metrics |= slice_metrics(np.concatenate(slice_probs), np.concatenate(slice_targets))
    atomic_write_csv(output_dir / TEST_PATIENTS_FILE, ["patient", "true_class", *(f"{r}_vote" for r in rules)], rows)
    log.info(
        "Test patients (%d, %s): accuracy %.3f with vote=%s", len(labels), ckpt_path, metrics["test/patient/acc"], rule
    )
    return TestScores(ckpt_path, len(labels), metrics)


def slice_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """``test/slice_acc`` and ``test/slice_f1_macro`` (micro accuracy and macro F1, torchmetrics, as the
    validation epochs log them) of ``probs`` (N, C) over the slices whose ``targets`` (N,) is known (>= 0)."""
    known = np.asarray(targets) >= 0
    if not known.any():
        return {}
    p = torch.as_tensor(probs[known])
    t = torch.as_tensor(np.asarray(targets)[known], dtype=torch.long)
    c = p.shape[1]
    return {
        "test/slice_acc": float(multiclass_accuracy(p, t, num_classes=c, average="micro")),
        "test/slice_f1_macro": float(multiclass_f1_score(p, t, num_classes=c, average="macro")),
    }
