"""One training run from a composed config: data -> model -> Lightning fit -> summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import Logger
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from pytorch_lightning.utilities.exceptions import SIGTERMException

from covidct.config import check_config
from covidct.contracts import (
    CLASS_NAMES,
    DATA_SUMMARY_TEXT,
    METRICS_FILE,
    PATIENT_ACC,
    PATIENTS_FILE,
    REPORT_FILE,
    SPLIT_FILE,
    rule_metric,
    vote_parameter,
)
from covidct.errors import ConfigError, CovidCTError
from covidct.models.checkpoint import check_resume_settings, read_checkpoint
from covidct.models.losses import auto_class_weights
from covidct.patients.metrics import accuracy_interval
from covidct.patients.rules import LEARNED_RULES, VOTE_RULES
from covidct.training.callbacks.best_epoch import BestEpochCallback
from covidct.training.callbacks.step_seed import StepSeed
from covidct.training.run_logging import (
    ClassWeightsLog,
    build_loggers,
    finish_wandb,
    logged_config,
    parameter_counts,
    publish_best_epoch,
)
from covidct.training.sweep_summary import write_run_metrics

log = logging.getLogger(__name__)

#: what a finished run writes into its folder, in the order the summary names them
RUN_FILES = (REPORT_FILE, METRICS_FILE, PATIENTS_FILE, DATA_SUMMARY_TEXT, SPLIT_FILE)


@dataclass
class TrainResult:
    """What a run produced. ``score`` is the monitored metric of the best epoch (what sweepers optimise):
    the patient accuracy of the vote rule, or for stage 1 (``stage=infection``) the slice infection AUROC."""

    score: float
    best_epoch: int | None
    best_checkpoint: str
    metrics: dict[str, float]
    confusion: np.ndarray | None  # (C, C) patient confusion matrix of the best epoch, rows = truth
    output_dir: Path
    monitor: str = PATIENT_ACC
    class_names: tuple[str, ...] = CLASS_NAMES
    vote_parameters: str = ""  # where the checkpoint's vote parameters come from, when no validation tuned them
    no_validation: str = ""  # why no validation epoch ran (:func:`validation_off`), "" when they did
    test: dict[str, float] | None = None  # data.split_file's test patients, scored with the best checkpoint
    last_epoch: int | None = None  # the last validation epoch, and its monitored value: beside the best one,
    last_score: float | None = None  # which was chosen on the same patients (selection, not evidence)
    class_weights: dict[str, float] | None = None  # loss.alpha=auto: fitted on the training slices; else None

    @property
    def n_patients(self) -> int:
        """Validation patients the best epoch's patient accuracy counts (0 without patient votes)."""
        return int(self.confusion.sum()) if self.confusion is not None else 0

    @cached_property
    def score_ci(self) -> tuple[float, float] | None:
        """Percentile bootstrap 95% interval of the best epoch's patient accuracy over its validation patients
        (:func:`~covidct.patients.metrics.accuracy_interval`); None without patient votes."""
        if not self.votes_patients or self.confusion is None or not self.n_patients:
            return None
        return accuracy_interval(self.confusion)

    @classmethod
    def of(cls, trainer: pl.Trainer, model: pl.LightningModule, output_dir: Path) -> TrainResult:
        """The best epoch the patient vote (or, without one, :class:`BestEpochCallback`) recorded."""
        ckpt = trainer.checkpoint_callback
        vote = next((c for c in trainer.callbacks if hasattr(c, "parameters_source")), None)
        why = validation_off(getattr(trainer.datamodule, "validates", True), trainer.limit_val_batches)
        common = {
            "best_checkpoint": (ckpt.best_model_path if ckpt else "") or "",
            "output_dir": output_dir,
            "class_names": tuple(model.hparams.class_names),
            "vote_parameters": vote.parameters_source() if vote is not None and why else "",
            "no_validation": why,
            "class_weights": auto_class_weights(getattr(model, "criterion", None), model.hparams.class_names),
        }
        votes, best = model.patient_votes, model.best_epoch
        last = trainer.callback_metrics.get(model.best_epoch.monitor if best is not None else PATIENT_ACC)
        if last is not None and trainer.current_epoch > 0:
            common |= {"last_epoch": trainer.current_epoch - 1, "last_score": float(last)}
        if votes is None and best is not None:
            return cls(best.score, best.epoch, metrics=best.metrics, confusion=None, monitor=best.monitor, **common)
        # the same epoch's slice metrics (val/loss, val/slice_acc, ...) beside its patient votes
        logged = best.metrics if best is not None and votes is not None and best.epoch == votes.epoch else {}
        return cls(
            score=float(votes.score) if votes is not None else float("nan"),
            best_epoch=votes.epoch if votes is not None else None,
            metrics=logged | dict(votes.metrics) if votes is not None else {},
            confusion=votes.confusion if votes is not None and votes.confusion.size else None,
            **common,
        )

    @property
    def votes_patients(self) -> bool:
        return self.monitor.startswith("val/patient/")

    def to_json(self, rule: str) -> dict[str, Any]:
        """What ``metrics.json`` holds (read back by the sweep summary)."""
        return {
            "status": "ok",
            "score": self.score,
            "monitor": self.monitor,
            "vote_rule": rule if self.votes_patients else None,
            "best_epoch": self.best_epoch,
            "best_checkpoint": self.best_checkpoint,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "confusion": self.confusion.tolist() if self.confusion is not None else None,
            "class_names": list(self.class_names),
            **({"n_patients": self.n_patients, "score_ci": list(ci)} if (ci := self.score_ci) is not None else {}),
            "last_epoch": self.last_epoch,
            "last_score": self.last_score,
            **({"vote_parameters": self.vote_parameters} if self.vote_parameters else {}),
            **({"test": self.test} if self.test is not None else {}),
            **({"class_weights": self.class_weights} if self.class_weights is not None else {}),
        }

    def summary(self, rule: str) -> str:
        """The end-of-run text: best epoch, every rule's patient accuracy, confusion, files written.
        Metrics missing (no validation epoch was voted) print as nan; only files that exist are named."""
        if not self.votes_patients:
            return self._infection_summary()
        if self.no_validation:
            return "\n".join(
                [
                    f"No validation ({self.no_validation}), so no patient metrics",
                    f"  vote={rule}, its parameters: {self.vote_parameters}",
                    f"  outputs: {self.output_dir}",
                    f"  checkpoint for predict.py: {self.best_checkpoint or 'none'}",
                ]
            )
        m = self.metrics
        nan = float("nan")
        if self.best_epoch is None:
            head = f"No best epoch: no validation epoch was voted in this run (vote={rule})"
        else:
            tau = m.get(vote_parameter("tau"))
            head = f"Best epoch {self.best_epoch}: patient accuracy {self.score:.3f}{self._interval()} with vote={rule}"
            head += (
                f" (tau {tau:.3f}, leave-one-patient-out)" if rule == "infected_fraction" and tau is not None else ""
            )
        written = [name for name in RUN_FILES if (self.output_dir / name).is_file()]
        lines = [
            head,
            *self._selection_lines(),
            "  same logits, patient accuracy per rule (majority is the paper's): "
            + " | ".join(
                f"{r} {m.get(rule_metric(r, 'acc'), nan):.3f}"
                for r in VOTE_RULES + LEARNED_RULES
                if r in VOTE_RULES or rule_metric(r, "acc") in m
            )
            + f"; patient macro F1 {m.get(rule_metric(rule, 'f1_macro'), nan):.3f}",
            f"  patient confusion (rows = truth, columns = prediction, {' / '.join(CLASS_NAMES)}): "
            f"{self.confusion.tolist() if self.confusion is not None else None}",
            f"  outputs: {self.output_dir} ({', '.join(written) or 'none of ' + ', '.join(RUN_FILES)})",
            f"  best checkpoint: {self.best_checkpoint or 'none'}",
        ]
        if self.test is not None:
            lines.append(
                f"  test patients (data.split_file, scored once with the best checkpoint): accuracy "
                f"{self.test['test/patient/acc']:.3f} with vote={rule}; "
                + " | ".join(
                    f"{r} {v:.3f}"
                    for r in VOTE_RULES + LEARNED_RULES
                    if (v := self.test.get(rule_metric(r, "acc", "test"))) is not None
                )
                + " (test_patients.csv)"
            )
        return "\n".join(lines)

    def _interval(self) -> str:
        """`` (95% CI 0.667-0.944, 18 patients)`` after the best epoch's accuracy; "" without patient votes."""
        ci = self.score_ci
        return f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, {self.n_patients} patients)" if ci is not None else ""

    def _selection_lines(self) -> list[str]:
        """Why the best epoch's figure is optimistic, and the last epoch's beside it."""
        if self.best_epoch is None or self.n_patients == 0:
            return []
        last = (
            f"; the last epoch ({self.last_epoch}) scored {self.last_score:.3f}"
            if self.last_score is not None and self.last_epoch is not None and self.last_epoch != self.best_epoch
            else ""
        )
        return [f"  the best epoch was chosen on these same validation patients, so its figure is optimistic{last}"]

    def _infection_summary(self) -> str:
        """Stage 1: the best epoch's slice infection AUROC, sensitivity and specificity, and the next step."""
        if self.best_epoch is None:
            return f"No best epoch: no validation epoch scored {self.monitor} in this run"
        sens, spec = (self.metrics.get(f"val/infection/{k}", float("nan")) for k in ("sensitivity", "specificity"))
        ckpt = self.best_checkpoint or "<checkpoint>"
        return "\n".join(
            [
                f"Best epoch {self.best_epoch}: slice infection AUROC {self.score:.3f}, sensitivity {sens:.3f}, "
                f"specificity {spec:.3f} at model.infection_threshold",
                "  (validation slices with radiologist labels; every slice of a Normal patient is clean)",
                f"  outputs: {self.output_dir}",
                f"  best checkpoint: {self.best_checkpoint or 'none'}",
                f"  next: python -m covidct.training.pseudo_label ckpt_path={ckpt} input=<data.root>",
            ]
        )


class RunInterrupted(Exception):
    """SIGTERM (what SLURM, Kubernetes and ``kill`` send) stopped training. ``metrics.json`` says
    ``interrupted``; ``train.py`` exits 143 (128 + SIGTERM), also in a multirun, which stops: the
    signal is for the whole process. Not a :class:`CovidCTError`: nothing is wrong with the config."""


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
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not launcher.cluster_environment.creates_processes_externally
    ):
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


def validation_off(validates: bool, limit_val_batches: float | int | None) -> str:
    """Why no validation epoch runs, "" when they do: ``data.val_fraction=0`` (every patient trains) or
    ``trainer.limit_val_batches=0`` (the validation patients are held out, and never validated)."""
    if not validates:
        return "data.val_fraction=0, every patient trains"
    if limit_val_batches is not None and not limit_val_batches:
        return "trainer.limit_val_batches=0, the validation patients are held out and never validated"
    return ""


def needs_validation(callback: pl.Callback) -> bool:
    """A callback with nothing to do without validation epochs: one that monitors a validation metric
    (best checkpoint, early stopping), the run report, Grad-CAM images and the W&B tables."""
    from covidct.training.callbacks.cam_images import CamImagesCallback
    from covidct.training.callbacks.run_report import RunReportCallback
    from covidct.training.callbacks.wandb_tables import WandbTablesCallback

    monitored = getattr(callback, "monitor", None) is not None
    return monitored or isinstance(callback, RunReportCallback | CamImagesCallback | WandbTablesCallback)


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a covidct user error (bad value, missing file) that a
    constructor raised as itself, instead of wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, CovidCTError):
            raise exc.__cause__ from None
        raise


@dataclass
class Run:
    """Everything a training run is made of, instantiated from the config, before any data is read."""

    datamodule: pl.LightningDataModule
    model: pl.LightningModule
    callbacks: list[pl.Callback]
    loggers: list[Logger]
    trainer: pl.Trainer


def build_run(cfg: DictConfig, group: str | None = None, wandb_run_id: str | None = None) -> Run:
    """Instantiate data, model, callbacks, loggers and trainer. Every constructor checks its own values,
    so a bad one stops the run here, naming its key, before any data is read."""
    datamodule = instantiate_checked(cfg.data, _convert_="all")
    scheduler = cfg.get("scheduler")
    model = instantiate_checked(
        cfg.model,
        _convert_="all",
        loss=instantiate_checked(cfg.loss),
        optimizer=instantiate_checked(cfg.optimizer),
        scheduler=instantiate_checked(scheduler) if scheduler and "_target_" in scheduler else None,
    )
    callbacks = [instantiate_checked(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(StepSeed(cfg.seed))  # a step's randomness depends on (seed, epoch, step): exact resumes
    callbacks.append(ClassWeightsLog())  # loss.alpha=auto: the weights fitted in setup, to the console and loggers
    loggers = build_loggers(cfg, group, wandb_run_id)
    if not loggers:  # nothing to report learning rates to (logger=none, debug=fast)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    no_validation = {} if datamodule.validates else {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    if why := validation_off(datamodule.validates, cfg.trainer.get("limit_val_batches", 1.0)):
        callbacks = [c for c in callbacks if not needs_validation(c)]
        log.info("%s: no validation epochs, checkpoints/last.ckpt only", why)
    trainer: pl.Trainer = instantiate_checked(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **no_validation
    )
    check_launch(trainer)
    return Run(datamodule, model, callbacks, loggers, trainer)


def train(cfg: DictConfig, group: str | None = None) -> TrainResult:
    """Fit the configured model on the configured data; returns the best patient-level score.

    ``group`` names the W&B group (the sweep folder in a multirun). W&B runs are always finished,
    even when training fails. The data is read once, by Lightning (``prepare_data`` on one process per
    node builds the cache; ``setup`` on every process opens it).
    """
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg)
    # read once, weights-only: a tampered or broken file is refused before anything starts
    resumed = read_checkpoint(ckpt_path) if ckpt_path else {}
    if resumed:  # another input size, window or backbone: refused before any data is read
        check_resume_settings(resumed, cfg, ckpt_path)
    run = build_run(cfg, group, resumed.get("wandb_run_id"))
    del resumed  # Lightning reads it again (weights-only) to restore every state
    datamodule, model, trainer = run.datamodule, run.model, run.trainer
    # the trainer's: under trainer.fast_dev_run Lightning swaps them for a DummyLogger (no W&B run is made)
    loggers = trainer.loggers
    try:
        params = parameter_counts(model)
        if trainer.is_global_zero:
            log.info("Model parameters: %s (%s trainable, %s non-trainable)", *(f"{n:,}" for n in params.values()))
        for lg in loggers:
            lg.log_hyperparams(logged_config(cfg) | params)
        compile_network(model, cfg.compile)
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # Lightning ends fit with SystemExit(0) on SIGTERM: not a success
            raise RunInterrupted(record_interruption(trainer, model, output_dir, ckpt_path, cfg.vote.rule)) from None
        result = TrainResult.of(trainer, model, output_dir)
        if trainer.is_global_zero and len(getattr(datamodule, "test_patients", ())) and result.best_checkpoint:
            result.test = score_test_set(result.best_checkpoint, datamodule, cfg.vote.rule, output_dir, loggers)
        if trainer.is_global_zero:
            tracked = next((c for c in trainer.callbacks if isinstance(c, BestEpochCallback)), None)
            publish_best_epoch(loggers, result, tracked)
    finally:
        finish_wandb(failed=trainer.state.status.value != "finished")
    if trainer.is_global_zero:
        write_run_metrics(output_dir, result.to_json(cfg.vote.rule))
    return result


def score_test_set(
    checkpoint: str, datamodule: pl.LightningDataModule, rule: str, output_dir: Path, loggers: list[Logger]
) -> dict[str, float]:
    """``data.split_file``'s test patients, scored once with ``checkpoint``; the metrics also go to the loggers."""
    from covidct.training.held_out_test import score_test_patients

    metrics = score_test_patients(checkpoint, datamodule, rule, output_dir).metrics
    for lg in loggers:
        lg.log_metrics(metrics)
    return metrics


def record_interruption(
    trainer: pl.Trainer, model: pl.LightningModule, output_dir: Path, resumed_from: str | None, rule: str
) -> str:
    """After SIGTERM: ``metrics.json`` with status ``interrupted`` (rank 0), the best epoch so far and the
    checkpoint to resume from (the newest one saved at an epoch end; the interrupted epoch restarts).
    Returns the one-line message."""
    saved = [Path(p) for cb in trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path) if p]
    newest = max((p for p in saved if p.is_file()), key=lambda p: p.stat().st_mtime, default=None)
    resume = str(newest) if newest else resumed_from
    message = f"Training interrupted by SIGTERM in epoch {trainer.current_epoch} (step {trainer.global_step}): " + (
        f"resume with ckpt_path={resume}" if resume else "no checkpoint was saved yet"
    )
    so_far = TrainResult.of(trainer, model, output_dir).to_json(rule)
    if trainer.is_global_zero:
        write_run_metrics(
            output_dir,
            {
                "status": "interrupted",
                "error": message,
                "resume_from": resume,
                **{key: so_far[key] for key in ("score", "monitor", "vote_rule", "best_epoch")},
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "metrics": so_far["metrics"],
            },
        )
    return message


def compile_network(model: pl.LightningModule, settings: DictConfig) -> None:
    """``compile.enabled``: compile the network in place (``nn.Module.compile``), not the whole
    LightningModule, so metrics and logging stay eager and checkpoint keys stay plain."""
    if settings.enabled:
        log.info("torch.compile(backend=%s, mode=%s) of the network", settings.backend, settings.mode)
        model.net.compile(backend=settings.backend, mode=settings.mode)
