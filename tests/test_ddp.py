"""DDP on CPU (gloo, 2 real processes): exactly-once patient metrics, train.py under DDP with Hydra,
the multirun refusal, and SLURM's requeue signal (SIGUSR1) with a fake ``scontrol``; plus the resume
helpers they rely on."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from covidct.patients.rules import VOTE_RULES
from covidct.training.callbacks.patient_vote import PatientVoteCallback
from covidct.training.run import resume_checkpoint
from tests.conftest import REPO, tiny

SLURM_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "covidct",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}
DIST_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")

#: what the patient vote logs (covidct.metric_names): computed from all ranks' gathered slices
PATIENT_LEVEL = ("val/patient/", "rules/", "vote/", "calibration/")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SLURM's or a launcher's rank variables (so Lightning starts the ranks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in DIST_VARS}
    return env | {"WANDB_MODE": "offline"} | extra


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=300
    )


# ---- resume helpers (fast) ------------------------------------------------------------------------
def test_resume_checkpoint_is_the_newest_hpc_checkpoint_under_slurm_only(tmp_path, monkeypatch):
    for n in (2, 10, 9):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    cfg = OmegaConf.create({"ckpt_path": None, "trainer": {"default_root_dir": str(tmp_path)}})
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert resume_checkpoint(cfg) is None  # not on SLURM: a fresh run
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    assert resume_checkpoint(cfg) == str(tmp_path / "hpc_ckpt_10.ckpt")
    cfg.ckpt_path = "given.ckpt"
    assert resume_checkpoint(cfg) == "given.ckpt"  # an explicit ckpt_path wins


def test_vote_state_keeps_the_best_epochs_metrics_for_a_resumed_run():
    """A resumed run that never beats the restored best still reports the best epoch's figures."""
    before = PatientVoteCallback()
    before.parameters = dataclasses.replace(before.parameters, tau=0.2)
    before.best = before.decide(3, *_one_patient_per_class(), ["P0", "P1", "P2"], np.array([0, 1, 2]))
    state = torch.load(_roundtrip(before.state_dict()), weights_only=True)  # as checkpoints are read
    after = PatientVoteCallback()
    after.load_state_dict(state)
    assert (after.best.score, after.best.epoch, after.parameters.tau) == (before.best.score, 3, before.parameters.tau)
    assert after.best.metrics == pytest.approx(before.best.metrics)
    np.testing.assert_array_equal(after.best.confusion, before.best.confusion)
    assert after.best.patients == []  # the slices are not stored: no report for a run that does not improve
    old = PatientVoteCallback()  # a checkpoint from before these keys existed
    old.load_state_dict({"rule": "infected_fraction", "tau": 0.4, "best": 0.5, "best_epoch": 1})
    assert old.best.metrics == {"val/patient/acc": 0.5} and old.best.confusion.size == 0


def _one_patient_per_class() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, patient, probs) of 3 patients of 2 slices each, every slice called its patient's class."""
    probs = np.repeat(np.eye(3, dtype=np.float32) * 0.7 + 0.1, 2, axis=0)
    return np.arange(6), np.repeat([0, 1, 2], 2), probs


def _roundtrip(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# ---- exactly-once patient metrics -----------------------------------------------------------------
@pytest.mark.slow
def test_ddp_validation_counts_every_slice_once_and_matches_one_process(tmp_path, shared_cache, trained):
    """The same checkpoint (the session's tiny run) validated by 1 process and by 2 DDP processes (odd
    number of slices, so the sampler pads one repeat): same slices, votes, slice and patient metrics, and
    patients.csv."""
    best_checkpoint, _ = trained
    script = str(REPO / "tests" / "ddp_eval_script.py")
    results = {}
    for name, trainer in (("single", "trainer=cpu"), ("ddp", "trainer=ddp_cpu")):
        out = tmp_path / name
        out.mkdir()
        # one precision for both (trainer=cpu picks bf16-mixed on a CPU with AVX-512 BF16 or AMX)
        proc = run(
            [script, str(out), str(best_checkpoint), *tiny(shared_cache), trainer, "trainer.precision=32-true"],
            tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    (single,), (rank0, rank1) = results["single"], results["ddp"]

    n = single["val_rows"]
    assert n % 2 == 1 and single["world_size"] == 1 and rank0["world_size"] == 2
    assert rank0["rank_slices"] + rank1["rank_slices"] == n + 1  # one padded repeat...
    slice_metrics = {k: v for k, v in single["metrics"].items() if not k.startswith(PATIENT_LEVEL)}
    assert set(slice_metrics) == {"val/loss", "val/slice_acc", "val/slice_f1_macro"}
    for key, value in slice_metrics.items():  # the repeat is not counted by the slice metrics either
        assert rank0["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert len(single["index"]) == len(rank0["index"]) == n  # ...counted once
    assert len(set(rank0["index"])) == n
    assert rank0["index"] == single["index"] and rank0["patient"] == single["patient"]
    np.testing.assert_allclose(rank0["probs"], single["probs"], atol=1e-5, rtol=0)
    assert len(single["votes"]) == 6  # patients
    assert rank0["votes"] == single["votes"]  # votes per class, both rules, infected fraction, slices
    assert rank0["predictions"] == single["predictions"]
    patient_metrics = {k: v for k, v in single["metrics"].items() if k.startswith(PATIENT_LEVEL)}
    assert all(f"rules/{rule}/acc" in patient_metrics for rule in VOTE_RULES)
    assert "calibration/temperature" in patient_metrics  # fitted on the gathered slices: the same on every rank
    assert {k: rank0["metrics"][k] for k in patient_metrics} == pytest.approx(patient_metrics)
    # every rank computed the same (so each logs and monitors the same val/patient/acc)
    del rank0["rank_slices"], rank1["rank_slices"]
    assert rank1 == rank0
    assert (tmp_path / "ddp" / "patients.csv").read_text() == (tmp_path / "single" / "patients.csv").read_text()


# ---- train.py under DDP ---------------------------------------------------------------------------
@pytest.mark.slow
def test_train_py_with_ddp_cpu_makes_one_run(tmp_path, shared_cache):
    """Lightning re-runs train.py for rank 1 with rank 0's run folder: one folder, one W&B run, one
    checkpoints folder, one patients.csv, one summary."""
    proc = run([str(REPO / "train.py"), "trainer=ddp_cpu", f"paths.log_dir={tmp_path}", *tiny(shared_cache)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_ddp_process_1.log").read_text()  # rank 1 ran here
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    assert list(tmp_path.rglob("checkpoints")) == [run_dir / "checkpoints"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    assert list(tmp_path.rglob("patients.csv")) == [run_dir / "patients.csv"]
    with (run_dir / "patients.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "ok"
    assert proc.stderr.count("Best epoch 0: patient accuracy") == 1


@pytest.mark.slow
def test_multirun_with_ddp_started_by_lightning_is_refused(tmp_path, shared_cache):
    proc = run(
        [
            str(REPO / "train.py"),
            "-m",
            "trainer=ddp_cpu",
            "loss.gamma=0,2",
            f"paths.log_dir={tmp_path}",
            *tiny(shared_cache),
        ],
        tmp_path,
    )
    assert proc.returncode == 1
    assert "-m (multirun) cannot start 2 DDP processes per job" in proc.stderr
    assert "hydra/launcher=slurm" in proc.stderr and "Traceback" not in proc.stderr
    assert len(list((tmp_path / "train" / "multiruns").iterdir())) == 1  # no second sweep from a rank 1
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("split.csv"))  # stopped before the data


# ---- SLURM preemption -----------------------------------------------------------------------------
@pytest.mark.slow
def test_slurm_requeue_signal_saves_a_checkpoint_and_the_requeued_job_resumes(tmp_path, shared_cache):
    """SLURM env variables make Lightning use its SLURMEnvironment, which handles SIGUSR1: save
    hpc_ckpt_1.ckpt in the run folder, then `scontrol requeue <job id>`. The fake scontrol records its
    arguments and, as SLURM does on a requeue, sends SIGTERM to the job. The job started again (same
    run folder, as a requeued SLURM job is the same job id) resumes from that checkpoint."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -TERM $PPID\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = SLURM_JOB | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"hydra.run.dir={run_dir}",
        "logger=[wandb,csv]",
        *tiny(shared_cache),
    ]
    with (tmp_path / "first.log").open("w") as log:
        job = subprocess.Popen(
            [*command, "trainer.max_epochs=100"],
            cwd=tmp_path,
            env=clean_env(**slurm),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            last, saves = run_dir / "checkpoints" / "last.ckpt", set()
            # last.ckpt saved twice: epoch 0 is complete (its first save comes just before the epoch counts as
            # completed: a signal in between saved an HPC checkpoint of 0 completed epochs, 2 runs in 5)
            while len(saves) < 2:
                assert job.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                if last.exists():
                    saves.add(last.stat().st_mtime_ns)
                time.sleep(0.05)
            job.send_signal(signal.SIGUSR1)
            job.wait(timeout=120)
        finally:
            job.kill()
    assert calls.read_text() == "requeue 4242\n"
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    done = hpc["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"]
    assert 1 <= done < 100 and hpc["global_step"] >= 2

    second = subprocess.run(
        [*command, f"trainer.max_epochs={done + 1}"],
        cwd=tmp_path,
        env=clean_env(**slurm),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {run_dir}/hpc_ckpt_1.ckpt" in second.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * (done + 1) and last["wandb_run_id"] == hpc["wandb_run_id"]
    # the requeued job trained only what was left of epoch `done` (nothing, when the signal came after its
    # last batch), never done + 1 epochs from scratch (the global step above says the same)
    logged = run_dir / "csv" / "version_1" / "metrics.csv"
    with logged.open() if logged.exists() else io.StringIO("") as f:
        epochs = {int(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")}
    assert epochs <= {done}
    assert "Best epoch" in second.stderr
