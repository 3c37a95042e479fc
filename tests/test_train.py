"""End-to-end training through the real Hydra config: compose API, CLI, multirun, resume, W&B offline."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from covidct.data import cache, datamodule
from covidct.patients.rules import VOTE_RULES
from covidct.training.run import train
from tests import wandb_records
from tests.conftest import compose_train, run_cli, tiny

pytestmark = pytest.mark.slow


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


class ScriptedPatientVotes(pl.Callback):
    """Runs before the patient vote and overwrites the validation slice probabilities it receives: at epoch 0
    each slice says its patient's true class (every rule right), later the next class (every rule wrong),
    so the best epoch is 0 and not the last, whatever the tiny model learnt."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        labels = torch.as_tensor(trainer.datamodule.slice_table.patient_labels)[batch["patient"].cpu()]
        said = labels if trainer.current_epoch == 0 else (labels + 1) % outputs["probs"].shape[1]
        outputs["probs"].copy_(torch.nn.functional.one_hot(said, outputs["probs"].shape[1]).float())


def test_two_epochs_through_the_composed_config_write_everything(tmp_path, shared_cache, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="covidct")
    cfg = with_scripted_votes(compose_train(tmp_path, tiny(shared_cache) + ["loss.alpha=auto", "trainer.max_epochs=2"]))
    calls = {"discover": 0, "cache_key": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(datamodule, "discover_covid_ct_md", counted("discover", datamodule.discover_covid_ct_md))
    monkeypatch.setattr(cache, "cache_key", counted("cache_key", cache.cache_key))
    result = train(cfg)
    assert calls == {"discover": 1, "cache_key": 1}  # the files are listed and hashed once per run
    assert result.score == 1.0 and result.best_epoch == 0  # the last epoch's votes were all wrong
    # the headline with its uncertainty and its selection: 6 patients, all right at epoch 0, all wrong at epoch 1
    head = result.summary("infected_fraction").splitlines()
    assert head[0].startswith("Best epoch 0: patient accuracy 1.000 (95% CI 1.000-1.000, 6 patients) with vote=")
    assert head[1] == (
        "  the best epoch was chosen on these same validation patients, so its figure is optimistic; "
        "the last epoch (1) scored 0.000"
    )
    patients = read_csv(tmp_path / "patients.csv")
    split = read_csv(tmp_path / "split.csv")
    val_ids = {r["patient"] for r in split if r["subset"] == "val"}
    assert {r["patient"] for r in patients} == val_ids and len(val_ids) == 6
    assert {r["true_class"] for r in patients} == {"COVID-19", "CAP", "Normal"}
    assert all(int(r["n_slices"]) >= 8 for r in patients)
    assert (tmp_path / "data_summary.txt").read_text().startswith("Data: ")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and Path(result.best_checkpoint).is_file()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    media = runs[0] / "files" / "media"  # the W&B tables callback: per-patient table, confusion, sample slices
    (table,) = media.glob("table/val/patients_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:2] == ["patient", "true"] and set(VOTE_RULES) <= set(logged["columns"])
    assert sorted(row[0] for row in logged["data"]) == sorted(val_ids)
    assert list(media.glob("table/val/patient_confusion_table_*.table.json"))
    assert len(list(media.glob("images/val/sample_slices_*.png"))) == 6
    # the W&B summary (its runs table, sweep comparisons) holds metrics.json's best epoch, not the last one
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["n_patients"], metrics["score_ci"], metrics["last_epoch"], metrics["last_score"]) == (
        6,
        [1.0, 1.0],
        1,
        0.0,
    )
    (log_file,) = runs[0].glob("run-*.wandb")  # what `wandb sync` uploads
    summary = wandb_records.summary(log_file)
    assert summary["best_epoch"] == metrics["best_epoch"] == 0 and summary["val/patient/acc"] == 1.0
    assert (summary["score_ci_low"], summary["score_ci_high"], summary["n_patients"]) == (1.0, 1.0, 6)
    assert {k: pytest.approx(v) for k, v in metrics["metrics"].items()} == {k: summary[k] for k in metrics["metrics"]}
    assert {"val/loss", "val/slice_acc", "vote/tau"} <= set(metrics["metrics"])  # that epoch's, all of them
    assert summary["best_checkpoint"] == str(Path(result.best_checkpoint).relative_to(tmp_path))
    # named <experiment>-<model>-<rule>-<run folder>; its config: the experiment, choices and overrides, no
    # machine paths
    assert wandb_records.run_name(log_file) == f"demo-resnet18-infected_fraction-{tmp_path.name}"
    config = wandb_records.config(log_file)
    assert config["experiment"] == "demo" and config["choices"]["model"] == "resnet18"
    assert "trainer.max_epochs=2" in config["overrides"] and "paths" not in config
    assert "class_names" not in config  # the model's hyperparameters once, under model
    assert "val/patient/acc" in result.metrics and "rules/majority/acc" in result.metrics
    check_wandb_at_a_glance(log_file, metrics, Path(result.best_checkpoint))
    check_class_weights(metrics, config, (tmp_path / "report.html").read_text(), caplog.text)
    check_rule_lines(caplog.records)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["preprocessing"]["image_size"] == 32
    assert ckpt["wandb_run_id"] in runs[0].name
    vote_state = next(v for k, v in ckpt["callbacks"].items() if "PatientVote" in k)
    assert 0.0 <= vote_state["tau"] <= 1.0
    assert ckpt["hyper_parameters"]["loss"] == {
        "_target_": "covidct.models.losses.FocalLoss",
        "gamma": 2.0,
        "alpha": "auto",
    }
    assert "class_counts" not in ckpt["hyper_parameters"]


def check_wandb_at_a_glance(log_file: Path, metrics: dict, best_checkpoint: Path) -> None:
    """The W&B run of 2 epochs of the demo (vote infected_fraction, best epoch 0, last 1): a few line charts in a
    few sections, the configured rule's only; the summary is the best epoch's, the last epoch's under last/;
    run tags; the model's parameter counts in its config."""
    charts = wandb_records.chart_sections(log_file)
    assert set(charts) == {"Charts", "calibration", "rules", "train", "trainer", "val", "vote"}
    assert charts["Charts"] == ["epoch", "lr-Adam"] and charts["train"] == ["train/loss_epoch", "train/slice_acc"]
    headline = ["val/loss", "val/patient/acc", "val/patient/f1_macro", "val/slice_acc", "val/slice_f1_macro"]
    assert charts["val"] == headline
    assert all(key.startswith("rules/infected_fraction/") for key in charts["rules"])  # no other rule's
    assert sum(map(len, charts.values())) == 29  # were 69 (49 of them rules/*; 77 and 57 with vote.mil)
    assert "rules/table" in wandb_records.chart_sections(log_file, media=True)["rules"]  # every rule, per epoch
    summary, rows = wandb_records.summary(log_file), wandb_records.history(log_file)
    assert all(f"rules/{rule}/acc" in summary for rule in VOTE_RULES)  # every rule: the best epoch's
    # every charted scalar of the best epoch's rows is the summary's; the last epoch's are under last/
    for epoch, prefix in ((0, ""), (1, "last/")):
        logged = {k: v for row in rows if row.get("epoch") == epoch for k, v in row.items() if not k.startswith("_")}
        logged.pop("trainer/global_step")  # the summary's: the checkpoint's (Lightning logs epoch ends one less)
        charted = {k: v for k, v in logged.items() if prefix == "" or k.startswith(("val/", "train/", "epoch"))}
        assert {k: summary[prefix + k] for k in charted} == pytest.approx(charted), epoch
    lrs = [row["lr-Adam"] for row in rows if "lr-Adam" in row]
    assert (summary["lr-Adam"], summary["last/lr-Adam"]) == (lrs[0], lrs[-1]) and lrs[0] != lrs[-1]
    assert (summary["epoch"], summary["last/epoch"]) == (0, metrics["last_epoch"])
    assert summary["last/val/patient/acc"] == metrics["last_score"] == 0.0
    best = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
    assert (summary["trainer/global_step"], summary["last/trainer/global_step"]) == (best["global_step"], 4)
    assert wandb_records.run_tags(log_file) == ["covidct", "demo", "resnet18", "infected_fraction"]
    config = wandb_records.config(log_file)
    weights = {k: v for k, v in best["state_dict"].items() if not k.endswith(("running_mean", "running_var"))}
    total = sum(v.numel() for k, v in weights.items() if not k.endswith("num_batches_tracked"))
    assert (config["model/params/total"], config["model/params/trainable"]) == (total, total)
    assert config["model/params/non_trainable"] == 0


def check_class_weights(metrics: dict, config: dict, report: str, console: str) -> None:
    """loss.alpha=auto: the fitted class weights in metrics.json, the W&B config, the report's key metrics and
    the console (once)."""
    weights = metrics["class_weights"]
    assert list(weights) == ["COVID-19", "CAP", "Normal"] and sum(weights.values()) == pytest.approx(1.0)
    assert config["class_weights"] == pytest.approx(weights)
    text = ", ".join(f"{name} {w:.3f}" for name, w in weights.items())
    key_metrics = report.split("<h2>Key metrics</h2>")[1].split("<h2>")[0]
    assert "class weights (loss.alpha=auto)" in key_metrics and text in key_metrics
    assert console.count(f"loss.alpha=auto: class weights {text}") == 1


def check_rule_lines(records: list) -> None:
    """The console: one line per epoch for the patient rules, their whole table once, at the end, for the best
    epoch (0, every rule right: the scripted votes)."""
    lines = [r.getMessage() for r in records if r.name == "covidct.training.callbacks.patient_vote"]
    assert lines[0].startswith("Epoch 0: patient accuracy 1.000 with vote=infected_fraction (val/patient/acc, 6 ")
    assert lines[1].startswith("Epoch 1: patient accuracy 0.000 with vote=infected_fraction")
    assert lines[2].startswith("Patient rules at the best epoch 0, 6 validation patients") and len(lines) == 3
    assert all(rule in lines[2] for rule in VOTE_RULES) and "* infected_fraction  1.000" in lines[2]


def with_scripted_votes(cfg):
    """``cfg`` with :class:`ScriptedPatientVotes` first among its callbacks (the vote sees what it says)."""
    cfg.callbacks = OmegaConf.merge({"scripted_votes": {"_target_": f"{__name__}.ScriptedPatientVotes"}}, cfg.callbacks)
    return cfg


def test_resume_into_another_folder_continues_training_the_wandb_run_and_the_best_epoch(tmp_path, shared_cache):
    first = with_scripted_votes(compose_train(tmp_path / "a", tiny(shared_cache) + ["logger=wandb"]))
    train(first)  # epoch 0: every vote right, score 1.0
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    run_id = torch.load(last, map_location="cpu", weights_only=True)["wandb_run_id"]
    second = compose_train(tmp_path / "b", tiny(shared_cache) + ["trainer.max_epochs=2", f"ckpt_path={last}"])
    result = train(with_scripted_votes(second))  # epoch 1, in another folder: every vote wrong
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["wandb_run_id"] == run_id
    # the best so far is still run a's epoch 0, its checkpoint included (it was a worse epoch 1 of b's before)
    assert (result.best_epoch, result.score) == (0, 1.0)
    assert Path(result.best_checkpoint) == tmp_path / "a" / "checkpoints" / "epoch000.ckpt"
    assert not (tmp_path / "b" / "checkpoints" / "epoch001.ckpt").exists()
    assert (tmp_path / "a" / "checkpoints" / "epoch000.ckpt").is_file()  # never deleted from another folder


def test_cli_override_and_bad_values_fail_with_the_key(tmp_path, shared_cache):
    out = run_cli(tiny(shared_cache) + ["loss.gamma=-1", f"paths.log_dir={tmp_path}"], tmp_path)
    assert out.returncode != 0 and "loss.gamma must be >= 0" in out.stderr + out.stdout
    (failed,) = (tmp_path / "train" / "runs").iterdir()  # kept, and named so that no listing takes it for a result
    assert failed.name.endswith("-failed") and f"kept as {failed}" in out.stderr and (failed / "train.log").is_file()
    out = run_cli(tiny(shared_cache) + ["loss.gama=2"], tmp_path)
    assert out.returncode != 0 and "gama" in out.stderr
    out = run_cli(tiny(shared_cache) + ["model=vgg61"], tmp_path)
    assert out.returncode != 0 and "vgg16_bn" in out.stderr  # Hydra lists the choices
    out = run_cli(tiny(shared_cache) + ["data.image_size=abc"], tmp_path)  # the schema's type check
    assert out.returncode != 0 and "full_key: data.image_size" in out.stderr and "Traceback" not in out.stderr
    out = run_cli(tiny(shared_cache) + ["loss.alpha=[0.2,0.3]", f"paths.log_dir={tmp_path}"], tmp_path)
    assert out.returncode == 1 and "loss.alpha has 2 values" in out.stderr and "Traceback" not in out.stderr
    for root in (f"data.root={tmp_path / 'no such folder'}", "data.root=null"):  # missing data root: one line
        out = run_cli(["data=covid_ct_md", root, f"paths.log_dir={tmp_path}"], tmp_path)
        errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
        assert out.returncode == 1 and len(errors) == 1 and "data.root" in errors[0] and "Traceback" not in out.stderr


def test_paper_experiment_trains_on_the_real_sample_from_imagenet_weights(
    tmp_path, shared_cache, real_sample, monkeypatch
):
    """experiment=paper as a user runs it on COVID-CT-MD (3 real patients here, one per fold), with a
    VGG16 ImageNet weights file this test writes into torch hub's cache (no download)."""
    from covidct.models.backbones import BACKBONES, imagenet_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = BACKBONES["vgg16"].builder(weights=None).state_dict()
    imagenet_weights_path("vgg16").parent.mkdir(parents=True)
    torch.save(reference, imagenet_weights_path("vgg16"))
    cfg = compose_train(
        tmp_path / "run",
        [
            "experiment=paper",
            f"data.root={real_sample}",
            "data.num_folds=3",
            "data.fold=0",
            f"paths.cache_dir={shared_cache}",
            "data.image_size=64",
            "data.batch_size=8",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.enable_progress_bar=false",
            "logger=none",
            "callbacks.last_checkpoint=null",  # VGG16 with Adam's state is 1.6 GB a checkpoint: keep only the best
        ],
    )
    result = train(cfg)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    (patient,) = read_csv(tmp_path / "run" / "patients.csv")  # one validation patient in fold 0 of 3
    assert patient["predicted_class"] == patient["majority_vote"]  # the paper's rule decides
    assert int(patient["n_slices"]) in (148, 154, 168)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["vote_rule"] == "majority" and metrics["score"] == result.score
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["backbone"] == "vgg16"
    assert hparams["loss"] == {"_target_": "covidct.models.losses.FocalLoss", "gamma": 2.0, "alpha": 0.25}
    assert hparams["preprocessing"]["windows"] == ["lung"] and hparams["preprocessing"]["vote_rule"] == "majority"
    # started from the weights file: two Adam steps at lr 1e-4 move each weight by ~2e-4 at most
    trained = ckpt["state_dict"]["net.features.0.weight"]
    assert torch.allclose(trained, reference["features.0.weight"], atol=1e-3)
    assert not torch.allclose(trained, BACKBONES["vgg16"].builder(weights=None).features[0].weight, atol=1e-2)


def test_compiled_training_saves_plain_checkpoints(tmp_path, shared_cache, monkeypatch):
    """compile.enabled compiles the network in place (the eager backend here: no C++ toolchain
    needed), so the checkpoint has the plain module's keys for predict.py."""
    calls = []
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw) or original(self, **kw))
    cfg = compose_train(tmp_path, tiny(shared_cache) + ["compile.enabled=true", "compile.backend=eager", "logger=none"])
    result = train(cfg)
    assert calls == [{"backend": "eager", "mode": None}]
    keys = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["state_dict"].keys()
    assert "net.conv1.weight" in keys and not any("_orig_mod" in k for k in keys)


def test_weighted_center_vote_drives_checkpointing_and_every_rule_is_logged(tmp_path, shared_cache):
    cfg = compose_train(tmp_path, tiny(shared_cache) + ["vote=weighted_center", "vote.center_slices=4", "logger=csv"])
    result = train(cfg)
    assert result.metrics["val/patient/acc"] == result.metrics["rules/weighted_center/acc"] == result.score
    patients = read_csv(tmp_path / "patients.csv")
    assert all(p["predicted_class"] == p["weighted_center_vote"] for p in patients)
    logged = read_csv(next(tmp_path.glob("csv/version_*/metrics.csv")))[0].keys()
    assert all(f"rules/{rule}/sensitivity_cap" in logged for rule in VOTE_RULES)
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    vote_state = next(v for k, v in ckpt["callbacks"].items() if "PatientVote" in k)
    assert (vote_state["center_slices"], vote_state["window_slices"], vote_state["k"]) == (
        4,
        80,
        5,
    ) and "rule" not in vote_state
    assert ckpt["hyper_parameters"]["preprocessing"]["vote_rule"] == "weighted_center"  # the rule, stored once
