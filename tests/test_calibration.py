"""Temperature scaling on a deliberately overconfident model: NLL and ECE go down, argmax stays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covidct.patients.calibration import apply_temperature, expected_calibration_error, fit_temperature, nll


def overconfident(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Slices whose class shifts one of 3 standard normal scores by 1.2: the calibrated logits are 1.2 x the
    scores (the Bayes posterior), these are 4 x the scores, so 4 / 1.2 times too sharp."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), targets] += 1.2
    sharp = 4.0 * logits
    probs = np.exp(sharp - sharp.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True), targets


def test_temperature_scaling_fixes_an_overconfident_model():
    probs, targets = overconfident()
    t = fit_temperature(probs, targets)
    assert t == pytest.approx(4.0 / 1.2, rel=0.1)  # it recovers the sharpening
    calibrated = apply_temperature(probs, t)
    assert nll(calibrated, targets) < 0.7 * nll(probs, targets)
    assert expected_calibration_error(calibrated, targets) < 0.5 * expected_calibration_error(probs, targets)
    assert (calibrated.argmax(1) == probs.argmax(1)).all()  # no call changes
    np.testing.assert_allclose(calibrated.sum(1), 1.0, rtol=1e-5)


def test_unknown_targets_are_left_out_and_none_known_means_no_change():
    probs, targets = overconfident(500, seed=1)
    mixed = np.where(np.arange(500) % 2 == 0, targets, -1)
    assert fit_temperature(probs, mixed) == pytest.approx(fit_temperature(probs[::2], targets[::2]), rel=1e-6)
    assert fit_temperature(probs, np.full(500, -1)) == 1.0
    np.testing.assert_array_equal(apply_temperature(probs, 1.0), probs.astype(np.float32))


@pytest.mark.slow
def test_training_stores_the_temperature_and_predict_applies_it(trained, tmp_path):
    """The session's tiny training fitted a temperature; predict.py divides the logits by it unless
    calibration=false, and records what it used."""
    import csv
    import json

    from tests.conftest import run_cli

    best, run = trained
    state = torch.load(best, map_location="cpu", weights_only=True)["callbacks"]
    temperature = next(v for k, v in state.items() if k.startswith("PatientVoteCallback"))["temperature"]
    assert temperature != 1.0 and 0.05 <= temperature <= 20.0
    logged = (run / "metrics.json").read_text()
    assert "calibration/slice_ece_after" in logged and "calibration/temperature" in logged
    split = list(csv.DictReader((run / "split.csv").open()))
    root = Path(json.loads((run / "data_summary.json").read_text())["root"])
    folder = next(root.glob(f"*/{split[0]['patient']}"))
    probs = {}
    for calibration in ("true", "false"):
        out = tmp_path / calibration
        done = run_cli(
            [
                f"ckpt_path={best}",
                f"input={folder}",
                f"calibration={calibration}",
                f"hydra.run.dir={out}",
                "progress=false",
            ],
            tmp_path,
            "predict.py",
        )
        assert done.returncode == 0, done.stderr[-2000:]
        rows = list(csv.DictReader(next(out.glob("*_slices.csv")).open()))
        probs[calibration] = np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])
        used = json.loads((out / "prediction.json").read_text())["temperature"]
        assert used == (temperature if calibration == "true" else 1.0)
    # the CSVs hold 4 decimals: applying T to rounded probabilities is exact to ~1e-3
    np.testing.assert_allclose(apply_temperature(probs["false"], temperature), probs["true"], atol=1e-3)
    assert (probs["true"].argmax(1) == probs["false"].argmax(1)).all()


def test_fitting_works_inside_inference_mode_as_in_lightnings_validation_hooks():
    probs, targets = overconfident(300, seed=2)
    with torch.inference_mode():
        inside = fit_temperature(probs, targets)
    assert inside == pytest.approx(fit_temperature(probs, targets)) and inside != 1.0


def test_a_temperature_at_its_bound_is_warned_about(caplog):
    """A model confidently wrong on every validation slice drives T to its cap (seen on real CT with one
    validation patient): the vote callback says so."""
    import logging

    from covidct.patients.calibration import T_MAX
    from covidct.training.callbacks.patient_vote import PatientVoteCallback

    probs = np.tile([[0.001, 0.001, 0.998]], (20, 1))  # every slice confidently Normal
    targets = np.repeat([0, 1, 0, 1], 5)  # all COVID-19 or CAP, 4 patients
    cb = PatientVoteCallback()
    with caplog.at_level(logging.WARNING, logger="covidct.patients.decisions"):
        metrics = cb.calibrate(probs, np.repeat(np.arange(4), 5), np.array([0, 1, 0, 1]), targets)
    assert metrics["calibration/temperature"] == T_MAX
    assert "hit its bound" in caplog.text and "calibration=false" in caplog.text


@pytest.mark.parametrize(
    ("patients", "targets"),
    [(np.zeros(20, dtype=np.int64), np.zeros(20, dtype=np.int64)), (np.repeat(np.arange(4), 5), np.zeros(20))],
    ids=["one patient", "one class"],
)
def test_too_few_validation_patients_or_classes_are_not_calibrated_on(caplog, patients, targets):
    """One patient's slices (real CT with one validation patient: T went to its cap and flipped a call) or
    slices of one class keep T = 1, and the first epoch says why, once."""
    import logging

    from covidct.patients.decisions import MIN_CALIBRATION_PATIENTS
    from covidct.training.callbacks.patient_vote import PatientVoteCallback

    probs, _ = overconfident(20, seed=3)  # a fit would move T well away from 1
    cb = PatientVoteCallback()
    labels = np.zeros(patients.max() + 1, dtype=np.int64)
    with caplog.at_level(logging.WARNING, logger="covidct.patients.decisions"):
        for _ in range(2):  # two epochs
            metrics = cb.calibrate(probs, patients, labels, targets.astype(np.int64))
    assert metrics["calibration/temperature"] == 1.0 and cb.parameters.temperature == 1.0
    assert caplog.text.count("calibration: not fitted") == 1
    assert f"at least {MIN_CALIBRATION_PATIENTS} patients of 2 classes" in caplog.text
    assert "slice_ece_after" in " ".join(metrics)  # ECE is still measured, before = after
    assert metrics["calibration/slice_ece_after"] == pytest.approx(metrics["calibration/slice_ece_before"])
