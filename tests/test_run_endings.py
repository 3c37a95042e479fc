"""Runs that end badly must not look like success, and command-line mistakes end in one line.

Tried for real: a training sent SIGTERM after its first checkpoint (exit 143, ``last.ckpt`` kept,
``metrics.json`` says ``interrupted``), a multirun with a job that crashes inside Lightning's fit
(every job in ``summary.csv`` with its real status, exit 1), ``trainer.max_epochs=0``, a resume with
nothing left to train, and the CLI mistakes of a new user (predict.py without its keys, synthetic
overrides with real data, an output folder that cannot be created).
"""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from covidct.config import synthetic_override_conflict
from covidct.errors import ConfigError
from covidct.models.checkpoint import read_checkpoint
from covidct.training.run import TrainResult, train
from covidct.training.sweep_summary import write_sweep_summary
from tests.conftest import REPO, cli_env, compose_train, run_cli, tiny


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, script)


def test_max_epochs_zero_is_refused_before_any_data_is_read(tmp_path, shared_cache):
    for override in ("trainer.max_epochs=0", "+trainer.max_steps=0"):
        cfg = compose_train(tmp_path / "run", tiny(shared_cache) + ["logger=none", override])
        with pytest.raises(ConfigError, match="^" + re.escape(f"{override.lstrip('+')}: nothing to train")):
            train(cfg)
    assert not (tmp_path / "run").exists()


def test_run_summary_survives_missing_metrics_and_names_only_written_files(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    result = TrainResult(
        score=float("nan"), best_epoch=None, best_checkpoint="", metrics={}, confusion=None, output_dir=tmp_path
    )
    text = result.summary("infected_fraction")
    assert text.startswith("No best epoch") and f"outputs: {tmp_path} (metrics.json)" in text
    result.best_epoch, result.score, result.metrics = 2, 0.5, {"val/patient/acc": 0.5}  # no tau, no per-rule values
    assert result.summary("infected_fraction").startswith("Best epoch 2: patient accuracy 0.500 with vote=")


@pytest.mark.slow
def test_a_resume_with_nothing_left_to_train_ends_with_a_true_summary(tmp_path, shared_cache, tiny_checkpoint):
    """trainer.max_epochs=1 from the checkpoint of epoch 0: no epoch runs, the checkpoint's best epoch is
    reported, and no report is written (its slices are not in the checkpoint), so none is named. The
    windows are the checkpoint's, written as {level, width}: not a different input."""
    cfg = compose_train(
        tmp_path,
        tiny(shared_cache) + ["logger=none", f"ckpt_path={tiny_checkpoint}", "data.windows=[{level:-600,width:1500}]"],
    )
    result = train(cfg)
    text = result.summary(cfg.vote.rule)
    assert result.best_epoch == 0 and not (tmp_path / "report.html").exists()
    listed = text.split(f"outputs: {tmp_path} (")[1].split(")")[0].split(", ")
    assert "metrics.json" in listed and "report.html" not in listed
    assert all((tmp_path / name).is_file() for name in listed)


@pytest.mark.slow
def test_sigterm_mid_training_exits_143_keeps_last_ckpt_and_records_interrupted(tmp_path, shared_cache):
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [*tiny(shared_cache), "trainer.max_epochs=50", "logger=none", f"hydra.run.dir={run_dir}"]
    with log.open("w") as stderr:  # a file, not a pipe: an unread pipe could block the child
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            for _ in range(3000):  # until the first epoch's checkpoint exists (or the run ends)
                if last.exists() or proc.poll() is not None:
                    break
                time.sleep(0.2)
            assert proc.poll() is None and last.exists(), log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)  # what SLURM and Kubernetes send
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "ERROR" in line]
    assert "Training interrupted by SIGTERM" in line and f"resume with ckpt_path={last}" in line
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["resume_from"] == str(last)
    assert metrics["best_epoch"] is not None and metrics["epoch"] >= 1
    saved = read_checkpoint(last)  # kept, whole, and resumable
    assert saved["epoch"] == metrics["epoch"] - 1


@pytest.mark.slow
def test_a_crashing_job_of_a_multirun_is_listed_as_crashed_and_the_sweep_exits_1(tmp_path, shared_cache):
    # weight_decay -1: torch.optim.Adam raises ValueError when Lightning builds the optimizer, inside fit;
    # not a covidct error (nothing in the config checks it), so job 0 crashes; job 1 trains
    out = run(
        "train.py",
        ["-m", "optimizer.weight_decay=-1,0", "logger=none", f"paths.log_dir={tmp_path}", *tiny(shared_cache)],
        tmp_path,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    rows = {r["job"]: r for r in read_csv(sweep / "summary.csv")}
    assert rows["0"]["status"] == "crashed: ValueError: Invalid weight_decay value: -1"
    assert rows["1"]["status"] == "ok" and 0.0 <= float(rows["1"]["score"]) <= 1.0
    assert rows["0"]["rank"] == "2"  # crashed jobs rank last
    assert "crashed: ValueError" in out.stdout  # the table is printed
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "crashed"
    assert "Traceback" in (sweep / "0" / "train.log").read_text()  # the crash's traceback is in the job's log
    (sweep / "summary.csv").unlink()
    write_sweep_summary(sweep)  # python -m covidct.training.sweep_summary: the same statuses
    assert {r["job"]: r["status"] for r in read_csv(sweep / "summary.csv")} == {k: r["status"] for k, r in rows.items()}


def test_synthetic_overrides_with_real_data_are_named_before_hydra_composes():
    conf = REPO / "conf"
    real = ["data=covid_ct_md", "data.root=/data/COVID-CT-MD"]
    with pytest.raises(AssertionError):  # what Hydra does with them: a traceback that names no key
        compose_train(Path("unused"), [*real, "data.synthetic.image_size=64"])
    message = synthetic_override_conflict([*real, "data.synthetic.image_size=64"], conf)
    assert message.startswith("data.synthetic.image_size=64: data=covid_ct_md")
    assert synthetic_override_conflict(["experiment=paper_ce", "data.synthetic.seed=3"], conf)  # via paper
    assert synthetic_override_conflict(["-m", "experiment=demo,paper", "+data.synthetic.seed=1,2"], conf)
    assert synthetic_override_conflict(["data.synthetic.image_size=64"], conf) is None  # synthetic data: fine
    assert synthetic_override_conflict(real, conf) is None


@pytest.mark.slow
def test_cli_mistakes_end_in_one_line_without_traceback(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    cases = [
        ("predict.py", [], "ckpt_path and input not set: python predict.py ckpt_path="),
        (
            "train.py",
            ["data=covid_ct_md", f"data.root={tmp_path}", "data.synthetic.image_size=64"],
            "data.synthetic.image_size=64: data=covid_ct_md reads the real data in data.root",
        ),
        (
            "train.py",
            ["logger=none", f"hydra.run.dir={blocker / 'run'}"],
            f"hydra.run.dir={blocker / 'run'}: the output folder cannot be created or written",
        ),
        (
            "train.py",
            ["-m", "loss.gamma=0,1", f"paths.log_dir={blocker}"],
            f"hydra.sweep.dir={blocker}/train/multiruns/",
        ),
        (
            "predict.py",
            ["ckpt_path=x.ckpt", f"input={tmp_path}", f"hydra.run.dir={blocker / 'run'}"],
            f"hydra.run.dir={blocker / 'run'}: the output folder cannot be created or written",
        ),
    ]
    for script, args, expected in cases:
        out = run(script, args, tmp_path)
        said = [line for line in out.stderr.splitlines() if expected in line]
        assert out.returncode == 1 and len(said) == 1 and "Traceback" not in out.stderr, (args, out.stderr[-3000:])


def test_the_accuracy_interval_is_a_patient_bootstrap_that_narrows_with_more_patients():
    from covidct.patients.metrics import accuracy_interval

    assert accuracy_interval(np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5]])) == (1.0, 1.0)  # no patient wrong
    low, high = accuracy_interval(np.array([[9, 1], [1, 9]]))  # 16 of 20 right: binomial sd 0.089
    assert 0.55 <= low < 0.8 < high <= 1.0
    low4, high4 = accuracy_interval(np.array([[36, 4], [4, 36]]))  # the same share of 4x the patients
    assert low4 > low and high4 < high and (high4 - low4) == pytest.approx((high - low) / 2, rel=0.35)
    assert accuracy_interval(np.array([[9, 1], [1, 9]])) == (low, high)  # seeded: the same every time


def test_a_failed_run_renames_only_the_folder_it_made(tmp_path, shared_cache):
    """A user error after Hydra made the run folder: the folder is renamed <folder>-failed (kept, with its log);
    a folder that held something before (a resume into it, one chosen by hand) keeps its name."""
    out = run(
        "predict.py",
        [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input={tmp_path}", f"paths.log_dir={tmp_path}"],
        tmp_path,
    )
    (failed,) = (tmp_path / "predict" / "runs").iterdir()
    assert out.returncode == 1 and failed.name.endswith("-failed") and (failed / "predict.log").is_file()
    assert f"kept as {failed}" in out.stderr

    earlier = tmp_path / "earlier run"
    (earlier / "checkpoints").mkdir(parents=True)
    out = run("train.py", [*tiny(shared_cache), "loss.gamma=-1", f"hydra.run.dir={earlier}"], tmp_path)
    assert out.returncode == 1 and "loss.gamma must be >= 0" in out.stderr
    assert earlier.is_dir() and not list(tmp_path.glob("earlier run-failed*"))
