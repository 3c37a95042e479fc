"""Train a slice classifier with patient voting: python train.py [group=choice] [key=value] [-m ...]

Examples:
    python train.py                                  # CPU demo on embedded synthetic data, W&B offline
    python train.py loss.gamma=2 model=vgg16
    python train.py -m loss.gamma=0,1,2              # three jobs, one W&B group
    python train.py data=covid_ct_md data.root=/data/COVID-CT-MD experiment=paper

python train.py --help: examples, outputs, what null means, every group and key (conf/hydra/help/train.yaml).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from covidct.cli import exit_on_typo
from covidct.config import register_resolvers, synthetic_override_conflict
from covidct.errors import CovidCTError

log = logging.getLogger("train")
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the monitored patient accuracy for sweepers; None for a failed job of a multirun
    (Optuna records such a trial as failed and goes on; NaN would stop Optuna 2.x).

    How a run ends:

    - ok: ``metrics.json`` with status ``ok``, exit 0.
    - a user error (:class:`CovidCTError`, a bad value or file): one line, exit 1; in a multirun the job
      is recorded as ``failed: <reason>`` and the sweep goes on (exit 0 at its end).
    - a crash (any other exception: a bug, out of memory, a library error): ``metrics.json`` with status
      ``crashed`` and ``<ExcType>: <first line>``, the traceback in the log. A single run re-raises it
      (exit 1); in a multirun the job returns None so that the sweep goes on and ``summary.csv`` lists
      every job, and the sweep exits 1 at its end (``SweepSummaryCallback``).
    - SIGTERM (SLURM, Kubernetes): ``metrics.json`` with status ``interrupted`` and the checkpoint to
      resume from, exit 143; a multirun stops too, after writing ``summary.csv``.
    """
    from pytorch_lightning.utilities import rank_zero_only

    from covidct.io import made_by_this_run
    from covidct.training.console import quiet_library_noise
    from covidct.training.run import LaunchError, RunInterrupted, train
    from covidct.training.sweep_summary import write_run_metrics, write_sweep_summary

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = os.path.basename(hydra_cfg.sweep.dir) if multirun else None
    quiet_library_noise()
    fresh = made_by_this_run(cfg.paths.output_dir)  # a failed run renames only a folder it made
    if rank_zero_only.rank == 0:
        log.info("Run folder %s", cfg.paths.output_dir)
    try:
        result = train(cfg, group=group)
        if rank_zero_only.rank == 0:  # under DDP every rank returns here; one summary is enough
            log.info("\n%s", result.summary(cfg.vote.rule))
    except RunInterrupted as exc:
        log.error("%s", exc)
        if multirun and rank_zero_only.rank == 0:
            print(write_sweep_summary(hydra_cfg.sweep.dir), flush=True)
        sys.exit(143)  # noqa: B904 (128 + SIGTERM, as if the signal had ended the process)
    except Exception as exc:  # a user error may arrive wrapped by hydra.utils.instantiate
        user = exc if isinstance(exc, CovidCTError) else exc.__cause__
        if not isinstance(user, CovidCTError):
            if rank_zero_only.rank == 0:
                record_crash(cfg.paths.output_dir, exc)
            if not multirun:
                if fresh:
                    keep_failed_folder(cfg.paths.output_dir)
                raise
            log.exception("Job %s crashed", hydra_cfg.job.num)
            return None
        if multirun and not isinstance(user, LaunchError):  # one bad job must not end the sweep; the summary lists it
            log.error("Job %s failed: %s", hydra_cfg.job.num, user)
            write_run_metrics(cfg.paths.output_dir, {"status": "failed", "error": str(user)})
            return None
        log.error("%s", user)
        if fresh:
            keep_failed_folder(cfg.paths.output_dir)
        sys.exit(1)  # noqa: B904 (the message says it all; no traceback for user errors)
    return None if math.isnan(result.score) else result.score


def keep_failed_folder(output_dir: str) -> None:
    """A single run that failed: the folder it made renamed ``<folder>-failed`` (rank 0; a multirun's jobs stay,
    listed as failed in ``summary.csv``); said in one INFO line."""
    from pytorch_lightning.utilities import rank_zero_only

    from covidct.io import mark_failed

    if rank_zero_only.rank == 0 and (kept := mark_failed(output_dir)) != Path(output_dir):
        log.info("The failed run's folder is kept as %s", kept)


def record_crash(output_dir: str, exc: BaseException) -> None:
    """``metrics.json`` with status ``crashed``; a failure to write it must not hide the crash."""
    from covidct.training.sweep_summary import write_run_metrics

    try:
        write_run_metrics(output_dir, {"status": "crashed", "error": describe(exc)})
    except OSError as err:
        log.warning("Could not write metrics.json into %s: %s", output_dir, err)


def describe(exc: BaseException) -> str:
    """``<ExcType>: <first line>`` of a crash (of its cause when Hydra's instantiate wrapped it)."""
    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


if __name__ == "__main__":
    if problem := synthetic_override_conflict(sys.argv[1:], Path(__file__).resolve().parent / "conf"):
        sys.stderr.write(f"Error: {problem}\n")
        sys.exit(1)
    exit_on_typo("train")
    main()
