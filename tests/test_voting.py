"""Patient voting rules, tau tuning and DDP de-duplication."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidct.voting import (
    deduplicate,
    infected_fraction,
    infected_fraction_vote,
    majority_vote,
    patient_accuracy,
    tune_tau,
    vote_patients,
)

COVID, CAP, NORMAL = 0, 1, 2
ONE_HOT = {COVID: [0.8, 0.1, 0.1], CAP: [0.1, 0.8, 0.1], NORMAL: [0.1, 0.1, 0.8]}


def slices(*classes: int) -> np.ndarray:
    """(n, 3) probabilities whose argmax is each given class."""
    return np.array([ONE_HOT[c] for c in classes])


def test_majority_vote_clear_winner() -> None:
    assert majority_vote(slices(CAP, CAP, COVID, NORMAL)) == CAP
    assert majority_vote(slices(NORMAL)) == NORMAL


def test_majority_tie_resolved_by_summed_probability() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.4, 0.6, 0.0], [0.45, 0.55, 0.0]])
    assert majority_vote(probs) == COVID  # 2 vs 2 votes; sums 2.55 vs 1.45
    probs = np.array([[0.51, 0.49, 0.0], [0.51, 0.49, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert majority_vote(probs) == CAP  # 2 vs 2 votes; sums 1.02 vs 2.98


def test_majority_full_tie_resolved_by_lowest_index() -> None:
    probs = np.array([[0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.7, 0.1, 0.2]])
    assert majority_vote(probs) == COVID
    assert majority_vote(np.array([[0.2, 0.3, 0.5], [0.2, 0.5, 0.3]])) == CAP  # CAP vs Normal


def test_infected_fraction() -> None:
    assert infected_fraction(slices(COVID, NORMAL, NORMAL, CAP)) == 0.5
    assert infected_fraction(slices(NORMAL, NORMAL)) == 0.0
    assert infected_fraction(slices(NORMAL, CAP), normal_class=CAP) == 0.5


def test_infected_fraction_vote_at_and_around_tau() -> None:
    probs = slices(COVID, COVID, CAP, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL)  # 0.3
    assert infected_fraction_vote(probs, tau=0.3) == NORMAL  # fraction <= tau is Normal
    assert infected_fraction_vote(probs, tau=0.31) == NORMAL
    assert infected_fraction_vote(probs, tau=0.29) == COVID
    assert infected_fraction_vote(probs, tau=0.0) == COVID
    assert majority_vote(probs) == NORMAL
    assert infected_fraction_vote(slices(NORMAL, NORMAL), tau=0.0) == NORMAL


def test_infected_fraction_vote_ignores_normal_and_breaks_ties() -> None:
    probs = np.array(
        [[0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8], [0.0, 0.1, 0.9]]
    )
    # 2 COVID vs 2 CAP among infected slices: sums over the 4 infected slices 1.8 vs 1.8 -> lowest index.
    assert infected_fraction_vote(probs, tau=0.5) == COVID
    probs[2] = [0.2, 0.75, 0.05]
    assert infected_fraction_vote(probs, tau=0.5) == CAP  # 1.8 vs 1.85
    # Normal may have the most votes overall, but never wins once the patient is called infected.
    assert infected_fraction_vote(slices(CAP, NORMAL, NORMAL), tau=0.2) == CAP


def _separable() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fractions = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
    labels = np.array([NORMAL] * 4 + [COVID, CAP, COVID, CAP])
    votes = np.array([NORMAL, COVID, CAP, COVID, COVID, CAP, COVID, CAP])
    return fractions, votes, labels


def _accuracy(tau: float, fractions: np.ndarray, votes: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.where(fractions <= tau, NORMAL, votes) == labels))


def test_tune_tau_separable() -> None:
    fractions, votes, labels = _separable()
    tau = tune_tau(fractions, votes, labels)
    assert 0.2 < tau < 0.35
    assert tau == pytest.approx(0.275)
    assert _accuracy(tau, fractions, votes, labels) == 1.0
    assert patient_accuracy(fractions, votes, labels, tau) == 1.0
    assert patient_accuracy(fractions, votes, labels, 0.0) == 5 / 8  # 3 normals called sick
    perm = np.random.default_rng(0).permutation(len(fractions))
    assert tune_tau(fractions[perm], votes[perm], labels[perm]) == tau


def test_tune_tau_where_majority_fails() -> None:
    # Sick patients with 30% infected slices: the majority vote calls them Normal.
    rng = np.random.default_rng(1)
    patients = []
    # (label, class of the infected slices, number of infected slices out of 10)
    for label, seen, n_infected in [
        (NORMAL, COVID, 0),
        (NORMAL, COVID, 1),
        (NORMAL, CAP, 1),
        (COVID, COVID, 3),
        (CAP, CAP, 3),
        (COVID, COVID, 4),
    ]:
        classes = [seen] * n_infected + [NORMAL] * (10 - n_infected)
        patients.append((slices(*rng.permutation(classes)), label))
    labels = np.array([label for _, label in patients])
    majority = np.array([majority_vote(p) for p, _ in patients])
    assert np.mean(majority == labels) == 0.5

    results = vote_patients(
        np.repeat([f"p{i}" for i in range(6)], 10), np.concatenate([p for p, _ in patients]), 0.0
    )
    fractions = np.array([r.infected_fraction for r in results])
    votes = np.array([r.infected_vote for r in results])
    tau = tune_tau(fractions, votes, labels)
    assert fractions.tolist() == pytest.approx([0.0, 0.1, 0.1, 0.3, 0.3, 0.4])
    assert tau == pytest.approx(0.2)  # midpoint of 0.1 (normals) and 0.3 (sick)
    preds = [infected_fraction_vote(p, tau) for p, _ in patients]
    assert preds == labels.tolist()


def test_tune_tau_candidates_and_ties() -> None:
    fractions = np.array([0.1, 0.3, 0.5])
    votes = np.array([COVID, COVID, COVID])
    normals = np.array([NORMAL, NORMAL, NORMAL])
    assert tune_tau(fractions, votes, normals) == pytest.approx(0.75)  # all Normal: midpoint of 0.5 and 1
    assert tune_tau(fractions, votes, np.array([COVID, COVID, COVID])) == 0.0  # all infected
    assert 0.0 <= tune_tau(np.array([1.0]), np.array([COVID]), np.array([NORMAL])) < 1.0

    # Patients at 0.3 and 0.5 are wrong whatever tau is: candidates 0.2, 0.4 and 0.6 tie -> the median.
    fractions = np.array([0.1, 0.3, 0.5, 0.7])
    votes = np.array([COVID, CAP, CAP, COVID])
    labels = np.array([NORMAL, COVID, COVID, COVID])
    accuracies = [_accuracy(t, fractions, votes, labels) for t in (0.0, 0.2, 0.4, 0.6, 0.85)]
    assert accuracies == [0.25, 0.5, 0.5, 0.5, 0.25]
    assert tune_tau(fractions, votes, labels) == pytest.approx(0.4)
    # An even number of tied candidates (0.2, 0.4, 0.525, 0.625) -> the lower middle one.
    fractions, votes, labels = np.append(fractions, 0.55), np.append(votes, CAP), np.append(labels, COVID)
    assert tune_tau(fractions, votes, labels) == pytest.approx(0.4)


def test_tune_tau_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        tune_tau(np.array([]), np.array([]), np.array([]))
    with pytest.raises(ValueError):
        tune_tau(np.array([0.1, 0.2]), np.array([0]), np.array([0, 1]))


def test_vote_patients_groups_interleaved_slices() -> None:
    ids = ["b", "a", "b", "a", "c", "b", "a"]
    classes = [COVID, NORMAL, COVID, CAP, NORMAL, NORMAL, NORMAL]
    results = vote_patients(ids, slices(*classes), tau=0.4)
    assert [r.patient for r in results] == ["b", "a", "c"]  # order of first appearance
    b, a, c = results
    assert b.n_slices == 3 and b.votes.tolist() == [2, 0, 1]
    assert (
        b.majority == COVID
        and b.infected_fraction == pytest.approx(2 / 3)
        and b.infected_fraction_pred == COVID
    )
    assert a.n_slices == 3 and a.votes.tolist() == [0, 1, 2]
    assert (
        a.majority == NORMAL
        and a.infected_fraction == pytest.approx(1 / 3)
        and a.infected_fraction_pred == NORMAL
    )
    assert a.infected_vote == CAP
    np.testing.assert_allclose(a.mean_prob, np.mean([ONE_HOT[NORMAL], ONE_HOT[CAP], ONE_HOT[NORMAL]], axis=0))
    assert c.n_slices == 1 and c.infected_fraction == 0.0 and c.infected_vote == NORMAL
    with pytest.raises(ValueError):
        vote_patients(ids[:-1], slices(*classes), tau=0.4)


def _distributed_sampler_gather(n: int, world: int) -> np.ndarray:
    """Global indices as all_gather returns them for DistributedSampler(shuffle=False, drop_last=False)."""
    per_rank = -(-n // world)
    padded = list(range(n)) + list(range(n))[: per_rank * world - n]
    return np.concatenate([padded[rank::world] for rank in range(world)])


def test_deduplicate_numpy_padded_distributed_sampler() -> None:
    gathered = _distributed_sampler_gather(10, 4)
    assert gathered.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 0, 3, 7, 1]
    probs = np.stack([np.full(3, i, dtype=float) for i in gathered])
    names = np.array([f"s{i}" for i in gathered])
    idx, probs_u, names_u = deduplicate(gathered, probs, names)
    assert isinstance(idx, np.ndarray) and idx.tolist() == list(range(10))
    assert probs_u[:, 0].tolist() == list(range(10))
    assert names_u.tolist() == [f"s{i}" for i in range(10)]


def test_deduplicate_keeps_first_occurrence_and_torch_types() -> None:
    indices = torch.tensor([3, 1, 3, 0, 1])
    values = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])
    idx, vals, arr = deduplicate(indices, values, np.arange(5))
    assert isinstance(idx, torch.Tensor) and isinstance(vals, torch.Tensor) and isinstance(arr, np.ndarray)
    assert idx.tolist() == [0, 1, 3]
    assert vals.tolist() == [13.0, 11.0, 10.0]  # first occurrences
    assert arr.tolist() == [3, 1, 0]
    with pytest.raises(ValueError):
        deduplicate(indices, values[:3])


def test_vote_dispatches_on_the_rule_name():
    from covidct.voting import vote

    # 3 of 10 slices COVID-19, 7 Normal: the paper's rule says Normal, infected_fraction (tau 0.2) COVID-19
    probs = np.array([[0.8, 0.1, 0.1]] * 3 + [[0.1, 0.1, 0.8]] * 7)
    assert vote(probs, "majority", 0.2) == 2
    assert vote(probs, "infected_fraction", 0.2) == 0
    assert vote(probs, "infected_fraction", 0.3) == 2  # fraction 0.3 <= tau: Normal
    with pytest.raises(ValueError, match="mean"):
        vote(probs, "mean", 0.2)
