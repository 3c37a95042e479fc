"""Gather every validation slice's probabilities, vote per patient, log patient-level metrics.

Every rule of :data:`covidct.patients.rules.VOTE_RULES` is scored every validation epoch on the same slice
probabilities, as ``rules/<rule>/<metric>`` scalars (every logger; W&B charts the configured rule's only:
:class:`covidct.training.wandb_logger.RuleChartWandbLogger`; the names: :mod:`covidct.contracts`) and a per-rule
table (rule, accuracy, macro F1, sensitivity per class): with a WandbLogger the ``wandb.Table`` ``rules/table``
every epoch (its summary: the best epoch's), and on the console one line per epoch (the configured rule's
accuracy and the best other rule's), the whole table once at the end of fit, for the best epoch (rank 0 only).
Each patient's slices are voted in position order (head first: the cache stores them so and ``index`` is the
cache row).

``infected_fraction`` (Normal if at most ``tau`` of the slices look infected, else the majority among
the infected slices) tunes ``tau`` on the validation patients; it is stored in the checkpoint (this
callback's state) for prediction. The *reported* accuracy of this rule is leave-one-patient-out: each
patient is scored with a tau tuned on the other validation patients, so the figure is not fitted to
the patient it scores. ``threshold`` tunes its slice threshold and its tau together
(:func:`~covidct.patients.tuning.tune_threshold`), reported leave-one-patient-out the same way. The other rules
have no fitted parameter.

``mil`` (:mod:`covidct.patients.aggregation`) is learned: a gated attention MIL head over what the slice model says
of each slice (``mil_features``, :mod:`covidct.patients.mil_features`: the embeddings its ``validation_step``
returns as ``embedding``, or its calibrated log probabilities), trained on the validation patients' classes (every
patient, its slices labelled or not). Its reported predictions are cross-fitted (each patient scored by
a head fitted on the other validation patients: stratified 5-fold, leave-one-out up to 10 patients); the
head fitted on all of them is stored in the checkpoint for predict.py. It is not fitted on the training
patients, whose embeddings the slice model has learnt by heart (they would not transfer). Unless ``mil`` is the
configured rule (then its score picks the best epoch, and it is fitted every epoch), it is fitted once, at the end
of fit, on the best epoch's slices: its ``rules/mil/*`` scalars reach metrics.json, the W&B summary, patients.csv
and the report, and its head is written into the best checkpoint; epochs have no ``rules/mil/*`` of their own.

The chosen ``rule`` is also logged as ``val/patient/acc``, the metric checkpointing monitors.
Under DDP the slices of all ranks are gathered and deduplicated by their global index (the
DistributedSampler pads with repeats), so every rank computes the same patient metrics.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from covidct.contracts import PATIENT_ACC, PATIENTS_FILE, rule_metric
from covidct.errors import ConfigError
from covidct.io import atomic_write_csv
from covidct.models.checkpoint import update_callback_state
from covidct.patients.decisions import PatientVoter, ValidationVotes
from covidct.patients.explanations import patient_decisions, patients_table
from covidct.patients.metrics import rules_table
from covidct.patients.mil_features import DEFAULT_MIL_FEATURES
from covidct.patients.parameters import CENTER_SLICES, TEMPERATURE, TOP_K, WINDOW_SLICES, VoteParameters
from covidct.patients.rules import LEARNED_RULES, VOTE_RULES
from covidct.text_table import format_table

log = logging.getLogger(__name__)
# The patient metrics are computed from all ranks' gathered slices, so every rank logs the same values
# and syncing them would only cost collectives: Lightning's hint to log them with sync_dist is noise.
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self.log\('val/patient/",
    category=PossibleUserWarning,
)


def rules_text(columns: list[str], rows: list[list], marked: str | None = None) -> str:
    """:func:`~covidct.patients.metrics.rules_table` as aligned text, numbers to 3 decimals; rule ``marked`` is
    starred."""
    header = ["  " + columns[0], *(c.replace("sensitivity ", "sens ") for c in columns[1:])]
    body = [[("* " if r[0] == marked else "  ") + r[0], *(f"{v:.3f}" for v in r[1:])] for r in rows]
    return format_table(header, body)


def logged_rules_table(metrics: dict[str, float]) -> tuple[list[str], list[list]]:
    """:func:`~covidct.patients.metrics.rules_table` of one epoch's logged ``rules/<rule>/<metric>`` scalars
    (e.g. a best epoch restored from a checkpoint, which keeps no votes): every rule scored that epoch, in
    :data:`VOTE_RULES` then :data:`LEARNED_RULES` order; ``([], [])`` when they were not all recorded."""
    by_rule = {}
    for rule in VOTE_RULES + LEARNED_RULES:
        prefix = rule_metric(rule, "")
        scores = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        if scores:
            by_rule[rule] = scores
    try:
        return rules_table(by_rule) if by_rule else ([], [])
    except KeyError:  # an older checkpoint's best epoch: not every rule's sensitivities
        return [], []


def deduplicate(indices: np.ndarray | torch.Tensor, *arrays: Any) -> tuple:
    """Keep the first occurrence of each global sample index.

    ``DistributedSampler`` pads the dataset with repeated samples so every rank gets as many; after an
    ``all_gather`` the repeats must count once. ``indices`` (N,) int and each array (N, ...) are numpy
    arrays or torch tensors; returns ``(unique_indices_sorted, *arrays)`` with every array reordered the
    same way and of the same type (and device) as given.
    """
    idx_np = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    idx_np = idx_np.reshape(-1)
    for k, array in enumerate(arrays):
        if len(array) != idx_np.size:
            raise ValueError(f"array {k} has {len(array)} rows but there are {idx_np.size} indices")
    _, first = np.unique(idx_np, return_index=True)

    def take(array: Any) -> Any:
        if isinstance(array, torch.Tensor):
            return array[torch.as_tensor(first, dtype=torch.long, device=array.device)]
        return np.asarray(array)[first]

    return (take(indices), *(take(a) for a in arrays))


class PatientVoteCallback(PatientVoter, pl.Callback):
    """Patient-level voting and metrics on the validation set: gathers the validation slices, decides the
    epoch's calls (:class:`~covidct.patients.decisions.PatientVoter`), logs the metrics and the rule table,
    writes ``patients.csv`` and keeps the vote parameters (``parameters``) in the checkpoint.

    Reads the data's :class:`~covidct.data.datamodule.SliceTable` (``trainer.datamodule.slice_table``)
    and publishes the best epoch's :class:`~covidct.patients.decisions.ValidationVotes` as ``best`` and on the
    LightningModule as ``pl_module.patient_votes`` (read by the report and W&B callbacks).

    Args:
        rule, tau, k, center_slices, window_slices, slice_threshold, calibration, mil, mil_features: see
            :class:`~covidct.patients.decisions.PatientVoter`.
        output_dir: where ``patients.csv`` of the best epoch is written (None: not written).
        from_ckpt: take tau, the threshold rule's parameters and the temperature from this checkpoint's
            vote state, fixed (nothing is tuned): e.g. a k-fold run's best fold, for a run on every
            patient (``data.val_fraction=0``), which has no validation patients to tune them on.
    """

    def __init__(
        self,
        rule: str = "infected_fraction",
        tau: float | None = None,
        output_dir: str | None = None,
        k: int = TOP_K,
        center_slices: int = CENTER_SLICES,
        window_slices: int = WINDOW_SLICES,
        slice_threshold: float | None = None,
        calibration: bool = True,
        from_ckpt: str | None = None,
        mil: bool = True,
        mil_features: str = DEFAULT_MIL_FEATURES,
    ):
        super().__init__(rule, tau, k, center_slices, window_slices, slice_threshold, calibration, mil, mil_features)
        if rule in LEARNED_RULES and from_ckpt is not None:
            raise ConfigError(
                f"vote.rule={rule} with vote.from_ckpt: the MIL head is fitted on the outputs of the model it "
                "belongs to, so another run's head cannot be reused; without validation patients use a fixed rule"
            )
        self.from_ckpt = from_ckpt
        if from_ckpt is not None:
            self.fix_to(self.source_parameters(from_ckpt))
        self.output_dir = Path(output_dir) if output_dir else None
        self.best: ValidationVotes | None = None
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def source_parameters(self, source: str) -> VoteParameters:
        """The vote parameters ``source``'s vote state records (older checkpoints: the threshold rule's tau is
        its tau, the defaults for the rest). A checkpoint without a vote state is refused, naming
        ``vote.from_ckpt``."""
        from covidct.models.checkpoint import read_checkpoint

        ckpt = read_checkpoint(source, key="vote.from_ckpt")
        state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("PatientVoteCallback")), None)
        if not state:
            raise ConfigError(
                f"vote.from_ckpt={source}: the checkpoint has no patient vote state (a stage-1 model, or not "
                "written by train.py); give a checkpoint of a run with validation patients"
            )
        defaults = VoteParameters(self.rule, tau=float(state["tau"]), threshold_tau=float(state["tau"]))
        return VoteParameters.from_state(state, defaults)

    def parameters_source(self) -> str:
        """Where the vote parameters a checkpoint stores come from, with their values (for the run summary)."""
        p = self.parameters
        values = (
            f"tau {p.tau:.3f}, threshold rule slice {p.slice_threshold:.3f} / share {p.threshold_tau:.3f}, "
            f"temperature {p.temperature:.3f}"
        )
        if self.from_ckpt:
            return f"from vote.from_ckpt={self.from_ckpt} ({values})"
        return (
            f"the rules' defaults, nothing tuned without validation patients ({values}); "
            "vote.from_ckpt=<checkpoint> takes a validated run's"
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.patient_votes = self.best  # a resumed run's best so far (restored before fit starts)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_best_mil(trainer, pl_module)
        if trainer.is_global_zero:
            self.log_best_rules(trainer)

    def fit_best_mil(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit ``mil`` on the best epoch's slices (:meth:`PatientVoter.fit_mil`, every rank alike) and, on rank 0,
        rewrite patients.csv and put the head into the best checkpoint (atomically). Before the run report and
        the run summary read the best epoch (callbacks run in order; Lightning puts checkpointing last)."""
        best = self.best
        if best is None or best.mil_pending is None:
            if self.mil and best is not None and not best.patients and self.rule not in LEARNED_RULES:
                log.info("mil is not scored: the best epoch (%d) was validated before this run resumed", best.epoch)
            return
        self.best = pl_module.patient_votes = self.fit_mil(best)
        if "mil" not in self.best.predictions or not trainer.is_global_zero:
            return
        self.write_patients_csv(self.best)
        head = {"mil": self.parameters.to_state()["mil"]}
        paths = {c.best_model_path for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)}
        for path in sorted(p for p in paths if p):
            if not update_callback_state(path, self.state_key, head, best.epoch):
                log.warning(
                    "%s is not the best epoch's checkpoint (%d): the mil head is not stored in it", path, best.epoch
                )

    # ---- collection ---------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        embedding = outputs.get("embedding") if self.mil and self.mil_features == "embeddings" else None
        self._batches.append(
            (
                batch["index"].detach(),
                batch["patient"].detach(),
                outputs["probs"].detach(),
                None if embedding is None else embedding.detach().float(),
            )
        )

    def gather(self, trainer: pl.Trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """All ranks' (index (N,), patient (N,), probs (N, C), embeddings (N, D) float32 or None when the
        model gave none, ``mil`` is off or reads no embeddings), each slice exactly once, by index."""
        columns = [torch.cat([b[k] for b in self._batches]) for k in range(3)]
        if all(b[3] is not None for b in self._batches):
            columns.append(torch.cat([b[3] for b in self._batches]))
        if trainer.world_size > 1:  # equal lengths per rank: DistributedSampler pads
            columns = [trainer.strategy.all_gather(t).flatten(0, 1) for t in columns]
        index, *arrays = deduplicate(*columns)
        arrays = [a.cpu().numpy() for a in arrays]
        return index.cpu().numpy(), arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._batches:
            return
        table = trainer.datamodule.slice_table
        index, patient, probs, embeddings = self.gather(trainer)
        targets = table.target[index] if len(table.target) else None
        result = self.decide(
            trainer.current_epoch,
            index,
            patient,
            probs,
            table.patient_ids,
            table.patient_labels,
            targets,
            embeddings,
        )
        scalars = self.log_scalars(trainer, pl_module, result.metrics)
        if trainer.is_global_zero:
            self.log_rule_table(trainer, len(result.labels), scalars)
        if self.best is None or result.score > self.best.score:
            self.best = result
            pl_module.patient_votes = result
            if trainer.is_global_zero:
                self.write_patients_csv(result)

    @staticmethod
    def log_scalars(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]) -> dict[str, float]:
        """The epoch's scalars: ``val/*`` through Lightning (what checkpointing, early stopping and the best-epoch
        record read), every other one (``rules/*``, ``vote/*``, ``calibration/*``) straight to the loggers (rank 0),
        at the epoch's step with its ``epoch``, as Lightning would; returned for W&B, which gets them with the rule
        table (:meth:`log_rule_table`: one history row). Lightning makes and moves a result object per logged key
        every epoch (~0.5 ms a key): for the vote's ~70 keys, ~10% of a small epoch (``make bench``'s framework row).
        """
        pl_module.log_dict({k: v for k, v in metrics.items() if k.startswith("val/")}, sync_dist=False)
        others = {k: float(v) for k, v in metrics.items() if not k.startswith("val/")}
        if others and trainer.is_global_zero:
            for lg in trainer.loggers:
                if not isinstance(lg, WandbLogger):
                    lg.log_metrics(others | {"epoch": trainer.current_epoch}, step=trainer.global_step)
        return others

    def log_rule_table(self, trainer: pl.Trainer, n_patients: int, scalars: dict[str, float] | None = None) -> None:
        """The epoch's per-rule table: one INFO line (the configured rule's accuracy, the best other rule's),
        and ``rules/table`` with the epoch's other ``scalars`` (:meth:`log_scalars`) to every WandbLogger, in one
        history row at the epoch's step (call on rank 0)."""
        columns, rows = self.rule_table
        mine = next((r for r in rows if r[0] == self.rule), None)
        others = [r for r in rows if r[0] != self.rule]
        best_other = max(others, key=lambda r: r[1]) if others else None  # the first of equals: VOTE_RULES order
        log.info(
            "Epoch %d: patient accuracy %s with vote=%s (val/patient/acc, %d validation patients)%s",
            trainer.current_epoch,
            "nan" if mine is None else f"{mine[1]:.3f}",
            self.rule,
            n_patients,
            "" if best_other is None else f"; best other rule {best_other[0]} {best_other[1]:.3f}",
        )
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            import wandb

            for lg in wandb_loggers:  # RuleChartWandbLogger leaves the other rules' scalars out
                row = (scalars or {}) | {"rules/table": wandb.Table(columns=columns, data=rows)}
                lg.log_metrics(row, step=trainer.global_step)

    def log_best_rules(self, trainer: pl.Trainer) -> None:
        """At the end of fit, the best epoch's per-rule table: INFO text, and the ``rules/table`` of every
        WandbLogger's summary (which W&B would leave at the last epoch's). Nothing without a best epoch."""
        best = self.best
        columns, rows = logged_rules_table(best.metrics) if best is not None else ([], [])
        if not rows:
            return
        n_patients = len(best.labels) if len(best.labels) else int(best.confusion.sum())
        log.info(
            "Patient rules at the best epoch %d, %d validation patients (* = vote.rule, logged as "
            "val/patient/acc):\n%s",
            best.epoch,
            n_patients,
            rules_text(columns, rows, marked=self.rule),
        )
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            import wandb

            for lg in wandb_loggers:
                lg.experiment.summary["rules/table"] = wandb.Table(columns=columns, data=rows)

    # ---- outputs ------------------------------------------------------------------------------
    def write_patients_csv(self, result: ValidationVotes) -> None:
        """``patients.csv``: one row per validation patient of the best epoch (atomic): what the configured
        rule decided on (:func:`~covidct.patients.explanations.patient_decisions`) and every rule's reported
        vote (:func:`~covidct.patients.explanations.patients_table`)."""
        if self.output_dir is None:
            return
        atomic_write_csv(self.output_dir / PATIENTS_FILE, *patients_table(result, patient_decisions(result, self)))

    def state_dict(self) -> dict[str, Any]:
        # The vote parameters (VoteParameters.to_state: read by predict.py; on resume the config's k,
        # center_slices and window_slices win, like its rule, which the model's hyper_parameters hold) and the
        # best epoch's metrics and confusion: a resumed run (ckpt_path, SLURM requeue) that does not improve
        # on it still reports them. ``mil`` is the latest epoch's head with vote.rule=mil (the checkpoint
        # monitor saves the best epoch, so a best checkpoint holds the head of its own epoch); with another rule
        # none until the end of fit, which writes the best epoch's into the best checkpoint (fit_best_mil).
        best = self.best
        return self.parameters.to_state() | {
            "best": None if best is None else best.score,
            "best_epoch": None if best is None else best.epoch,
            "best_summary": {} if best is None else {k: float(v) for k, v in best.metrics.items()},
            "best_confusion": None if best is None else best.confusion.tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        defaults = replace(self.parameters, temperature=TEMPERATURE)  # older checkpoints: not calibrated
        self.parameters = self.parameters.with_fitted(VoteParameters.from_state(state_dict, defaults))
        if state_dict.get("best") is None:
            return
        metrics = dict(state_dict.get("best_summary") or {PATIENT_ACC: state_dict["best"]})  # older: no summary
        self.best = ValidationVotes.restored(
            int(state_dict["best_epoch"]),
            self.rule,
            self.parameters.tau,
            self.fixed_tau is None,
            metrics,
            state_dict.get("best_confusion"),
        )
