"""At fit end (rank 0, with a WandbLogger): the best validation epoch's per-patient table, patient
confusion matrix and a few sample slices, from the patient vote's :class:`ValidationVotes`. Patients are
named by the logger's pseudonyms when ``privacy.pseudonymize`` is on (see :mod:`covidct.training.privacy`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from covidct.contracts import CLASS_NAMES, NORMAL_CLASS
from covidct.data.datamodule import SliceTable
from covidct.errors import ConfigError
from covidct.patients.decisions import ValidationVotes
from covidct.patients.rules import VOTE_RULES
from covidct.training.privacy import prepare_loggers, pseudonymizer_of


class WandbTablesCallback(pl.Callback):
    """Logs ``val/patients`` (every rule's vote per patient), ``val/patient_confusion`` (the configured
    rule's) and ``val/sample_slices`` (the most infected-looking slice of ``n_images`` validation
    patients, the classes taking turns) to every WandbLogger; nothing without one, or without a best epoch in
    this run (a resumed run that did not improve). With ``privacy.pseudonymize`` on, every patient id
    (table rows, captions) is the logger's pseudonym."""

    def __init__(self, n_images: int = 8) -> None:
        if n_images < 0:
            raise ConfigError(f"callbacks.wandb_tables.n_images must be >= 0, got {n_images}")
        self.n_images = n_images

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Mapping file, collision check and identifier-shape warning of the W&B pseudonymizers."""
        if trainer.is_global_zero:
            prepare_loggers(trainer.loggers, getattr(trainer.datamodule, "patient_ids", None))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        votes: ValidationVotes | None = getattr(pl_module, "patient_votes", None)
        if not trainer.is_global_zero or not loggers or votes is None or not votes.patients:
            return
        import wandb

        confusion = wandb.plot.confusion_matrix(
            y_true=votes.labels.tolist(), preds=votes.predicted.tolist(), class_names=list(CLASS_NAMES)
        )
        for lg in loggers:
            pseudonym = pseudonymizer_of(lg)
            columns, rows = patient_rows(votes, pseudonym)
            samples = [
                wandb.Image(image, caption=caption)
                for image, caption in sample_slices(votes, trainer.datamodule.slice_table, self.n_images, pseudonym)
            ]
            lg.log_table("val/patients", columns=columns, data=rows)
            lg.experiment.log({"val/patient_confusion": confusion, "val/sample_slices": samples})


def patient_rows(votes: ValidationVotes, pseudonym: Callable[[str], str] = str) -> tuple[list[str], list[list]]:
    """Columns and one row per patient: id (``pseudonym(id)``), true class, every rule's vote, infected
    fraction, slices."""
    columns = ["patient", "true", *VOTE_RULES, "infected_fraction_of_slices", "n_slices"]
    rows = [
        [
            pseudonym(v.patient),
            CLASS_NAMES[t],
            *[CLASS_NAMES[v.rule_votes[r]] for r in VOTE_RULES],
            v.infected_fraction,
            v.n_slices,
        ]
        for v, t in zip(votes.patients, votes.labels, strict=True)
    ]
    return columns, rows


def sample_slices(
    votes: ValidationVotes, table: SliceTable, n: int, pseudonym: Callable[[str], str] = str
) -> list[tuple[np.ndarray, str]]:
    """(uint8 (S, S) first channel, caption) of the most infected-looking slice (lowest P(Normal)) of ``n``
    validation patients taken from each true class in turn (the first patient of every class, then the
    second, ...); the caption names the patient as ``pseudonym(id)``, its true class and what was predicted."""
    samples = []
    rows, patient, probs = votes.slice_rows, votes.slice_patient, votes.slice_probs
    for p in classes_in_turn(np.unique(patient), table.patient_labels)[:n]:
        mine = np.flatnonzero(patient == p)
        i = mine[np.argmin(probs[mine, NORMAL_CLASS])]
        row, pred, target = rows[i], int(probs[i].argmax()), int(table.target[rows[i]])
        caption = (
            f"{pseudonym(table.patient_ids[p])} ({CLASS_NAMES[table.patient_labels[p]]}), its most infected-looking "
            f"slice {table.rank[row]} ({table.images.shape[-1]} px): slice target "
            f"{'unknown' if target < 0 else CLASS_NAMES[target]}, predicted {CLASS_NAMES[pred]} ({probs[i, pred]:.2f})"
        )
        samples.append((np.array(table.images[row, 0]), caption))
    return samples


def classes_in_turn(patients: np.ndarray, patient_labels: np.ndarray) -> list[int]:
    """``patients`` (P,) int reordered so that true classes (``patient_labels[p]``) take turns: the first
    patient of each class (in class order), then the second of each, ..."""
    by_class = [[int(p) for p in patients if patient_labels[p] == c] for c in np.unique(patient_labels[patients])]
    depth = max((len(group) for group in by_class), default=0)
    return [group[i] for i in range(depth) for group in by_class if i < len(group)]
