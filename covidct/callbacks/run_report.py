"""At fit end (rank 0), the run report of the best validation epoch: ``report.html`` and its figures in
the run folder (see :mod:`covidct.report`), and the same in W&B when a WandbLogger is active."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from covidct import CLASS_NAMES
from covidct.callbacks.patient_vote import PatientVoteCallback

log = logging.getLogger(__name__)


def report_from_vote(vote: PatientVoteCallback, slice_targets: np.ndarray, run_name: str):
    """A :class:`~covidct.report.RunReport` from the vote callback's best epoch.

    ``slice_targets``: int (rows of the slice cache,) slice class per cache row, -1 unknown
    (``CTDataModule.targets``).
    """
    from covidct.report import RunReport

    index, _, slice_probs = vote.best_slices
    extra, note = {}, ""
    if vote.rule == "infected_fraction" and vote.fixed_tau is None:
        extra["tau (tuned at the best epoch)"] = float(vote.best_summary.get("val/patient/tau", vote.tau))
        note = "Each patient's predicted class uses a tau tuned on the other validation patients (leave-one-out)."
    elif vote.rule == "infected_fraction":
        extra["tau (fixed)"] = float(vote.fixed_tau)
    return RunReport(
        run_name=run_name,
        class_names=CLASS_NAMES,
        vote_rule=vote.rule,
        best_epoch=vote.best_epoch,
        patients=[v.patient for v in vote.best_votes],
        patient_labels=np.asarray(vote.best_labels),
        patient_preds=np.asarray(vote.best_predictions),
        patient_scores=np.stack([v.mean_prob for v in vote.best_votes]),
        n_slices=np.asarray([v.n_slices for v in vote.best_votes]),
        slice_labels=np.asarray(slice_targets)[index],
        slice_scores=slice_probs,
        extra_metrics=extra,
        note=note,
    )


class RunReportCallback(pl.Callback):
    """Writes the run report into ``output_dir`` when fitting ends (rank 0 only).

    Args:
        output_dir: the run folder (``${paths.output_dir}``).
        run_name: shown as the report's title; None = the run folder's name.
    """

    def __init__(self, output_dir: str, run_name: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.run_name = run_name or self.output_dir.name

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        vote = next((c for c in trainer.callbacks if isinstance(c, PatientVoteCallback)), None)
        if vote is None or not vote.best_votes or vote.best_slices is None:
            log.warning("Run report skipped: no best validation epoch in this run (none was voted, or a resumed "
                        "run did not improve on its checkpoint's best, whose slices are not stored)")
            return
        from covidct.report import write_report

        written = write_report(report_from_vote(vote, trainer.datamodule.targets, self.run_name), self.output_dir)
        log.info("Run report: %s", written.paths["report.html"])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_to_wandb(logger, written, trainer.global_step)


def log_to_wandb(logger: WandbLogger, written, step: int) -> None:
    """The report's figures, AUCs and HTML page under ``report/`` in the W&B run."""
    import wandb

    for title, path in written.paths.items():
        if path.suffix == ".png":
            logger.log_image(f"report/{path.stem}", [str(path)], step=step, caption=[title])
    aucs = {_key(k): v for k, v in written.metrics.items() if "AUC" in k and np.isfinite(v)}
    logger.log_metrics(aucs, step=step)
    logger.experiment.log({"report/html": wandb.Html(written.html)})


def _key(metric: str) -> str:
    """'patient AUC (macro)' -> 'report/patient_auc_macro'."""
    return "report/" + re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_")
