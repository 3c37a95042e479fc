"""Patient-level prediction on new DICOM folders (SPGC style: one CSV per test folder), with a trained
checkpoint (PyTorch) or its ONNX export (onnxruntime, ``python -m covidct.predict.export``).

Accepted inputs:

* one patient folder (DICOM files directly inside)         -> one test set named after the folder;
* a folder of patient folders (one test set)                -> one CSV;
* a folder of test sets (e.g. ``SPGC-Test1/T1-001/*.dcm``)  -> one CSV per test set.

Preprocessing (windows, image size), class names and the vote rule come from the checkpoint, or from the
export's sidecar. This module does not import torch: the checkpoint side lives in
:mod:`covidct.predict.torch_backend` (its names, e.g. ``load_checkpoint``, are also importable from here) and is
imported only for a checkpoint; an ``.onnx`` model is read in worker processes and run by onnxruntime.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf
from pydicom.misc import is_dicom

from covidct import NORMAL_CLASS
from covidct.data.dicom import IGNORED_NAMES, Skipped, entry_kind, one_line
from covidct.data.labels import INFECTION_CLASSES
from covidct.data.preprocess import SlicePreprocessor, parse_windows, read_preprocessed
from covidct.data.series import (
    AUTO,
    SERIES_COLUMNS,
    check_min_slices,
    check_series_rule,
    find_shared_series,
    other_axial,
    series_cells,
    series_line,
)
from covidct.errors import ConfigError, CovidCTError, DataError
from covidct.io import atomic_write_csv, atomic_write_text, create_exclusive
from covidct.patients.mil_features import slice_features
from covidct.patients.voting import (
    CENTER_SLICES,
    LEARNED_RULES,
    SLICE_THRESHOLD,
    TOP_K,
    WINDOW_SLICES,
    check_vote_settings,
    vote,
)
from covidct.predict.onnx_backend import (
    NumpyMIL,
    OnnxSliceModel,
    apply_temperature,
    load_onnx,
    looks_like_onnx,
    sidecar_path,
)
from covidct.predict.tta import mean_over_views, tta_views
from covidct.processes import worker_pool

if TYPE_CHECKING:
    from covidct.models.classifier import SliceClassifier
    from covidct.patients.aggregation import GatedAttentionMIL

#: the PyTorch side, importable from here as before (``from covidct.predict.predictor import load_checkpoint``)
TORCH_NAMES = (
    "load_checkpoint",
    "PatientFolders",
    "iterate_patients",
    "slice_probabilities",
    "slice_probabilities_and_embeddings",
    "pick_device",
)


def __getattr__(name: str) -> Any:
    """``covidct.predict.predictor.load_checkpoint`` and the other :data:`TORCH_NAMES`: imported on first use."""
    if name in TORCH_NAMES:
        from covidct.predict import torch_backend as torch_inference

        return getattr(torch_inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger(__name__)


@dataclass
class TestSet:
    """A named group of patient folders whose predictions go into one CSV; ``skipped``: the entries beside
    them that are not patient folders (stray files, archives, hidden folders), each with why."""

    name: str
    patients: list[Path]
    skipped: list[Skipped] = field(default_factory=list)


def _has_dicom(folder: Path) -> bool:
    """True if any file directly in ``folder`` is DICOM (checks the 'DICM' preamble, stops at the first)."""
    return any(entry_kind(e) == "file" and e.name not in IGNORED_NAMES and is_dicom(e.path) for e in os.scandir(folder))


def _entries(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """The visible subfolders of ``folder`` (sorted), and every other entry with why it is not a patient."""
    folders, others = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path, kind = Path(entry.path), entry_kind(entry)
        if entry.name in IGNORED_NAMES:
            continue  # OS droppings (.DS_Store, Thumbs.db, DICOMDIR): never a patient, never worth a row
        if entry.name.startswith("."):
            others.append(Skipped(path, "hidden entry, not read"))
        elif kind == "dir":
            folders.append(path)
        elif kind == "file":
            what = "a DICOM file" if is_dicom(path) else "a file"
            others.append(Skipped(path, f"{what} beside the patient folders, not a patient folder"))
        else:
            others.append(Skipped(path, "a broken link or special file, not a patient folder"))
    return folders, others


def find_test_sets(input_path: str | Path) -> list[TestSet]:
    """Test sets under ``input_path`` (see the module docstring). Errors before any work is done.

    ``input`` is one patient folder when it holds DICOM files and no subfolder with DICOM files; else its
    subfolders are patients (a test set) when any holds DICOM files; else its subfolders are test sets.
    Entries beside the patient folders (a stray ``.dcm``, a ``.zip``, a hidden folder) are listed in the
    test set's ``skipped``, never read as a patient and never dropped without a word."""
    root = Path(input_path)
    if not root.exists():
        raise DataError(f"input={root}: does not exist.")
    if not root.is_dir():
        raise DataError(f"input={root}: is a file; give a patient folder or a folder of patient folders.")
    children, stray = _entries(root)
    # every subfolder of a test set is a patient: one without a readable slice gets a row saying why
    if any(_has_dicom(c) for c in children):
        return [TestSet(root.name, children, stray)]
    if _has_dicom(root):
        return [TestSet(root.name, [root], [s for s in stray if not s.reason.startswith("a DICOM file")])]
    sets = []
    for child in children:
        patients, others = _entries(child)
        if any(_has_dicom(p) for p in patients):
            sets.append(TestSet(child.name, patients, others))
        else:
            log.warning("input: %s holds no patient folder with DICOM files; not a test set, skipped", child)
    for s in stray:
        log.warning("input: %s: %s; skipped", s.path, s.reason)
    if not sets:
        raise DataError(
            f"input={root}: no DICOM file in it, its subfolders or their subfolders. Expected a patient folder "
            "of DICOM slices, a folder of patient folders, or a folder of test sets."
        )
    return sets


@dataclass
class PredictorSettings:
    """What prediction takes from the checkpoint or the export's sidecar (and what the user overrode)."""

    windows: list
    image_size: int
    class_names: list[str]
    vote_rule: str
    tau: float
    k: int = TOP_K  # topk_mean
    center_slices: int = CENTER_SLICES  # weighted_center
    window_slices: int = WINDOW_SLICES  # weighted_center
    slice_threshold: float = SLICE_THRESHOLD  # threshold
    threshold_tau: float = 0.5  # threshold
    temperature: float = 1.0  # divides the logits (temperature scaling fitted in training)
    tta: bool = False  # predict.py tta=true: mean of each slice's and its horizontal flip's probabilities
    tta_transforms: list = field(default_factory=list)  # predict.py tta_transforms: more views (covidct.predict.tta)
    tta_views: list = field(default_factory=list)  # the built tta_transforms (not recorded)
    lung_crop: bool = False  # crop each series to its lungs, as the model was trained
    mil_head: GatedAttentionMIL | NumpyMIL | None = None  # vote_rule mil: the head fitted on the validation patients
    precision: str = "fp32"  # fp32 | bf16 (checkpoint, predict.py precision=bf16) | int8 (a quantized ONNX export)
    series: str = AUTO  # predict.py series: which axial series of a folder is the patient's (covidct.data.series)
    min_slices: int = 1  # predict.py min_slices: a series with fewer usable slices is not called (status error)
    overridden: dict[str, Any] = field(default_factory=dict)

    def vote_parameters(self) -> dict[str, Any]:
        """The keyword arguments of :func:`covidct.patients.voting.vote` besides the rule and tau."""
        return {
            "k": self.k,
            "center_slices": self.center_slices,
            "window_slices": self.window_slices,
            "slice_threshold": self.slice_threshold,
            "threshold_tau": self.threshold_tau,
        }


def settings_from_sidecar(sidecar: dict[str, Any], mil_head: NumpyMIL | None) -> PredictorSettings:
    """The :class:`PredictorSettings` an export's sidecar records (those of its source checkpoint)."""
    v = sidecar["vote"]
    return PredictorSettings(
        windows=sidecar["windows"],
        image_size=int(sidecar["image_size"]),
        class_names=list(sidecar["class_names"]),
        vote_rule=v["rule"],
        tau=float(v["tau"]),
        k=int(v["k"]),
        center_slices=int(v["center_slices"]),
        window_slices=int(v["window_slices"]),
        slice_threshold=float(v["slice_threshold"]),
        threshold_tau=float(v["threshold_tau"]),
        temperature=float(v["temperature"]),
        lung_crop=bool(sidecar.get("lung_crop", False)),
        mil_head=mil_head,
        precision=str(sidecar["precision"]),
    )


def read_patient(folder: Path, preprocessor: SlicePreprocessor) -> dict[str, Any]:
    """One patient folder read and preprocessed: ``images`` uint8 (N, C, S, S) in slice order (head first),
    ``locations``, ``ranks``, ``order_key``, ``order_note``, ``skipped`` (one line per unreadable slice),
    ``series`` (the series read, ``SeriesInfo.as_dict()``), ``n_series``, ``series_notes`` (one line per series
    when the folder held more than one), ``sop_digest``; or
    ``error`` (one line) when no slice could be used. Shared by the DataLoader (checkpoint) and the process
    pool (ONNX) readers."""
    try:
        series, _ = read_preprocessed(folder, preprocessor)  # a series not cropped is logged there
    except CovidCTError as exc:
        return {"folder": folder, "error": one_line(exc)}
    chosen = series.series.as_dict() if series.series else None
    others = [s.as_dict() for s in series.other_series]
    return {
        "folder": folder,
        "images": np.stack(series.slices),
        "locations": series.locations,
        "ranks": series.ranks,
        "order_key": series.order_key,
        "order_note": series.order_note,
        "skipped": [f"{s.path.name}: {s.reason}" for s in series.skipped],
        "series": chosen,
        "n_series": 1 + len(other_axial(others)),
        "series_notes": ([f"used {series_line(chosen)}"] if others and chosen else [])
        + [f"not used: {series_line(o)}" for o in others],
        "sop_digest": series.sop_digest,
    }


def _reader_process() -> None:
    """A reader process resizes with one OpenCV thread: the processes already run in parallel."""
    import cv2

    cv2.setNumThreads(1)


def read_patients(folders: list[Path], preprocessor: SlicePreprocessor, num_workers: int) -> Iterator[dict]:
    """:func:`read_patient` of each folder, in order, without torch: ``num_workers`` processes read ahead
    (at most two patients each) while the caller computes; 0 reads in this process."""
    if not num_workers:
        yield from (read_patient(f, preprocessor) for f in folders)
        return
    pool = worker_pool(num_workers, _reader_process)  # they die with this process, even after kill -9
    try:
        pending: deque[Future] = deque()
        todo = iter(folders)
        for folder in todo:
            pending.append(pool.submit(read_patient, folder, preprocessor))
            if len(pending) >= 2 * num_workers:
                break
        while pending:
            item = pending.popleft().result()
            folder = next(todo, None)
            if folder is not None:
                pending.append(pool.submit(read_patient, folder, preprocessor))
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def predict_patient(
    model: SliceClassifier | OnnxSliceModel, images: Any, settings: PredictorSettings, batch_size: int = 64
) -> tuple[np.ndarray, int]:
    """One patient's uint8 (N, C, S, S) slices (head first) -> (float32 (N, classes) calibrated slice
    probabilities, the patient's class index): what :func:`predict_test_set` writes for each patient."""
    raw, embeddings = patient_probabilities(model, images, settings, batch_size)
    probs = apply_temperature(raw, settings.temperature)
    if settings.vote_rule in LEARNED_RULES:  # mil: the checkpoint's head on what it reads of the slices
        head = settings.mil_head
        # fitted on probabilities at the checkpoint's temperature: it reads those even with calibration=false
        fitted = settings.overridden.get("temperature", {}).get("checkpoint", settings.temperature)
        head_probs = probs if fitted == settings.temperature else apply_temperature(raw, fitted)
        features = slice_features(head.slice_features, head_probs, embeddings)
        return probs, mil_decision(head, features)
    return probs, vote(probs, settings.vote_rule, settings.tau, **settings.vote_parameters())


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

    if cam_slices:  # pytorch-grad-cam imports matplotlib, scipy and scikit-learn: only when asked
        from covidct.report.cam import lung_channel, write_patient_cams
    pre = SlicePreprocessor(
        parse_windows(settings.windows), settings.image_size, settings.lung_crop, settings.series, settings.min_slices
    )
    names = settings.class_names
    patient_rows: list[list[object]] = [
        [s.path.name, "", *[""] * len(names), "", 0, "", "", "", "", "", "skipped", s.reason] for s in test_set.skipped
    ]
    slice_rows = []
    series_of: list[tuple[str, str, str]] = []  # (patient, SeriesInstanceUID, SOP digest) of the patients read
    if isinstance(model, OnnxSliceModel):
        items = read_patients(test_set.patients, pre, num_workers)
    else:
        from covidct.predict.torch_backend import iterate_patients

        items = iterate_patients(test_set.patients, pre, num_workers)
    for item in tqdm(items, total=len(test_set.patients), desc=test_set.name, disable=not progress, unit="patient"):
        pid = item["folder"].name
        if "error" not in item:
            series_of.append((pid, str((item["series"] or {}).get("uid", "")), item["sop_digest"]))
            shared = find_shared_series(series_of)
            if shared:
                series_of.pop()
                item = {"folder": item["folder"], "error": f"{shared} (not called twice)"}
        if "error" in item:
            log.error("%s: %s", pid, item["error"])
            patient_rows.append([pid, "", *[""] * len(names), "", 0, "", "", "", "", "", "error", item["error"]])
            continue
        probs, pred = predict_patient(model, item["images"], settings, batch_size)
        if record is not None:
            record[pid] = (probs, pred)
        infected = float(np.mean(probs.argmax(1) != NORMAL_CLASS))
        mean_probs = np.round(probs.mean(0, dtype=np.float64), 4).tolist()
        if cam_slices:
            write_patient_cams(
                model,
                item["images"],
                probs,
                pred,
                names,
                output_dir / f"{test_set.name}_cam" / pid,
                cam_slices,
                lung_channel(settings.windows),
                pid,
            )
        notes = [item["order_note"]] if item["order_note"] else []
        detail = "; ".join(notes + item["series_notes"] + item["skipped"])
        patient_rows.append(
            [
                pid,
                names[pred],
                *mean_probs,
                round(infected, 4),
                len(probs),
                len(item["skipped"]),
                item["order_key"],
                *series_cells(item["series"], item["n_series"]),
                "ok",
                detail,
            ]
        )
        slice_rows += [
            [pid, rank, loc, *np.round(p.astype(np.float64), 4).tolist()]
            for rank, loc, p in zip(item["ranks"], item["locations"], probs, strict=True)
        ]
    patients_csv = atomic_write_csv(
        output_dir / f"{test_set.name}.csv",
        [
            "patient",
            "predicted_class",
            *[f"prob_{n}" for n in names],
            "infected_fraction",
            "n_slices",
            "n_skipped",
            "order_key",
            *SERIES_COLUMNS,
            "status",
            "detail",
        ],
        patient_rows,
    )
    slices_csv = atomic_write_csv(
        output_dir / f"{test_set.name}_slices.csv",
        ["patient", "slice_index", "slice_location", *[f"prob_{n}" for n in names]],
        slice_rows,
    )
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
    checkpoint (PyTorch, ``precision`` fp32 or bf16) or an ``.onnx`` export (onnxruntime, no torch import)."""
    path = Path(cfg.ckpt_path)
    requested = str(cfg.get("precision", "fp32"))
    if looks_like_onnx(path):
        if cam_slices:
            raise ConfigError(
                f"cam=true: Grad-CAM needs the network's gradients, and ckpt_path={path} is an ONNX export; draw "
                "the overlays with its PyTorch checkpoint, or predict with cam=false"
            )
        if requested != "fp32":
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
    """Everything ``predict.py`` does: check input, load the model (a checkpoint, or an ONNX export when
    ``ckpt_path`` is an ``.onnx`` file), predict each test set, record the settings in prediction.json."""
    test_sets = find_test_sets(cfg.input)
    chosen = cfg.get("vote") or {}  # vote=<rule>: that file's rule and parameters override the checkpoint's
    rule, k, center_slices, window_slices = (chosen.get(key) for key in ("rule", "k", "center_slices", "window_slices"))
    check_vote_settings(rule, None, k, center_slices, window_slices, cfg.get("slice_threshold"))
    if cfg.tau is not None and not 0.0 <= float(cfg.tau) <= 1.0:
        raise ConfigError(f"tau must be in [0, 1] or null (the checkpoint's), got {cfg.tau}")
    cam_slices = check_cam(cfg)
    model, settings, model_record = load_model(cfg, cam_slices)
    if tuple(settings.class_names) == INFECTION_CLASSES:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a stage-1 infected-slice model (classes {list(INFECTION_CLASSES)}); it "
            "calls slices, not patients. Use it for pseudo-labels (python -m covidct.training.pseudo_label), and "
            "predict "
            "with the stage-2 checkpoint"
        )
    overrides = (
        ("vote_rule", rule),
        ("tau", cfg.tau),
        ("threshold_tau", cfg.tau),
        ("slice_threshold", cfg.get("slice_threshold")),
        ("temperature", None if cfg.get("calibration", True) else 1.0),
        ("k", k),
        ("center_slices", center_slices),
        ("window_slices", window_slices),
    )
    for attr, value in overrides:
        if value is not None:
            settings.overridden[attr] = {"checkpoint": getattr(settings, attr), "used": value}
            setattr(settings, attr, value)
    if settings.overridden:  # the overrides beside the checkpoint's other values (window_slices >= center_slices)
        check_vote_settings(settings.vote_rule, settings.tau, **settings.vote_parameters())
    if settings.vote_rule in LEARNED_RULES and settings.mil_head is None:
        raise ConfigError(
            f"vote rule {settings.vote_rule}: ckpt_path={cfg.ckpt_path} holds no fitted MIL head (a checkpoint from "
            "before the mil rule, or of a run without validation patients); choose another vote=<rule>"
        )
    settings.series = check_series_rule(cfg.get("series", AUTO), "series")
    settings.min_slices = check_min_slices(cfg.get("min_slices", 1), "min_slices")
    settings.tta = bool(cfg.get("tta", False))
    transforms = cfg.get("tta_transforms") or []
    settings.tta_transforms = (
        OmegaConf.to_container(transforms, resolve=True) if OmegaConf.is_config(transforms) else list(transforms)
    )
    settings.tta_views = tta_views(settings.tta_transforms)
    output_dir = Path(cfg.paths.output_dir)
    claim_output_dir(output_dir, test_sets, Path(cfg.input), bool(cfg.get("overwrite", False)))
    outputs = []
    for test_set in test_sets:
        outputs += predict_test_set(
            test_set, model, settings, output_dir, cfg.batch_size, cfg.num_workers, cfg.progress, cam_slices
        )
    record = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "model_file": str(Path(cfg.ckpt_path).resolve()),
        "input": str(Path(cfg.input).resolve()),
        "test_sets": {t.name: len(t.patients) for t in test_sets},
        "cam": cam_slices > 0,
        "cam_slices": cam_slices,
        **model_record,
        **{key: value for key, value in settings.__dict__.items() if key not in ("mil_head", "tta_views")},
        "mil_head": settings.mil_head is not None,
        "mil_features": None if settings.mil_head is None else settings.mil_head.slice_features,
    }
    outputs.append(atomic_write_text(output_dir / "prediction.json", json.dumps(record, indent=1)))
    return outputs


def claim_output_dir(output_dir: Path, test_sets: list[TestSet], input_path: Path, overwrite: bool) -> Path:
    """Make ``output_dir`` this run's before anything is written into it: its claim ``.predict-run.json`` is
    created exclusively, so of two runs into one folder (``paths.output_dir=`` given to both) only one goes
    on. A folder that holds another run's claim or results (prediction.json, a test set's CSVs) is refused
    (:class:`ConfigError`) unless ``overwrite``."""
    claim = output_dir / ".predict-run.json"
    results = [f"{t.name}{suffix}.csv" for t in test_sets for suffix in ("", "_slices")]
    found = [p.name for p in [claim, *(output_dir / name for name in ["prediction.json", *results])] if p.exists()]
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
