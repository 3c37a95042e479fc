"""Predict patients from DICOM folders: python predict.py ckpt_path=<checkpoint> input=<folder>

Writes into the run folder (outputs/predict/runs/<time>_<suffix>/) one CSV per test set
(patient, predicted class, mean probability per class, slices used and skipped, status), a
per-slice CSV per test set, and prediction.json recording the checkpoint and settings used.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from covidct.config import register_resolvers  # noqa: E402
from covidct.errors import CovidCTError  # noqa: E402

log = logging.getLogger("predict")
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from covidct.inference import run_prediction

    try:
        outputs = run_prediction(cfg)
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message says it all)
    for path in outputs:
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
