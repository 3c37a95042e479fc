"""Two-stage training (the SPGC 2021 winner's pseudo-labels): stage-1 infected-slice targets, the
pseudo-label file and its alignment, stage 2's use of it, and every refusal. Real trainings, real DICOM."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from covidct.config import register_resolvers
from covidct.contracts import CLASS_NAMES, INDEX_FILE, NORMAL_CLASS
from covidct.data.datamodule import CTDataModule
from covidct.data.labels import INFECTION_CLASSES, UNKNOWN, slice_targets
from covidct.data.layout import discover_covid_ct_md, read_index
from covidct.data.pseudo_labels import LABEL_FILE, META_FILE, read_pseudo_labels, write_pseudo_labels
from covidct.errors import ConfigError, DataError
from tests.conftest import REPO, compose_train, tiny

SPLIT = ["data.val_fraction=0.5", "data.seed=3"]


# ---- stage-1 targets -----------------------------------------------------------------------------------


def test_infection_targets_mark_labelled_infected_slices_and_leave_unlabelled_sick_patients_unknown():
    labels = [0, 1, 2, 0]  # COVID-19 labelled, CAP labelled, Normal, COVID-19 without slice labels
    rows = [np.array([0, 1, 1, 0], np.int8), np.array([1, 0, 0, 0], np.int8), None, None]
    patient = np.repeat(np.arange(4), 3)
    rank = np.tile([0, 1, 2], 4)
    targets = slice_targets("infection", labels, rows, patient, rank)
    assert targets.tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, UNKNOWN, UNKNOWN, UNKNOWN]
    # pseudo mode is paper mode on the rows it is given
    assert (
        slice_targets("pseudo", labels, rows, patient, rank).tolist()
        == slice_targets("paper", labels, rows, patient, rank).tolist()
    )


@pytest.mark.slow
def test_stage1_targets_on_the_real_sample_follow_the_radiologists_labels(real_sample, tmp_path):
    dm = CTDataModule(root=str(real_sample), cache_dir=str(tmp_path), image_size=32, label_mode="infection")
    dm.setup()
    assert dm.class_names == INFECTION_CLASSES
    table = dm.slice_table
    labels = {p.patient_id: p.slice_labels for p in discover_covid_ct_md(real_sample)}
    for i, pid in enumerate(table.patient_ids):
        mine = table.patient == i
        expected = np.zeros(mine.sum(), int) if labels[pid] is None else labels[pid][table.rank[mine]]
        assert table.target[mine].tolist() == expected.tolist(), pid
    p001 = table.patient == table.patient_ids.index("P001")
    assert table.target[p001].sum() == 80 and p001.sum() == 148  # 80 of 148 slices infected (the figure)
    assert dm.train_class_counts == np.bincount(table.target[dm.train_rows], minlength=2).tolist()


# ---- the pseudo-label file -----------------------------------------------------------------------------


def test_pseudo_label_file_follows_the_datasets_convention(tmp_path):
    rows = [("P007", 0, np.array([0, 1, 1, 0, 1], np.int8)), ("cap009", 1, np.ones(230, np.int8))]
    sizes = {"P007": {"series_length": 5}, "cap009": {"series_length": 230}}
    meta = {"threshold": 0.5, "stage1_train_patients": ["P001"], "patients": sizes, "preprocessing": {}}
    path = write_pseudo_labels(tmp_path, rows, meta)
    assert path == tmp_path / LABEL_FILE
    index = read_index(tmp_path)  # the dataset's own reader: row r of the array = r-th data row of Index.csv
    array = np.load(path)
    assert [r["Folder/ID"] for r in index] == ["P007", "cap009"]
    assert [r["Diagnosis"] for r in index] == ["COVID-19", "CAP"]
    assert array.dtype == np.int8 and array.shape == (2, 230)  # at least 200 columns, as the dataset's
    assert array[0, :6].tolist() == [0, 1, 1, 0, 1, 0] and array[0, 6:].sum() == 0
    back = read_pseudo_labels(path)
    assert back.meta["threshold"] == 0.5 and back.stage1_train_patients == ["P001"]
    assert back.rows["cap009"].sum() == 230
    # the JSON binds the array: its SHA-256, the patient of each row, each patient's counts
    assert back.meta["label_array"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert back.meta["label_array"]["rows"] == ["P007", "cap009"]
    assert back.meta["patients"] == {
        "P007": {"series_length": 5, "infected": 3},
        "cap009": {"series_length": 230, "infected": 230},
    }


def test_a_foreign_or_broken_pseudo_label_folder_is_refused_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_pseudo_labels(tmp_path / LABEL_FILE)
    meta = {"stage1_train_patients": [], "patients": {"P1": {"series_length": 3}}}
    path = write_pseudo_labels(tmp_path, [("P1", 0, np.ones(3, np.int8))], meta)
    (tmp_path / META_FILE).write_text('{"kind": "something else"}')
    with pytest.raises(DataError, match="not covidct pseudo-labels"):
        read_pseudo_labels(path)
    with pytest.raises(ConfigError, match="data.label_mode=pseudo needs data.pseudo_labels"):
        CTDataModule(synthetic={}, label_mode="pseudo")
    with pytest.raises(ConfigError, match="only with data.label_mode=pseudo"):
        CTDataModule(synthetic={}, label_mode="paper", pseudo_labels=str(path))


# ---- the array, its Index.csv and its JSON are bound together -----------------------------------------

REGENERATE = "regenerate them with python -m covidct.training.pseudo_label"


def infected_row(length: int, columns: list[int]) -> np.ndarray:
    row = np.zeros(length, np.int8)
    row[columns] = 1
    return row


def three_patients(folder: Path) -> Path:
    """A pseudo-label folder of P003 (99 of 148 slices infected), P005 and cap002 (3 each, elsewhere)."""
    rows = [
        ("P003", 0, infected_row(148, list(range(20, 119)))),
        ("P005", 0, infected_row(150, [40, 41, 42])),
        ("cap002", 1, infected_row(160, [70, 90, 110])),
    ]
    sizes = {pid: {"series_length": len(row)} for pid, _, row in rows}
    return write_pseudo_labels(folder, rows, {"stage1_train_patients": [], "patients": sizes})


def edit_array(path: Path, edit) -> None:
    np.save(path, edit(np.load(path)))


def edit_json(path: Path, edit) -> None:
    meta = json.loads((path.parent / META_FILE).read_text())
    edit(meta)
    (path.parent / META_FILE).write_text(json.dumps(meta))


def edit_index(path: Path, edit) -> None:
    lines = (path.parent / INDEX_FILE).read_text().splitlines()
    (path.parent / INDEX_FILE).write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (  # the case: accepted while the JSON said 99 infected
            lambda p: edit_array(p, np.zeros_like),
            r"labels-pseudo.npy: patient 'P003' \(row 0\) has 0 infected slices, pseudo_labels.json says 99",
        ),
        (
            lambda p: edit_array(p, lambda a: a[[1, 0, 2]]),  # P003's and P005's rows swapped
            r"patient 'P003' \(row 0\) has 3 infected slices, pseudo_labels.json says 99",
        ),
        (
            lambda p: edit_array(p, lambda a: a[[0, 2, 1]]),  # two rows of equal counts swapped
            r"Slice-level-labels-pseudo.npy: changed since it was written \(SHA-256 differs",
        ),
        (
            lambda p: edit_index(p, lambda lines: [lines[0], lines[1], lines[3], lines[2]]),
            r"Index.csv, line 3: row 1 is patient 'cap002' but pseudo_labels.json says patient 'P005'",
        ),
        (
            lambda p: (edit_array(p, lambda a: a[:2]), edit_index(p, lambda lines: lines[:3])),  # cap002's row dropped
            r"Slice-level-labels-pseudo.npy: no row for patient 'cap002' of pseudo_labels.json",
        ),
        (
            lambda p: edit_json(p, lambda meta: meta["patients"].pop("cap002")),
            r"pseudo_labels.json: no record of patient 'cap002'",
        ),
        (
            lambda p: edit_json(p, lambda meta: meta.pop("label_array")),  # as written before the binding
            r"pseudo_labels.json: records no SHA-256 and row patients .* older covidct",
        ),
    ],
    ids=["zeroed", "rows-swapped", "equal-rows-swapped", "index-swapped", "row-dropped", "not-in-json", "older"],
)
def test_pseudo_labels_edited_apart_from_their_json_are_refused(tmp_path, edit, expected):
    path = three_patients(tmp_path)
    assert read_pseudo_labels(path).rows["P003"].sum() == 99  # as written, it reads back
    edit(path)
    with pytest.raises(DataError, match=expected) as info:
        read_pseudo_labels(path)
    assert REGENERATE in str(info.value) and "\n" not in str(info.value)


# ---- the pipeline on synthetic data (stage 1 -> pseudo-labels -> stage 2) ------------------------------


def tiny_unlabelled(cache_dir: Path) -> list[str]:
    """:func:`tiny`, with half the sick patients without slice labels and a fixed split."""
    return [
        *tiny(cache_dir),
        "data.synthetic.patients_per_class=[6,6,4]",
        "data.synthetic.labelled_fraction=0.5",
        "logger=none",
        *SPLIT,
    ]


def compose_pseudo_label(output_dir: Path, overrides: list[str]) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("pseudo_label", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """(stage-1 TrainResult, pseudo-label array path, dataset root, cache dir, overrides)."""
    from covidct.training.pseudo_label import pseudo_label
    from covidct.training.run import train

    cache = tmp_path_factory.mktemp("two_stage_cache")
    overrides = tiny_unlabelled(cache)
    stage1 = train(compose_train(tmp_path_factory.mktemp("stage1"), [*overrides, "stage=infection"]))
    root = next(cache.glob("synthetic-*"))
    cfg = compose_pseudo_label(
        tmp_path_factory.mktemp("pseudo"),
        [f"ckpt_path={stage1.best_checkpoint}", f"input={root}", f"paths.cache_dir={cache}"],
    )
    return stage1, pseudo_label(cfg), root, cache, overrides


def stage2_datamodule(cfg: DictConfig) -> CTDataModule:
    from covidct.training.run import instantiate_checked

    dm = instantiate_checked(cfg.data, _convert_="all")
    dm.setup()
    return dm


@pytest.mark.slow
def test_stage1_reports_its_slice_auroc_and_records_what_it_trained_on(two_stage):
    stage1 = two_stage[0]
    assert stage1.monitor == "val/infection/auroc" and 0.0 <= stage1.score <= 1.0
    assert {"val/infection/sensitivity", "val/infection/specificity"} <= set(stage1.metrics)
    saved = json.loads((stage1.output_dir / "metrics.json").read_text())
    assert saved["class_names"] == list(INFECTION_CLASSES) and saved["monitor"] == "val/infection/auroc"
    assert "slice infection AUROC" in stage1.summary("infected_fraction")
    ckpt = torch.load(stage1.best_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == list(INFECTION_CLASSES)
    assert ckpt["CTDataModule"]["trained_on"]  # the patients whose labels stage 1 learnt


@pytest.mark.slow
def test_pseudo_labels_cover_exactly_the_unlabelled_sick_patients_at_their_slice_positions(two_stage):
    from covidct.data.preprocess import SlicePreprocessor, parse_windows
    from covidct.predict.torch_backend import iterate_patients, load_checkpoint, slice_probabilities

    stage1, path, root, _, _ = two_stage
    pseudo = read_pseudo_labels(path)
    patients = discover_covid_ct_md(root)
    unlabelled_sick = {p.patient_id for p in patients if p.label != NORMAL_CLASS and p.slice_labels is None}
    assert set(pseudo.rows) == unlabelled_sick and unlabelled_sick
    assert pseudo.meta["threshold"] == 0.5
    # independently of the cache: read each DICOM folder again, score its slices, place them by rank
    model, settings = load_checkpoint(stage1.best_checkpoint, torch.device("cpu"))
    pre = SlicePreprocessor(parse_windows(settings.windows), settings.image_size)
    folders = [p.folder for p in patients if p.patient_id in unlabelled_sick]
    for item in iterate_patients(folders, pre, num_workers=0):
        infected = slice_probabilities(model, item["images"], 64)[:, 1] > 0.5
        row = pseudo.rows[item["folder"].name]
        assert row[np.asarray(item["ranks"])].tolist() == infected.astype(int).tolist()
        assert pseudo.meta["patients"][item["folder"].name]["infected"] == int(infected.sum())


@pytest.mark.slow
def test_stage2_uses_pseudo_labels_for_training_patients_only_and_never_over_radiologist_labels(two_stage, tmp_path):
    _, path, _, cache, overrides = two_stage
    paper = stage2_datamodule(compose_train(tmp_path / "paper", overrides))
    # a pseudo-label folder that also (wrongly) holds a row for every radiologist-labelled patient
    pseudo = read_pseudo_labels(path)
    planted = tmp_path / "planted"
    labelled = [
        (pid, int(paper.patient_labels[i]), np.ones(paper.cache.patients[i].series_length, np.int8))
        for i, pid in enumerate(paper.patient_ids)
        if paper.patient_labels[i] != NORMAL_CLASS and pid not in pseudo.rows
    ]
    rows = [(pid, CLASS_NAMES.index(pseudo.meta["patients"][pid]["class"]), r) for pid, r in pseudo.rows.items()]
    sizes = {pid: {"series_length": len(row)} for pid, _, row in labelled}
    meta = {**pseudo.meta, "patients": {**pseudo.meta["patients"], **sizes}}
    planted_path = write_pseudo_labels(planted, rows + labelled, meta)
    dm = stage2_datamodule(
        compose_train(tmp_path / "s2", [*overrides, "data.label_mode=pseudo", f"data.pseudo_labels={planted_path}"])
    )
    train, val = set(map(int, dm.train_patients)), set(map(int, dm.val_patients))
    assert dm.pseudo_labelled and set(dm.pseudo_labelled) <= train
    for i, pid in enumerate(dm.patient_ids):
        mine = dm.slice_table.patient == i
        got, before = dm.targets[mine], paper.targets[mine]
        if pid in pseudo.rows and i in train:  # pseudo-labelled: infected slices take the class, the rest Normal
            expected = np.where(pseudo.rows[pid][dm.slice_table.rank[mine]] == 1, dm.patient_labels[i], NORMAL_CLASS)
            assert got.tolist() == expected.tolist(), pid
        else:  # radiologist-labelled, Normal, or a validation patient: exactly as in paper mode
            assert got.tolist() == before.tolist(), pid
            if pid in pseudo.rows:
                assert i in val and (got == UNKNOWN).all()
    assert "patients with pseudo-labels" in (tmp_path / "s2" / "data_summary.txt").read_text()


@pytest.mark.slow
def test_stage2_refuses_pseudo_labels_that_do_not_fit(two_stage, tmp_path):
    _, path, _, _, overrides = two_stage
    stage2 = [*overrides, "data.label_mode=pseudo", f"data.pseudo_labels={path}"]
    with pytest.raises(DataError, match="data.image_size"):  # stage 1 read 32 px slices
        stage2_datamodule(compose_train(tmp_path / "a", [*stage2, "data.image_size=48"]))
    with pytest.raises(DataError, match="leak into stage 2"):  # another split: stage 1 trained on a val patient
        stage2_datamodule(compose_train(tmp_path / "b", [*stage2, "data.seed=11"]))
    changed = tmp_path / "changed"
    shutil.copytree(path.parent, changed)
    meta = json.loads((changed / META_FILE).read_text())
    pid = next(iter(meta["patients"]))
    meta["patients"][pid]["series_length"] += 1
    (changed / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"series changed.*{pid}"):
        stage2_datamodule(
            compose_train(
                tmp_path / "c", [*overrides, "data.label_mode=pseudo", f"data.pseudo_labels={changed / LABEL_FILE}"]
            )
        )
    assert (changed / INDEX_FILE).is_file()


@pytest.mark.slow
def test_stage2_refuses_a_real_pseudo_label_array_edited_apart_from_its_json(two_stage, tmp_path):
    _, path, _, _, overrides = two_stage
    edited = tmp_path / "edited"
    shutil.copytree(path.parent, edited)
    meta = json.loads((edited / META_FILE).read_text())
    pid = meta["label_array"]["rows"][0]
    written, length = meta["patients"][pid]["infected"], meta["patients"][pid]["series_length"]
    array = np.load(edited / LABEL_FILE)
    array[0, :length] = 0 if written else 1  # row 0 cleared (or, when clean, every slice marked)
    np.save(edited / LABEL_FILE, array)
    stage2 = [*overrides, "data.label_mode=pseudo", f"data.pseudo_labels={edited / LABEL_FILE}"]
    now = 0 if written else length
    with pytest.raises(DataError, match=f"patient '{pid}' \\(row 0\\) has {now} infected slices, .* says {written}"):
        stage2_datamodule(compose_train(tmp_path / "run", stage2))


@pytest.mark.slow
def test_pseudo_label_refuses_a_checkpoint_that_is_not_a_stage1_model(two_stage, tiny_checkpoint, tmp_path):
    from covidct.training.pseudo_label import pseudo_label

    _, _, root, cache, _ = two_stage
    cfg = compose_pseudo_label(tmp_path, [f"ckpt_path={tiny_checkpoint}", f"input={root}", f"paths.cache_dir={cache}"])
    with pytest.raises(ConfigError, match="not a stage-1 infected-slice model.*stage=infection"):
        pseudo_label(cfg)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_predict_refuses_a_stage1_checkpoint_and_says_what_it_is_for(two_stage, tmp_path):
    from tests.conftest import run_cli

    stage1, _, root, _, _ = two_stage
    patient = next(root.glob("COVID-19*/P001"))
    done = run_cli(
        [f"ckpt_path={stage1.best_checkpoint}", f"input={patient}", f"hydra.run.dir={tmp_path}"], tmp_path, "predict.py"
    )
    assert done.returncode == 1
    assert (
        "stage-1 infected-slice model" in done.stderr + done.stdout
        and "covidct.training.pseudo_label" in done.stderr + done.stdout
    )
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.slow
def test_stage2_trains_on_radiologist_and_pseudo_labels(two_stage, tmp_path):
    from covidct.training.run import train

    _, path, _, _, overrides = two_stage
    result = train(compose_train(tmp_path, [*overrides, "data.label_mode=pseudo", f"data.pseudo_labels={path}"]))
    assert result.monitor == "val/patient/acc" and result.best_epoch == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["class_names"] == list(CLASS_NAMES)


@pytest.mark.slow
def test_an_automatic_threshold_maximises_youdens_j_on_stage1_validation_patients(two_stage, tmp_path):
    from covidct.training.pseudo_label import pseudo_label

    stage1, _, root, cache, _ = two_stage
    cfg = compose_pseudo_label(
        tmp_path, [f"ckpt_path={stage1.best_checkpoint}", f"input={root}", f"paths.cache_dir={cache}", "threshold=auto"]
    )
    meta = read_pseudo_labels(pseudo_label(cfg)).meta
    assert "Youden" in meta["threshold_source"] and 0.0 < meta["threshold"] < 1.0
    # recompute J over every candidate threshold from the validation patients' labelled slices
    from covidct.predict.torch_backend import load_checkpoint, slice_probabilities

    model, _ = load_checkpoint(stage1.best_checkpoint, torch.device("cpu"))
    val = set(torch.load(stage1.best_checkpoint, weights_only=True)["CTDataModule"]["val_patients"])
    dm = CTDataModule(synthetic=None, root=str(root), cache_dir=str(cache), image_size=32, label_mode="infection")
    dm.setup()
    table = dm.slice_table
    rows = [r for r in range(len(table.patient)) if table.patient_ids[table.patient[r]] in val and table.target[r] >= 0]
    scores = slice_probabilities(model, torch.from_numpy(np.array(table.images[rows])), 64)[:, 1]
    truth = table.target[rows]
    youden = lambda t: np.mean(scores[truth == 1] > t) + np.mean(scores[truth == 0] <= t) - 1  # noqa: E731
    best = max(youden(t) for t in np.concatenate([[0.0], np.nextafter(scores, 0)]))
    assert youden(meta["threshold"]) == pytest.approx(best)
