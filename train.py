"""Train a slice classifier with patient voting: python train.py [group=choice] [key=value] [-m ...]

Examples:
    python train.py                                  # CPU demo on embedded synthetic data, W&B offline
    python train.py loss.gamma=2 model=vgg16
    python train.py -m loss.gamma=0,1,2              # three jobs, one W&B group
    python train.py data=covid_ct_md data.root=/data/COVID-CT-MD experiment=paper
"""

from __future__ import annotations

import logging
import math
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import otherwise

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from covidct.config import register_resolvers  # noqa: E402
from covidct.errors import CovidCTError  # noqa: E402

log = logging.getLogger("train")
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the monitored patient accuracy for sweepers; None for a failed job of a multirun
    (Optuna records such a trial as failed and goes on; NaN would stop Optuna 2.x)."""
    from pytorch_lightning.utilities import rank_zero_only

    from covidct.sweep_summary import write_run_metrics
    from covidct.training import LaunchError, train

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = os.path.basename(hydra_cfg.sweep.dir) if multirun else None
    try:
        result = train(cfg, group=group)
    except Exception as exc:  # a user error may arrive wrapped by hydra.utils.instantiate
        exc = exc if isinstance(exc, CovidCTError) else exc.__cause__
        if not isinstance(exc, CovidCTError):
            raise
        if multirun and not isinstance(exc, LaunchError):  # one bad job must not end the sweep; the summary lists it
            log.error("Job %s failed: %s", hydra_cfg.job.num, exc)
            write_run_metrics(cfg.paths.output_dir, {"status": "failed", "error": str(exc)})
            return None
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message says it all; no traceback for user errors)
    if rank_zero_only.rank == 0:  # under DDP every rank returns here; one summary is enough
        log.info("\n%s", result.summary(cfg.vote.rule))
    return None if math.isnan(result.score) else result.score


if __name__ == "__main__":
    main()
