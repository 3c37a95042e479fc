"""Reseed torch, numpy and ``random`` before every training step, from (seed, epoch, step, rank).

With the training sampler's draws depending only on (seed, epoch) (see
:class:`covidct.data.slice_dataset.EpochSampler`), step k of epoch e then sees the same batch,
augmentation and dropout whether the run went through every earlier step itself or was resumed
from a checkpoint (a killed or preempted run): with ``trainer.deterministic=true`` both end with the
same weights and metrics.
"""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch

from covidct.seeding import derive_seed


class StepSeed(pl.Callback):
    """Seeds the global generators (model randomness such as dropout) at each training batch."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        seed = derive_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        # the generators themselves (not seed_everything, which also rewrites PL_GLOBAL_SEED and logs)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
