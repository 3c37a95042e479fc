"""The learned patient rule (gated attention MIL over slice embeddings): where the argmax rules break on a
per-patient scanner shift and it holds, cross-fitting, determinism, plain-data state, the callback's
``mil`` row and column, and predict.py with the stored head."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

from covidct.contracts import CLASS_NAMES
from covidct.errors import ConfigError
from covidct.patients import aggregation as agg
from covidct.patients.aggregation import cross_fit_predictions, fit_mil, folds_of, mil_from_state, mil_state, predict
from covidct.patients.rules import VOTE_RULES, check_vote_settings, vote
from covidct.patients.tuning import leave_one_out_predictions, leave_one_out_threshold_predictions
from covidct.patients.voting import infected_class, infected_fraction
from covidct.training.callbacks.patient_vote import PatientVoteCallback
from tests.conftest import stand_in_validation


def shifted_patients(per_class: int = 8, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Hand-made bags with a per-patient scanner shift: (embeddings (n, 6) per patient, labels (P,), probs
    (n, 3) per patient).

    A slice's features 0 / 1 carry COVID-19 / CAP lesions (+2 on 25-45% of a sick patient's slices); every
    slice of a patient also carries its scanner's shift, of size 1.6-2.5, along features 0 and 1 alike
    (alternately up and down by patient). The slice "model" reads the absolute features: logits (3 x0, 3 x1,
    1.5). A Normal patient shifted up looks infected on every slice, a sick patient shifted down clean.
    """
    rng = np.random.default_rng(seed)
    bags, labels, probs = [], [], []
    for label in range(3):
        for i in range(per_class):
            n = int(rng.integers(20, 40))
            x = rng.normal(0.0, 0.15, (n, 6))
            x[:, :2] += (1 if i % 2 else -1) * rng.uniform(1.6, 2.5)
            if label < 2:
                sick = rng.permutation(n)[: int(n * rng.uniform(0.25, 0.45))]
                x[sick, label] += 2.0
            logits = np.stack([3 * x[:, 0], 3 * x[:, 1], np.full(n, 1.5)], axis=1)
            p = np.exp(logits - logits.max(1, keepdims=True))
            bags.append(x.astype(np.float32))
            probs.append((p / p.sum(1, keepdims=True)).astype(np.float32))
            labels.append(label)
    return bags, np.asarray(labels), probs


def fixed_rule_accuracies(probs: list[np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Accuracy of every rule of VOTE_RULES; tuned ones (infected_fraction, threshold) leave-one-out."""
    acc = {
        rule: float(np.mean([vote(p, rule, k=5) == t for p, t in zip(probs, labels, strict=True)]))
        for rule in VOTE_RULES
    }
    fractions = np.asarray([infected_fraction(p) for p in probs])
    sick = np.asarray([infected_class(p) for p in probs])
    acc["infected_fraction"] = float(np.mean(leave_one_out_predictions(fractions, sick, labels) == labels))
    acc["threshold"] = float(np.mean(leave_one_out_threshold_predictions(probs, labels) == labels))
    return acc


@pytest.mark.slow  # several MIL fits (3-8 s): CI runs it; make test-fast stays under 2 min
def test_mil_holds_where_the_fixed_rules_break_under_a_per_patient_shift():
    bags, labels, probs = shifted_patients()
    fixed = fixed_rule_accuracies(probs, labels)
    # the argmax rules are fooled by the shift; threshold (a tuned slice threshold) still calls every Normal
    # patient shifted up infected: all of its slices are
    assert max(acc for rule, acc in fixed.items() if rule != "threshold") <= 0.7, fixed
    assert fixed["threshold"] <= 0.85, fixed
    mil = cross_fit_predictions(bags, labels, seed=0)  # 24 patients: 5 stratified folds
    assert np.mean(mil == labels) >= 0.95
    # and it generalises to new patients from the same scanners
    fresh_bags, fresh_labels, _ = shifted_patients(seed=1)
    assert np.mean(predict(fit_mil(bags, labels), fresh_bags) == fresh_labels) >= 0.9


@pytest.mark.slow  # several MIL fits (3-8 s): CI runs it; make test-fast stays under 2 min
def test_without_per_patient_centring_the_head_learns_less():
    # the same data, raw embeddings: each bag's shift is not removed (the design choice the default makes)
    bags, labels, _ = shifted_patients()
    centred = np.mean(cross_fit_predictions(bags, labels) == labels)
    raw = np.mean(cross_fit_predictions(bags, labels, standardize="none") == labels)
    assert centred >= raw


def test_fit_is_deterministic_and_leaves_the_global_rng_alone():
    bags, labels, _ = shifted_patients(per_class=3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = fit_mil(bags, labels, seed=3), fit_mil(bags, labels, seed=3)
    assert torch.rand(1) == before
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=0)
    c = fit_mil(bags, labels, seed=4)
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_fit_works_inside_lightnings_validation_loop():
    bags, labels, _ = shifted_patients(per_class=2)
    with torch.inference_mode():  # what Lightning's validation runs in
        model = fit_mil(bags, labels, epochs=5)
    assert predict(model, bags).shape == (6,)


def test_state_is_plain_data_loadable_weights_only():
    bags, labels, _ = shifted_patients(per_class=3)
    model = fit_mil(bags, labels, standardize="center_concat")
    buffer = io.BytesIO()
    torch.save(mil_state(model), buffer)
    buffer.seek(0)
    loaded = mil_from_state(torch.load(buffer, weights_only=True))
    np.testing.assert_allclose(agg.predict_proba(loaded, bags), agg.predict_proba(model, bags))
    assert loaded.init_args["standardize"] == "center_concat"


def test_folds_are_leave_one_out_for_few_patients_and_stratified_for_more():
    small = np.array([0, 0, 1, 1, 2, 2])
    assert folds_of(small).tolist() == list(range(6))
    labels = np.repeat([0, 1, 2], [10, 8, 7])
    fold = folds_of(labels, folds=5, seed=1)
    for f in range(5):
        assert set(labels[fold == f]) == {0, 1, 2}  # every fold holds every class
        assert 4 <= np.count_nonzero(fold == f) <= 6


@pytest.mark.slow  # several MIL fits (3-8 s): CI runs it; make test-fast stays under 2 min
def test_cross_fitting_never_fits_on_the_patient_it_scores(monkeypatch):
    bags, labels, _ = shifted_patients(per_class=2)  # 6 patients: leave-one-out
    for i, bag in enumerate(bags):
        bag[0, 5] = i  # a tag, to recognise each bag in the fits
    fitted: list[set[int]] = []
    real_fit = agg.fit_mil

    def spy(train_bags, *args, **kwargs):
        fitted.append({int(b[0, 5]) for b in train_bags})
        return real_fit(train_bags, *args, **kwargs)

    monkeypatch.setattr(agg, "fit_mil", spy)
    cross_fit_predictions(bags, labels)
    assert fitted == [set(range(6)) - {i} for i in range(6)]


def test_mil_is_a_vote_rule_of_its_own():
    check_vote_settings("mil")  # accepted as vote.rule
    with pytest.raises(ValueError, match="covidct.patients.aggregation"):
        vote(np.full((3, 3), 1 / 3), "mil")
    with pytest.raises(ConfigError, match="from_ckpt"):
        PatientVoteCallback("mil", from_ckpt="some.ckpt")


def test_slice_classifier_gives_its_embeddings_from_the_same_forward_pass():
    from covidct.models.classifier import SliceClassifier

    model = SliceClassifier("resnet18").eval()
    images = torch.randint(0, 255, (4, 1, 32, 32), dtype=torch.uint8)
    batch = {"image": images, "target": torch.tensor([0, 1, 2, -1])}
    with torch.no_grad():
        out = model.validation_step(batch, 0)
        logits = model(images)
    assert out["embedding"].shape == (4, 512) and out["embedding"].dtype == torch.float32
    torch.testing.assert_close(model.head()(out["embedding"]), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.features(images), out["embedding"])


def run_epoch(cb: PatientVoteCallback, embeddings: bool = True) -> dict[str, float]:
    """One validation epoch of :func:`shifted_patients` through the callback (stand-in trainer); the logged dict."""
    bags, labels, probs = shifted_patients()
    patient = np.repeat(np.arange(len(bags)), [len(b) for b in bags])
    emb, prob = np.concatenate(bags), np.concatenate(probs)
    ids = [f"pt{i:02d}" for i in range(len(bags))]
    trainer, module, recorder = stand_in_validation(ids, labels)
    cb.on_validation_epoch_start(trainer, module)
    for rows in np.array_split(np.random.default_rng(0).permutation(len(emb)), 4):
        outputs = {"probs": torch.as_tensor(prob[rows])}
        if embeddings:
            outputs["embedding"] = torch.as_tensor(emb[rows])
        batch = {"index": torch.as_tensor(rows), "patient": torch.as_tensor(patient[rows])}
        cb.on_validation_batch_end(trainer, module, outputs, batch, 0)
    cb.on_validation_epoch_end(trainer, module)
    return module.lightning_logged | recorder.metrics


@pytest.mark.slow  # several MIL fits (3-8 s): CI runs it; make test-fast stays under 2 min
def test_callback_scores_mil_beside_the_fixed_rules_and_stores_the_head(tmp_path):
    cb = PatientVoteCallback("mil", output_dir=str(tmp_path), mil_features="embeddings")
    logged = run_epoch(cb)
    columns, rows = cb.rule_table
    assert [r[0] for r in rows] == [*VOTE_RULES, "mil"]
    assert logged["val/patient/acc"] == logged["rules/mil/acc"] >= 0.9  # cross-fitted
    assert logged["rules/mil/acc"] > max(logged[f"rules/{r}/acc"] for r in VOTE_RULES)
    with (tmp_path / "patients.csv").open() as f:
        table = list(csv.DictReader(f))
    assert all(row["mil_vote"] == row["predicted_class"] for row in table)  # mil is vote.rule here
    assert sum(row["mil_vote"] == row["true_class"] for row in table) / len(table) == logged["rules/mil/acc"]
    buffer = io.BytesIO()
    torch.save(cb.state_dict(), buffer)
    buffer.seek(0)
    restored = PatientVoteCallback("mil")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    bags, labels, _ = shifted_patients(seed=1)
    np.testing.assert_array_equal(predict(restored.parameters.mil_head, bags), predict(cb.parameters.mil_head, bags))


@pytest.mark.slow  # several MIL fits (3-8 s): CI runs it; make test-fast stays under 2 min
def test_callback_without_embeddings_skips_mil_unless_it_is_the_rule(tmp_path):
    cb = PatientVoteCallback("majority", output_dir=str(tmp_path), mil_features="embeddings")
    logged = run_epoch(cb, embeddings=False)
    assert "rules/mil/acc" not in logged and cb.state_dict()["mil"] is None and cb.parameters.mil_head is None
    with (tmp_path / "patients.csv").open() as f:
        assert "mil_vote" not in next(csv.reader(f))
    with pytest.raises(ConfigError, match="embedding"):
        run_epoch(PatientVoteCallback("mil", mil_features="embeddings"), embeddings=False)


@pytest.mark.slow
def test_training_with_patient_shift_reports_mil_and_predict_uses_its_head(shared_cache, tmp_path):
    from covidct.training.run import train
    from tests.conftest import compose_train, run_cli, tiny

    run = tmp_path / "run"
    overrides = [
        *tiny(shared_cache),
        "logger=none",
        "vote=mil",
        "data.synthetic.patient_shift=100",
    ]
    result = train(compose_train(run, overrides))
    with (run / "patients.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table and all(row["mil_vote"] in CLASS_NAMES for row in table)
    assert all(row["mil_vote"] == row["predicted_class"] for row in table)
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("PatientVoteCallback"))
    assert state["mil"]["init"]["in_features"] == 3 and state["mil"]["init"]["slice_features"] == "log_probs"
    data_root = next(shared_cache.glob("synthetic-*"))  # the shifted dataset: the only one made with this spec here
    row = table[0]  # a validation patient: predict.py must call it as the stored head did in training
    patient = next(p for p in data_root.glob(f"*/{row['patient']}") if p.is_dir())
    args = [f"ckpt_path={result.best_checkpoint}", f"input={patient}", "progress=false", "num_workers=0"]
    done = run_cli([*args, f"paths.output_dir={tmp_path / 'pred'}"], tmp_path, script="predict.py")
    assert done.returncode == 0, done.stderr[-2000:]
    head_call = max(CLASS_NAMES, key=lambda c: float(row[f"mil_prob_{c}"]))  # the head fitted on all of them
    with next(f for f in (tmp_path / "pred").glob("*.csv") if not f.stem.endswith("_slices")).open() as f:
        assert next(csv.DictReader(f))["predicted_class"] == head_call
    record = (tmp_path / "pred" / "prediction.json").read_text()
    assert '"vote_rule": "mil"' in record and '"mil_head": true' in record and '"mil_features": "log_probs"' in record
    # a checkpoint without a head is refused with a message, before any patient is read
    del state["mil"]
    bare = tmp_path / "bare.ckpt"
    torch.save(ckpt, bare)
    done = run_cli(
        [f"ckpt_path={bare}", f"input={patient}", f"paths.output_dir={tmp_path / 'p2'}"], tmp_path, "predict.py"
    )
    assert done.returncode != 0 and "no fitted MIL head" in done.stderr


@pytest.mark.slow  # a tiny training run and one MIL cross-fit (~8 s): CI runs it
def test_with_another_rule_mil_is_fitted_once_at_the_end_on_the_best_epoch_into_its_checkpoint(shared_cache, tmp_path):
    """vote.mil=true beside infected_fraction: no epoch fits the head; the end of fit fits it on the best epoch,
    which metrics.json, patients.csv and the best checkpoint (and only it) then hold."""
    import json

    from covidct.training.run import train
    from tests.conftest import compose_train, tiny

    run = tmp_path / "run"
    overrides = [*tiny(shared_cache), "logger=csv", "vote.mil=true", "trainer.max_epochs=2"]
    result = train(compose_train(run, overrides))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == result.best_epoch and 0 <= metrics["metrics"]["rules/mil/acc"] <= 1
    logged = next(run.rglob("metrics.csv")).read_text()
    assert "rules/infected_fraction/acc" in logged and "rules/mil" not in logged  # no epoch fitted it
    with (run / "patients.csv").open() as f:
        table = list(csv.DictReader(f))
    assert np.mean([r["mil_vote"] == r["true_class"] for r in table]) == pytest.approx(
        metrics["metrics"]["rules/mil/acc"]
    )

    def vote_state(path) -> dict:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return ckpt["epoch"], next(v for k, v in ckpt["callbacks"].items() if k.startswith("PatientVoteCallback"))

    epoch, state = vote_state(result.best_checkpoint)
    assert epoch == result.best_epoch and state["mil"]["init"]["slice_features"] == "log_probs"
    last_epoch, last = vote_state(run / "checkpoints" / "last.ckpt")
    assert last["mil"] is None or last_epoch == result.best_epoch  # only the best epoch's checkpoint gets a head


def test_slice_features_are_the_embeddings_or_the_clipped_log_probabilities():
    from covidct.patients.mil_features import slice_features

    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    embeddings = np.arange(8, dtype=np.float64).reshape(2, 4)
    logs = slice_features("log_probs", probs, None)
    assert logs.dtype == np.float32 and logs.shape == (2, 3)
    np.testing.assert_allclose(logs, np.log(np.maximum(probs, 1e-6)), rtol=1e-6)
    np.testing.assert_array_equal(slice_features("embeddings", probs, embeddings), embeddings.astype(np.float32))
    with pytest.raises(ValueError, match="needs the slice embeddings"):
        slice_features("embeddings", probs, None)
    with pytest.raises(ConfigError, match=r"vote.mil_features='pixels' is not known"):
        PatientVoteCallback("mil", mil_features="pixels")


@pytest.mark.slow  # several MIL fits (~3 s): CI runs it; make test-fast stays under 2 min
def test_callback_fits_mil_on_log_probabilities_without_embeddings(tmp_path):
    cb = PatientVoteCallback("mil", output_dir=str(tmp_path), mil_features="log_probs")
    logged = run_epoch(cb, embeddings=False)  # the model gives no embeddings: none are needed
    init = cb.parameters.mil_head.init_args
    assert (init["in_features"], init["standardize"], init["slice_features"]) == (3, "center_concat", "log_probs")
    assert cb.best.mil.attention.shape == (sum(len(b) for b in shifted_patients()[0]),)
    # each patient's log probabilities relative to its own median slice undo the shift the argmax rules fall for
    assert logged["rules/mil/acc"] >= 0.9 > max(logged[f"rules/{r}/acc"] for r in VOTE_RULES if r != "threshold")


def test_vote_parameters_carry_the_mil_head_through_the_checkpoint_state():
    from covidct.patients.parameters import VoteParameters

    bags, labels, _ = shifted_patients()
    head = fit_mil(bags, labels, num_classes=len(CLASS_NAMES), epochs=5)
    state = torch.load(_saved(VoteParameters("mil", mil_head=head).to_state()), weights_only=True)
    restored = VoteParameters.from_state(state, VoteParameters("mil"))
    np.testing.assert_array_equal(predict(restored.mil_head, bags), predict(head, bags))


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
