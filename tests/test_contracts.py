"""The shared names: what configs resolve them to, and that readers ask only for what writers write."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from covidct import contracts
from covidct.config import register_resolvers
from tests.conftest import compose_train


def test_checkpointing_and_early_stopping_monitor_the_patient_accuracy_key_by_interpolation(tmp_path):
    cfg = compose_train(tmp_path, ["callbacks=[default,early_stopping]"])
    assert cfg.callbacks.model_checkpoint.monitor == "val/patient/acc"
    assert cfg.callbacks.early_stopping.monitor == "val/patient/acc"
    assert cfg.callbacks.best_epoch.monitor == "val/patient/acc"
    stage1 = compose_train(tmp_path, ["stage=infection"])
    assert stage1.callbacks.model_checkpoint.monitor == "val/infection/auroc"


def test_an_unknown_contract_name_is_an_error_listing_the_known_ones():
    register_resolvers()
    with pytest.raises(
        InterpolationResolutionError,
        match=r"\$\{contract:PATIENT_ACCURACY\}: not a name of covidct.contracts.*PATIENT_ACC",
    ):
        OmegaConf.to_container(OmegaConf.create({"monitor": "${contract:PATIENT_ACCURACY}"}), resolve=True)


def test_the_normal_class_is_found_by_name_and_evaluate_reads_columns_predict_writes():
    assert contracts.CLASS_NAMES[contracts.NORMAL_CLASS] == "Normal"
    assert contracts.CLASS_NAMES[contracts.COVID_CLASS] == "COVID-19"
    header = contracts.patient_csv_columns(["COVID-19", "CAP", "Normal"])
    assert header[:5] == ["patient", "predicted_class", "decision", "decision_quantity", "decision_threshold"]
    assert "mean_prob_Normal" in header and "prob_Normal" not in header  # training's patients.csv names
    assert set(contracts.EVALUATED_COLUMNS) <= set(header) and header[-2:] == ["status", "detail"]
    assert contracts.slice_csv_columns(["a"]) == ["patient", "slice_index", "slice_location", "prob_a"]
    assert (contracts.patient_csv_name("T1"), contracts.slice_csv_name("T1")) == ("T1.csv", "T1_slices.csv")
