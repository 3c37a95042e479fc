"""Lightning's debugging flags with the default config (every callback, W&B offline as the default logger).

``trainer.fast_dev_run=true`` swaps the loggers for Lightning's DummyLogger (which answers any attribute
with a no-op function) and saves no checkpoint; ``trainer.limit_val_batches=0`` runs no validation epoch
although validation patients are held out. Both must train and end with a true summary.
"""

from __future__ import annotations

import json

import pytest

from covidct.training.run import train
from tests.conftest import compose_train, tiny


@pytest.mark.slow  # ~10 s each: one tiny training
@pytest.mark.parametrize(
    "flag", ["trainer.fast_dev_run=true", "trainer.limit_val_batches=0"], ids=["fast_dev_run", "limit_val_batches"]
)
def test_lightning_debug_flags_train_with_the_default_config(tmp_path, shared_cache, flag):
    result = train(compose_train(tmp_path, [*tiny(shared_cache), flag]))
    summary = result.summary("infected_fraction")
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    if flag == "trainer.fast_dev_run=true":  # one batch each, nothing logged, nothing saved
        assert result.best_epoch == 0 and summary.startswith("Best epoch 0")
        assert not (tmp_path / "wandb").exists() and not (tmp_path / "checkpoints").exists()
        assert "best checkpoint: none" in summary
    else:  # the validation patients are held out, not trained on: not "every patient trains"
        assert result.best_epoch is None and result.best_checkpoint == str(tmp_path / "checkpoints" / "last.ckpt")
        assert summary.startswith("No validation (trainer.limit_val_batches=0, the validation patients are held out")
        assert f"checkpoint for predict.py: {result.best_checkpoint}" in summary
