"""Patient vote callback: metrics on known predictions, leave-one-out tau, DDP gather + dedup."""

from __future__ import annotations

import csv
import logging
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from covidct.errors import ConfigError
from covidct.patients.metrics import patient_metrics
from covidct.patients.rules import VOTE_RULES
from covidct.patients.tuning import leave_one_out_predictions
from covidct.training.callbacks.patient_vote import PatientVoteCallback, logged_rules_table
from covidct.training.wandb_logger import RuleChartWandbLogger as ChartingWandbLogger
from tests.conftest import stand_in_validation


def test_patient_metrics_on_known_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 2, 1, 1, 2, 0])
    m = patient_metrics(preds, labels)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["sensitivity_covid_19"] == pytest.approx(0.5) and m["sensitivity_cap"] == 1.0
    assert m["specificity_covid_19"] == pytest.approx(3 / 4)  # one Normal called COVID-19
    assert m["confusion"].tolist() == [[1, 0, 1], [0, 2, 0], [1, 0, 1]]
    f1 = np.mean([0.5, 1.0, 0.5])
    assert m["f1_macro"] == pytest.approx(f1)


def test_leave_one_out_tau_does_not_score_a_patient_with_its_own_tau():
    # normals at fractions 0.0-0.2, sick at 0.45-0.9: every held-out patient is still classified right
    fractions = np.array([0.0, 0.1, 0.2, 0.45, 0.6, 0.9])
    labels = np.array([2, 2, 2, 0, 1, 0])
    infected_votes = np.array([0, 0, 1, 0, 1, 0])
    assert leave_one_out_predictions(fractions, infected_votes, labels).tolist() == labels.tolist()
    # a patient that is an outlier is misclassified when held out (honest), though a tau tuned on all fits it
    fractions = np.array([0.0, 0.1, 0.5, 0.3, 0.6, 0.9])
    labels = np.array([2, 2, 2, 0, 0, 0])
    preds = leave_one_out_predictions(fractions, np.zeros(6, int), labels)
    assert (preds != labels).sum() >= 1


def test_bad_vote_config_names_the_key():
    with pytest.raises(ConfigError, match="vote.rule"):
        PatientVoteCallback(rule="mean")
    with pytest.raises(ConfigError, match="vote.tau"):
        PatientVoteCallback(tau=1.5)


def test_gather_counts_every_slice_once_despite_distributed_sampler_padding():
    n, ranks = 10, 4
    probs = torch.softmax(torch.randn(n, 3), dim=1)
    embedding = torch.randn(n, 5)
    patient = torch.arange(n) // 4
    per_rank = [list(DistributedSampler(range(n), num_replicas=ranks, rank=r, shuffle=False)) for r in range(ranks)]
    assert sum(len(r) for r in per_rank) == 12  # two repeats
    callbacks = []
    for rank_indices in per_rank:
        cb = PatientVoteCallback()
        idx = torch.tensor(rank_indices)
        cb._batches = [(idx, patient[idx], probs[idx], embedding[idx])]
        callbacks.append(cb)
    stacked = {k: torch.stack([cb._batches[0][k] for cb in callbacks]) for k in range(4)}
    calls = iter(stacked.values())
    fake_trainer = SimpleNamespace(world_size=ranks, strategy=SimpleNamespace(all_gather=lambda t: next(calls)))
    index, patient_out, probs_out, embedding_out = callbacks[0].gather(fake_trainer)
    assert index.tolist() == list(range(n))
    np.testing.assert_array_equal(patient_out, patient.numpy())
    np.testing.assert_allclose(probs_out, probs.numpy())
    np.testing.assert_allclose(embedding_out, embedding.numpy())  # the MIL rule's inputs, gathered alike


def _slices(rows: list[list[float]], n: int) -> list[list[float]]:
    return [row for row in rows for _ in range(n)]


def tiny_validation() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 patients (COVID-19, CAP, Normal, Normal), slices head first: cache rows, patient, probs (N, 3).

    P0: 4 confident COVID-19 slices (rows 3-6) among 6 hesitant Normal ones: majority says Normal,
    mean_prob / weighted_center (centre 4) / topk_mean say COVID-19. P3: one confident COVID-19 slice
    (the last, outside the centre) among 4 hesitant Normal ones: only topk_mean (k=2) says COVID-19.
    """
    p0 = _slices([[0.4, 0.05, 0.55]], 3) + _slices([[0.95, 0.03, 0.02]], 4) + _slices([[0.4, 0.05, 0.55]], 3)
    p1 = _slices([[0.1, 0.8, 0.1]], 3)
    p2 = _slices([[0.1, 0.1, 0.8]], 4)
    p3 = _slices([[0.3, 0.1, 0.6]], 4) + [[0.99, 0.005, 0.005]]
    probs = np.array(p0 + p1 + p2 + p3, dtype=np.float32)
    patient = np.repeat([0, 1, 2, 3], [10, 3, 4, 5])
    return np.arange(len(probs)), patient, probs


def run_validation_epoch(cb: PatientVoteCallback, loggers: list) -> tuple[dict[str, float], SimpleNamespace]:
    """One validation epoch on :func:`tiny_validation`, fed in shuffled batches; returns the logged dict
    and the (stand-in) LightningModule."""
    index, patient, probs = tiny_validation()
    trainer, module, recorder = stand_in_validation(["P0", "P1", "P2", "P3"], np.array([0, 1, 2, 2]), loggers)
    cb.on_validation_epoch_start(trainer, module)
    for rows in np.array_split(np.random.default_rng(0).permutation(len(index)), 3):
        batch = {"index": torch.as_tensor(index[rows]), "patient": torch.as_tensor(patient[rows])}
        cb.on_validation_batch_end(trainer, module, {"probs": torch.as_tensor(probs[rows])}, batch, 0)
    cb.on_validation_epoch_end(trainer, module)
    return module.lightning_logged | recorder.metrics, module


def test_every_rule_is_scored_in_the_logged_metrics_and_the_rule_table(tmp_path, caplog):
    from pytorch_lightning.loggers import WandbLogger

    wandb_logger = MagicMock(spec=WandbLogger)
    cb = PatientVoteCallback("weighted_center", output_dir=str(tmp_path), k=2, center_slices=4, mil=False)
    with caplog.at_level(logging.INFO, logger="covidct.training.callbacks.patient_vote"):
        logged, module = run_validation_epoch(cb, [wandb_logger])
    # truth COVID-19, CAP, Normal, Normal -> (predictions, acc, macro F1, sensitivity COVID-19 / CAP / Normal).
    # infected_fraction is leave-one-out: without P0 (40% infected) tau lands above it, without P3 (20%) at 0
    expected = {
        "majority": ([2, 1, 2, 2], 0.75, 0.6, [0.0, 1.0, 1.0]),
        "infected_fraction": ([2, 1, 2, 0], 0.5, 0.5, [0.0, 1.0, 0.5]),
        "mean_prob": ([0, 1, 2, 2], 1.0, 1.0, [1.0, 1.0, 1.0]),
        "weighted_center": ([0, 1, 2, 2], 1.0, 1.0, [1.0, 1.0, 1.0]),
        "topk_mean": ([0, 1, 2, 0], 0.75, 7 / 9, [1.0, 1.0, 0.5]),
        # leave-one-out too: P0 and P3 cannot be told apart by the other patients' thresholds
        "threshold": ([2, 1, 2, 0], 0.5, 0.5, [0.0, 1.0, 0.5]),
    }
    columns, rows = cb.rule_table
    assert columns == ["rule", "acc", "f1_macro", "sensitivity COVID-19", "sensitivity CAP", "sensitivity Normal"]
    assert [r[0] for r in rows] == list(VOTE_RULES) == list(expected)
    for (rule, (preds, acc, f1, sens)), row in zip(expected.items(), rows, strict=True):
        if rule not in ("infected_fraction", "threshold"):  # rule_votes: at the parameters tuned on all patients
            assert [v.rule_votes[rule] for v in cb.best.patients] == preds
        assert row[1:] == pytest.approx([acc, f1, *sens])
        assert logged[f"rules/{rule}/acc"] == pytest.approx(acc)
        assert logged[f"rules/{rule}/f1_macro"] == pytest.approx(f1)
        assert logged[f"rules/{rule}/sensitivity_normal"] == pytest.approx(sens[2])
    # the configured rule drives val/patient/acc, the best epoch's predictions and patients.csv
    assert logged["val/patient/acc"] == 1.0 and cb.best.epoch == 0 and cb.best.score == 1.0
    assert cb.best.predicted.tolist() == [0, 1, 2, 2] and cb.best.labels.tolist() == [0, 1, 2, 2]
    assert [v.patient for v in cb.best.patients] == ["P0", "P1", "P2", "P3"]  # ids from the start
    assert module.patient_votes is cb.best  # published for the report and W&B callbacks
    with (tmp_path / "patients.csv").open() as f:
        first = next(csv.DictReader(f))
    assert (first["patient"], first["predicted_class"], first["majority_vote"]) == ("P0", "COVID-19", "Normal")
    assert (first["weighted_center_vote"], first["topk_mean_vote"], first["mean_prob_vote"]) == ("COVID-19",) * 3
    # Lightning logs val/* only; W&B gets the other scalars with the rule table, in one history row
    assert set(module.lightning_logged) == {"val/patient/acc", "val/patient/f1_macro"}
    (sent,), kwargs = wandb_logger.log_metrics.call_args
    assert kwargs == {"step": 0} and (sent["rules/table"].columns, sent["rules/table"].data) == (columns, rows)
    assert sent["rules/topk_mean/acc"] == pytest.approx(0.75) and "vote/tau" in sent and "val/patient/acc" not in sent

    # the console: one line per epoch (the configured rule, the best other one), the table once, at fit end
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "covidct.training.callbacks.patient_vote"]

    (line,) = lines()
    assert line == (
        "Epoch 0: patient accuracy 1.000 with vote=weighted_center (val/patient/acc, 4 validation patients); "
        "best other rule mean_prob 1.000"
    )
    with caplog.at_level(logging.INFO, logger="covidct.training.callbacks.patient_vote"):
        cb.on_fit_end(SimpleNamespace(is_global_zero=True, loggers=[wandb_logger]), module)
    assert len(lines()) == 2
    table = lines()[-1]
    assert table.startswith("Patient rules at the best epoch 0, 4 validation patients")
    assert "* weighted_center    1.000     1.000" in table and "  topk_mean          0.750     0.778" in table
    assert all(rule in table for rule in VOTE_RULES) and "sens COVID-19" in table
    # W&B's summary: the best epoch's table (rebuilt from its logged scalars: also a restored best epoch's)
    (key, logged_table), _ = wandb_logger.experiment.summary.__setitem__.call_args
    assert key == "rules/table" and (logged_table.columns, logged_table.data) == (columns, rows)
    assert logged_rules_table(cb.best.metrics) == (columns, rows)
    assert logged_rules_table({"val/patient/acc": 1.0, "rules/majority/acc": 0.5}) == ([], [])  # an older one


def test_wandb_charts_only_the_configured_rule(tmp_path):
    """The W&B logger leaves the other rules' scalars out of the W&B history (CSV and metrics.json keep them)."""
    logger = ChartingWandbLogger(charted_rule="majority", save_dir=str(tmp_path), offline=True)
    kept = ["rules/majority/acc", "test_rules/majority/acc", "rules/table", "val/patient/acc", "vote/tau", "epoch"]
    assert all(logger.charted(key) for key in kept)
    assert not any(logger.charted(key) for key in ("rules/mean_prob/acc", "test_rules/mil/f1_macro"))
    assert ChartingWandbLogger(save_dir=str(tmp_path), offline=True).charted("rules/mean_prob/acc")  # None: all


def test_vote_state_holds_the_rule_parameters_and_older_states_load():
    cb = PatientVoteCallback("topk_mean", k=3, center_slices=20)
    state = cb.state_dict()
    assert (state["k"], state["center_slices"], state["window_slices"]) == (3, 20, 80)
    assert "rule" not in state  # stored once, in the model's hyper_parameters (preprocessing.vote_rule)
    old = PatientVoteCallback("topk_mean", k=3)  # a checkpoint without k / center_slices
    old.load_state_dict({"rule": "majority", "tau": 0.4, "best": 0.5, "best_epoch": 1})
    assert (old.rule, old.parameters.k, old.parameters.center_slices, old.parameters.tau) == ("topk_mean", 3, 40, 0.4)
    assert old.parameters.rule == "topk_mean"  # the config's rule wins


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"k": 0}, "vote.k"), ({"center_slices": 2.5}, "vote.center_slices"), ({"rule": "median"}, "vote.rule")],
)
def test_bad_rule_parameters_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        PatientVoteCallback(**kwargs)


def test_wandb_sample_slices_take_the_classes_in_turn():
    from covidct.training.callbacks.wandb_tables import classes_in_turn

    labels = np.array([0, 0, 0, 0, 1, 1, 2])  # 4 COVID-19, 2 CAP, 1 Normal
    assert classes_in_turn(np.arange(7), labels) == [0, 4, 6, 1, 5, 2, 3]
    assert classes_in_turn(np.array([1, 2, 5]), labels) == [1, 5, 2]
    assert classes_in_turn(np.array([], dtype=int), labels) == []


def test_mil_is_not_scored_on_one_validation_patient(caplog):
    """One validation patient has no others to fit a head on: mil is left out (said once), never fitted on it;
    vote.rule=mil stops with what to do."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=6).astype(np.float32)
    embeddings = rng.normal(size=(6, 8)).astype(np.float32)
    args = (np.arange(6), np.zeros(6, dtype=np.int64), probs, ["P0"], np.array([1]))
    cb = PatientVoteCallback("threshold")
    with caplog.at_level(logging.WARNING, logger="covidct.patients.decisions"):
        for epoch in range(2):
            result = cb.fit_mil(cb.decide(epoch, *args, embeddings=embeddings))
    assert "mil" not in result.predictions and result.mil_pending is None
    assert cb.parameters.mil_head is None and result.mil is None
    assert "rules/mil/acc" not in result.metrics and [r[0] for r in cb.rule_table[1]] == list(VOTE_RULES)
    assert caplog.text.count("needs at least 2 validation patients") == 1
    with pytest.raises(ConfigError, match=r"vote.rule=mil: .*got 1; raise data.val_fraction"):
        PatientVoteCallback("mil").decide(0, *args, embeddings=embeddings)


@pytest.mark.slow  # three MIL cross-fits (~3 s on 2 cores): keeps make test-fast under a minute
def test_mil_is_fitted_on_the_best_epoch_only_unless_it_is_the_rule():
    """With a fixed rule an epoch keeps what the head reads (``mil_pending``) and fits nothing: the callback fits
    the best epoch's at the end of fit (six fits: the cross-fitted calls and the stored head). With vote.rule=mil
    its own score picks the best epoch, so every epoch fits it."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 3)  # 9 patients of 12 slices
    patient = np.repeat(np.arange(9), 12)

    def probs(signal: float) -> np.ndarray:
        logits = rng.normal(size=(len(patient), 3)) + signal * np.eye(3)[labels[patient]]
        return (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)

    args = lambda p: (np.arange(len(patient)), patient, p, [f"P{i}" for i in range(9)], labels)  # noqa: E731
    voter = PatientVoteCallback("mean_prob", calibration=False)
    epoch = voter.decide(0, *args(probs(3.0)))
    assert "mil" not in epoch.predictions and "rules/mil/acc" not in epoch.metrics and epoch.mil is None
    assert voter.parameters.mil_head is None and epoch.mil_pending.shape == (len(patient), 3)  # log probs
    fitted = voter.fit_mil(epoch)
    assert fitted.mil_pending is None and fitted.mil is not None and voter.parameters.mil_head is not None
    assert fitted.metrics["rules/mil/acc"] == pytest.approx(np.mean(fitted.predictions["mil"] == labels))
    assert {k: v for k, v in fitted.metrics.items() if not k.startswith("rules/mil/")} == epoch.metrics
    assert fitted.mil.probs.shape == (9, 3) and np.allclose(np.bincount(patient, weights=fitted.mil.attention), 1)

    learned = PatientVoteCallback("mil", calibration=False)
    learned.decide(0, *args(probs(3.0)))
    again = learned.decide(1, *args(probs(0.0)))  # worse, but mil's own score decides
    assert "mil" in again.predictions and again.score == again.metrics["rules/mil/acc"] and again.mil_pending is None
