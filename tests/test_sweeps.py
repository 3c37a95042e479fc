"""Multirun sweeps: the summary table and k-fold report, and every launcher and sweeper run for real
through ``train.py`` on tiny settings (basic + k-fold, joblib, submitit_local, Optuna with sqlite)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from covidct.training.sweep_summary import write_run_metrics, write_sweep_summary
from tests.conftest import run_cli, tiny


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def fake_job(sweep: Path, num: int, overrides: list[str], score: float | None, error: str | None = None) -> None:
    """A job folder as Hydra and train.py leave it (score None and no error: a crash, no metrics.json)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if error is not None:
        write_run_metrics(job, {"status": "failed", "error": error})
    elif score is not None:
        metrics = {
            "val/patient/acc": score,
            "val/patient/f1_macro": score - 0.1,
            "rules/majority/acc": score / 2,
            "rules/majority/f1_macro": 0.1,
            "rules/infected_fraction/acc": score,
            "rules/infected_fraction/f1_macro": score - 0.1,
        }
        write_run_metrics(
            job, {"status": "ok", "score": score, "vote_rule": "infected_fraction", "best_epoch": 3, "metrics": metrics}
        )


def test_summary_lists_every_job_best_first_with_failures_last(tmp_path):
    fake_job(tmp_path, 0, ["loss.gamma=0", "seed=1"], 0.5)
    fake_job(tmp_path, 1, ["loss.gamma=1", "seed=1"], None)  # crashed: no metrics.json
    fake_job(tmp_path, 2, ["loss.gamma=2", "seed=1"], 0.9)
    fake_job(tmp_path, 3, ["loss.gamma=-1", "seed=1"], None, error="loss.gamma must be >= 0, got -1")
    report = write_sweep_summary(tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert [r["job"] for r in rows] == ["2", "0", "1", "3"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert "seed" not in rows[0]  # the same in every job: not a column
    assert rows[0]["loss.gamma"] == "2" and float(rows[0]["score"]) == 0.9
    assert float(rows[0]["majority_acc"]) == 0.45 and float(rows[0]["f1_macro"]) == 0.8
    assert rows[2]["status"].startswith("crashed") and math.isnan(float(rows[2]["score"]))
    assert rows[3]["status"] == "failed: loss.gamma must be >= 0, got -1"
    assert "4 jobs, 2 failed" in report and not (tmp_path / "folds.csv").exists()


def test_fold_report_gives_mean_and_std_per_setting(tmp_path):
    scores = {("0", "0"): 0.5, ("0", "1"): 0.7, ("0", "2"): 0.9, ("2", "0"): 0.6, ("2", "1"): 0.6}
    for num, ((gamma, fold), score) in enumerate(scores.items()):
        fake_job(tmp_path, num, [f"loss.gamma={gamma}", f"data.fold={fold}", "data.num_folds=3"], score)
    fake_job(tmp_path, 5, ["loss.gamma=2", "data.fold=2", "data.num_folds=3"], None)  # a crashed fold
    report = write_sweep_summary(tmp_path)
    folds = read_csv(tmp_path / "folds.csv")
    assert [r["loss.gamma"] for r in folds] == ["0", "2"]  # best mean first
    first, second = folds
    assert first["folds"] == "0;1;2" and first["failed"] == "0"
    assert float(first["score_mean"]) == pytest.approx(0.7) and float(first["score_std"]) == pytest.approx(0.2)
    assert second["folds"] == "0;1;2" and second["failed"] == "1"
    assert float(second["score_mean"]) == pytest.approx(0.6) and float(second["score_std"]) == 0.0
    assert "Cross-validation over data.fold" in report


@pytest.mark.slow
def test_multirun_with_default_paths_lands_in_the_working_folder_one_wandb_run_per_job_in_one_group(
    tmp_path, shared_cache
):
    """No paths.log_dir override: the sweep folder must resolve before Hydra's runtime exists. The default
    logger (W&B, offline): each job its own run, the sweep folder their group."""
    out = run_cli(["-m", "loss.gamma=0,2", *tiny(shared_cache)], tmp_path)  # tiny sets paths.cache_dir only
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    rows = read_csv(sweep / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert str(sweep) in out.stdout  # the table names the sweep folder, absolute
    console = out.stderr  # each job says its folder first; Lightning's lines come, its adverts do not
    assert console.count("[train][INFO] - Run folder ") == 2 and "GPU available: False" in console
    assert "💡 Tip" not in console and "100% of the batches" not in console and "LeafSpec" not in console
    header = (sweep / "summary.csv").read_text().splitlines()[0].split(",")
    at = header.index("score")  # the score names its metric and comes with its interval and patient count
    assert header[at : at + 5] == ["score", "score_of", "score_ci_low", "score_ci_high", "n_patients"]
    for r in rows:
        assert r["score_of"] == "val/patient/acc" and r["n_patients"] == "6"
        assert float(r["score_ci_low"]) <= float(r["score"]) <= float(r["score_ci_high"])
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    run_files = [next(j.glob("wandb/offline-run-*/run-*.wandb")) for j in jobs]
    assert run_files[0].parent.name != run_files[1].parent.name
    for f in run_files:
        assert sweep.name.encode() in f.read_bytes()  # the W&B group is the sweep folder
    for j, gamma in zip(jobs, ("0", "2"), strict=True):
        assert f"loss.gamma={gamma}" in (j / ".hydra" / "overrides.yaml").read_text().replace("- ", "")
        assert (j / "patients.csv").is_file()


@pytest.mark.slow
def test_kfold_multirun_in_parallel_with_joblib(tmp_path, shared_cache):
    out = run_cli(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "data.num_folds=2",
            "data.fold=0,1",
            "logger=csv",
            f"paths.log_dir={tmp_path}",
            *tiny(shared_cache),
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = next((tmp_path / "train" / "multiruns").iterdir())
    rows = read_csv(sweep / "summary.csv")
    assert sorted(r["data.fold"] for r in rows) == ["0", "1"] and all(r["status"] == "ok" for r in rows)
    split = {fold: read_csv(sweep / str(fold) / "split.csv") for fold in (0, 1)}
    val = [{r["patient"] for r in split[fold] if r["subset"] == "val"} for fold in (0, 1)]
    assert not val[0] & val[1] and len(val[0] | val[1]) == 12  # each patient validated exactly once
    (fold_row,) = read_csv(sweep / "folds.csv")
    assert fold_row["folds"] == "0;1" and fold_row["failed"] == "0"
    mean = sum(float(r["score"]) for r in rows) / 2
    assert float(fold_row["score_mean"]) == pytest.approx(mean, abs=1e-4)
    assert "Cross-validation over data.fold" in out.stdout  # the tables are printed; logs go to stderr


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path, shared_cache):
    out = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "loss.gamma=0,2",
            "logger=none",
            f"paths.log_dir={tmp_path}",
            *tiny(shared_cache),
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = next((tmp_path / "train" / "multiruns").iterdir())
    assert (sweep / ".submitit").is_dir()
    rows = read_csv(sweep / "summary.csv")
    assert sorted(r["loss.gamma"] for r in rows) == ["0", "2"] and all(r["status"] == "ok" for r in rows)
    for row in rows:
        metrics = json.loads((Path(row["dir"]) / "metrics.json").read_text())
        assert metrics["score"] == pytest.approx(float(row["score"]), abs=1e-4)


@pytest.mark.slow
def test_optuna_search_survives_failed_trials_and_resumes_from_sqlite(tmp_path, shared_cache):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # gamma=-1 is refused by the config check: those trials fail, the others complete
    args = [
        "-m",
        "hparams_search=focal_optuna",
        "loss.gamma=choice(-1.0,2.0)",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=test",
        "logger=none",
        f"paths.log_dir={tmp_path}",
        *tiny(shared_cache),
    ]
    first = run_cli([*args, "hydra.sweeper.n_trials=4"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="test", storage=storage)
    states = [t.state.name for t in study.trials]
    assert len(states) == 4 and "COMPLETE" in states and "FAIL" in states
    for trial in study.trials:
        assert (trial.state.name == "FAIL") == (trial.params["loss.gamma"] == -1.0)
        assert 1e-5 <= trial.params["optimizer.lr"] <= 1e-3
    sweep = next((tmp_path / "train" / "multiruns").iterdir())
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 4 and sum(r["status"].startswith("failed: loss.gamma") for r in rows) == states.count("FAIL")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(float(rows[0]["score"]), abs=1e-4)

    again = run_cli([*args, "hydra.sweeper.n_trials=1"], tmp_path)  # same storage and name: resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(optuna.load_study(study_name="test", storage=storage).trials) == 5
