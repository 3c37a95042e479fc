"""The names that writers, readers, configs and tests share, each defined once: classes, file names, CSV
columns and metric keys. Pure constants and string helpers (standard library only), so any module may
import it; configs reach it through the ``${contract:NAME}`` resolver (``covidct.config``)."""

from __future__ import annotations

import re
from pathlib import Path

CONF_DIR: Path = Path(__file__).resolve().parents[1] / "conf"
"""The Hydra config folder (absolute: ``python -m covidct.<module>`` finds it from any working folder)."""

# ---- classes -------------------------------------------------------------------------------------------
CLASS_NAMES: tuple[str, ...] = ("COVID-19", "CAP", "Normal")
"""Patient class index -> name (the dataset's Diagnosis values)."""
NORMAL_CLASS: int = CLASS_NAMES.index("Normal")
"""The uninfected class: slice labels 0 and every 'infected or not' rule count against it."""
COVID_CLASS: int = CLASS_NAMES.index("COVID-19")

# ---- the dataset (COVID-CT-MD layout) -------------------------------------------------------------------
INDEX_FILE = "Index.csv"
"""Label Index,Diagnosis,Relative Path,Folder/ID: one row per patient; row r is row r of the slice labels."""

# ---- a training run's folder ---------------------------------------------------------------------------
METRICS_FILE = "metrics.json"  # status, best epoch, its metrics (what sweeps summarise)
PATIENTS_FILE = "patients.csv"  # one row per validation patient: every rule's call and why
SPLIT_FILE = "split.csv"  # which patient went where, with its series
DATA_SUMMARY_TEXT = "data_summary.txt"
DATA_SUMMARY_JSON = "data_summary.json"
REPORT_FILE = "report.html"
TEST_PATIENTS_FILE = "test_patients.csv"  # the held-out test patients of data.split_file
PSEUDONYMS_FILE = "pseudonyms.csv"  # privacy.mapping_file=true
LAST_CHECKPOINT = "last.ckpt"
CHECKPOINTS_HINT = "checkpoints are in <run>/checkpoints/"  # what a missing ckpt_path's message adds

# ---- a sweep's folder ----------------------------------------------------------------------------------
SWEEP_SUMMARY_FILE = "summary.csv"
FOLDS_FILE = "folds.csv"

# ---- a predict.py run's folder -------------------------------------------------------------------------
PREDICTION_RECORD = "prediction.json"  # the model, settings and test sets of the run
PREDICT_CLAIM = ".predict-run.json"  # written first: the folder belongs to this run
EVALUATION_JSON = "evaluation.json"
EVALUATION_CSV = "evaluation.csv"


def patient_csv_name(test_set: str) -> str:
    """``<test set>.csv``: one row per patient."""
    return f"{test_set}.csv"


def slice_csv_name(test_set: str) -> str:
    """``<test set>_slices.csv``: one row per slice."""
    return f"{test_set}_slices.csv"


def prob_column(class_name: str) -> str:
    """``prob_<class>``: a slice's probability of a class (slice CSV: one slice, so not a mean)."""
    return f"prob_{class_name}"


def mean_prob_column(class_name: str) -> str:
    """``mean_prob_<class>``: a patient's mean slice probability of a class (patient CSV, training's patients.csv)."""
    return f"mean_prob_{class_name}"


def score_column(class_name: str) -> str:
    """``score_<class>``: the vote rule's per-class score of a patient (patient CSV, training's patients.csv)."""
    return f"score_{class_name}"


#: what the vote rule decided a patient on, as training's patients.csv names it: the one-sentence why, the
#: quantity the rule compared and the threshold it was compared to (sick when quantity > threshold)
DECISION_COLUMNS: tuple[str, ...] = ("decision", "decision_quantity", "decision_threshold")
SERIES_COLUMNS: tuple[str, ...] = ("series_uid", "series_description", "n_series")


def patient_csv_columns(class_names: list[str] | tuple[str, ...]) -> list[str]:
    """The header of ``<test set>.csv``, in order."""
    return [
        "patient",
        "predicted_class",
        *DECISION_COLUMNS,
        *map(score_column, class_names),
        *map(mean_prob_column, class_names),
        "infected_fraction",
        "n_slices",
        "n_skipped",
        "order_key",
        *SERIES_COLUMNS,
        "status",
        "detail",
    ]


def slice_csv_columns(class_names: list[str] | tuple[str, ...]) -> list[str]:
    """The header of ``<test set>_slices.csv``, in order."""
    return ["patient", "slice_index", "slice_location", *map(prob_column, class_names)]


#: the patient CSV's columns evaluate reads (by name; others may be added without breaking it)
EVALUATED_COLUMNS: tuple[str, ...] = ("patient", "predicted_class", "status")
STATUS_OK, STATUS_ERROR, STATUS_SKIPPED = "ok", "error", "skipped"

# ---- metric keys (W&B, metrics.json, checkpoint monitoring) ----------------------------------------------
# val/...: the headline per epoch; rules/<rule>/<metric>: every vote rule; vote/...: tuned parameters;
# calibration/...: temperature and ECE/NLL; test/..., test_rules/...: the held-out test patients.
PATIENT_ACC = "val/patient/acc"
"""The configured rule's patient accuracy: what checkpointing, early stopping and sweepers monitor."""
PATIENT_F1 = "val/patient/f1_macro"
INFECTION_AUROC = "val/infection/auroc"
"""Stage 1 (``stage=infection``): infected vs clean slices, what its checkpointing monitors."""


def class_slug(name: str) -> str:
    """``COVID-19`` -> ``covid_19``, ``CAP`` -> ``cap``: a class name as a metric key part."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def rule_metric(rule: str, metric: str, split: str = "val") -> str:
    """Key of vote rule ``rule``'s patient ``metric`` (``acc``, ``f1_macro``, ``sensitivity_<slug>``, ...):
    ``rules/<rule>/<metric>`` for validation epochs, ``<split>_rules/<rule>/<metric>`` otherwise."""
    return f"{'' if split == 'val' else split + '_'}rules/{rule}/{metric}"


def vote_parameter(name: str) -> str:
    """Key of a tuned vote parameter: ``vote/<name>`` (``tau``, ``threshold_slice_threshold``, ...)."""
    return f"vote/{name}"


def calibration_metric(name: str) -> str:
    """Key of a calibration figure: ``calibration/<name>`` (``temperature``, ``slice_ece_before``, ...)."""
    return f"calibration/{name}"
