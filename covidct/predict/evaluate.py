"""Score predictions against ground truth: accuracy, per-class sensitivity / specificity, macro F1,
confusion matrices and 95% bootstrap confidence intervals, per test set and overall.

    python -m covidct.predict.evaluate predictions=<predict.py run folder | one test set's CSV> labels=<csv>
        [bootstrap=2000] [seed=0] [allow_errors=false]

or ``python predict.py ... labels=<csv>``, which scores the CSVs it has just written. Settings in
``conf/evaluate.yaml``. The labels CSV has a patient and a class column (the SPGC / COVID-CT-MD
headers are accepted: ``patient``, ``patient_id``, ``Folder/ID``; ``class``, ``label``, ``Diagnosis``),
class names as in :data:`covidct.contracts.CLASS_NAMES` in any case (``covid``, ``covid19`` are COVID-19 too).
Labels and predictions must match one to one: a bad class name, a duplicate row, a predicted patient
without a label, a label without a prediction, or a prediction that failed (status ``error``, unless
``allow_errors=true`` scores it as wrong) is refused with the file and line named; nothing is dropped
(reading and matching: :mod:`covidct.predict.eval_inputs`). ``predict.py labels=`` scores partially
(``partial``): the predicted patients with a label row are scored, the label rows of patients absent from
the input and the input patients without one are logged and listed in evaluation.json (``unscored``).

Writes into the run folder: ``evaluation.json`` (every number, the CIs, the labels file and its
SHA-256), ``evaluation.csv`` (test set, metric, value, ci_low, ci_high), ``confusion_<test set>.png``
and ``confusion_overall.png``; prints the table. Metrics (:mod:`covidct.predict.eval_metrics`) are
torchmetrics'; the bootstrap resamples
patients with replacement (numpy Generator seeded with ``seed``, the same draws for every run with
that seed), percentile intervals; a per-class metric that a resample leaves undefined (sensitivity
without that class, specificity with only that class) is skipped in that resample, and the number of
resamples that counted is recorded. Macro F1 averages the classes present in the truth or the
predictions (torchmetrics' rule).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from covidct.cli import exit_if_keys_missing
from covidct.contracts import CONF_DIR, EVALUATION_CSV, EVALUATION_JSON
from covidct.errors import ConfigError, CovidCTError
from covidct.io import atomic_write_bytes, atomic_write_csv, atomic_write_text
from covidct.predict.eval_inputs import (
    OVERALL,
    Labels,
    Predictions,
    Unscored,
    match,
    read_labels,
    read_predictions,
    unscored,
)
from covidct.predict.eval_metrics import NO_PREDICTION, Scores, confusion_png, format_scores, metric_names, score

log = logging.getLogger("evaluate")
LOGGED = 10
"""Patients named per 'not scored' log line (then 'and N more')."""


@dataclass
class Evaluation:
    """What :func:`evaluate` computed and wrote: scores per test set, then ``overall``."""

    scores: dict[str, Scores]
    class_names: list[str]
    files: list[Path]
    unscored: Unscored = field(default_factory=lambda: Unscored([], []))


def check_settings(resamples: object, seed: object, allow_errors: object = False) -> None:
    """ConfigError unless ``bootstrap`` and ``seed`` are integers >= 0 and ``allow_errors`` a boolean."""
    for key, value in (("bootstrap", resamples), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be an integer >= 0 (bootstrap=0: no intervals), got {value!r}")
    if not isinstance(allow_errors, bool):
        raise ConfigError(f"allow_errors must be true or false, got {allow_errors!r}")


def evaluate(
    predictions: str | Path,
    labels: str | Path,
    output_dir: str | Path,
    resamples: int = 2000,
    seed: int = 0,
    allow_errors: bool = False,
    partial: bool = False,
) -> Evaluation:
    """Score ``predictions`` (run folder or CSV) against ``labels``; write evaluation.json / .csv and
    the confusion PNGs into ``output_dir``. ``partial`` (predict.py ``labels=``): score the predicted patients
    that have a label row, and record the others and the labels of patients not predicted (``unscored``)
    instead of refusing them."""
    check_settings(resamples, seed, allow_errors)
    preds = read_predictions(predictions)
    names = preds.class_names
    label_set = read_labels(labels, names)
    truth_pred = match(label_set, preds, allow_errors, partial)
    left_out = unscored(label_set, preds)
    k = len(names)
    truth_pred[OVERALL] = (
        np.concatenate([t for t, _ in truth_pred.values()]),
        np.concatenate([p for _, p in truth_pred.values()]),
    )
    failed = {p.patient: p.test_set for p in preds.rows if p.predicted is None and p.patient in label_set.rows}
    scores = {}
    for name, (truth, pred) in truth_pred.items():
        scores[name] = score(truth, pred, k, names, resamples, seed)
        scores[name].scored_as_wrong = [pid for pid, t in failed.items() if name in (t, OVERALL)]
    out = Path(output_dir)
    written = []
    for name, s in scores.items():
        png = confusion_png(s.confusion, names, f"{name} (n={s.n_patients})")
        written.append(atomic_write_bytes(out / f"confusion_{name}.png", png))
    record = evaluation_record(preds, label_set, scores, resamples, seed, allow_errors)
    record |= {"partial_labels": partial, "unscored": asdict(left_out)}
    written.append(atomic_write_text(out / EVALUATION_JSON, json.dumps(record, indent=1) + "\n"))
    written.append(write_scores_csv(out / EVALUATION_CSV, scores, names))
    return Evaluation(scores, names, written, left_out)


def evaluation_record(
    preds: Predictions, label_set: Labels, scores: dict[str, Scores], resamples: int, seed: int, allow_errors: bool
) -> dict[str, Any]:
    """What ``evaluation.json`` holds: the inputs (the labels with their SHA-256), the settings, and per test
    set and overall the confusion matrix and every metric with its CI and valid resamples."""
    names = preds.class_names
    return {
        "predictions": str(preds.source.resolve()),
        "prediction_files": {n: str(p.resolve()) for n, p in preds.files.items()},
        "labels": str(label_set.path.resolve()),
        "labels_sha256": label_set.sha256,
        "class_names": names,
        "confidence": 0.95,
        "bootstrap_resamples": resamples,
        "seed": seed,
        "allow_errors": allow_errors,
        "scores": {
            name: {
                "n_patients": s.n_patients,
                "scored_as_wrong": s.scored_as_wrong,
                "confusion_matrix": {
                    "true": names,
                    "predicted": names + [NO_PREDICTION] * (s.confusion.shape[1] - len(names)),
                    "counts": s.confusion.tolist(),
                },
                "metrics": {
                    m: {"value": s.values[m], "ci_low": s.ci[m][0], "ci_high": s.ci[m][1], "valid_resamples": n}
                    for m, n in s.valid_resamples.items()
                },
            }
            for name, s in scores.items()
        },
    }


def _num(value: float | None) -> float | str:
    """A CSV cell: the value to 6 decimals, "" when undefined."""
    return "" if value is None else round(value, 6)


def write_scores_csv(path: Path, scores: dict[str, Scores], class_names: list[str]) -> Path:
    """Write ``evaluation.csv`` (atomic): one row per test set (then overall) and metric, with its CI."""
    rows = [
        [name, s.n_patients, m, _num(s.values[m]), _num(s.ci[m][0]), _num(s.ci[m][1]), s.valid_resamples[m]]
        for name, s in scores.items()
        for m in metric_names(class_names)
    ]
    header = ["test_set", "n_patients", "metric", "value", "ci_low", "ci_high", "valid_resamples"]
    return atomic_write_csv(path, header, rows)


def run_evaluation(cfg: DictConfig, predictions: str | Path, partial: bool = False) -> list[Path]:
    """Evaluate ``predictions`` with ``cfg.labels / bootstrap / seed / allow_errors`` into the run
    folder; print the table. Shared by ``python -m covidct.predict.evaluate`` and ``predict.py labels=...``
    (``partial``: the labels may list patients not in the input, and the input patients without a label row;
    both are logged and recorded in evaluation.json, the others scored)."""
    resamples, seed = cfg.get("bootstrap", 2000), cfg.get("seed", 0)
    allow_errors = cfg.get("allow_errors", False)
    result = evaluate(predictions, cfg.labels, cfg.paths.output_dir, resamples, seed, allow_errors, partial)
    log_unscored(result.unscored, cfg.labels)
    what = f"value [95% CI, {resamples} patient resamples, seed {seed}]" if resamples else "value (bootstrap=0)"
    print(f"labels={cfg.labels}: {what}")
    print(format_scores(result.scores, result.class_names), flush=True)
    if wrong := result.scores[OVERALL].scored_as_wrong:
        log.warning("scored as wrong (their prediction failed): %s", ", ".join(wrong))
    return result.files


def log_unscored(left_out: Unscored, labels: str | Path) -> None:
    """One warning line per kind of patient not scored, naming the first :data:`LOGGED` (all are in
    evaluation.json's ``unscored``)."""
    for patients, what in (
        (left_out.absent_from_input, f"labelled in labels={labels} but absent from the input"),
        (left_out.without_label, "in the input but without a label row"),
    ):
        if patients:
            more = f" and {len(patients) - LOGGED} more" if len(patients) > LOGGED else ""
            shown = ", ".join(patients[:LOGGED])
            log.warning(
                "not scored: %d patient(s) %s: %s%s (evaluation.json: unscored)", len(patients), what, shown, more
            )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def evaluate_app(cfg: DictConfig) -> None:
    exit_if_keys_missing(cfg, "evaluate", log)
    try:
        written = run_evaluation(cfg, cfg.predictions)
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message names the file and row; no traceback for user errors)
    for path in written:
        log.info("wrote %s", path)


def main() -> None:
    """``python -m covidct.predict.evaluate predictions=<...> labels=<csv> [...]``: process setup, then Hydra."""
    from covidct.config import register_resolvers

    register_resolvers()  # ${run_suffix:} names the run folder
    evaluate_app()


if __name__ == "__main__":
    from covidct.cli import exit_on_typo

    exit_on_typo("evaluate")
    main()
