"""Predict patients from DICOM folders: python predict.py ckpt_path=<checkpoint> input=<folder>
(python predict.py --help: every key, conf/hydra/help/predict.yaml)

Writes into the run folder (outputs/predict/runs/<time>_<suffix>/) one CSV per test set
(patient, predicted class, mean probability per class, slices used and skipped, status), a
per-slice CSV per test set, and prediction.json recording the checkpoint and settings used.
With ``labels=<patient,class CSV>`` it then scores them (covidct/predict/evaluate.py): evaluation.json,
evaluation.csv and confusion_<test set>.png in the same folder, and a printed table.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from covidct.cli import exit_if_keys_missing
from covidct.config import register_resolvers
from covidct.errors import CovidCTError

log = logging.getLogger("predict")
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    # Unset ckpt_path / input end before Hydra makes the run folder (covidct.cli.MandatoryKeysCheck, a
    # callback of conf/hydra/default.yaml); this is the same line should that callback be switched off.
    exit_if_keys_missing(cfg, "predict", log)
    vote = cfg.get("vote") or {}
    for key in ("tau", "slice_threshold"):  # vote=threshold brings vote.tau: null; predict.py's tau is top level
        if vote.get(key) is not None:
            log.error(
                "vote.%s=%s: predict.py sets it with %s=%s (vote.%s is not used)", key, vote[key], key, vote[key], key
            )
            sys.exit(1)

    from covidct.predict.predictor import run_prediction

    labels = cfg.get("labels")
    try:
        if labels is not None:  # a bad labels file or setting fails before any prediction work
            from covidct.predict.eval_inputs import read_labels
            from covidct.predict.evaluate import check_settings

            check_settings(cfg.get("bootstrap"), cfg.get("seed"), cfg.get("allow_errors"))
            read_labels(labels)
        outputs = run_prediction(cfg)
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message says it all)
    for path in outputs:
        log.info("wrote %s", path)
    if labels is not None:
        from covidct.predict.evaluate import run_evaluation

        out = cfg.paths.output_dir
        try:
            outputs = run_evaluation(cfg, out)
        except CovidCTError as exc:
            log.error("%s", exc)
            log.error(
                "the predictions are kept in %s: python -m covidct.predict.evaluate predictions=%s labels=...", out, out
            )
            sys.exit(1)  # noqa: B904
        for path in outputs:
            log.info("wrote %s", path)


if __name__ == "__main__":
    from covidct.cli import exit_on_typo

    exit_on_typo("predict")
    main()
