"""After a multirun: one table of every job's overrides and metrics, best first, and a k-fold report.

Each training job writes ``metrics.json`` into its own folder (``write_run_metrics``): its metrics, or
``{"status": "failed" | "crashed" | "interrupted", "error": ...}`` when a user error, an exception or
SIGTERM stopped it. This module reads the sweep folder back, so it works the same for every launcher
(basic, joblib, submitit) and sweeper (basic, Optuna). A job folder without ``metrics.json`` (a job
killed outright) is listed as crashed, never left out.

Outputs in the sweep folder (atomic), also printed:
- ``summary.csv``: one row per job: the overrides that vary across jobs, the metrics, status, folder.
- ``folds.csv`` when ``data.fold`` varies: mean, std (ddof=1) and count over folds of each metric,
  one row per combination of the other varying overrides.

Hydra calls :class:`SweepSummaryCallback` at the end of a multirun (``conf/hydra/default.yaml``);
``python -m covidct.training.sweep_summary <sweep dir>`` rebuilds the tables by hand. A sweep with a crashed or
interrupted job exits 1 once the table is written; failed jobs (bad values) do not change the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from covidct.contracts import FOLDS_FILE, METRICS_FILE, PATIENT_F1, SWEEP_SUMMARY_FILE
from covidct.io import atomic_write_csv, atomic_write_text
from covidct.text_table import format_table

log = logging.getLogger(__name__)

#: job statuses that make a finished multirun exit 1 (``failed``, a user error, does not)
BROKEN = ("crashed", "interrupted")
FOLD_KEY = "data.fold"
#: "score" is the monitored patient accuracy (the configured vote rule's); then the configured rule's
#: macro F1, then ``<rule>_acc``: the patient accuracy of every vote rule scored on the same logits.
#: the columns after ``score`` in summary.csv: its metric, its bootstrap 95% interval, the patients it counts
SCORE_OF = ("score_of", "score_ci_low", "score_ci_high", "n_patients")
RULE_ACCURACY = re.compile(r"^rules/(\w+)/acc$")  # covidct.metric_names.rule_metric(rule, "acc")


def write_run_metrics(output_dir: Path, payload: dict[str, Any]) -> Path:
    """``<output_dir>/metrics.json`` (atomic): the run's score, vote rule, best epoch and patient metrics,
    or ``{"status": "failed", "error": message}``."""
    return atomic_write_text(Path(output_dir) / METRICS_FILE, json.dumps(payload, indent=2, default=float) + "\n")


def _parse_overrides(path: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` (a list of ``key=value``) -> {key: value}; ``+``/``++`` prefixes dropped."""
    items = yaml.safe_load(path.read_text()) or []
    pairs = (item.split("=", 1) for item in items)
    return {key.lstrip("+~"): value for key, value in pairs}


def _job_number(job_dir: Path) -> tuple[int, str]:
    return (int(job_dir.name), "") if job_dir.name.isdigit() else (1 << 30, job_dir.name)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job folder of ``sweep_dir``: ``job``, ``dir``, ``overrides``, ``status``, metrics."""
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_number(p.parents[1])):
        job_dir = overrides_file.parents[1]
        record: dict[str, Any] = {"job": job_dir.name, "dir": str(job_dir)}
        record["overrides"] = _parse_overrides(overrides_file)
        metrics_file = job_dir / METRICS_FILE
        payload = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {"status": "crashed"}
        if payload.get("status", "ok") == "ok":
            metrics = payload.get("metrics", {})
            ci = payload.get("score_ci") or [math.nan, math.nan]
            record |= {"status": "ok", "best_epoch": payload.get("best_epoch")}
            record["score_of"] = [payload.get("monitor", ""), *ci, payload.get("n_patients", "")]
            record["metrics"] = {
                "score": payload.get("score", math.nan),
                "f1_macro": metrics.get(PATIENT_F1, math.nan),
            } | {f"{m[1]}_acc": v for k, v in metrics.items() if (m := RULE_ACCURACY.match(k))}
        else:
            reason = payload.get("error") or f"no {METRICS_FILE}; see the job's .log file"
            record |= {"status": f"{payload['status']}: {reason}", "best_epoch": None, "metrics": {"score": math.nan}}
            record["score_of"] = [payload.get("monitor", ""), math.nan, math.nan, ""]
        jobs.append(record)
    return jobs


def _varying_keys(jobs: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job["overrides"] if k not in keys]
    return [k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1]


def _metric_columns(jobs: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for job in jobs:
        columns += [c for c in job["metrics"] if c not in columns]
    return columns


def _sort_key(score: float) -> float:
    return -score if isinstance(score, int | float) and not math.isnan(score) else math.inf


def summary_rows(jobs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``summary.csv``, best score first (failed and NaN jobs last). ``score`` is followed by
    what it is (``score_of``: the monitored metric), its bootstrap 95% interval over the validation patients and
    their number: jobs a patient apart are within each other's intervals, not a ranking."""
    varying, metrics = _varying_keys(jobs), _metric_columns(jobs)
    header = ["rank", "job", *varying, "score", *SCORE_OF, *metrics[1:], "best_epoch", "status", "dir"]
    ordered = sorted(jobs, key=lambda j: (_sort_key(j["metrics"]["score"]), _job_number(Path(j["dir"]))))
    rows = [
        [
            rank,
            j["job"],
            *(j["overrides"].get(k, "") for k in varying),
            _fmt(j["metrics"]["score"]),
            *(_fmt(v) for v in j["score_of"]),
            *(_fmt(j["metrics"].get(c, math.nan)) for c in metrics[1:]),
            _fmt(j["best_epoch"]),
            j["status"],
            j["dir"],
        ]
        for rank, j in enumerate(ordered, start=1)
    ]
    return header, rows


def fold_rows(jobs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]] | None:
    """Mean / std / count over ``data.fold`` per combination of the other varying overrides, best mean
    first; None when ``data.fold`` does not vary. Failed folds count in ``failed``, not in the mean."""
    varying = _varying_keys(jobs)
    if FOLD_KEY not in varying:
        return None
    others = [k for k in varying if k != FOLD_KEY]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        groups[tuple(job["overrides"].get(k, "") for k in others)].append(job)
    header = [*others, "folds", "failed"]
    metrics = _metric_columns(jobs)
    for column in metrics:
        header += [f"{column}_mean", f"{column}_std"]
    rows = []
    for key, members in groups.items():
        done = [j for j in members if j["status"] == "ok"]
        folds = sorted((j["overrides"][FOLD_KEY] for j in members), key=lambda f: (len(f), f))
        row: list[Any] = [*key, ";".join(folds), len(members) - len(done)]
        for column in metrics:
            values = [v for j in done if not math.isnan(v := float(j["metrics"].get(column, math.nan)))]
            row += [_fmt(_mean(values)), _fmt(_std(values))]
        rows.append(row)
    score_mean = header.index("score_mean")
    rows.sort(key=lambda r: _sort_key(float(r[score_mean])))
    return header, rows


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _std(values: list[float]) -> float:
    """Sample standard deviation (ddof=1); nan for fewer than two values."""
    return statistics.stdev(values) if len(values) >= 2 else math.nan


def _fmt(value: Any) -> Any:
    """Metrics rounded to 4 decimals; None (no best epoch) as an empty cell."""
    if value is None:
        return ""
    return round(value, 4) if isinstance(value, float) else value


def _cell(value: Any) -> str:
    """Printed cell: numbers sampled by Optuna (1.3066739238053272e-05) shortened to 4 significant digits."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.4g}" if len(text) > 8 and math.isfinite(number) else text


def sweep_table(header: list[str], rows: list[list[Any]], skip: tuple[str, ...] = ("dir",)) -> str:
    """The printed table: columns in ``skip`` left out, long numbers shortened (:func:`_cell`)."""
    keep = [i for i, h in enumerate(header) if h not in skip]
    return format_table([header[i] for i in keep], [[_cell(r[i]) for i in keep] for r in rows])


def broken_jobs(sweep_dir: str | Path) -> list[str]:
    """Numbers of the jobs of ``sweep_dir`` that crashed or were interrupted (see :data:`BROKEN`)."""
    return [j["job"] for j in collect_jobs(Path(sweep_dir)) if j["status"].startswith(BROKEN)]


def write_sweep_summary(sweep_dir: str | Path) -> str:
    """Write ``summary.csv`` (and ``folds.csv`` for k-fold sweeps) into ``sweep_dir``; returns the text report."""
    sweep_dir = Path(sweep_dir).resolve()
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        return f"No job folders with .hydra/overrides.yaml in {sweep_dir}"
    header, rows = summary_rows(jobs)
    atomic_write_csv(sweep_dir / SWEEP_SUMMARY_FILE, header, rows)
    failed = sum(j["status"] != "ok" for j in jobs)
    broken = sum(j["status"].startswith(BROKEN) for j in jobs)
    report = [
        f"Sweep {sweep_dir}: {len(jobs)} jobs, {failed} failed ({broken} crashed or interrupted), "
        "best first (summary.csv)",
        sweep_table(header, rows),
    ]
    folds = fold_rows(jobs)
    if folds is not None:
        atomic_write_csv(sweep_dir / FOLDS_FILE, *folds)
        report += [
            "",
            "Cross-validation over data.fold: mean and std (ddof=1) per setting (folds.csv)",
            sweep_table(*folds),
        ]
    return "\n".join(report)


class SweepSummaryCallback(Callback):
    """Hydra callback: writes the sweep summary when a ``train`` multirun ends (any launcher or sweeper)
    and prints it on stdout (logs go to stderr). Then, if a job crashed or was interrupted, the process
    exits 1: the summary lists every job, and the exit status says that not all of them ran to the end.
    (It runs in the process that launched the jobs, so this holds for every launcher.)"""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("task_name") != "train":  # only train.py jobs write metrics.json
            return
        sweep_dir = config.hydra.sweep.dir
        try:
            print(write_sweep_summary(sweep_dir), flush=True)
            broken = broken_jobs(sweep_dir)
        except Exception:  # a summary problem must not turn a finished sweep into a failed one
            log.exception("Could not write the sweep summary for %s", sweep_dir)
            return
        if broken:
            log.error("Jobs %s crashed or were interrupted (see summary.csv and their .log files)", ", ".join(broken))
            raise SystemExit(1)  # Hydra turns an Exception raised in a callback into a warning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (outputs/train/multiruns/<time>_<id>)")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        raise SystemExit(f"{args.sweep_dir} is not a folder")
    print(write_sweep_summary(args.sweep_dir))


if __name__ == "__main__":
    main()
