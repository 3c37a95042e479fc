"""ModelCheckpoint that keeps the best epoch so far when a run is resumed into another folder.

Lightning's ``ModelCheckpoint`` restores only ``best_model_path`` from a checkpoint saved in another
``dirpath`` (a resume with ``ckpt_path=<run A>/checkpoints/last.ckpt`` into a new run folder B): its
score is forgotten, so B's first epoch became the "best" checkpoint even when worse than A's, while the
vote and best-epoch callbacks (whose state is restored) still reported A's best epoch. Here the score
and the top-k are restored too: A's best stays the one to beat, and its file stays where it is
(Lightning never deletes a checkpoint outside its own ``dirpath``).
"""

from __future__ import annotations

import warnings
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose best score and top-k survive a resume into another folder."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        with warnings.catch_warnings():  # Lightning's "won't be reloaded": they are, below
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)
        if moved:  # the same fields Lightning restores when the folder is unchanged
            self.best_model_score = state_dict["best_model_score"]
            self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
            self.kth_value = state_dict.get("kth_value", self.kth_value)
            self.best_k_models = state_dict.get("best_k_models", self.best_k_models)
