"""A callback that SIGKILLs its own process at a chosen training batch (tests of crash recovery)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """``kill -9`` this process when training batch ``batch`` of epoch ``epoch`` starts: no handler runs,
    nothing is flushed, as when the OOM killer or a cluster's hard limit strikes."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
