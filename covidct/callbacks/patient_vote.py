"""Gather every validation slice's probabilities, vote per patient, log patient-level metrics.

Every rule of :data:`covidct.voting.VOTE_RULES` is scored every validation epoch on the same slice
probabilities, as ``val/patient/<rule>/<metric>`` scalars (any logger) and a per-rule table (rule,
accuracy, macro F1, sensitivity per class): logged at INFO as aligned text and, with a WandbLogger,
as the ``wandb.Table`` ``val/rules`` (rank 0 only). Each patient's slices are voted in position order
(head first: the cache stores them so and ``index`` is the cache row).

``infected_fraction`` (Normal if at most ``tau`` of the slices look infected, else the majority among
the infected slices) tunes ``tau`` on the validation patients; it is stored in the checkpoint (this
callback's state) for prediction. The *reported* accuracy of this rule is leave-one-patient-out: each
patient is scored with a tau tuned on the other validation patients, so the figure is not fitted to
the patient it scores. The other rules have no fitted parameter.

The chosen ``rule`` is also logged as ``val/patient/acc``, the metric checkpointing monitors.
Under DDP the slices of all ranks are gathered and deduplicated by their global index (the
DistributedSampler pads with repeats), so every rank computes the same patient metrics.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_recall,
    multiclass_specificity,
)

from covidct import CLASS_NAMES, NORMAL_CLASS
from covidct.io import atomic_write_csv
from covidct.voting import (
    CENTER_SLICES,
    TOP_K,
    VOTE_RULES,
    PatientVote,
    check_vote_settings,
    deduplicate,
    tune_tau,
    vote_patients,
)

log = logging.getLogger(__name__)
# The patient metrics are computed from all ranks' gathered slices, so every rank logs the same values
# and syncing them would only cost collectives: Lightning's hint to log them with sync_dist is noise.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/patient/",
                        category=PossibleUserWarning)


def leave_one_out_predictions(fractions: np.ndarray, infected_votes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Infected-fraction predictions (P,) where patient i is decided by a tau tuned without it."""
    preds = np.empty(len(labels), dtype=np.int64)
    for i in range(len(labels)):
        others = np.arange(len(labels)) != i
        tau = tune_tau(fractions[others], infected_votes[others], labels[others]) if others.any() else 0.5
        preds[i] = NORMAL_CLASS if fractions[i] <= tau else infected_votes[i]
    return preds


def patient_metrics(preds: np.ndarray, labels: np.ndarray, class_names=CLASS_NAMES) -> dict[str, Any]:
    """Accuracy, macro F1, per-class sensitivity and specificity, confusion matrix (rows = truth)."""
    p, t, c = torch.as_tensor(preds), torch.as_tensor(labels), len(class_names)
    sens = multiclass_recall(p, t, c, average=None)
    spec = multiclass_specificity(p, t, c, average=None)
    metrics: dict[str, Any] = {
        "acc": float(multiclass_accuracy(p, t, c, average="micro")),
        "f1_macro": float(multiclass_f1_score(p, t, c, average="macro")),
    }
    for k, name in enumerate(class_names):
        metrics[f"sensitivity/{name}"] = float(sens[k])
        metrics[f"specificity/{name}"] = float(spec[k])
    metrics["confusion"] = multiclass_confusion_matrix(p, t, c).numpy()
    return metrics


def rules_table(metrics_by_rule: dict[str, dict[str, Any]], class_names=CLASS_NAMES) -> tuple[list[str], list[list]]:
    """Columns and one row per rule: rule, patient accuracy, macro F1, sensitivity of each class
    (``metrics_by_rule``: rule -> :func:`patient_metrics`)."""
    columns = ["rule", "acc", "f1_macro", *[f"sensitivity/{name}" for name in class_names]]
    rows = [[rule, *(float(m[c]) for c in columns[1:])] for rule, m in metrics_by_rule.items()]
    return columns, rows


def format_table(columns: list[str], rows: list[list], marked: str | None = None) -> str:
    """:func:`rules_table` as aligned text, numbers to 3 decimals; rule ``marked`` is starred."""
    header = ["  " + columns[0], *(c.replace("sensitivity/", "sens ") for c in columns[1:])]
    body = [[("* " if r[0] == marked else "  ") + r[0], *(f"{v:.3f}" for v in r[1:])] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True))])
        for line in [header, *body]
    )


class PatientVoteCallback(pl.Callback):
    """Patient-level voting and metrics on the validation set.

    Args:
        rule: one of :data:`~covidct.voting.VOTE_RULES`; drives ``val/patient/acc``.
        tau: fixed infected-fraction threshold; None = tuned on the validation patients.
        output_dir: where ``patients.csv`` of the best epoch is written (None: not written).
        k: ``topk_mean``'s slices averaged per class.
        center_slices: ``weighted_center``'s central slices that count fully.
    """

    def __init__(self, rule: str = "infected_fraction", tau: float | None = None, output_dir: str | None = None,
                 k: int = TOP_K, center_slices: int = CENTER_SLICES):
        check_vote_settings(rule, tau, k, center_slices)
        self.rule, self.fixed_tau, self.k, self.center_slices = rule, tau, k, center_slices
        self.output_dir = Path(output_dir) if output_dir else None
        self.tau = 0.5 if tau is None else float(tau)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_summary: dict[str, float] = {}
        # the best epoch's patients, predictions (chosen rule), confusion (rows = truth) and slices
        self.best_votes: list[PatientVote] = []
        self.best_labels = np.zeros(0, dtype=np.int64)
        self.best_predictions = np.zeros(0, dtype=np.int64)
        self.best_confusion: np.ndarray | None = None
        self.best_slices: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # cache row, patient, probs
        self.rule_table: tuple[list[str], list[list]] = ([], [])  # the last epoch's rules_table
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ---- collection ---------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batches.append((batch["index"].detach(), batch["patient"].detach(), outputs["probs"].detach()))

    def gather(self, trainer: pl.Trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All ranks' (index (N,), patient (N,), probs (N, C)), each slice exactly once."""
        index = torch.cat([b[0] for b in self._batches])
        patient = torch.cat([b[1] for b in self._batches])
        probs = torch.cat([b[2] for b in self._batches])
        if trainer.world_size > 1:  # equal lengths per rank: DistributedSampler pads
            index, patient, probs = (trainer.strategy.all_gather(t) for t in (index, patient, probs))
            index, patient, probs = index.flatten(0, 1), patient.flatten(0, 1), probs.flatten(0, 1)
        index, patient, probs = deduplicate(index, patient, probs)
        return index.cpu().numpy(), patient.cpu().numpy(), probs.cpu().numpy()

    # ---- voting -------------------------------------------------------------------------------
    def vote_all_rules(self, patient: np.ndarray, probs: np.ndarray, patient_labels: np.ndarray) -> tuple:
        """Vote every rule for each patient of the slices ``patient`` (N,) int, ``probs`` (N, C), given
        sorted by cache row (so each patient's slices are head first); ``patient_labels`` (all patients,)
        int. Tunes ``tau`` unless fixed. Returns (votes, labels (P,), {rule: (P,) int predictions})."""
        order = np.argsort(patient, kind="stable")  # keeps each patient's slices in position order
        votes = vote_patients(patient[order], probs[order], self.tau, k=self.k, center_slices=self.center_slices)
        labels = np.asarray(patient_labels)[[int(v.patient) for v in votes]]
        fractions = np.asarray([v.infected_fraction for v in votes])
        infected_votes = np.asarray([v.infected_vote for v in votes])
        if self.fixed_tau is None:
            self.tau = tune_tau(fractions, infected_votes, labels)
            honest = leave_one_out_predictions(fractions, infected_votes, labels)
        else:
            honest = np.where(fractions <= self.tau, NORMAL_CLASS, infected_votes)
        for v in votes:
            v.infected_fraction_pred = NORMAL_CLASS if v.infected_fraction <= self.tau else v.infected_vote
            v.rule_votes["infected_fraction"] = v.infected_fraction_pred
        predictions = {rule: np.asarray([v.rule_votes[rule] for v in votes]) for rule in VOTE_RULES}
        predictions["infected_fraction"] = honest
        return votes, labels, predictions

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._batches:
            return
        dm = trainer.datamodule
        index, patient, probs = self.gather(trainer)
        votes, labels, predictions = self.vote_all_rules(patient, probs, dm.patient_labels)
        for v in votes:
            v.patient = dm.patient_ids[int(v.patient)]
        metrics_by_rule = {rule: patient_metrics(preds, labels) for rule, preds in predictions.items()}
        confusion = metrics_by_rule[self.rule]["confusion"]
        summary = {f"val/patient/{rule}/{k}": v for rule, m in metrics_by_rule.items()
                   for k, v in m.items() if k != "confusion"}
        summary["val/patient/acc"] = summary[f"val/patient/{self.rule}/acc"]
        summary["val/patient/tau"] = self.tau
        tuned = np.asarray([v.infected_fraction_pred for v in votes])
        summary["val/patient/infected_fraction/acc_at_tuned_tau"] = float(np.mean(tuned == labels))
        pl_module.log_dict(summary, sync_dist=False)  # identical on every rank by construction
        self.rule_table = rules_table(metrics_by_rule)
        if trainer.is_global_zero:
            self.log_rule_table(trainer, len(labels))
        if self.best is None or summary["val/patient/acc"] > self.best:
            self.best, self.best_epoch, self.best_summary = summary["val/patient/acc"], trainer.current_epoch, summary
            self.best_votes, self.best_labels, self.best_predictions = votes, labels, predictions[self.rule]
            self.best_confusion, self.best_slices = confusion, (index, patient, probs)
            if trainer.is_global_zero:
                self.write_patients_csv(votes, labels, predictions[self.rule])

    def log_rule_table(self, trainer: pl.Trainer, n_patients: int) -> None:
        """The epoch's per-rule table: INFO text, and ``val/rules`` to every WandbLogger (call on rank 0)."""
        columns, rows = self.rule_table
        log.info("Patient rules, epoch %d, %d validation patients (* = vote.rule, logged as val/patient/acc):\n%s",
                 trainer.current_epoch, n_patients, format_table(columns, rows, marked=self.rule))
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_table(key="val/rules", columns=columns, data=rows)

    # ---- outputs ------------------------------------------------------------------------------
    def write_patients_csv(self, votes: list[PatientVote], labels: np.ndarray, preds: np.ndarray) -> None:
        """``patients.csv``: one row per validation patient of the best epoch (atomic)."""
        if self.output_dir is None:
            return
        header = ["patient", "true_class", "predicted_class", *[f"{rule}_vote" for rule in VOTE_RULES],
                  "infected_fraction", "n_slices"]
        header += [f"votes_{c}" for c in CLASS_NAMES] + [f"mean_prob_{c}" for c in CLASS_NAMES]
        rows = [
            [v.patient, CLASS_NAMES[t], CLASS_NAMES[p], *[CLASS_NAMES[v.rule_votes[rule]] for rule in VOTE_RULES],
             round(v.infected_fraction, 4), v.n_slices, *v.votes.tolist(), *np.round(v.mean_prob, 4).tolist()]
            for v, t, p in zip(votes, labels, preds, strict=True)
        ]
        atomic_write_csv(self.output_dir / "patients.csv", header, rows)

    def state_dict(self) -> dict[str, Any]:
        # the best epoch's metrics and confusion too: a resumed run (ckpt_path, SLURM requeue) that does
        # not improve on it still reports them
        confusion = None if self.best_confusion is None else self.best_confusion.tolist()
        # k and center_slices are read by predict.py; on resume the config's values (like its rule) win
        return {"rule": self.rule, "tau": self.tau, "k": self.k, "center_slices": self.center_slices,
                "best": self.best, "best_epoch": self.best_epoch,
                "best_summary": {k: float(v) for k, v in self.best_summary.items()}, "best_confusion": confusion}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tau = float(state_dict["tau"])
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]
        self.best_summary = dict(state_dict.get("best_summary", {}))  # absent in older checkpoints
        confusion = state_dict.get("best_confusion")
        self.best_confusion = None if confusion is None else np.asarray(confusion, dtype=np.int64)
