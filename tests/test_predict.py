"""predict.py: input layouts, errors before work, one CSV per test set, preprocessing from the checkpoint, each
call explained, partial labels, the one-line input summary and the Grad-CAM captions."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from covidct.config import register_resolvers
from covidct.contracts import CLASS_NAMES, NORMAL_CLASS, patient_csv_columns
from covidct.data.datamodule import CTDataModule
from covidct.errors import ConfigError, DataError
from covidct.patients.calibration import apply_temperature
from covidct.patients.voting import vote_shares
from covidct.predict.predictor import claim_output_dir, run_prediction
from covidct.predict.test_sets import find_test_sets
from covidct.predict.torch_backend import load_checkpoint
from tests.conftest import REPO, compose_train, run_cli, tiny, write_ct_slice


def patient(folder: Path, n: int = 2) -> Path:
    for i in range(n):
        write_ct_slice(folder / f"IM{i:04d}.dcm", np.full((8, 8), -800, np.int16), slice_location=float(i))
    return folder


def test_input_layouts(tmp_path):
    one = patient(tmp_path / "single" / "T1-001")
    assert [(t.name, [p.name for p in t.patients]) for t in find_test_sets(one)] == [("T1-001", ["T1-001"])]
    patient(tmp_path / "set" / "T1-001")
    patient(tmp_path / "set" / "T1-002")
    (tmp_path / "set" / "notes.txt").write_text("x")
    assert [len(t.patients) for t in find_test_sets(tmp_path / "set")] == [2]
    for s, p in [("SPGC-Test1", "T1-001"), ("SPGC-Test1", "T1-002"), ("SPGC-Test2", "T2-001")]:
        patient(tmp_path / "many" / s / p)
    sets = find_test_sets(tmp_path / "many")
    assert [(t.name, len(t.patients)) for t in sets] == [("SPGC-Test1", 2), ("SPGC-Test2", 1)]


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_test_sets(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM file"):
        find_test_sets(tmp_path / "empty")
    (tmp_path / "text" / "T1").mkdir(parents=True)
    (tmp_path / "text" / "T1" / "a.txt").write_text("not an image")
    with pytest.raises(DataError, match="no DICOM file"):
        find_test_sets(tmp_path / "text")


def run_predict(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli([*args, "progress=false", "num_workers=1"], cwd, "predict.py")


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_predict_uses_the_checkpoint_preprocessing_and_reports_bad_patients(trained, shared_cache, tmp_path):
    ckpt, run_dir = trained
    ckpt_data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data_root = Path(next(shared_cache.glob("synthetic-*")))
    val = [r["patient"] for r in read(run_dir / "split.csv") if r["subset"] == "val"]
    folders = {p.name: p for p in data_root.glob("*/*") if p.is_dir()}
    # two SPGC-style test sets; one patient loses a slice to corruption, one has nothing readable
    tests = tmp_path / "input"
    for pid in val[:3]:
        shutil.copytree(folders[pid], tests / "Test1" / pid)
    shutil.copytree(folders[val[3]], tests / "Test2" / val[3])
    damaged = sorted((tests / "Test1" / val[0]).iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:-100])
    (tests / "Test2" / "broken").mkdir()
    (tests / "Test2" / "broken" / "IM0001.dcm").write_bytes(damaged.read_bytes()[:-200])
    (tests / "Test2" / "empty").mkdir()  # listed with the reason, not silently dropped
    (tests / "Test2" / val[3] / "loop").symlink_to(tests / "Test2" / val[3] / "loop")  # ignored, no crash
    out = run_predict([f"ckpt_path={ckpt}", f"input={tests}", f"paths.log_dir={tmp_path / 'logs'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result_dir = next((tmp_path / "logs" / "predict" / "runs").iterdir())
    test1, test2 = read(result_dir / "Test1.csv"), read(result_dir / "Test2.csv")
    assert [r["patient"] for r in test1] == sorted(val[:3])
    damaged_row = next(r for r in test1 if r["patient"] == val[0])
    assert damaged_row["n_skipped"] == "1" and damaged_row["status"] == "ok" and damaged.name in damaged_row["detail"]
    assert damaged_row["order_key"] == "SliceLocation" and "\n" not in damaged_row["detail"]
    broken = next(r for r in test2 if r["patient"] == "broken")
    assert broken["status"] == "error" and broken["predicted_class"] == ""
    assert next(r for r in test2 if r["patient"] == val[3])["status"] == "ok"
    empty = next(r for r in test2 if r["patient"] == "empty")
    assert empty["status"] == "error" and "no readable DICOM slice" in empty["detail"]
    record = json.loads((result_dir / "prediction.json").read_text())
    assert record["image_size"] == 32 and record["vote_rule"] == "infected_fraction"
    assert record["tau"] == next(v for k, v in ckpt_data["callbacks"].items() if "PatientVote" in k)["tau"]
    # the slice probabilities equal the model's on the training pipeline's own 32 px cache
    dm = CTDataModule(
        synthetic=compose_train(tmp_path, tiny(shared_cache)).data.synthetic, cache_dir=str(shared_cache), image_size=32
    )
    dm.setup()
    model, _ = load_checkpoint(ckpt, torch.device("cpu"))
    pid = val[1]
    rows = np.flatnonzero(dm.cache.patient == dm.patient_ids.index(pid))
    with torch.inference_mode():
        expected = model(torch.from_numpy(np.array(dm.cache.images[rows]))).softmax(1).numpy()
    vote_state = next(v for k, v in ckpt_data["callbacks"].items() if "PatientVote" in k)
    expected = apply_temperature(expected, vote_state["temperature"])  # the checkpoint's calibration
    slices = [r for r in read(result_dir / "Test1_slices.csv") if r["patient"] == pid]
    got = np.array([[float(r[f"prob_{c}"]) for c in ("COVID-19", "CAP", "Normal")] for r in slices])
    np.testing.assert_allclose(got, expected, atol=2e-4)
    np.testing.assert_allclose([float(r["slice_location"]) for r in slices], dm.cache.location[rows], atol=1e-4)


@pytest.mark.slow
def test_vote_override_is_recorded_and_bad_paths_exit_nonzero(trained, shared_cache, tmp_path):
    ckpt, _ = trained
    data_root = Path(next(shared_cache.glob("synthetic-*")))
    one = next((data_root / "Normal subjects").iterdir())
    out = run_predict([f"ckpt_path={ckpt}", f"input={one}", "vote=majority", f"paths.log_dir={tmp_path}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("predict/runs/*/prediction.json")).read_text())
    assert record["vote_rule"] == "majority"
    assert record["overridden"]["vote_rule"] == {"checkpoint": "infected_fraction", "used": "majority"}
    (row,) = read(next(tmp_path.glob(f"predict/runs/*/{one.name}.csv")))  # the end-of-run table: one row each
    table = out.stderr.split("Patients and their calls")[1].splitlines()[1:3]
    assert table[0].split() == ["test", "set", "patient", "call", "status"]
    assert table[1].split() == [one.name, one.name, row["predicted_class"], "ok"]
    bad = run_predict([f"ckpt_path={ckpt}", f"input={tmp_path / 'missing'}", f"paths.log_dir={tmp_path}"], tmp_path)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    # a missing model is said first and alone: not after warnings about every folder of the input
    noisy = tmp_path / "noisy"
    for name in ("a", "b", "c"):
        (noisy / name / "notes").mkdir(parents=True)
    bad = run_predict([f"ckpt_path={tmp_path / 'x.ckpt'}", f"input={noisy}", f"paths.log_dir={tmp_path}"], tmp_path)
    logged = [line for line in bad.stderr.splitlines() if "[predict" in line or "[covidct" in line]
    said = [line for line in logged if "][ERROR] - " in line or "][WARNING] - " in line]  # info: the kept folder
    assert bad.returncode == 1 and said == logged[:1], bad.stderr  # one error, first, and no warning
    assert f"ckpt_path={tmp_path / 'x.ckpt'}: file not found" in logged[0]


def compose_predict(overrides: list[str]) -> DictConfig:
    """conf/predict.yaml composed with ``overrides``, as ``python predict.py`` would see it."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("predict", overrides=[*overrides, "num_workers=0", "progress=false", "device=cpu"])


@pytest.mark.slow
def test_a_folder_holding_another_runs_predictions_is_refused_unless_overwrite(trained, shared_cache, tmp_path):
    one = next((next(shared_cache.glob("synthetic-*")) / "Normal subjects").iterdir())
    out = tmp_path / "shared"
    args = [f"ckpt_path={trained[0]}", f"input={one}", f"paths.output_dir={out}"]
    run_prediction(compose_predict(args))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"prediction.json", f"{one.name}.csv"} <= set(first)
    with pytest.raises(ConfigError) as refused:
        run_prediction(compose_predict([*args, "vote=majority"]))
    message = str(refused.value)
    assert message.startswith(f"paths.output_dir={out}: holds another predict.py run's results (")
    assert "prediction.json" in message and "overwrite=true" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the first run's results are untouched

    running = tmp_path / "running"  # a run that claimed its folder and has written nothing yet
    claim_output_dir(running, find_test_sets(one), one, overwrite=False)
    with pytest.raises(ConfigError, match=r"results \(\.predict-run\.json\); .* overwrite=true"):
        run_prediction(compose_predict([f"ckpt_path={trained[0]}", f"input={one}", f"paths.output_dir={running}"]))

    run_prediction(compose_predict([*args, "vote=majority", "overwrite=true"]))
    assert json.loads((out / "prediction.json").read_text())["vote_rule"] == "majority"


def test_test_time_augmentation_averages_each_slice_and_its_horizontal_flip():
    from covidct.models.classifier import SliceClassifier
    from covidct.predict.torch_backend import slice_probabilities

    torch.manual_seed(0)
    model = SliceClassifier("resnet18").eval()
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    plain = slice_probabilities(model, images, batch_size=2)
    flipped = slice_probabilities(model, images.flip(-1), batch_size=2)
    tta = slice_probabilities(model, images, batch_size=2, tta=True)
    np.testing.assert_allclose(tta, (plain + flipped) / 2, atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-4  # the flip changes what the model sees
    symmetric = torch.cat([images[..., :16], images[..., :16].flip(-1)], dim=-1)
    np.testing.assert_allclose(
        slice_probabilities(model, symmetric, 2, tta=True), slice_probabilities(model, symmetric, 2), atol=1e-6
    )


def test_tta_transforms_are_more_views_averaged_in_and_bad_ones_are_refused():
    """predict.py tta_transforms=[...]: each albumentations transform is one more view of every slice."""
    from covidct.errors import ConfigError
    from covidct.models.classifier import SliceClassifier
    from covidct.predict.predictor import patient_probabilities
    from covidct.predict.settings import PredictorSettings
    from covidct.predict.torch_backend import slice_probabilities
    from covidct.predict.tta import tta_views

    torch.manual_seed(0)
    model = SliceClassifier("resnet18").eval()
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    vflip = {"_target_": "albumentations.VerticalFlip", "p": 1.0}
    settings = PredictorSettings(["lung"], 32, ["COVID-19", "CAP", "Normal"], "majority", 0.5, tta=True)
    settings.tta_views = tta_views([vflip])
    probs, embeddings = patient_probabilities(model, images, settings, batch_size=2)
    both = [slice_probabilities(model, x, 2, tta=True) for x in (images, images.flip(-2))]
    np.testing.assert_allclose(probs, (both[0] + both[1]) / 2, atol=1e-6)
    assert embeddings is None and np.abs(probs - both[0]).max() > 1e-4
    with pytest.raises(ConfigError, match=r"tta_transforms\[0\].*not an albumentations transform"):
        tta_views([{"_target_": "collections.OrderedDict"}])
    with pytest.raises(ConfigError, match=r"tta_transforms\[1\].*cannot be built"):
        tta_views([vflip, {"_target_": "albumentations.NoSuchTransform"}])
    resize = tta_views([{"_target_": "albumentations.Resize", "height": 16, "width": 16}])
    with pytest.raises(ConfigError, match="keep the slice's size"):
        resize[0](images.numpy())


# ---- each call explained, partial labels, the input summary (one predict.py run shared) --------------------
NORMAL = CLASS_NAMES[NORMAL_CLASS]
LABELLED = {"P001": "COVID-19", "P002": "COVID-19", "cap001": "CAP", "normal001": "Normal", "cap002": "CAP"}


def slice_probs(result_dir: Path, test_set: str) -> dict[str, np.ndarray]:
    """Patient -> (n, C) slice probabilities of ``<test set>_slices.csv`` (4 decimals)."""
    probs: dict[str, list[list[float]]] = {}
    for r in read(result_dir / f"{test_set}_slices.csv"):
        probs.setdefault(r["patient"], []).append([float(r[f"prob_{c}"]) for c in CLASS_NAMES])
    return {pid: np.array(p) for pid, p in probs.items()}


@pytest.fixture(scope="module")
def explained(trained, shared_cache, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """(the run, its folder, its input) of one predict.py with labels=: two test sets (Test1: 4 patients and a
    stray file; Test2: 2 patients), a file and an empty folder beside them; labels for 5 of the 6 patients and
    for one patient not in the input (ghost-001)."""
    tmp = tmp_path_factory.mktemp("explained")
    data_root = Path(next(shared_cache.glob("synthetic-*")))
    folders = {p.name: p for p in data_root.glob("*/*") if p.is_dir()}
    tests = tmp / "input"
    for test_set, pids in (("Test1", ["P001", "P002", "cap001", "normal001"]), ("Test2", ["cap002", "normal002"])):
        for pid in pids:
            shutil.copytree(folders[pid], tests / test_set / pid)
    (tests / "Test1" / "notes.txt").write_text("not a patient")
    (tests / "README.txt").write_text("not a test set")
    (tests / "empty").mkdir()
    labels = tmp / "labels.csv"
    labels.write_text(
        "Folder/ID,Diagnosis\n" + "".join(f"{p},{c}\n" for p, c in [*LABELLED.items(), ("ghost-001", "CAP")])
    )
    args = [f"ckpt_path={trained[0]}", f"input={tests}", f"labels={labels}", "bootstrap=0"]
    out = run_predict([*args, f"hydra.run.dir={tmp / 'run'}"], tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, tmp / "run", tests


@pytest.mark.slow
def test_the_patient_csv_explains_each_call_with_the_checkpoint_parameters(explained):
    """The checkpoint's rule (infected_fraction) and tuned tau decide: each row's call is what its quantity vs
    threshold implies, the sentence names the quantity, the scores and mean probabilities are the slices'."""
    _, result_dir, _ = explained
    record = json.loads((result_dir / "prediction.json").read_text())
    assert record["vote_rule"] == "infected_fraction"
    tau = record["tau"]
    called = 0
    for test_set in ("Test1", "Test2"):
        with (result_dir / f"{test_set}.csv").open() as f:
            assert next(csv.reader(f)) == patient_csv_columns(CLASS_NAMES)  # mean_prob_<class>, no prob_<class>
        probs = slice_probs(result_dir, test_set)
        for r in read(result_dir / f"{test_set}.csv"):
            if r["status"] != "ok":
                assert r["decision"] == r["decision_quantity"] == r["score_CAP"] == r["mean_prob_CAP"] == ""
                continue
            called += 1
            p, call, why = probs[r["patient"]], r["predicted_class"], r["decision"]
            q, threshold = float(r["decision_quantity"]), float(r["decision_threshold"])
            fraction = np.mean(p.argmax(1) != NORMAL_CLASS)
            assert q == pytest.approx(fraction, abs=1e-4) and q == float(r["infected_fraction"])
            assert threshold == pytest.approx(tau, abs=1e-4)
            assert (q > threshold) == (call != NORMAL), r  # the call follows from the figures beside it
            assert f"slices infected (argmax not Normal): fraction {q:.3f}" in why and f"tau {tau:.3f}" in why
            assert why.endswith(f": {call}") and (" > tau " in why) == (call != NORMAL), why
            np.testing.assert_allclose([float(r[f"score_{c}"]) for c in CLASS_NAMES], vote_shares(p), atol=1e-4)
            np.testing.assert_allclose([float(r[f"mean_prob_{c}"]) for c in CLASS_NAMES], p.mean(0), atol=2e-4)
    assert called == 6


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["threshold", "mean_prob", "majority"])
def test_the_other_rules_explain_their_calls_too(trained, shared_cache, tmp_path, rule):
    """vote=threshold with a fixed slice threshold and tau: share vs tau decides, and the sentence names both;
    the argmax rules: the call is their scores' argmax, the quantity the sick margin against 0."""
    data_root = Path(next(shared_cache.glob("synthetic-*")))
    test_set = tmp_path / "Test1"
    for pid in ("P003", "cap003", "normal003"):
        shutil.copytree(next(data_root.glob(f"*/{pid}")), test_set / pid)
    extra = ["slice_threshold=0.3", "tau=0.2"] if rule == "threshold" else []
    out = tmp_path / "out"
    run_prediction(
        compose_predict(
            [f"ckpt_path={trained[0]}", f"input={test_set}", f"vote={rule}", *extra, f"paths.output_dir={out}"]
        )
    )
    probs = slice_probs(out, "Test1")
    for r in read(out / "Test1.csv"):
        p, call, why = probs[r["patient"]], r["predicted_class"], r["decision"]
        q, threshold = float(r["decision_quantity"]), float(r["decision_threshold"])
        scores = np.array([float(r[f"score_{c}"]) for c in CLASS_NAMES])
        assert why.endswith(f": {call}"), why
        if rule == "threshold":
            assert q == pytest.approx(np.mean(1 - p[:, NORMAL_CLASS] > 0.3), abs=1e-4) and threshold == 0.2
            assert (q > threshold) == (call != NORMAL) and f"slices with P(infected) > 0.300: share {q:.3f}" in why
        else:
            assert threshold == 0.0 and q == pytest.approx(
                np.delete(scores, NORMAL_CLASS).max() - scores[NORMAL_CLASS], abs=2e-4
            )
            if abs(q) > 1e-3:  # at 0 the tie rule decides
                assert (q > 0) == (call != NORMAL) and CLASS_NAMES[int(scores.argmax())] == call
            expected = p.mean(0) if rule == "mean_prob" else vote_shares(p)
            np.testing.assert_allclose(scores, expected, atol=2e-4)
            assert why.startswith("mean P " if rule == "mean_prob" else "slice votes "), why


@pytest.mark.slow
def test_labels_score_the_labelled_patients_and_list_the_rest(explained):
    """labels= naming a patient absent from the input (an Index.csv of more patients) and missing one that is in
    it: the 5 labelled patients are scored, the 2 others named in the log and in evaluation.json."""
    out, result_dir, _ = explained
    record = json.loads((result_dir / "evaluation.json").read_text())
    assert record["partial_labels"] is True
    assert record["unscored"] == {"absent_from_input": ["ghost-001"], "without_label": ["normal002"]}
    assert [record["scores"][n]["n_patients"] for n in ("Test1", "Test2", "overall")] == [4, 1, 5]
    calls = {r["patient"]: r["predicted_class"] for t in ("Test1", "Test2") for r in read(result_dir / f"{t}.csv")}
    right = np.mean([calls[p] == c for p, c in LABELLED.items()])
    assert record["scores"]["overall"]["metrics"]["accuracy"]["value"] == pytest.approx(right)
    absent = next(line for line in out.stderr.splitlines() if "absent from the input" in line)
    assert "not scored: 1 patient(s) labelled in labels=" in absent and absent.endswith(
        ": ghost-001 (evaluation.json: unscored)"
    )
    assert "not scored: 1 patient(s) in the input but without a label row: normal002" in out.stderr


@pytest.mark.slow
def test_the_input_is_summarised_in_one_line_and_every_entry_is_listed(explained):
    """After the model check one line sums the input up (no line per folder); the stray file is a row of its
    test set's CSV, the entries beside the test sets are in prediction.json, each with why."""
    out, result_dir, tests = explained
    logged = [line for line in out.stderr.splitlines() if line.startswith("[")]
    summary = [line for line in logged if "[covidct.predict.predictor][INFO] - input " in line]
    assert len(summary) == 1, logged
    assert summary[0].endswith(
        f"input {tests}: 2 test sets, 6 patient folders; 3 entries skipped (2 not a patient folder, 1 without "
        "patient folders), listed in the CSVs (status skipped) and prediction.json (input_skipped)"
    )
    assert not [line for line in logged if "[WARNING]" in line and "[covidct.predict" in line], logged
    stray = next(r for r in read(result_dir / "Test1.csv") if r["patient"] == "notes.txt")
    assert stray["status"] == "skipped" and "not a patient folder" in stray["detail"]
    record = json.loads((result_dir / "prediction.json").read_text())
    assert record["input_skipped"] == [
        {"path": str(tests / "README.txt"), "reason": "a file beside the patient folders, not a patient folder"},
        {"path": str(tests / "empty"), "reason": "holds no patient folder with DICOM files; not a test set"},
    ]


def test_grad_cam_captions_say_the_input_size(monkeypatch, tmp_path):
    """cam=true: each overlay's caption names the patient and the size the model saw (upsampled when drawn
    larger), through covidct.report.cam.write_patient_cams' patient caption."""
    import covidct.report.cam as cam
    from covidct.predict.predictor import cam_writer
    from covidct.predict.settings import PredictorSettings

    captions = []
    monkeypatch.setattr(cam, "write_patient_cams", lambda *args: captions.append(args[-1]))
    for size in (64, 512):
        settings = PredictorSettings(["lung"], size, list(CLASS_NAMES), "majority", 0.5)
        cam_writer(None, settings, tmp_path, 2)(None, np.zeros((1, 3)), 0, "T1-001")
    assert captions == ["T1-001 (64 px input, upsampled)", "T1-001 (512 px input)"]


def test_precision_auto_takes_bf16_only_where_the_hardware_has_it(monkeypatch):
    import torch

    from covidct.errors import ConfigError
    from covidct.predict import torch_backend

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch_backend, "bf16_supported", lambda device: (True, "this CPU has AMX"))
    assert torch_backend.resolve_precision("auto", cpu) == "bf16"
    assert torch_backend.resolve_precision("fp32", cpu) == "fp32"  # asked for: kept
    monkeypatch.setattr(torch_backend, "bf16_supported", lambda device: (False, "no AVX-512 BF16 nor AMX"))
    assert torch_backend.resolve_precision("auto", cpu) == "fp32"
    assert torch_backend.resolve_precision("bf16", cpu) == "fp32"  # with a warning
    with pytest.raises(ConfigError, match="use fp32, bf16 or auto"):
        torch_backend.resolve_precision("fp16", cpu)
