"""Keep the best validation epoch's every ``val/`` scalar: with patient votes (``val/patient/acc``) the slice
metrics of the votes' best epoch, for ``metrics.json`` and the W&B summary; without (stage 1: infected
slices, ``val/infection/auroc``) the run's best epoch itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl

from covidct.contracts import INFECTION_AUROC


@dataclass(frozen=True)
class BestEpoch:
    """The best epoch by ``monitor``: its number, score and every ``val/`` scalar logged that epoch."""

    epoch: int
    monitor: str
    score: float
    metrics: dict[str, float]


class BestEpochCallback(pl.Callback):
    """Snapshots the ``val/`` metrics of the best epoch by ``monitor`` (``mode`` max or min) and publishes
    it as ``pl_module.best_epoch`` (what ``train`` reports and ``metrics.json`` holds). Stored in the
    checkpoint, so a resumed run still knows its best epoch. With patient votes, the best epoch is
    :class:`~covidct.training.callbacks.patient_vote.PatientVoteCallback`'s (the same score, the same first-best
    rule) and this one adds that epoch's slice metrics."""

    def __init__(self, monitor: str = INFECTION_AUROC, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: BestEpoch | None = None

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
        if not math.isnan(score) and self._better(score):
            self.best = BestEpoch(trainer.current_epoch, self.monitor, score, metrics)
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and state.get("monitor") == self.monitor:
            self.best = BestEpoch(int(state["epoch"]), self.monitor, float(state["score"]), dict(state["metrics"]))
