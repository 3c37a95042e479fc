"""Crash recovery, tried for real: a training killed with SIGKILL mid-epoch, resumed from its last
checkpoint, ends exactly where an uninterrupted run ends, in the same W&B run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli_env, run_cli, tiny

pytestmark = pytest.mark.slow


def overrides(cache: Path) -> list[str]:
    """3 epochs of 4 batches, augmentation on (the default), deterministic kernels."""
    keep = [
        o
        for o in tiny(cache)
        if not o.startswith(("trainer.max_epochs", "trainer.limit_train_batches", "data.batch_size"))
    ]
    return keep + [
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=4",
        "data.batch_size=4",
        "trainer.deterministic=true",
        "seed=7",
        "logger=wandb",
        "model=efficientnet_b0",
    ]  # dropout and stochastic depth: model randomness replayed too


def train_cli(run_dir: Path, args: list[str], process: bool = False) -> subprocess.CompletedProcess:
    """``python train.py <args>`` into ``run_dir``: in this process, or as a process of its own (to be killed)."""
    if not process:
        return run_cli([*args, f"hydra.run.dir={run_dir}"], REPO)
    env = cli_env()
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def wandb_run_ids(run_dir: Path) -> list[str]:
    return [p.name.rsplit("-", 1)[-1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_metrics(tmp_path, shared_cache):
    common = overrides(shared_cache)
    whole = train_cli(tmp_path / "whole", common)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = train_cli(
        tmp_path / "killed",
        [
            *common,
            "+callbacks.kill._target_=tests.kill_at.KillAt",
            "+callbacks.kill.epoch=1",
            "+callbacks.kill.batch=2",
        ],
        process=True,
    )
    assert killed.returncode == -signal.SIGKILL
    saved = load(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert saved["epoch"] == 0 and saved["global_step"] == 4  # epoch 1 was half done when the kill came
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed = train_cli(tmp_path / "resumed", [*common, f"ckpt_path={tmp_path / 'killed/checkpoints/last.ckpt'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    got = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert got["best_epoch"] == expected["best_epoch"] and got["score"] == expected["score"]
    assert got["metrics"] == expected["metrics"] and got["confusion"] == expected["confusion"]
    final = load(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    final_resumed = load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert final_resumed["global_step"] == final["global_step"] == 12
    for name, weights in final["state_dict"].items():
        assert torch.equal(final_resumed["state_dict"][name], weights), name
    # the resumed run continues the killed run's W&B run; the uninterrupted one is another run
    assert wandb_run_ids(tmp_path / "resumed") == wandb_run_ids(tmp_path / "killed") == [saved["wandb_run_id"]]
    assert wandb_run_ids(tmp_path / "whole") != wandb_run_ids(tmp_path / "killed")
