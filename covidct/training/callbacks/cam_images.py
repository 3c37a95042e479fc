"""Grad-CAM overlays of a few fixed validation slices, logged to W&B during training (rank 0 only).

The same slices every time, so the W&B image panel shows how the model's attention changes over the
epochs: one validation patient per class in turn, its middle slice among those labelled with the
patient's class (its middle slice when it has none). Each overlay names its patient (caption and the
text drawn into the image) by the logger's pseudonym when ``privacy.pseudonymize`` is on.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from covidct.contracts import CLASS_NAMES
from covidct.errors import ConfigError
from covidct.training.privacy import prepare_loggers, pseudonymizer_of

log = logging.getLogger(__name__)


def pick_slices(patients: np.ndarray, targets: np.ndarray, patient_labels: np.ndarray, n: int) -> np.ndarray:
    """Positions (up to ``n``, int64) into validation slices given by ``patients`` int (R,) patient index
    and ``targets`` int (R,) slice class (-1 unknown), in head-first order per patient;
    ``patient_labels`` int (P,) class per patient index. One patient per class in turn."""
    queues = [list(dict.fromkeys(patients[patient_labels[patients] == c]).keys()) for c in range(len(CLASS_NAMES))]
    picked: list[int] = []
    for rank in range(max(map(len, queues), default=0)):
        for queue in queues:
            if rank < len(queue) and len(picked) < n:
                p = queue[rank]
                mine = np.flatnonzero(patients == p)
                labelled = mine[targets[mine] == patient_labels[p]]
                pool = labelled if len(labelled) else mine
                picked.append(int(pool[len(pool) // 2]))
    return np.asarray(picked, dtype=np.int64)


class CamImagesCallback(pl.Callback):
    """Logs Grad-CAM overlays (of each slice's predicted class) of ``n_slices`` fixed validation slices
    to W&B every ``every_n_epochs`` validation epochs and at fit end; nothing without a WandbLogger.

    Args:
        n_slices: validation slices shown.
        every_n_epochs: log after every n-th validation epoch (and at fit end).
        key: the W&B image key.
    """

    def __init__(self, n_slices: int = 4, every_n_epochs: int = 5, key: str = "val/grad_cam") -> None:
        if n_slices < 1:
            raise ConfigError(f"callbacks.cam_images.n_slices must be >= 1, got {n_slices}")
        if every_n_epochs < 1:
            raise ConfigError(f"callbacks.cam_images.every_n_epochs must be >= 1, got {every_n_epochs}")
        self.n_slices, self.every_n_epochs, self.key = n_slices, every_n_epochs, key
        self._logged_step: int | None = None
        self._said_no_wandb = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Mapping file, collision check and identifier-shape warning of the W&B pseudonymizers."""
        if trainer.is_global_zero:
            prepare_loggers(trainer.loggers, getattr(trainer.datamodule, "patient_ids", None))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_cams(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._logged_step != trainer.global_step:
            self.log_cams(trainer, pl_module)

    def log_cams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute and log the overlays (rank 0, with a WandbLogger)."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not trainer.is_global_zero or not loggers:
            if not loggers and not self._said_no_wandb:
                log.debug("Grad-CAM images not logged: no WandbLogger")
                self._said_no_wandb = True
            return
        from covidct.report.cam import grad_cam, lung_channel, overlay

        table = trainer.datamodule.slice_table
        val = table.val_rows
        rows = val[pick_slices(table.patient[val], table.target[val], table.patient_labels, self.n_slices)]
        images = torch.from_numpy(np.array(table.images[rows]))
        heatmaps, probs = grad_cam(pl_module, images)
        channel = lung_channel(table.windows)
        for lg in loggers:  # the caption is drawn into the image too: one set of overlays per pseudonymizer
            pseudonym = pseudonymizer_of(lg)
            captions, overlays = [], []
            for row, image, heatmap, p in zip(rows, images, heatmaps, probs, strict=True):
                pred, target = int(p.argmax()), int(table.target[row])
                captions.append(
                    f"{pseudonym(table.patient_ids[table.patient[row]])} slice {table.rank[row]}: "
                    f"true {CLASS_NAMES[target] if target >= 0 else '?'}, "
                    f"Grad-CAM of {CLASS_NAMES[pred]} p={p[pred]:.2f} ({image.shape[-1]} px input, upsampled)"
                )
                overlays.append(overlay(image[channel].numpy(), heatmap, captions[-1]))
            lg.log_image(self.key, overlays, step=trainer.global_step, caption=captions)
        self._logged_step = trainer.global_step
