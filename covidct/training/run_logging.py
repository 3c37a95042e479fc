"""What a training run tells its loggers: which loggers, the W&B run's name and tags, the logged config with
parameter counts and ``loss.alpha=auto``'s class weights, and at the end the best epoch as every W&B summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from covidct.models.losses import auto_class_weights, class_weights_text
from covidct.training.callbacks.best_epoch import BestEpochCallback
from covidct.training.privacy import instantiate_logger

if TYPE_CHECKING:
    from covidct.training.run import TrainResult

log = logging.getLogger("covidct.training.run")  # the run's own log lines, under one name


def build_loggers(cfg: DictConfig, group: str | None, wandb_run_id: str | None = None) -> list[Logger]:
    """The configured loggers; W&B continues run ``wandb_run_id`` (a resumed training's, from its checkpoint)."""
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        extra: dict[str, Any] = {}
        if conf._target_.endswith("WandbLogger"):
            labels = run_labels(cfg)
            extra = {
                "group": conf.get("group") or group,
                "name": conf.get("name") or "-".join([*labels, run_name(cfg, group)]),
                "tags": list(dict.fromkeys([*(conf.get("tags") or []), *labels])),  # no repeats, in order
            }
            if wandb_run_id:
                extra |= {"id": wandb_run_id, "resume": "allow"}
        loggers.append(instantiate_logger(conf, cfg, **extra))  # W&B: with its patient-id pseudonymizer
        log.info("Logger %s", name)
    return loggers


def run_name(cfg: DictConfig, group: str | None) -> str:
    """The run folder's name (``<time>_<suffix>``; a multirun job: ``<sweep folder>-<job number>``): the end of
    the W&B run's name (``<experiment>-<model>-<rule>-<this>``), so that a dashboard row leads to its folder."""
    folder = Path(cfg.paths.output_dir).name
    return f"{group}-{folder}" if group else folder


def run_labels(cfg: DictConfig) -> tuple[str, str, str]:
    """(experiment, model, rule) of the run, which name and tag its W&B run: the experiment config chosen
    (``default`` without one), the model config (else ``model.backbone``) and ``vote.rule`` (a stage's name,
    ``infection``, for a stage that votes no patients)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    experiment = choices.get("experiment") or "default"
    model = choices.get("model") or str(cfg.model.get("backbone", "model"))
    rule = choices.get("stage") or str(cfg.vote.rule)
    return str(experiment), str(model), str(rule)


def parameter_counts(model: pl.LightningModule) -> dict[str, int]:
    """``model/params/{total,trainable,non_trainable}``: the model's parameters, as lightning-hydra-template
    records them in the loggers' config."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model/params/total": total,
        "model/params/trainable": trainable,
        "model/params/non_trainable": total - trainable,
    }


def logged_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as loggers record it: resolved, without ``paths`` and ``hydra`` (this machine's
    absolute folders, which differ between otherwise equal runs), plus ``experiment`` (its choice),
    ``choices`` (every config group's) and ``overrides`` (the command line's), so that W&B can group and
    compare runs by them."""
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    for machine_specific in ("paths", "hydra"):
        config.pop(machine_specific, None)
    choices: dict[str, Any] = {}
    overrides: list[str] = []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")}
        overrides = list(hydra_cfg.overrides.task)
    return config | {"experiment": choices.get("experiment"), "choices": choices, "overrides": overrides}


def publish_best_epoch(loggers: list[Logger], result: TrainResult, tracked: BestEpochCallback | None = None) -> None:
    """Every W&B run's summary := what ``metrics.json`` holds: the best epoch's metrics, its number, score
    and checkpoint (W&B would otherwise keep the last epoch's values, which its runs table and sweep
    comparisons show). With ``tracked`` (the run's :class:`BestEpochCallback`), ``epoch``,
    ``trainer/global_step``, ``train/*`` and ``lr-*`` are the best epoch's too, and the last epoch's ``epoch``,
    ``trainer/global_step``, ``lr-*``, ``train/*`` and ``val/*`` are under ``last/``; a last-epoch value with no
    best-epoch one (a best epoch restored from an older checkpoint) leaves the summary."""
    from pytorch_lightning.loggers import WandbLogger

    if result.best_epoch is None:
        return
    best = tracked.best if tracked is not None else None
    training = best.training if best is not None and best.epoch == result.best_epoch else {}
    last = tracked.last if tracked is not None else {}
    checkpoint = Path(result.best_checkpoint)
    summary = dict(result.metrics) | {"epoch": result.best_epoch} | training
    summary |= {f"last/{k}": v for k, v in last.items()} | {
        "best_epoch": result.best_epoch,
        "score": result.score,
        **(
            {"score_ci_low": ci[0], "score_ci_high": ci[1], "n_patients": result.n_patients}
            if (ci := result.score_ci)
            else {}
        ),
        "best_checkpoint": str(checkpoint.relative_to(result.output_dir))
        if checkpoint.is_relative_to(result.output_dir)
        else str(checkpoint),
    }
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update(summary)
            for key in sorted(set(last) - set(summary)):  # the last epoch's value: under last/ only
                del lg.experiment.summary[key]


class ClassWeightsLog(pl.Callback):
    """``loss.alpha=auto``: once, when fit starts (after the model's ``setup`` fitted them on the training
    slices), the class weights to the console and as ``class_weights`` {class: weight} to every logger's
    config (rank 0). Nothing for any other loss setting. ``metrics.json`` holds them too (:class:`TrainResult`)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = auto_class_weights(getattr(pl_module, "criterion", None), pl_module.hparams.class_names)
        if weights is None or not trainer.is_global_zero:
            return
        counts = getattr(trainer.datamodule, "train_class_counts", None)
        log.info(
            "loss.alpha=auto: class weights %s (inverse training slices per class%s, summing to 1)",
            class_weights_text(weights),
            f": {', '.join(map(str, counts))}" if counts is not None else "",
        )
        for lg in trainer.loggers:
            lg.log_hyperparams({"class_weights": weights})


def finish_wandb(failed: bool) -> None:
    """Close the W&B run if one is open (marked failed when training did not finish)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
