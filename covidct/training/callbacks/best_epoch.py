"""Keep the best validation epoch's every ``val/`` scalar: with patient votes (``val/patient/acc``) the slice
metrics of the votes' best epoch, for ``metrics.json`` and the W&B summary; without (stage 1: infected
slices, ``val/infection/auroc``) the run's best epoch itself. Also that epoch's training scalars (``train/*``,
the learning rates ``lr-*``, ``trainer/global_step``) and the last epoch's, for the W&B summary (best epoch;
the last one's under ``last/``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor

from covidct.contracts import INFECTION_AUROC


@dataclass(frozen=True)
class BestEpoch:
    """The best epoch by ``monitor``: its number, score and every ``val/`` scalar logged that epoch, and
    ``training``: that epoch's ``trainer/global_step``, learning rates (``lr-*``) and ``train/`` scalars."""

    epoch: int
    monitor: str
    score: float
    metrics: dict[str, float]
    training: dict[str, float] = field(default_factory=dict)


def learning_rates(trainer: pl.Trainer) -> dict[str, float]:
    """The latest learning rates the :class:`LearningRateMonitor` logged (``lr-Adam``, ...); {} without one."""
    monitor = next((c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)), None)
    return {name: float(values[-1]) for name, values in getattr(monitor, "lrs", {}).items() if values}


def training_scalars(trainer: pl.Trainer) -> dict[str, float]:
    """The epoch's ``train/`` scalars as the loggers got them: ``train/loss_epoch`` rather than ``train/loss``
    (logged per step and per epoch), no ``*_step``."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and v.numel() == 1}
    return {k: v for k, v in metrics.items() if not k.endswith("_step") and f"{k}_epoch" not in metrics}


class BestEpochCallback(pl.Callback):
    """Snapshots the ``val/`` metrics of the best epoch by ``monitor`` (``mode`` max or min) and publishes
    it as ``pl_module.best_epoch`` (what ``train`` reports and ``metrics.json`` holds). Stored in the
    checkpoint, so a resumed run still knows its best epoch. With patient votes, the best epoch is
    :class:`~covidct.training.callbacks.patient_vote.PatientVoteCallback`'s (the same score, the same first-best
    rule) and this one adds that epoch's slice metrics.

    ``last``: the latest epoch's ``epoch``, ``trainer/global_step``, ``lr-*``, ``train/`` and ``val/`` scalars
    (the W&B summary's ``last/*``)."""

    def __init__(self, monitor: str = INFECTION_AUROC, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: BestEpoch | None = None
        self.last: dict[str, float] = {}

    def _better(self, score: float) -> bool:
        if self.best is None:
            return True
        return score > self.best.score if self.mode == "max" else score < self.best.score

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the epoch's metrics are reduced, before ModelCheckpoint saves (Lightning runs it last)."""
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        score = metrics.get(self.monitor, math.nan)
        position = {"epoch": trainer.current_epoch, "trainer/global_step": trainer.global_step}
        self.last = position | learning_rates(trainer) | metrics
        if not math.isnan(score) and self._better(score):
            training = {"trainer/global_step": trainer.global_step} | learning_rates(trainer)
            self.best = BestEpoch(trainer.current_epoch, self.monitor, score, metrics, training)
        pl_module.best_epoch = self.best

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the epoch's validation (Lightning validates at the end of the training epoch): its ``train/``
        scalars, which Lightning reduces after that validation, to the last epoch and, when best, the best."""
        train = training_scalars(trainer)
        if self.last.get("epoch") != trainer.current_epoch:  # an epoch without validation
            self.last = {"epoch": trainer.current_epoch, "trainer/global_step": trainer.global_step}
            self.last |= learning_rates(trainer)
        self.last |= train
        if self.best is not None and self.best.epoch == trainer.current_epoch:
            self.best = replace(self.best, training=self.best.training | train)
            pl_module.best_epoch = self.best

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.best_epoch = self.best  # restored from a checkpoint when resuming

    def state_dict(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        return {
            "epoch": self.best.epoch,
            "monitor": self.monitor,
            "score": self.best.score,
            "metrics": self.best.metrics,
            "training": self.best.training,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and state.get("monitor") == self.monitor:
            self.best = BestEpoch(
                int(state["epoch"]),
                self.monitor,
                float(state["score"]),
                dict(state["metrics"]),
                dict(state.get("training") or {}),  # older checkpoints: none
            )
