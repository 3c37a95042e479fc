"""At fit end (rank 0), the run report of the best validation epoch: ``report.html`` and its figures in
the run folder (see :mod:`covidct.report.page`), and the same in W&B when a WandbLogger is active.

The callback also keeps the training curves: at every validation epoch's end the epoch's mean train
loss (over its batches, weighted by batch size; rank-local under DDP, as Lightning's ``train/loss_epoch``
is), ``val/loss`` and ``val/patient/acc``. They are kept in its checkpoint state, so a resumed run's report
draws the epochs before the resume too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from covidct.contracts import (
    CLASS_NAMES,
    DATA_SUMMARY_TEXT,
    METRICS_FILE,
    PATIENTS_FILE,
    REPORT_FILE,
    SPLIT_FILE,
    class_slug,
)
from covidct.data.series import series_line
from covidct.errors import ConfigError
from covidct.models.losses import CLASS_WEIGHTS_SETTING, auto_class_weights, class_weights_text
from covidct.patients.decisions import ValidationVotes
from covidct.patients.explanations import patient_decisions
from covidct.patients.metrics import patient_metrics
from covidct.training.callbacks.patient_vote import PatientVoteCallback

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


def rules_comparison(votes: ValidationVotes) -> tuple[list[str], list[list]]:
    """Header and one row per rule of ``votes.predictions``: patient accuracy, macro F1, sensitivity and
    specificity per class of the rule's reported calls."""
    header = [
        "rule",
        "accuracy",
        "macro F1",
        *[f"sensitivity {c}" for c in CLASS_NAMES],
        *[f"specificity {c}" for c in CLASS_NAMES],
    ]
    rows = []
    for rule, preds in votes.predictions.items():
        m = patient_metrics(preds, votes.labels)
        rows.append(
            [
                rule,
                m["acc"],
                m["f1_macro"],
                *[m[f"sensitivity_{class_slug(c)}"] for c in CLASS_NAMES],
                *[m[f"specificity_{class_slug(c)}"] for c in CLASS_NAMES],
            ]
        )
    return header, rows


def report_from_votes(
    votes: ValidationVotes,
    slice_targets: np.ndarray,
    run_name: str,
    vote: PatientVoteCallback | None = None,
    **extra: Any,
):
    """A :class:`~covidct.report.metrics.RunReport` of one validation epoch's :class:`ValidationVotes`.

    ``slice_targets``: int (rows of the slice cache,) slice class per cache row, -1 unknown
    (:attr:`~covidct.data.datamodule.SliceTable.target`). ``vote``: the patient vote callback whose settings
    the rule used (k, central slices, fixed or tuned parameters, calibration); without it the report has no
    per-patient decisions. ``extra``: further :class:`~covidct.report.metrics.RunReport` fields (history, data,
    config, links, title).
    """
    from covidct.report.metrics import Calibration, RunReport

    decisions = patient_decisions(votes, vote) if vote is not None else None
    extra_metrics: dict[str, float] = {}
    if decisions is not None and decisions.rule in ("infected_fraction", "threshold"):
        tuned = "tuned on all validation patients" if "tuned" in decisions.parameters else "fixed"
        if decisions.slice_threshold is not None:
            extra_metrics[f"slice threshold ({tuned})"] = float(decisions.slice_threshold)
        extra_metrics[f"{decisions.threshold_name} ({tuned})"] = decisions.threshold_all
    temperature = votes.temperature
    if temperature is None:  # recorded by decide() through report_fields; else the logged value
        logged = [v for k, v in votes.metrics.items() if "calibration" in k and k.endswith("temperature")]
        temperature = logged[0] if logged else None
    calibration = None
    if temperature is not None and vote is not None:
        from covidct.patients.calibration import apply_temperature

        # the probabilities before: softmax(log p * T) undoes softmax(logits / T) exactly (up to float32)
        before = apply_temperature(votes.slice_probs, 1.0 / float(temperature))
        calibration = Calibration(float(temperature), bool(vote.calibration), before)
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
        slice_patient=np.searchsorted(np.unique(votes.slice_patient), votes.slice_patient),
        decisions=decisions,
        rule_votes=dict(votes.predictions),
        rules=rules_comparison(votes),
        calibration=calibration,
        mil_attention=votes.mil.attention if votes.mil is not None else None,
        extra_metrics=extra_metrics,
        **extra,
    )


# ---- what the run was ----------------------------------------------------------------------------------


def git_commit(folder: Path) -> str:
    """The commit of the git work tree holding ``folder`` (``+ uncommitted changes`` when tracked files
    differ), or ``unknown`` (no git, not a work tree). Read-only: no optional index refresh."""
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return UNKNOWN
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    dirty = " + uncommitted changes" if status.returncode == 0 and status.stdout.strip() else ""
    return head.stdout.strip() + dirty


def hydra_run(output_dir: Path) -> tuple[dict[str, Any], list[str], Any]:
    """(choices per config group, command-line overrides, seed) of the run: from the run folder's
    ``.hydra/`` files (what ``train.py`` runs write), else from Hydra's current config when one is set;
    ({}, [], None) when neither is there. The seed falls back to Lightning's ``PL_GLOBAL_SEED``."""
    from omegaconf import OmegaConf

    choices: dict[str, Any] = {}
    overrides: list[str] = []
    seed: Any = None
    saved = output_dir / ".hydra"
    try:
        if (saved / "hydra.yaml").is_file():
            hydra = OmegaConf.load(saved / "hydra.yaml").hydra
            choices, overrides = dict(hydra.runtime.choices), list(hydra.overrides.task)
        else:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                hydra = HydraConfig.get()
                choices, overrides = dict(hydra.runtime.choices), list(hydra.overrides.task)
        if (saved / "config.yaml").is_file():
            seed = OmegaConf.load(saved / "config.yaml").get("seed")
    except Exception as exc:  # a hand-edited or foreign file: the report still gets written
        log.warning("Run report: could not read the Hydra config of %s (%s)", output_dir, exc)
    if seed is None:
        seed = os.environ.get("PL_GLOBAL_SEED")
    return choices, overrides, seed


def _plain(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items() if k != "_target_")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return str(value)


def run_config(
    output_dir: Path, pl_module: pl.LightningModule, vote: PatientVoteCallback | None, trainer: pl.Trainer
) -> tuple[str, dict[str, str]]:
    """(title, settings): the report's title (experiment, model, rule) and what the run was: experiment,
    overrides, model, loss, vote rule, calibration, preprocessing, epochs, seed, git commit (``unknown``
    where not known)."""
    choices, overrides, seed = hydra_run(output_dir)
    hp = getattr(pl_module, "hparams", {}) or {}
    backbone = str(hp.get("backbone", UNKNOWN))
    loss = hp.get("loss") or {}
    loss_name = str(loss.get("_target_", UNKNOWN)).rsplit(".", 1)[-1] if isinstance(loss, Mapping) else UNKNOWN
    settings = _plain(loss) if isinstance(loss, Mapping) else ""
    experiment = str(choices.get("experiment") or UNKNOWN)
    rule = vote.rule if vote is not None else UNKNOWN
    weights = auto_class_weights(getattr(pl_module, "criterion", None), hp.get("class_names") or CLASS_NAMES)
    config = {
        "experiment": experiment,
        "overrides": " ".join(overrides) if overrides else ("none" if choices else UNKNOWN),
        "model": backbone + (" (ImageNet weights)" if hp.get("pretrained") else " (from scratch)"),
        "loss": f"{loss_name} ({settings})" if settings else loss_name,
        **({CLASS_WEIGHTS_SETTING: class_weights_text(weights)} if weights else {}),  # the page's key metrics too
        "vote rule": rule,
        "calibration": UNKNOWN if vote is None else ("temperature scaling" if vote.calibration else "off"),
        "preprocessing": _plain(hp.get("preprocessing", UNKNOWN)),
        "epochs": f"{trainer.current_epoch} (trainer.max_epochs {trainer.max_epochs})",
        "seed": UNKNOWN if seed is None else str(seed),
        "git commit": git_commit(Path(__file__).resolve().parent),
    }
    for group in ("data", "optimizer", "scheduler", "loss"):
        if group in choices:
            config[f"{group} (config group)"] = str(choices[group])
    title = f"{experiment} · {backbone} · vote {rule}"
    return title, config


def run_links(output_dir: Path, best_checkpoint: str | None) -> dict[str, str]:
    """Label -> path relative to the run folder of the files a reader opens next: the best checkpoint,
    patients.csv, metrics.json (written when the run ends), the run's log file(s), the data summary and
    split, and the composed config."""
    links: dict[str, str] = {}
    if best_checkpoint:
        links[f"best checkpoint ({Path(best_checkpoint).name})"] = Path(
            os.path.relpath(best_checkpoint, output_dir)
        ).as_posix()
    links[PATIENTS_FILE] = PATIENTS_FILE
    links[METRICS_FILE] = METRICS_FILE
    for logfile in sorted(output_dir.glob("*.log")):  # train.py's Hydra job log: train.log
        links[logfile.name] = logfile.name
    for name in (DATA_SUMMARY_TEXT, SPLIT_FILE, ".hydra/config.yaml"):
        if (output_dir / name).is_file():
            links[Path(name).name] = name
    return links


def data_counts(datamodule: Any) -> tuple[tuple[list[str], list[list]] | None, str]:
    """((header, rows), note): patients and slices per class of the whole data and of each split, and the
    slice targets; (None, "") for a datamodule without a slice table."""
    try:
        table = datamodule.slice_table
    except Exception:  # not set up, or not a CTDataModule
        return None, ""
    labels = np.asarray(table.patient_labels)
    c = len(CLASS_NAMES)
    slices = np.bincount(np.asarray(table.patient), minlength=len(labels))
    header = ["split", *[f"patients {n}" for n in CLASS_NAMES], "patients", *[f"slices {n}" for n in CLASS_NAMES]]
    header.append("slices")
    rows = []
    splits = [("all", np.arange(len(labels)))]
    for name, attr in (("train", "train_patients"), ("validation", "val_patients"), ("test", "test_patients")):
        index = getattr(datamodule, attr, None)
        if index is not None and len(index):
            splits.append((name, np.asarray(index, dtype=np.int64)))
    for name, index in splits:
        patients = np.bincount(labels[index], minlength=c)
        per_class = np.bincount(labels[index], weights=slices[index], minlength=c).astype(np.int64)
        rows.append([name, *patients.tolist(), int(patients.sum()), *per_class.tolist(), int(per_class.sum())])
    summary = getattr(datamodule, "summary", None)
    note = ""
    if summary is not None:
        targets = ", ".join(f"{k} {v}" for k, v in summary.slice_targets.items())
        note = (
            f"Slice targets ({summary.label_mode} label mode): {targets}; training slices without a target "
            f"(not trained on): {summary.unknown_slices_not_trained}. {series_note(summary.series)}"
            "More in data_summary.txt."
        )
    return (header, rows), note


def series_note(series: list[dict[str, Any]]) -> str:
    """One sentence on the patient folders that held more than their series (``DataSummary.series``): which
    series each used and why, and what was left out; "" when every folder held one series."""
    mixed = [s for s in series if s.get("other_series")]
    if not mixed:
        return ""
    used = "; ".join(
        f"{s['patient']} used {series_line(s['series'])} and left out {len(s['other_series'])} other series or "
        f"image group(s)"
        for s in mixed
    )
    return f"{len(mixed)} patient folder(s) held more than one series: {used}. "


# ---- the callback ----------------------------------------------------------------------------------------


class RunReportCallback(pl.Callback):
    """Writes the run report into ``output_dir`` when fitting ends (rank 0 only), and keeps the per-epoch
    values of its training curves (in its checkpoint state).

    Args:
        output_dir: the run folder (``${paths.output_dir}``).
        run_name: shown under the report's title and on its figures; None = the run folder's name.
        cam_slices_per_patient: Grad-CAM images per patient call shown (the slices that decided it); 0 = no
            Grad-CAM section.
        cam_right_per_class: right calls shown per true class beside every wrong one (0: wrong calls only).
        cam_max_wrong: at most this many wrong calls shown (the section says how many more there were).
    """

    def __init__(
        self,
        output_dir: str,
        run_name: str | None = None,
        cam_slices_per_patient: int = 2,
        cam_right_per_class: int = 2,
        cam_max_wrong: int = 24,
    ) -> None:
        cams = {
            "cam_slices_per_patient": cam_slices_per_patient,
            "cam_right_per_class": cam_right_per_class,
            "cam_max_wrong": cam_max_wrong,
        }
        for key, value in cams.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"callbacks.run_report.{key} must be an integer >= 0, got {value!r}")
        self.cam_slices_per_patient, self.cam_right_per_class, self.cam_max_wrong = cams.values()
        self.output_dir = Path(output_dir)
        self.run_name = run_name or self.output_dir.name
        #: per validation epoch: epoch, train_loss, val_loss, val_patient_acc
        self.history: list[dict[str, float]] = []
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0

    # ---- training curves ----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_sum, self._loss_count = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        n = len(batch["image"]) if isinstance(batch, Mapping) and "image" in batch else 1
        self._loss_sum = self._loss_sum + loss.detach().float() * n  # stays on the device: no sync per step
        self._loss_count += n

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the epoch (before ModelCheckpoint saves, which Lightning runs last: the checkpoint holds it)."""
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics

        def value(key: str) -> float:
            v = metrics.get(key)
            return float(v) if v is not None else math.nan

        train_loss = float(self._loss_sum) / self._loss_count if self._loss_count else math.nan
        entry = {
            "epoch": int(trainer.current_epoch),
            "train_loss": train_loss,
            "val_loss": value("val/loss"),
            "val_patient_acc": value("val/patient/acc"),
        }
        self.history = [e for e in self.history if e["epoch"] != entry["epoch"]] + [entry]

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(e) for e in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(e) for e in state_dict.get("history", [])]

    # ---- the report ---------------------------------------------------------------------------------
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
        from covidct.report.page import write_report

        vote = next((c for c in trainer.callbacks if isinstance(c, PatientVoteCallback)), None)
        title, config = run_config(self.output_dir, pl_module, vote, trainer)
        data, data_note = data_counts(trainer.datamodule)
        ckpt = trainer.checkpoint_callback
        report = report_from_votes(
            votes,
            trainer.datamodule.slice_table.target,
            self.run_name,
            vote,
            history=list(self.history),
            data=data,
            data_note=data_note,
            config=config,
            links=run_links(self.output_dir, ckpt.best_model_path if ckpt else None),
            title=title,
        )
        report.cams = self.report_cams(trainer, pl_module, votes, report)
        written = write_report(report, self.output_dir)
        log.info("Run report: %s", written.paths[REPORT_FILE])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_to_wandb(logger, written, report)

    def report_cams(self, trainer: pl.Trainer, pl_module: pl.LightningModule, votes: ValidationVotes, report):
        """Grad-CAM of the report's calls (:func:`~covidct.report.call_cams.call_cams`) with the best
        checkpoint's weights; None when switched off, or when it fails (a warning: the report is written
        without the section)."""
        if self.cam_slices_per_patient < 1:
            return None
        from covidct.report.call_cams import call_cams
        from covidct.report.cam import lung_channel

        started = time.perf_counter()
        try:
            table = trainer.datamodule.slice_table
            ckpt = trainer.checkpoint_callback
            model, weights = best_model(pl_module, ckpt.best_model_path if ckpt else "")
            cams = call_cams(
                model,
                report,
                lambda index: table.images[votes.slice_rows[index]],
                weights,
                channel=lung_channel(table.windows),
                slices_per_patient=self.cam_slices_per_patient,
                right_per_class=self.cam_right_per_class,
                max_wrong=self.cam_max_wrong,
            )
        except Exception as exc:  # a report never fails for its Grad-CAM section
            log.warning("Run report: written without Grad-CAM (%s: %s)", type(exc).__name__, exc)
            return None
        shown = sum(len(c.slices) for c in cams.calls) if cams is not None else 0
        log.info("Run report: Grad-CAM of %d slices in %.1f s", shown, time.perf_counter() - started)
        return cams


def best_model(pl_module: pl.LightningModule, path: str) -> tuple[torch.nn.Module, str]:
    """(model, which weights it holds): the best checkpoint's model, read afresh onto ``pl_module``'s device
    (at fit end ``pl_module`` holds the last epoch's weights); ``pl_module`` itself when there is no best
    checkpoint to read."""
    if path and Path(path).is_file():
        try:
            from covidct.models.checkpoint import read_checkpoint

            ckpt = read_checkpoint(path)
            hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in ("loss", "class_counts")}
            model = type(pl_module)(**hp | {"pretrained": False})  # as predict.py builds it
            model.load_state_dict(ckpt["state_dict"])
            return model.eval().to(pl_module.device), f"the best checkpoint ({Path(path).name})"
        except Exception as exc:
            log.warning("Run report: Grad-CAM with the last epoch's weights: %s could not be read (%s)", path, exc)
    return pl_module, "the weights at the end of training (no best checkpoint was read)"


def log_to_wandb(logger: WandbLogger, written, report) -> None:
    """The report in the W&B run's summary, under ``report/``: each figure once, with a caption saying what
    it is (PNGs as images, the SVG figures as HTML), the AUCs and calibration errors as numbers, and the
    page itself (without the run folder's links). Patients are named by the logger's pseudonyms when
    ``privacy.pseudonymize`` is on (:mod:`covidct.training.privacy`); the PNGs name no patient."""
    import html

    import wandb

    from covidct.report.figures import render_figures
    from covidct.report.page import render_html
    from covidct.training.privacy import pseudonymizer_of

    pseudonym, figures = pseudonymizer_of(logger), written.figures
    if pseudonym.active:
        report = dataclasses.replace(report, patients=[pseudonym(p) for p in report.patients])
        figures = render_figures(report, written.scored, pngs=written.images)
    summary = logger.experiment.summary
    for name, path in written.paths.items():
        if path.suffix == ".png":
            summary[f"report/{path.stem}"] = wandb.Image(str(path), caption=figures.captions[name])
    for name, svg in figures.svgs.items():
        caption = html.escape(figures.captions[name])
        summary[f"report/{Path(name).stem}"] = wandb.Html(f"<figure>{svg}<figcaption>{caption}</figcaption></figure>")
    for metric, value in written.metrics.items():
        if np.isfinite(value):
            summary[_key(metric)] = float(value)
    summary["report/html"] = wandb.Html(render_html(report, written.scored, figures, links=False))


def _key(metric: str) -> str:
    """'patient AUC (macro), rule scores' -> 'report/patient_auc_macro_rule_scores'."""
    return "report/" + re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_")
