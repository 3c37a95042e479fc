"""Patient vote callback: metrics on known predictions, leave-one-out tau, DDP gather + dedup."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from covidct.callbacks.patient_vote import PatientVoteCallback, leave_one_out_predictions, patient_metrics
from covidct.errors import ConfigError


def test_patient_metrics_on_known_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 2, 1, 1, 2, 0])
    m = patient_metrics(preds, labels)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["sensitivity/COVID-19"] == pytest.approx(0.5) and m["sensitivity/CAP"] == 1.0
    assert m["specificity/COVID-19"] == pytest.approx(3 / 4)  # one Normal called COVID-19
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
    patient = torch.arange(n) // 4
    per_rank = [list(DistributedSampler(range(n), num_replicas=ranks, rank=r, shuffle=False)) for r in range(ranks)]
    assert sum(len(r) for r in per_rank) == 12  # two repeats
    callbacks = []
    for rank_indices in per_rank:
        cb = PatientVoteCallback()
        idx = torch.tensor(rank_indices)
        cb._batches = [(idx, patient[idx], probs[idx])]
        callbacks.append(cb)
    stacked = {k: torch.stack([cb._batches[0][k] for cb in callbacks]) for k in range(3)}
    calls = iter(stacked.values())
    fake_trainer = SimpleNamespace(world_size=ranks, strategy=SimpleNamespace(all_gather=lambda t: next(calls)))
    index, patient_out, probs_out = callbacks[0].gather(fake_trainer)
    assert index.tolist() == list(range(n))
    np.testing.assert_array_equal(patient_out, patient.numpy())
    np.testing.assert_allclose(probs_out, probs.numpy())
