"""One training run from a composed config: data -> model -> Lightning fit -> summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

from covidct import CLASS_NAMES, NORMAL_CLASS
from covidct.callbacks.patient_vote import PatientVoteCallback
from covidct.callbacks.step_seed import StepSeed
from covidct.checkpoint import read_checkpoint
from covidct.config import check_config
from covidct.errors import ConfigError
from covidct.sweep_summary import write_run_metrics
from covidct.voting import VOTE_RULES

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced. ``score`` is the monitored patient accuracy (what sweepers optimise)."""

    score: float
    best_epoch: int | None
    best_checkpoint: str
    metrics: dict[str, float]
    confusion: np.ndarray | None  # (C, C) patient confusion matrix of the best epoch, rows = truth
    output_dir: Path

    def to_json(self, rule: str) -> dict[str, Any]:
        """What ``metrics.json`` holds (read back by the sweep summary)."""
        return {
            "status": "ok",
            "score": self.score,
            "monitor": "val/patient/acc",
            "vote_rule": rule,
            "best_epoch": self.best_epoch,
            "best_checkpoint": self.best_checkpoint,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "confusion": self.confusion.tolist() if self.confusion is not None else None,
            "class_names": list(CLASS_NAMES),
        }

    def summary(self, rule: str) -> str:
        m = self.metrics
        lines = [
            f"Best epoch {self.best_epoch}: patient accuracy {self.score:.3f} with vote={rule}"
            + (f" (tau {m['val/patient/tau']:.3f}, leave-one-patient-out)" if rule == "infected_fraction" else ""),
            "  same logits, patient accuracy per rule (majority is the paper's): "
            + " | ".join(f"{r} {m.get(f'val/patient/{r}/acc', float('nan')):.3f}" for r in VOTE_RULES)
            + f"; patient macro F1 {m.get(f'val/patient/{rule}/f1_macro', float('nan')):.3f}",
            f"  patient confusion (rows = truth, columns = prediction, {' / '.join(CLASS_NAMES)}): "
            f"{self.confusion.tolist() if self.confusion is not None else None}",
            f"  outputs: {self.output_dir} (report.html, metrics.json, patients.csv, data_summary.txt, split.csv)",
            f"  best checkpoint: {self.best_checkpoint}",
        ]
        return "\n".join(lines)


class LaunchError(ConfigError):
    """A launch setting no job of a sweep can run with: ``train.py`` stops the whole sweep on it."""


def check_launch(trainer: pl.Trainer) -> None:
    """Refuse DDP that Lightning would start by re-running the script, inside a Hydra multirun.

    Lightning starts ranks 1..N-1 by running ``sys.argv`` again (with ``hydra.run.dir`` set to rank 0's
    run folder). In a single run that rejoins rank 0's run; in a multirun the copy runs the whole sweep
    again, in a second sweep folder. Ranks started by SLURM (or torchrun) are not re-run: allowed.
    """
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return
    launcher = trainer.strategy.launcher
    if (isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1
            and not launcher.cluster_environment.creates_processes_externally):
        raise LaunchError(
            f"-m (multirun) cannot start {launcher.num_processes} DDP processes per job (Lightning would re-run the "
            "whole sweep for each extra rank): sweep DDP jobs with hydra/launcher=slurm "
            "hydra.launcher.tasks_per_node=<GPUs per node> (SLURM starts every rank), or run each setting without -m"
        )


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path``, else on SLURM the newest ``hpc_ckpt_<n>.ckpt`` in the run folder: the checkpoint
    Lightning saves on SLURM's requeue signal (SIGUSR1). Lightning would find it by itself; resolving
    it here also lets the requeued job continue the same W&B run."""
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    if not SLURMEnvironment.detect():
        return None
    saved = Path(cfg.trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
    newest = max(saved, key=lambda p: int(p.stem.removeprefix("hpc_ckpt_")), default=None)
    if newest is not None:
        log.info("SLURM requeue: resuming from %s", newest)
    return str(newest) if newest else None


def build_loggers(cfg: DictConfig, group: str | None, wandb_run_id: str | None = None) -> list[Logger]:
    """The configured loggers; W&B continues run ``wandb_run_id`` (a resumed training's, from its checkpoint)."""
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        extra: dict[str, Any] = {}
        if conf._target_.endswith("WandbLogger"):
            extra = {"group": conf.get("group") or group}
            if wandb_run_id:
                extra |= {"id": wandb_run_id, "resume": "allow"}
        loggers.append(instantiate(conf, **extra))
        log.info("Logger %s", name)
    return loggers


def train(cfg: DictConfig, group: str | None = None) -> TrainResult:
    """Fit the configured model on the configured data; returns the best patient-level score.

    ``group`` names the W&B group (the sweep folder in a multirun). W&B runs are always finished,
    even when training fails.
    """
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg)
    # read once, weights-only: a tampered or broken file is refused before anything starts
    resumed = read_checkpoint(ckpt_path) if ckpt_path else {}
    vote = PatientVoteCallback(cfg.vote.rule, cfg.vote.tau, str(output_dir), k=cfg.vote.k,
                               center_slices=cfg.vote.center_slices)
    loggers = build_loggers(cfg, group, resumed.get("wandb_run_id"))
    del resumed  # Lightning reads it again (weights-only) to restore every state
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += [vote, StepSeed(cfg.seed)]  # a step's randomness depends on (seed, epoch, step): exact resumes
    if not loggers:  # nothing to report learning rates to (logger=none, debug=fast)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_launch(trainer)  # before any data is read
    # Every process prepares the data here (the model needs the class counts). Under DDP started by
    # Lightning, rank 0 has built the caches before it starts the other ranks, which only load them.
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    scheduler = cfg.get("scheduler")
    model = instantiate(
        cfg.model,
        _convert_="all",
        in_channels=datamodule.num_channels,
        class_counts=datamodule.train_class_counts,
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(scheduler) if scheduler and "_target_" in scheduler else None,
        preprocessing={
            "windows": OmegaConf.to_container(cfg.data.windows, resolve=True),
            "image_size": cfg.data.image_size,
            "label_mode": cfg.data.label_mode,
            "vote_rule": cfg.vote.rule,
        },
    )
    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        compile_network(model, cfg.compile)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        has_wandb = any(isinstance(lg, WandbLogger) for lg in loggers)
        if trainer.is_global_zero and has_wandb and vote.best_votes:
            log_wandb_tables(loggers, vote, datamodule)
    finally:
        finish_wandb(failed=trainer.state.status.value != "finished")
    ckpt = trainer.checkpoint_callback
    result = TrainResult(
        score=float(vote.best) if vote.best is not None else float("nan"),
        best_epoch=vote.best_epoch,
        best_checkpoint=(ckpt.best_model_path if ckpt else "") or "",
        metrics=vote.best_summary,
        confusion=vote.best_confusion,
        output_dir=output_dir,
    )
    if trainer.is_global_zero:
        write_run_metrics(output_dir, result.to_json(cfg.vote.rule))
    return result


def compile_network(model: pl.LightningModule, settings: DictConfig) -> None:
    """``compile.enabled``: compile the network in place (``nn.Module.compile``), not the whole
    LightningModule, so metrics and logging stay eager and checkpoint keys stay plain."""
    if settings.enabled:
        log.info("torch.compile(backend=%s, mode=%s) of the network", settings.backend, settings.mode)
        model.net.compile(backend=settings.backend, mode=settings.mode)


def log_wandb_tables(loggers: list[Logger], vote: PatientVoteCallback, datamodule, n_images: int = 8) -> None:
    """Per-patient table, confusion matrix and a few sample slices of the best validation epoch, to W&B."""
    import wandb

    columns = ["patient", "true", *VOTE_RULES, "infected_fraction_of_slices", "n_slices"]
    rows = [
        [v.patient, CLASS_NAMES[t], *[CLASS_NAMES[v.rule_votes[r]] for r in VOTE_RULES],
         v.infected_fraction, v.n_slices]
        for v, t in zip(vote.best_votes, vote.best_labels, strict=True)
    ]
    confusion = wandb.plot.confusion_matrix(
        y_true=vote.best_labels.tolist(), preds=vote.best_predictions.tolist(), class_names=list(CLASS_NAMES)
    )
    # the most infected-looking slice of the first few validation patients
    index, patient, probs = vote.best_slices
    samples = []
    for p in np.unique(patient)[:n_images]:
        mine = np.flatnonzero(patient == p)
        row = mine[np.argmin(probs[mine, NORMAL_CLASS])]
        pred = int(probs[row].argmax())
        caption = (f"{datamodule.patient_ids[p]} slice {datamodule.cache.slice_index[index[row]]}: "
                   f"target {_target_name(datamodule.targets[index[row]])}, predicted {CLASS_NAMES[pred]} "
                   f"({probs[row, pred]:.2f})")
        samples.append(wandb.Image(np.array(datamodule.cache.images[index[row], 0]), caption=caption))
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_table("val/patients", columns=columns, data=rows)
            lg.experiment.log({"val/patient_confusion": confusion, "val/sample_slices": samples})


def _target_name(target: int) -> str:
    return "unknown" if target < 0 else CLASS_NAMES[target]


def finish_wandb(failed: bool) -> None:
    """Close the W&B run if one is open (marked failed when training did not finish)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
