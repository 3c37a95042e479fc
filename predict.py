"""Predict patients from DICOM folders: python predict.py ckpt_path=<checkpoint> input=<folder>
(python predict.py --help: every key, conf/hydra/help/predict.yaml)

Writes into the run folder (outputs/predict/runs/<time>_<suffix>/) one CSV per test set
(patient, predicted class and why: the vote rule's decision sentence, quantity, threshold and scores; mean
probability per class, slices used and skipped, status), a per-slice CSV per test set, and prediction.json
recording the checkpoint and settings used. With ``labels=<patient,class CSV>`` it then scores the patients
that have a label row (covidct/predict/evaluate.py): evaluation.json (with the patients left out),
evaluation.csv and confusion_<test set>.png in the same folder, and a printed table.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from covidct.cli import exit_if_keys_missing
from covidct.config import register_resolvers
from covidct.errors import CovidCTError
from covidct.io import made_by_this_run, mark_failed

log = logging.getLogger("predict")
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    # Unset ckpt_path / input end before Hydra makes the run folder (covidct.cli.MandatoryKeysCheck, a
    # callback of conf/hydra/default.yaml); this is the same line should that callback be switched off.
    exit_if_keys_missing(cfg, "predict", log)
    fresh = made_by_this_run(cfg.paths.output_dir)  # a failed prediction renames only a folder it made
    vote = cfg.get("vote") or {}
    for key in ("tau", "slice_threshold"):  # vote=threshold brings vote.tau: null; predict.py's tau is top level
        if vote.get(key) is not None:
            log.error(
                "vote.%s=%s: predict.py sets it with %s=%s (vote.%s is not used)", key, vote[key], key, vote[key], key
            )
            exit_failed(cfg.paths.output_dir, fresh)

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
        exit_failed(cfg.paths.output_dir, fresh)
    for path in outputs:
        log.info("wrote %s", path)
    if labels is not None:
        from covidct.predict.evaluate import run_evaluation

        out = cfg.paths.output_dir
        try:
            outputs = run_evaluation(cfg, out, partial=True)  # labels of other patients (Index.csv) are fine
        except CovidCTError as exc:
            log.error("%s", exc)
            log.error(
                "the predictions are kept in %s: python -m covidct.predict.evaluate predictions=%s labels=...", out, out
            )
            sys.exit(1)  # noqa: B904
        for path in outputs:
            log.info("wrote %s", path)


def exit_failed(output_dir: str, fresh: bool) -> None:
    """Exit 1 after an error (said already); the run folder renamed ``<folder>-failed`` when this run made it."""
    if fresh and (kept := mark_failed(output_dir)) != Path(output_dir):
        log.info("The failed prediction's folder is kept as %s", kept)
    sys.exit(1)


if __name__ == "__main__":
    from covidct.cli import exit_on_typo

    exit_on_typo("predict")
    main()
