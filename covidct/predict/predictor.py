"""Patient-level prediction on new DICOM folders (SPGC style: one CSV per test folder), with a trained
checkpoint (PyTorch) or its ONNX export (onnxruntime, ``python -m covidct.predict.export``).

Accepted inputs (found by :mod:`covidct.predict.test_sets`):

* one patient folder (DICOM files directly inside)         -> one test set named after the folder;
* a folder of patient folders (one test set)                -> one CSV;
* a folder of test sets (e.g. ``SPGC-Test1/T1-001/*.dcm``)  -> one CSV per test set.

Preprocessing (windows, image size), class names and the vote rule come from the checkpoint, or from the
export's sidecar (:mod:`covidct.predict.settings`). This module does not import torch: the checkpoint side
lives in :mod:`covidct.predict.torch_backend` and is imported only for a checkpoint; an ``.onnx`` model is read
in worker processes and run by onnxruntime.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidct.contracts import (
    CHECKPOINTS_HINT,
    PREDICT_CLAIM,
    PREDICTION_RECORD,
    SERIES_COLUMNS,
    mean_prob_column,
    patient_csv_columns,
    patient_csv_name,
    score_column,
    slice_csv_columns,
    slice_csv_name,
)
from covidct.data.labels import INFECTION_CLASSES
from covidct.data.preprocess import SlicePreprocessor, parse_windows
from covidct.data.series import (
    add_series,
    series_cells,
)
from covidct.errors import ConfigError
from covidct.io import atomic_write_csv, atomic_write_text, create_exclusive, csv_text, require_file
from covidct.patients.explanations import explain_call
from covidct.patients.mil_features import slice_features
from covidct.patients.parameters import VoteParameters
from covidct.patients.rules import LEARNED_RULES, vote_with
from covidct.patients.voting import infected_fraction
from covidct.predict.onnx_backend import (
    NumpyMIL,
    OnnxSliceModel,
    apply_temperature,
    load_onnx,
    looks_like_onnx,
    sidecar_path,
)
from covidct.predict.overrides import apply_reading_options, apply_vote_overrides, check_vote_overrides
from covidct.predict.settings import PredictorSettings, settings_from_sidecar
from covidct.predict.test_sets import InputScan, TestSet, read_patients, scan_input
from covidct.predict.tta import mean_over_views
from covidct.text_table import format_table

if TYPE_CHECKING:
    from covidct.models.classifier import SliceClassifier
    from covidct.patients.aggregation import GatedAttentionMIL

log = logging.getLogger(__name__)


def patient_probabilities(
    model: SliceClassifier | OnnxSliceModel, images: Any, settings: PredictorSettings, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """One patient's uint8 (N, C, S, S) slices -> float32 (N, classes) probabilities at temperature 1, and
    float32 (N, D) embeddings when the vote rule's head reads them (``mil``, ``slice_features`` embeddings),
    else None."""
    embeddings = settings.vote_rule in LEARNED_RULES and settings.mil_head.slice_features == "embeddings"

    def run(views_of: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if isinstance(model, OnnxSliceModel):
            return model.run(views_of, batch_size, settings.tta, embeddings)
        from covidct.predict.torch_backend import slice_probabilities, slice_probabilities_and_embeddings

        if embeddings:
            return slice_probabilities_and_embeddings(model, views_of, batch_size, settings.tta, settings.precision)
        return slice_probabilities(model, views_of, batch_size, settings.tta, settings.precision), None

    return mean_over_views(run, images, settings.tta_views)  # tta_transforms: each one more view


def mil_decision(head: GatedAttentionMIL | NumpyMIL, features: np.ndarray) -> int:
    """The MIL head's class for what it reads of one patient's N slices, ``features`` (N, F)
    (:func:`covidct.patients.mil_features.slice_features`)."""
    if isinstance(head, NumpyMIL):
        return int(head.predict([features])[0])
    from covidct.patients.aggregation import predict as mil_predict

    return int(mil_predict(head, [features])[0])


def mil_probabilities(head: GatedAttentionMIL | NumpyMIL, features: np.ndarray) -> np.ndarray:
    """(classes,) float64: the MIL head's class probabilities for one patient's ``features`` (N, F), the
    scores its call (:func:`mil_decision`) is the argmax of."""
    if isinstance(head, NumpyMIL):
        return head.probabilities(features)
    from covidct.patients.aggregation import predict_proba

    return predict_proba(head, [features])[0].astype(np.float64)


def call_patient(
    model: SliceClassifier | OnnxSliceModel, images: Any, settings: PredictorSettings, batch_size: int = 64
) -> tuple[np.ndarray, int, np.ndarray | None]:
    """One patient's uint8 (N, C, S, S) slices (head first) -> (float32 (N, classes) calibrated slice
    probabilities, the patient's class index, the MIL head's float64 (classes,) probabilities with the ``mil``
    rule, else None): what :func:`predict_test_set` writes for each patient."""
    raw, embeddings = patient_probabilities(model, images, settings, batch_size)
    probs = apply_temperature(raw, settings.temperature)
    if settings.vote_rule in LEARNED_RULES:  # mil: the checkpoint's head on what it reads of the slices
        head = settings.mil_head
        # fitted on probabilities at the checkpoint's temperature: it reads those even with calibration=false
        fitted = settings.overridden.get("temperature", {}).get("checkpoint", settings.temperature)
        head_probs = probs if fitted == settings.temperature else apply_temperature(raw, fitted)
        features = slice_features(head.slice_features, head_probs, embeddings)
        return probs, mil_decision(head, features), mil_probabilities(head, features)
    return probs, vote_with(settings.vote, probs), None


def predict_patient(
    model: SliceClassifier | OnnxSliceModel, images: Any, settings: PredictorSettings, batch_size: int = 64
) -> tuple[np.ndarray, int]:
    """(float32 (N, classes) calibrated slice probabilities, class index) of :func:`call_patient`."""
    probs, pred, _ = call_patient(model, images, settings, batch_size)
    return probs, pred


def predict_test_set(
    test_set: TestSet,
    model: SliceClassifier | OnnxSliceModel,
    settings: PredictorSettings,
    output_dir: Path,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
    cam_slices: int = 0,
    record: dict[str, tuple[np.ndarray, int]] | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.csv`` (one row per patient) and ``<name>_slices.csv`` into ``output_dir``; with
    ``cam_slices`` > 0 also Grad-CAM PNGs of each patient's most decisive slices in ``<name>_cam/<patient>/``
    (checkpoints only). ``model``: a checkpoint's :class:`SliceClassifier` or an :class:`OnnxSliceModel`.
    ``record``, when given, receives each predicted patient's (float32 (N, classes) slice probabilities, class
    index), unrounded (the benchmark compares models with it)."""
    from tqdm import tqdm

    cams = cam_writer(model, settings, output_dir / f"{test_set.name}_cam", cam_slices) if cam_slices else None
    names, vote = settings.class_names, settings.vote
    patient_rows = [uncalled_row(s.path.name, "skipped", s.reason) for s in test_set.skipped]
    slice_rows: list[list[object]] = []
    items = once_per_series(read_test_set(test_set, model, settings, num_workers))
    for item in tqdm(items, total=len(test_set.patients), desc=test_set.name, disable=not progress, unit="patient"):
        pid = item["folder"].name
        if "error" in item:
            log.error("%s: %s", pid, item["error"])
            patient_rows.append(uncalled_row(pid, "error", item["error"]))
            continue
        probs, pred, head_probs = call_patient(model, item["images"], settings, batch_size)
        if record is not None:
            record[pid] = (probs, pred)
        if cams:
            cams(item["images"], probs, pred, pid)
        patient_rows.append(patient_row(item, probs, pred, names, vote, head_probs))
        slice_rows += patient_slice_rows(item, probs)
    return write_test_set_csvs(output_dir, test_set.name, names, patient_rows, slice_rows)


def read_test_set(
    test_set: TestSet, model: SliceClassifier | OnnxSliceModel, settings: PredictorSettings, num_workers: int
) -> Iterator[dict]:
    """The test set's patients read and preprocessed as the model was trained (:func:`read_patient` items, in
    order): by a process pool for an ONNX model (no torch), by a DataLoader for a checkpoint."""
    pre = SlicePreprocessor(
        parse_windows(settings.windows), settings.image_size, settings.lung_crop, settings.series, settings.min_slices
    )
    if isinstance(model, OnnxSliceModel):
        return read_patients(test_set.patients, pre, num_workers)
    from covidct.predict.torch_backend import iterate_patients

    return iterate_patients(test_set.patients, pre, num_workers)


def once_per_series(items: Iterator[dict]) -> Iterator[dict]:
    """``items`` as read, except a patient whose series (SeriesInstanceUID or SOP digest) an earlier patient of
    the test set already had: that one becomes an ``error`` item (a series is not called twice)."""
    seen: dict[tuple[str, str], str] = {}  # (SeriesInstanceUID or SOP digest) -> the patient read with it
    for item in items:
        if "error" not in item:
            uid = str((item["series"] or {}).get("uid", ""))
            if shared := add_series(seen, item["folder"].name, uid, item["sop_digest"]):
                item = {"folder": item["folder"], "error": f"{shared} (not called twice)"}
        yield item


def cam_writer(
    model: SliceClassifier, settings: PredictorSettings, cam_dir: Path, cam_slices: int
) -> Callable[[Any, np.ndarray, int, str], None]:
    """A function (images, probs, pred, patient) that writes Grad-CAM PNGs of the patient's ``cam_slices`` most
    decisive slices into ``cam_dir/<patient>/``; pytorch-grad-cam (matplotlib, scipy, scikit-learn) is imported
    here, only when asked."""
    from covidct.report.cam import lung_channel, write_patient_cams

    note = cam_input_note(settings.image_size)

    def write(images: Any, probs: np.ndarray, pred: int, pid: str) -> None:
        write_patient_cams(
            model,
            images,
            probs,
            pred,
            settings.class_names,
            cam_dir / pid,
            cam_slices,
            lung_channel(settings.windows),
            f"{pid} ({note})",  # the caption's patient: "T1-001 (64 px input, upsampled) slice 3: Grad-CAM ..."
        )

    return write


#: the side, in px, that covidct.report.cam.overlay draws each panel at (a smaller input is upsampled to it)
CAM_PANEL_PX = 256


def cam_input_note(image_size: int) -> str:
    """What a Grad-CAM caption says of the slices the model saw: ``64 px input, upsampled`` (drawn at
    :data:`CAM_PANEL_PX` px), or ``512 px input``."""
    return f"{image_size} px input" + (", upsampled" if image_size < CAM_PANEL_PX else "")


def uncalled_row(patient: str, status: str, reason: str) -> dict[str, object]:
    """The ``<name>.csv`` row of a patient not called (the other cells empty): ``status`` skipped (not a patient
    folder) or error (no usable series), ``reason`` the detail."""
    return {"patient": patient, "n_slices": 0, "status": status, "detail": reason}


def _cell(value: float) -> float | str:
    """A CSV number to 4 decimals (as training's patients.csv); NaN as an empty cell."""
    return "" if np.isnan(value) else round(float(value), 4)


def patient_row(
    item: dict[str, Any],
    probs: np.ndarray,
    pred: int,
    names: list[str],
    vote: VoteParameters,
    head_probs: np.ndarray | None = None,
) -> dict[str, object]:
    """The ``<name>.csv`` row of a called patient: its class and why (the rule's decision quantity, threshold,
    sentence and per-class scores under ``vote``, :func:`~covidct.patients.explanations.explain_call`; a
    learned rule's scores are its head's ``head_probs`` (classes,)), the mean of its float32 (N, classes) slice
    probabilities and its infected-slice fraction (4 decimals), slice counts, order and series cells."""
    call = explain_call(probs, vote, pred, head_probs)
    mean_probs = probs.mean(0, dtype=np.float64)
    notes = [item["order_note"]] if item["order_note"] else []
    series = dict(zip(SERIES_COLUMNS, series_cells(item["series"], item["n_series"]), strict=True))
    return {
        "patient": item["folder"].name,
        "predicted_class": names[pred],
        "decision": call.why,
        "decision_quantity": _cell(call.quantity),
        "decision_threshold": _cell(call.threshold),
        **{score_column(c): _cell(v) for c, v in zip(names, call.scores, strict=True)},
        **{mean_prob_column(c): _cell(v) for c, v in zip(names, mean_probs, strict=True)},
        "infected_fraction": round(infected_fraction(probs), 4),
        "n_slices": len(probs),
        "n_skipped": len(item["skipped"]),
        "order_key": item["order_key"],
        **series,
        "status": "ok",
        "detail": "; ".join(notes + item["series_notes"] + item["skipped"]),
    }


def patient_slice_rows(item: dict[str, Any], probs: np.ndarray) -> list[list[object]]:
    """The ``<name>_slices.csv`` rows of a called patient: one per slice (rank, location in mm, probabilities to
    4 decimals), head first."""
    pid = item["folder"].name
    return [
        [pid, rank, loc, *np.round(p.astype(np.float64), 4).tolist()]
        for rank, loc, p in zip(item["ranks"], item["locations"], probs, strict=True)
    ]


def write_test_set_csvs(
    output_dir: Path, name: str, names: list[str], patient_rows: list[dict[str, object]], slice_rows: list
) -> tuple[Path, Path]:
    """Write ``<name>.csv`` (``patient_rows``: column -> cell, a missing column empty) and ``<name>_slices.csv``
    (atomically) into ``output_dir``; their paths."""
    header = patient_csv_columns(names)
    for row in patient_rows:
        if unknown := set(row) - set(header):
            raise ValueError(f"patient row {row.get('patient')!r}: {sorted(unknown)} are not columns of {header}")
    cells = [[row.get(column, "") for column in header] for row in patient_rows]
    patients_csv = atomic_write_csv(output_dir / patient_csv_name(name), header, cells)
    slices_csv = atomic_write_csv(output_dir / slice_csv_name(name), slice_csv_columns(names), slice_rows)
    return patients_csv, slices_csv


def check_cam(cfg) -> int:
    """Slices per patient to draw Grad-CAM overlays of: ``cam_slices`` when ``cam=true``, else 0."""
    if not cfg.get("cam", False):
        return 0
    n = cfg.get("cam_slices", 4)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"cam_slices must be an integer >= 1 (with cam=true), got {n!r}")
    return n


def load_model(cfg, cam_slices: int) -> tuple[Any, PredictorSettings, dict[str, Any]]:
    """The model ``cfg.ckpt_path`` names, its settings, and what ``prediction.json`` records about it: a
    checkpoint (PyTorch, ``precision`` fp32, bf16 or auto) or an ``.onnx`` export (onnxruntime, no torch import; it
    runs at the precision it was exported in). ``prediction.json`` gets the precision used (``precision``) and, where
    it differs, the one asked for (``precision_requested``)."""
    path = Path(cfg.ckpt_path)
    requested = str(cfg.get("precision", "fp32"))
    if looks_like_onnx(path):
        if cam_slices:
            raise ConfigError(
                f"cam=true: Grad-CAM needs the network's gradients, and ckpt_path={path} is an ONNX export; draw "
                "the overlays with its PyTorch checkpoint, or predict with cam=false"
            )
        if requested not in ("fp32", "auto"):
            raise ConfigError(
                f"precision={requested}: ckpt_path={path} is an ONNX export, which runs at the precision it was "
                "exported in (its sidecar says which); precision applies to PyTorch checkpoints. For int8, export "
                "with python -m covidct.predict.export ... quantize=int8 calibration_input=<DICOM folder>"
            )
        export = load_onnx(path, str(cfg.device))
        settings = settings_from_sidecar(export.sidecar, export.mil_head)
        side = export.sidecar
        record = {
            "model_format": "onnx",
            "device": ",".join(export.model.providers),
            "onnx": {
                "sidecar": str(sidecar_path(path).resolve()),
                "model_sha256": side["model_sha256"],
                "opset": side.get("opset"),
                "source_checkpoint": side.get("source_checkpoint"),
                "source_checkpoint_sha256": side.get("source_checkpoint_sha256"),
                "providers": export.model.providers,
            },
        }
        return export.model, settings, record
    from covidct.predict.torch_backend import load_checkpoint, pick_device, resolve_precision

    device = pick_device(cfg.device)
    precision = resolve_precision(requested, device)
    model, settings = load_checkpoint(path, device)
    settings.precision = precision
    record = {"model_format": "checkpoint", "device": str(device)}
    if precision != requested:
        record["precision_requested"] = requested
    return model, settings, record


def run_prediction(cfg) -> list[Path]:
    """Everything ``predict.py`` does: check the model file and the input, load the model (a checkpoint, or an
    ONNX export when ``ckpt_path`` is an ``.onnx`` file), predict each test set, record the settings in
    prediction.json, and log the patient -> call table."""
    # the model file first: a missing one is the only message, before the input is searched
    require_file(Path(cfg.ckpt_path), "ckpt_path", f"{CHECKPOINTS_HINT}; exports end in .onnx")
    scan = scan_input(cfg.input)
    test_sets = scan.test_sets
    chosen = check_vote_overrides(cfg)
    cam_slices = check_cam(cfg)
    model, settings, model_record = load_model(cfg, cam_slices)
    if tuple(settings.class_names) == INFECTION_CLASSES:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a stage-1 infected-slice model (classes {list(INFECTION_CLASSES)}); it "
            "calls slices, not patients. Use it for pseudo-labels (python -m covidct.training.pseudo_label), and "
            "predict "
            "with the stage-2 checkpoint"
        )
    log.info("%s", scan.summary())  # after the model check: a missing or wrong model is said alone
    apply_vote_overrides(cfg, settings, chosen)
    apply_reading_options(cfg, settings)
    output_dir = Path(cfg.paths.output_dir)
    claim_output_dir(output_dir, test_sets, Path(cfg.input), bool(cfg.get("overwrite", False)))
    outputs = []
    for test_set in test_sets:
        outputs += predict_test_set(
            test_set, model, settings, output_dir, cfg.batch_size, cfg.num_workers, cfg.progress, cam_slices
        )
    record = prediction_record(cfg, scan, cam_slices, model_record, settings)
    outputs.append(atomic_write_text(output_dir / PREDICTION_RECORD, json.dumps(record, indent=1)))
    log.info(
        "Patients and their calls (why: the decision column of each test set's CSV, problems: its detail):\n%s",
        calls_table(output_dir, test_sets),
    )
    return outputs


def calls_table(output_dir: Path, test_sets: list[TestSet]) -> str:
    """The table predict.py prints at the end: test set, patient, call, status, one row per patient, read
    back from the patient CSVs just written (``output_dir``)."""
    rows = []
    for test_set in test_sets:
        with (output_dir / patient_csv_name(test_set.name)).open(newline="") as f:
            for row in csv.DictReader(f):
                call = csv_text(row["predicted_class"]) or "-"
                rows.append([test_set.name, csv_text(row["patient"]), call, row["status"]])
    return format_table(["test set", "patient", "call", "status"], rows)


def prediction_record(
    cfg, scan: InputScan, cam_slices: int, model_record: dict[str, Any], settings: PredictorSettings
) -> dict[str, Any]:
    """What ``prediction.json`` holds: the model file, input, test sets (patients each), the entries beside the
    test sets that were not read (``input_skipped``: path, reason), Grad-CAM, the model record of
    :func:`load_model` and every setting used (with what was overridden)."""
    return {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "model_file": str(Path(cfg.ckpt_path).resolve()),
        "input": str(Path(cfg.input).resolve()),
        "test_sets": {t.name: len(t.patients) for t in scan.test_sets},
        "input_skipped": [{"path": str(s.path), "reason": s.reason} for s in scan.skipped],
        "cam": cam_slices > 0,
        "cam_slices": cam_slices,
        **model_record,
        **{key: value for key, value in settings.__dict__.items() if key not in ("mil_head", "tta_views")},
        "mil_head": settings.mil_head is not None,
        "mil_features": None if settings.mil_head is None else settings.mil_head.slice_features,
    }


def claim_output_dir(output_dir: Path, test_sets: list[TestSet], input_path: Path, overwrite: bool) -> Path:
    """Make ``output_dir`` this run's before anything is written into it: its claim ``.predict-run.json`` is
    created exclusively, so of two runs into one folder (``paths.output_dir=`` given to both) only one goes
    on. A folder that holds another run's claim or results (prediction.json, a test set's CSVs) is refused
    (:class:`ConfigError`) unless ``overwrite``."""
    claim = output_dir / PREDICT_CLAIM
    results = [name(t.name) for t in test_sets for name in (patient_csv_name, slice_csv_name)]
    found = [p.name for p in [claim, *(output_dir / name for name in [PREDICTION_RECORD, *results])] if p.exists()]
    owner = json.dumps({"pid": os.getpid(), "input": str(input_path.resolve())})
    try:
        if found and not overwrite:
            raise FileExistsError(claim)
        return create_exclusive(claim, owner, replace=overwrite)
    except FileExistsError:
        raise ConfigError(
            f"paths.output_dir={output_dir}: holds another predict.py run's results "
            f"({', '.join(found or [claim.name])}); predict into another folder, or set overwrite=true to replace them"
        ) from None
