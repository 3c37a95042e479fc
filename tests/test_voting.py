"""Patient voting rules, tau tuning and DDP de-duplication."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from covidct.patients.parameters import VoteParameters
from covidct.patients.rules import VOTE_RULES, group_slices, vote, vote_patients
from covidct.patients.tuning import leave_one_out_threshold_predictions, tune_tau, tune_threshold
from covidct.patients.voting import (
    central_mask,
    infected_class,
    infected_fraction,
    infected_fraction_vote,
    infected_probability,
    infected_share,
    majority_vote,
    mean_prob_vote,
    threshold_calls,
    threshold_class,
    threshold_vote,
    topk_mean,
    topk_mean_vote,
    weighted_center_vote,
)
from covidct.training.callbacks.patient_vote import deduplicate

COVID, CAP, NORMAL = 0, 1, 2
ONE_HOT = {COVID: [0.8, 0.1, 0.1], CAP: [0.1, 0.8, 0.1], NORMAL: [0.1, 0.1, 0.8]}


def every_rule(**parameters) -> VoteParameters:
    """Parameters for :func:`vote_patients`, which votes every rule (the rule field is not used)."""
    return VoteParameters("majority", **parameters)


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


def mostly_clean_covid() -> np.ndarray:
    """10 slices: 4 confident COVID-19 slices in the middle (rows 3-6), 6 hesitant Normal slices around them."""
    probs = np.tile([0.4, 0.05, 0.55], (10, 1))
    probs[3:7] = [0.95, 0.03, 0.02]
    return probs


def test_majority_says_normal_where_mean_weighted_center_and_topk_say_covid() -> None:
    probs = mostly_clean_covid()
    assert majority_vote(probs) == NORMAL  # 6 Normal votes vs 4
    assert infected_fraction_vote(probs, tau=0.5) == NORMAL  # 40% infected <= 0.5
    assert mean_prob_vote(probs) == COVID  # means 0.62 vs 0.338 (Normal)
    assert weighted_center_vote(probs, center_slices=4) == COVID  # 4 x 1 vs 6 x 0.5 (outer Normal)
    assert topk_mean_vote(probs, k=5) == COVID  # top-5 means 0.84 vs 0.55
    # threshold at its defaults (slice 0.5, share 0.5): 4 of 10 slices above 0.5 -> Normal
    assert [vote(probs, r, 0.5, k=5, center_slices=4) for r in VOTE_RULES] == [
        NORMAL,
        NORMAL,
        COVID,
        COVID,
        COVID,
        NORMAL,
    ]


def test_mean_prob_vote_and_its_tie() -> None:
    # 2 confident CAP slices outvoted by 3 hesitant COVID-19 slices, but not on average
    probs = np.array([[0.1, 0.9, 0.0]] * 2 + [[0.5, 0.4, 0.1]] * 3)
    assert majority_vote(probs) == COVID and mean_prob_vote(probs) == CAP  # means 0.34 vs 0.6
    assert mean_prob_vote(np.array([[0.5, 0.5, 0.0]])) == COVID  # exact tie: lowest index


def test_central_mask_takes_the_middle_slices() -> None:
    assert central_mask(10, 4).tolist() == [False] * 3 + [True] * 4 + [False] * 3
    assert np.flatnonzero(central_mask(7, 4)).tolist() == [1, 2, 3, 4]  # odd surplus: extra outer slice at the end
    assert central_mask(5, 40).all()  # fewer slices than the centre: all count 1
    assert central_mask(40, 40).all() and np.count_nonzero(central_mask(100)) == 40  # default 40


def test_weighted_center_outer_slices_weigh_less_and_normal_least() -> None:
    # centre (rows 2-3): 2 Normal = 2; outer: 3 CAP x 0.7 = 2.1 against 1 Normal x 0.5 -> Normal 2.5 wins
    probs = slices(CAP, CAP, NORMAL, NORMAL, CAP, NORMAL)
    assert weighted_center_vote(probs, center_slices=2) == NORMAL
    assert majority_vote(probs) == CAP  # 3 vs 3, same summed probability: lowest index
    assert weighted_center_vote(probs, center_slices=6) == CAP  # every slice counts 1: the majority vote
    # centre (row 4): CAP = 1; outer: 4 COVID-19 x 0.7 = 2.8 beat 5 Normal x 0.5 = 2.5
    probs = slices(COVID, COVID, NORMAL, NORMAL, CAP, NORMAL, NORMAL, NORMAL, COVID, COVID)
    assert weighted_center_vote(probs, center_slices=1) == COVID
    assert majority_vote(probs) == NORMAL


def test_weighted_center_tie_goes_to_covid_then_the_summed_probability() -> None:
    # centre (rows 6-7): 1 COVID-19 + 1 Normal; outer: 5 COVID-19 x 0.7 = 3.5 vs 7 Normal x 0.5 = 3.5
    classes = [COVID] * 5 + [NORMAL] + [COVID, NORMAL] + [NORMAL] * 6
    probs = slices(*classes)
    assert weighted_center_vote(probs, center_slices=2) == COVID  # though Normal has the larger summed probability
    assert probs[:, NORMAL].sum() > probs[:, COVID].sum() and majority_vote(probs) == NORMAL
    # a CAP / Normal tie (no COVID-19 in it): the larger summed probability, here Normal's
    assert weighted_center_vote(slices(NORMAL, CAP, NORMAL), center_slices=1) == NORMAL  # 1 vs 0.5 + 0.5


def test_topk_mean_uses_the_most_confident_slices_and_caps_k() -> None:
    # 2 very confident CAP slices among 8 moderately COVID-19 ones
    probs = np.array([[0.05, 0.95, 0.0]] * 2 + [[0.6, 0.1, 0.3]] * 8)
    np.testing.assert_allclose(topk_mean(probs, k=2), [0.6, 0.95, 0.3])
    assert topk_mean_vote(probs, k=2) == CAP
    assert majority_vote(probs) == COVID and mean_prob_vote(probs) == COVID  # means 0.49 vs 0.27
    np.testing.assert_allclose(topk_mean(probs, k=100), probs.mean(axis=0))  # k > n: all slices
    assert topk_mean_vote(probs, k=100) == COVID
    with pytest.raises(ValueError, match="k must be"):
        topk_mean_vote(probs, k=0)


def test_vote_dispatches_every_rule_with_its_parameters() -> None:
    probs = mostly_clean_covid()
    assert vote(probs, "infected_fraction", tau=0.3) == COVID  # 40% infected > 0.3
    assert vote(probs, "weighted_center", center_slices=10) == NORMAL  # every slice counts 1: the majority
    confident_cap = np.array([[0.05, 0.95, 0.0]] * 2 + [[0.6, 0.1, 0.3]] * 8)
    assert vote(confident_cap, "topk_mean", k=2) == CAP and vote(confident_cap, "topk_mean", k=100) == COVID
    with pytest.raises(ValueError, match="unknown vote rule"):
        vote(probs, "median")
    with pytest.raises(ValueError, match="center_slices must be"):
        vote(probs, "weighted_center", center_slices=0)


def test_weighted_center_votes_with_the_winners_central_80_slices_only() -> None:
    # 200 slices: 60 above and 60 below the window say COVID-19; in the window the central 40 say Normal
    # (40 x 1) and the 40 around them CAP (40 x 0.7 = 28): Normal. Were all slices voting: COVID-19 (84).
    series = slices(*[COVID] * 60, *[CAP] * 20, *[NORMAL] * 40, *[CAP] * 20, *[COVID] * 60)
    assert weighted_center_vote(series) == NORMAL
    assert weighted_center_vote(series, window_slices=200) == COVID
    # 81 slices: the window is slices 0-79 (the odd one out is at the end). Inside it COVID-19 and CAP
    # tie (20 + 14 each), which goes to COVID-19; slice 80 says CAP and would break the tie if it voted.
    inner = [COVID] * 10 + [CAP] * 10  # each half of the window's outer 40: 10 COVID-19, 10 CAP
    series = slices(*inner, *[COVID] * 20, *[CAP] * 20, *inner, CAP)
    assert len(series) == 81 and weighted_center_vote(series) == COVID
    assert weighted_center_vote(series, window_slices=81) == CAP
    # 80 and 30 slices: every slice votes (the winner's code let none vote and called such patients COVID-19)
    assert weighted_center_vote(slices(*[NORMAL] * 80)) == NORMAL
    assert weighted_center_vote(slices(*[NORMAL] * 16, *[CAP] * 14)) == NORMAL  # all central: the majority
    with pytest.raises(ValueError, match="window_slices"):
        weighted_center_vote(slices(NORMAL), center_slices=40, window_slices=20)


def test_vote_patients_votes_every_rule_in_slice_order() -> None:
    ids = ["a"] * 10 + ["b"] * 3
    probs = np.concatenate([mostly_clean_covid(), slices(NORMAL, CAP, NORMAL)])
    a, b = vote_patients(ids, probs, every_rule(tau=0.5, k=5, center_slices=4))
    assert a.rule_votes == {
        "majority": NORMAL,
        "infected_fraction": NORMAL,
        "mean_prob": COVID,
        "weighted_center": COVID,
        "topk_mean": COVID,
        "threshold": NORMAL,  # at its defaults: 4 of 10 slices above 0.5 <= share 0.5
    }
    assert (a.infected_fraction, a.infected_class) == (0.4, COVID)
    assert set(b.rule_votes) == set(VOTE_RULES)
    # interleaved patients: each keeps its slices in the given order (b: Normal, CAP, CAP, Normal, Normal)
    ids = ["b", "a", "b", "b", "a", "b", "b"]
    (b, _) = vote_patients(
        ids, slices(NORMAL, COVID, CAP, CAP, COVID, NORMAL, NORMAL), every_rule(tau=0.5, center_slices=2)
    )
    assert b.rule_votes["weighted_center"] == CAP  # centre: 2 CAP = 2; outer: 3 Normal x 0.5 = 1.5
    assert b.rule_votes["majority"] == NORMAL


def _separable() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fractions = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
    labels = np.array([NORMAL] * 4 + [COVID, CAP, COVID, CAP])
    votes = np.array([NORMAL, COVID, CAP, COVID, COVID, CAP, COVID, CAP])
    return fractions, votes, labels


def test_tune_tau_separable() -> None:
    fractions, votes, labels = _separable()
    tau = tune_tau(fractions, votes, labels)
    assert 0.2 < tau < 0.35
    assert tau == pytest.approx(0.275)  # midway between the last Normal (0.2) and the first sick patient (0.35)
    assert (fractions[labels == NORMAL] <= tau).all() and (fractions[labels != NORMAL] > tau).all()
    assert (votes[labels != NORMAL] == labels[labels != NORMAL]).all()  # so every patient is called right
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
        np.repeat([f"p{i}" for i in range(6)], 10), np.concatenate([p for p, _ in patients]), every_rule(tau=0.0)
    )
    fractions = np.array([r.infected_fraction for r in results])
    votes = np.array([r.infected_class for r in results])
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
    # by hand, the calls at each candidate tau (fraction <= tau: Normal, else the infected vote):
    calls = {
        0.0: [COVID, CAP, CAP, COVID],
        0.2: [NORMAL, CAP, CAP, COVID],
        0.4: [NORMAL, NORMAL, CAP, COVID],
        0.6: [NORMAL, NORMAL, NORMAL, COVID],
        0.85: [NORMAL] * 4,
    }
    assert [np.mean(np.array(c) == labels) for c in calls.values()] == [0.25, 0.5, 0.5, 0.5, 0.25]
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
    results = vote_patients(ids, slices(*classes), every_rule(tau=0.4))
    assert [r.patient for r in results] == ["b", "a", "c"]  # order of first appearance
    b, a, c = results
    assert b.n_slices == 3 and b.votes.tolist() == [2, 0, 1]
    assert (
        b.rule_votes["majority"] == COVID
        and b.infected_fraction == pytest.approx(2 / 3)
        and b.rule_votes["infected_fraction"] == COVID
    )
    assert a.n_slices == 3 and a.votes.tolist() == [0, 1, 2]
    assert (
        a.rule_votes["majority"] == NORMAL
        and a.infected_fraction == pytest.approx(1 / 3)
        and a.rule_votes["infected_fraction"] == NORMAL
    )
    assert a.infected_class == CAP
    np.testing.assert_allclose(a.mean_prob, np.mean([ONE_HOT[NORMAL], ONE_HOT[CAP], ONE_HOT[NORMAL]], axis=0))
    assert c.n_slices == 1 and c.infected_fraction == 0.0 and c.infected_class == NORMAL
    with pytest.raises(ValueError):
        vote_patients(ids[:-1], slices(*classes), every_rule(tau=0.4))
    groups = group_slices(ids, slices(*classes))
    assert list(groups) == ["b", "a", "c"] and groups["a"].argmax(1).tolist() == [NORMAL, CAP, NORMAL]


def test_infected_class_is_the_majority_of_the_infected_slices_only() -> None:
    assert infected_class(slices(NORMAL, CAP, NORMAL, NORMAL, COVID, CAP)) == CAP  # Normal's 3 votes do not count
    assert infected_class(slices(NORMAL, NORMAL)) == NORMAL  # no infected slice
    assert infected_fraction_vote(slices(NORMAL, CAP, NORMAL, NORMAL), tau=0.2) == CAP  # 0.25 > 0.2
    assert infected_fraction_vote(slices(NORMAL, CAP, NORMAL, NORMAL), tau=0.25) == NORMAL


def _distributed_sampler_gather(n: int, world: int) -> np.ndarray:
    """Global indices as ``all_gather`` returns them (rank after rank) for torch's own
    DistributedSampler(shuffle=False, drop_last=False), which pads with repeats."""
    return np.concatenate(
        [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    )


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
    # 3 of 10 slices COVID-19, 7 Normal: the paper's rule says Normal, infected_fraction (tau 0.2) COVID-19
    probs = np.array([[0.8, 0.1, 0.1]] * 3 + [[0.1, 0.1, 0.8]] * 7)
    assert vote(probs, "majority", 0.2) == 2
    assert vote(probs, "infected_fraction", 0.2) == 0
    assert vote(probs, "infected_fraction", 0.3) == 2  # fraction 0.3 <= tau: Normal
    with pytest.raises(ValueError, match="mean"):
        vote(probs, "mean", 0.2)


# ---- threshold rule: infected probability above a tuned slice threshold --------------------------------


def low_scale_patients(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Six patients from a slice model whose scale is off: every slice's argmax is Normal, but sick
    patients' slices carry 0.30-0.45 infected probability (COVID-19 or CAP leaning), Normal ones' 0.05-0.20."""
    rng = np.random.default_rng(seed)

    def patient(infected: tuple[float, float], sick_class: int, n: int = 30) -> np.ndarray:
        p_inf = rng.uniform(*infected, n)
        lean = np.where(rng.random(n) < 0.8, 0.7, 0.3)  # share of p_inf given to the patient's own class
        probs = np.zeros((n, 3))
        probs[:, sick_class] = p_inf * lean
        probs[:, 1 - sick_class] = p_inf * (1 - lean)
        probs[:, 2] = 1 - p_inf
        return probs

    groups = [patient((0.30, 0.45), 0), patient((0.30, 0.45), 0), patient((0.30, 0.45), 1), patient((0.30, 0.45), 1)]
    groups += [patient((0.05, 0.20), 0), patient((0.05, 0.20), 1)]
    return groups, np.asarray([0, 0, 1, 1, 2, 2])


def test_threshold_rule_calls_patients_that_every_argmax_rule_calls_normal() -> None:
    groups, labels = low_scale_patients()
    for rule in ("majority", "infected_fraction", "weighted_center"):
        assert [vote(g, rule, 0.0) for g in groups] == [2] * 6, rule  # argmax never leaves Normal
    t, tau = tune_threshold(groups, labels)
    assert 0.2 <= t < 0.45 and 0.0 <= tau < 1.0  # above the Normal patients' probabilities, below the sick' top
    assert [threshold_vote(g, t, tau) for g in groups] == labels.tolist()
    assert [vote(g, "threshold", slice_threshold=t, threshold_tau=tau) for g in groups] == labels.tolist()
    # the reported figure: every patient decided by (t, tau) tuned on the other five
    assert leave_one_out_threshold_predictions(groups, labels).tolist() == labels.tolist()


def test_threshold_rule_pieces_on_hand_made_probabilities() -> None:
    probs = np.array([[0.1, 0.2, 0.7], [0.3, 0.1, 0.6], [0.12, 0.28, 0.6], [0.0, 0.0, 1.0]])
    assert infected_probability(probs).tolist() == pytest.approx([0.3, 0.4, 0.4, 0.0])
    assert infected_share(probs, 0.35) == 0.5 and infected_share(probs, 0.25) == 0.75
    assert threshold_class(probs, 0.35) == 0  # slices 1 and 2: COVID-19 mean 0.21 > CAP 0.19
    assert threshold_class(probs, 0.25) == 1  # slices 0-2: COVID-19 0.173 < CAP 0.193
    assert threshold_vote(probs, 0.35, tau=0.5) == 2 and threshold_vote(probs, 0.35, tau=0.4) == 0
    assert threshold_class(np.array([[0.0, 0.1, 0.9]]), 0.5) == 1  # none above: the sick class of all slices


def test_threshold_calls_equal_the_one_threshold_functions() -> None:
    """The vectorised form tune_threshold uses gives, at every threshold, the share and class (ties included)."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        probs = rng.dirichlet(np.full(3, rng.uniform(0.2, 3.0)), size=int(rng.integers(1, 30)))
        if trial % 4 == 0:  # coarse probabilities: tied classes and slices exactly on a threshold
            probs = np.round(probs, 1) + 1e-3
            probs /= probs.sum(axis=1, keepdims=True)
        thresholds = np.concatenate([np.arange(0.0, 1.0, 0.05), 1.0 - probs[:, 2]])
        shares, classes = threshold_calls(probs, thresholds)
        assert shares.tolist() == [infected_share(probs, t) for t in thresholds]
        assert classes.tolist() == [threshold_class(probs, t) for t in thresholds]


def test_tune_threshold_keeps_a_fixed_value() -> None:
    groups, labels = low_scale_patients(1)
    t, tau = tune_threshold(groups, labels, slice_threshold=0.5)
    assert t == 0.5 and [threshold_vote(g, t, tau) for g in groups].count(2) == 6  # nothing is above 0.5
    t, tau = tune_threshold(groups, labels, tau=0.3)
    assert tau == 0.3 and [threshold_vote(g, t, tau) for g in groups] == labels.tolist()


# ---- the rule registry and the vote parameter bundle ---------------------------------------------------


def test_every_configured_rule_is_registered_with_vote_scores_and_explanation():
    from pathlib import Path

    from omegaconf import OmegaConf

    from covidct.patients.parameters import VoteParameters
    from covidct.patients.rules import LEARNED_RULES, RULE_SCORES, RULES, SHARE_RULES, scores_with, vote_with

    configured = {OmegaConf.load(p).rule for p in (Path(__file__).parents[1] / "conf" / "vote").glob("*.yaml")}
    assert configured == set(RULES) and set(VOTE_RULES) | set(LEARNED_RULES) == set(RULES)
    assert set(SHARE_RULES) == {"infected_fraction", "threshold"} and set(RULE_SCORES) == set(RULES)
    probs = np.concatenate([mostly_clean_covid(), slices(NORMAL, CAP, NORMAL)])
    for name, rule in RULES.items():
        assert callable(rule.vote) and callable(rule.scores) and rule.scores_name
        parameters = VoteParameters(name)
        assert rule.explanation.format_map(vars(parameters))  # a template over the parameters' fields
        if rule.learned:
            with pytest.raises(ValueError, match="covidct.patients.aggregation"):
                vote_with(parameters, probs)
            continue
        assert vote_with(parameters, probs) == vote(probs, name)
        scores = scores_with(parameters, probs)
        assert scores.shape == (3,) and np.all(np.isfinite(scores))
        if not rule.share:  # an argmax rule: the argmax of its scores is its vote
            assert int(scores.argmax()) == vote(probs, name)


def test_weighted_center_scores_are_its_vote_counts_as_shares():
    from covidct.patients.voting import weighted_center_counts, weighted_center_scores

    probs = slices(*[NORMAL] * 5, *[CAP] * 4, *[COVID] * 5)
    counts = weighted_center_counts(probs, center_slices=4, window_slices=10)
    assert counts.tolist() == pytest.approx([0.7 * 3, 4.0, 0.5 * 3])  # outer window weights 0.7 / 0.5, rest 0
    np.testing.assert_allclose(weighted_center_scores(probs, 4, NORMAL, 10), counts / counts.sum())
    assert weighted_center_vote(probs, 4, NORMAL, 10) == CAP


def test_vote_parameters_round_trip_through_the_checkpoint_state_and_the_sidecar():
    import json

    from covidct.patients.parameters import ALL_SLICES, VOTE_KEYS, VoteParameters

    p = VoteParameters("threshold", 0.3, 7, 20, 60, 0.42, 0.25, 1.7)
    state = p.to_state()
    assert set(state) == {*VOTE_KEYS, "mil"} - {"rule"} and state["mil"] is None  # the rule is the model's
    assert VoteParameters.from_state(state, VoteParameters("threshold")) == p
    sidecar = json.loads(json.dumps(p.to_sidecar()))  # as the export writes it
    assert list(sidecar) == list(VOTE_KEYS) and VoteParameters.from_sidecar(sidecar) == p
    # a state in today's format, from before the threshold rule and calibration: the defaults fill in
    old = {"tau": 0.4, "k": 3, "center_slices": 20, "best": 0.5, "best_epoch": 1}
    read = VoteParameters.from_state(old, VoteParameters("topk_mean", window_slices=ALL_SLICES))
    assert (read.rule, read.tau, read.k, read.center_slices, read.window_slices) == (
        "topk_mean",
        0.4,
        3,
        20,
        ALL_SLICES,
    )
    assert (read.slice_threshold, read.threshold_tau, read.temperature, read.mil_head) == (0.5, 0.5, 1.0, None)
    fitted = VoteParameters("majority", k=9).with_fitted(p)  # resume: the fitted values, the config's settings
    assert (fitted.rule, fitted.k, fitted.tau, fitted.slice_threshold, fitted.temperature) == (
        "majority",
        9,
        0.3,
        0.42,
        1.7,
    )


def test_leave_one_out_threshold_parameters_are_each_round_tuned_on_the_others():
    """Each patient sorted once for every round: the same (slice_threshold, tau) as tuning each round on the other
    patients' slices from scratch."""
    from covidct.patients.tuning import leave_one_out_threshold_parameters, tune_threshold

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 12)
    groups = []
    for label in labels:
        logits = rng.normal(size=(int(rng.integers(5, 40)), 3)) + np.eye(3)[label] * rng.uniform(0, 2)
        groups.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    for fixed in ({}, {"tau": 0.3}, {"slice_threshold": 0.6}):
        got = leave_one_out_threshold_parameters(groups, labels, **fixed)
        for i in range(len(labels)):
            others = [g for j, g in enumerate(groups) if j != i]
            assert tuple(got[i]) == tune_threshold(others, np.delete(labels, i), **fixed)
