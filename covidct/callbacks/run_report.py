"""At fit end (rank 0), the run report of the best validation epoch: ``report.html`` and its figures in
the run folder (see :mod:`covidct.report`), and the same in W&B when a WandbLogger is active."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from covidct import CLASS_NAMES
from covidct.callbacks.patient_vote import ValidationVotes

log = logging.getLogger(__name__)


def report_from_votes(votes: ValidationVotes, slice_targets: np.ndarray, run_name: str):
    """A :class:`~covidct.report.RunReport` of one validation epoch's :class:`ValidationVotes`.

    ``slice_targets``: int (rows of the slice cache,) slice class per cache row, -1 unknown
    (:attr:`~covidct.data.datamodule.SliceTable.target`).
    """
    from covidct.report import RunReport

    extra, note = {}, ""
    if votes.rule == "infected_fraction" and votes.tau_tuned:
        extra["tau (tuned at the best epoch)"] = float(votes.tau)
        note = "Each patient's predicted class uses a tau tuned on the other validation patients (leave-one-out)."
    elif votes.rule == "infected_fraction":
        extra["tau (fixed)"] = float(votes.tau)
    return RunReport(
        run_name=run_name,
        class_names=CLASS_NAMES,
        vote_rule=votes.rule,
        best_epoch=votes.epoch,
        patients=[v.patient for v in votes.patients],
        patient_labels=votes.labels,
        patient_preds=votes.predicted,
        patient_scores=np.stack([v.mean_prob for v in votes.patients]),
        n_slices=np.asarray([v.n_slices for v in votes.patients]),
        slice_labels=np.asarray(slice_targets)[votes.slice_rows],
        slice_scores=votes.slice_probs,
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
        votes: ValidationVotes | None = getattr(pl_module, "patient_votes", None)
        if votes is None or not votes.patients:
            log.warning(
                "Run report skipped: no best validation epoch in this run (none was voted, or a resumed "
                "run did not improve on its checkpoint's best, whose slices are not stored)"
            )
            return
        from covidct.report import write_report

        report = report_from_votes(votes, trainer.datamodule.slice_table.target, self.run_name)
        written = write_report(report, self.output_dir)
        log.info("Run report: %s", written.paths["report.html"])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_to_wandb(logger, written, trainer.global_step, report)


def log_to_wandb(logger: WandbLogger, written, step: int, report) -> None:
    """The report's figures, AUCs and HTML page under ``report/`` in the W&B run; the page names the
    patients by the logger's pseudonyms when ``privacy.pseudonymize`` is on (:mod:`covidct.privacy`)."""
    import wandb

    from covidct.privacy import pseudonymizer_of
    from covidct.report import render_html

    pseudonym, page = pseudonymizer_of(logger), written.html
    if pseudonym.active:
        renamed = dataclasses.replace(report, patients=[pseudonym(p) for p in report.patients])
        page = render_html(renamed, written.metrics, written.images)

    for title, path in written.paths.items():
        if path.suffix == ".png":
            logger.log_image(f"report/{path.stem}", [str(path)], step=step, caption=[title])
    aucs = {_key(k): v for k, v in written.metrics.items() if "AUC" in k and np.isfinite(v)}
    logger.log_metrics(aucs, step=step)
    logger.experiment.log({"report/html": wandb.Html(page)})


def _key(metric: str) -> str:
    """'patient AUC (macro)' -> 'report/patient_auc_macro'."""
    return "report/" + re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_")
