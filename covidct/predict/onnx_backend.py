"""Predict with an exported ONNX model (``python -m covidct.predict.export``) through onnxruntime: no PyTorch.

An export is two or three files side by side:

* ``<name>.onnx``: the slice model. Input ``images``: uint8 (batch, C, S, S) window channels, as the
  checkpoint's model takes them (the ImageNet normalisation is inside the graph); outputs
  ``probabilities``: float32 (batch, classes) softmax probabilities at temperature 1, and ``embeddings``:
  float32 (batch, D) the penultimate features (:meth:`covidct.models.classifier.SliceClassifier.features`).
* ``<name>.onnx.json``: the sidecar (:func:`sidecar_path`): windows, image size, lung crop, class names,
  the vote rule and its tuned parameters (tau, thresholds, temperature), the SHA-256 of the model file
  and of its source checkpoint. The model file holds a copy of it (all but the model's SHA-256) in its
  ONNX metadata (:data:`SIDECAR_METADATA`): an edited sidecar, or one beside another model, is refused.
* ``<name>.onnx.mil.npz``: only when the checkpoint holds a fitted MIL head (vote rule ``mil``): its
  weights as plain arrays, run in numpy by :class:`NumpyMIL`.

This module imports numpy and onnxruntime only; :func:`load_onnx` checks that the three files belong
together before anything is predicted, and names the file at fault when they do not.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidct.errors import ConfigError, DataError
from covidct.patients.parameters import VOTE_KEYS
from covidct.patients.rules import check_vote_settings

log = logging.getLogger(__name__)

#: version of the sidecar's layout (``covidct_onnx`` key); readers refuse other versions
SIDECAR_VERSION = 1
INPUT_NAME = "images"
PROBABILITIES = "probabilities"
EMBEDDINGS = "embeddings"
#: the ONNX ``metadata_props`` key of the model's copy of its sidecar (:func:`bound_content`)
SIDECAR_METADATA = "covidct_sidecar"
#: the sidecar key the model's copy leaves out: the SHA-256 of the model file that holds the copy
MODEL_SHA256 = "model_sha256"
#: the first byte of an ONNX file: field 1 (ir_version) of the ModelProto, a varint
ONNX_FIRST_BYTE = 0x08
#: smallest probability taken as a log (as covidct.patients.calibration.EPS)
EPS = 1e-12
EXPORT_HINT = (
    "export the checkpoint again with python -m covidct.predict.export ckpt_path=<checkpoint>, "
    "which writes them together"
)
SIDECAR_KEYS = (
    "covidct_onnx",
    "model_sha256",
    "precision",
    "windows",
    "image_size",
    "class_names",
    "vote",
    "mil",
)


def sidecar_path(model_path: str | Path) -> Path:
    """``<model>.onnx`` -> ``<model>.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def mil_path(model_path: str | Path) -> Path:
    """``<model>.onnx`` -> ``<model>.onnx.mil.npz`` (the MIL head's weights, when the checkpoint has one)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".mil.npz")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 16 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def looks_like_onnx(path: str | Path) -> bool:
    """True for a ``.onnx`` file name, or a file whose first byte is an ONNX ModelProto's (a renamed export)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with path.open("rb") as f:
            return f.read(1) == bytes([ONNX_FIRST_BYTE])
    except OSError:
        return False


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) probabilities -> float32 (N, C) softmax(log(probs) / ``temperature``): numpy twin of
    :func:`covidct.patients.calibration.apply_temperature` (same float64 arithmetic, same clamp)."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float32)
    z = np.log(np.maximum(np.asarray(probs, dtype=np.float64), EPS)) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


# ---- the MIL head in numpy ----------------------------------------------------------------------
#: the parameter names of :class:`covidct.patients.aggregation.GatedAttentionMIL`'s state_dict
MIL_ARRAYS = (
    "shift",
    "scale",
    "project.1.weight",
    "project.1.bias",
    "attention_v.weight",
    "attention_v.bias",
    "attention_u.weight",
    "attention_u.bias",
    "attention_w.weight",
    "attention_w.bias",
    "classifier.weight",
    "classifier.bias",
)


@dataclass
class NumpyMIL:
    """:class:`covidct.patients.aggregation.GatedAttentionMIL` in eval mode, in numpy (float64): bag (n, D) -> C logits.

    ``weights`` holds the state_dict's arrays (:data:`MIL_ARRAYS`); ``standardize`` is the head's mode,
    ``slice_features`` what it reads of each slice (:mod:`covidct.patients.mil_features`).
    """

    weights: dict[str, np.ndarray]
    standardize: str
    slice_features: str = "embeddings"

    @classmethod
    def from_npz(cls, data: bytes, init: dict[str, Any], where: str) -> NumpyMIL:
        """The head from the bytes of a ``.mil.npz`` written by the export (no pickle allowed) and its
        constructor arguments ``init`` (the sidecar's)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                weights = {name: np.asarray(npz[name], dtype=np.float64) for name in MIL_ARRAYS}
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(
                f"{where}: not a MIL head written by python -m covidct.predict.export ({exc}); {EXPORT_HINT}."
            ) from None
        # heads exported before slice_features read embeddings
        return cls(weights, init["standardize"], init.get("slice_features", "embeddings"))

    def features(self, bag: np.ndarray) -> np.ndarray:
        """(n, D) embeddings -> (n, F) standardised features. torch's median of an even count is the lower
        of the two middle values, so it is taken here the same way."""
        bag = np.asarray(bag, dtype=np.float64)
        if self.standardize != "none":
            median = np.sort(bag, axis=0)[(len(bag) - 1) // 2]
            centred = bag - median
            bag = centred if self.standardize == "center" else np.concatenate([centred, bag], axis=1)
        return (bag - self.weights["shift"]) / self.weights["scale"]

    def logits(self, bag: np.ndarray) -> np.ndarray:
        """One bag (n, D) -> (C,) float64 logits."""
        w = self.weights
        h = np.maximum(self.features(bag) @ w["project.1.weight"].T + w["project.1.bias"], 0.0)
        v = np.tanh(h @ w["attention_v.weight"].T + w["attention_v.bias"])
        u = 1.0 / (1.0 + np.exp(-(h @ w["attention_u.weight"].T + w["attention_u.bias"])))
        score = ((v * u) @ w["attention_w.weight"].T + w["attention_w.bias"])[:, 0]
        attention = np.exp(score - score.max())
        attention /= attention.sum()
        return (attention[:, None] * h).sum(axis=0) @ w["classifier.weight"].T + w["classifier.bias"]

    def probabilities(self, bag: np.ndarray) -> np.ndarray:
        """One bag (n, D) -> (C,) float64 softmax class probabilities (as
        :func:`covidct.patients.aggregation.predict_proba`)."""
        logits = self.logits(bag)
        e = np.exp(logits - logits.max())
        return e / e.sum()

    def predict(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """(P,) int64 predicted class of each bag (as :func:`covidct.patients.aggregation.predict`)."""
        return np.array([int(np.argmax(self.logits(b))) for b in bags], dtype=np.int64)


# ---- the slice model ----------------------------------------------------------------------------
def providers_for(device: str, where: str) -> list[str]:
    """onnxruntime execution providers for ``device`` (auto | cpu | cuda): CUDA first when asked for or
    available (auto), the CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={device!r}: use auto, cpu or cuda")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ConfigError(
            f"device=cuda but this onnxruntime has no CUDA provider (it has {available}) for {where}: install "
            "onnxruntime-gpu, or use device=cpu or device=auto"
        )
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def open_session(path: Path, providers: list[str], where: str) -> Any:
    """An onnxruntime InferenceSession of ``path``; a file onnxruntime cannot load is a :class:`DataError`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers on stderr
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for foreign and broken files
        raise DataError(f"{where}: not a readable ONNX model ({_first_line(exc)}); {EXPORT_HINT}.") from None


class OnnxSliceModel:
    """An exported slice model run by onnxruntime: uint8 (N, C, S, S) -> probabilities (and embeddings).

    Built by :func:`load_onnx`, which checks it against its sidecar.
    """

    def __init__(self, path: Path, session: Any, sidecar: dict[str, Any]) -> None:
        self.path, self.session, self.sidecar = path, session, sidecar

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(
        self, images: np.ndarray, batch_size: int, tta: bool = False, embeddings: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (N, C, S, S) -> (float32 (N, classes) softmax probabilities, float32 (N, D) embeddings or
        None), in batches of ``batch_size``; ``tta``: the mean over each slice and its horizontal flip."""
        names = [PROBABILITIES, EMBEDDINGS] if embeddings else [PROBABILITIES]
        images = np.asarray(images)
        probs, feats = [], []
        for i in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[i : i + batch_size])
            passes = [batch, np.ascontiguousarray(batch[..., ::-1])] if tta else [batch]
            outs = [self.session.run(names, {INPUT_NAME: b}) for b in passes]
            probs.append(sum(o[0].astype(np.float32) for o in outs) / len(outs))
            if embeddings:
                feats.append(sum(o[1].astype(np.float32) for o in outs) / len(outs))
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.sidecar["class_names"])), np.float32)
        return p.astype(np.float32), (np.concatenate(feats).astype(np.float32) if embeddings else None)

    def probabilities(self, images: np.ndarray, batch_size: int = 64, tta: bool = False) -> np.ndarray:
        """uint8 (N, C, S, S) -> float32 (N, classes) softmax probabilities."""
        return self.run(images, batch_size, tta)[0]


def read_sidecar(model_path: Path, where: str) -> dict[str, Any]:
    """The sidecar of ``model_path``, checked for the keys predict needs."""
    side = sidecar_path(model_path)
    if not side.is_file():
        raise DataError(
            f"{where}: no sidecar {side.name} beside it (windows, image size, class names, vote rule); the model "
            f"cannot be used without it: {EXPORT_HINT}."
        )
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"sidecar {side}: not readable JSON ({_first_line(exc)}); {EXPORT_HINT}.") from None
    if not isinstance(data, dict) or data.get("covidct_onnx") != SIDECAR_VERSION:
        raise DataError(
            f"sidecar {side}: not a covidct export sidecar (key covidct_onnx: {SIDECAR_VERSION}); {EXPORT_HINT}."
        )
    missing = [key for key in SIDECAR_KEYS if key not in data]
    if missing:
        raise DataError(f"sidecar {side}: lacks {missing}; {EXPORT_HINT}.")
    return data


def _dims(value: Any) -> list[Any]:
    return [d if isinstance(d, int) else "batch" for d in value]


def check_model_against_sidecar(session: Any, sidecar: dict[str, Any], model_path: Path, where: str) -> None:
    """Refuse a model whose input or outputs are not what its sidecar (and predict) expect."""
    side = sidecar_path(model_path).name
    inputs = session.get_inputs()
    want = [len(sidecar["windows"]), int(sidecar["image_size"]), int(sidecar["image_size"])]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise DataError(
            f"{where}: the model's inputs are {[i.name for i in inputs]}, not one {INPUT_NAME!r} input of uint8 "
            f"slices: not a covidct export; {EXPORT_HINT}."
        )
    shape, dtype = list(inputs[0].shape), inputs[0].type
    if dtype != "tensor(uint8)" or len(shape) != 4 or list(shape[1:]) != want or isinstance(shape[0], int):
        raise DataError(
            f"{where}: the model takes {dtype} {_dims(shape)}, but {side} (windows {sidecar['windows']}, image size "
            f"{sidecar['image_size']}) needs tensor(uint8) ['batch', {want[0]}, {want[1]}, {want[2]}] with a dynamic "
            f"batch axis: the model and the sidecar do not belong together; {EXPORT_HINT}."
        )
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    classes = len(sidecar["class_names"])
    probs = outputs.get(PROBABILITIES)
    if probs is None or EMBEDDINGS not in outputs:
        raise DataError(
            f"{where}: the model's outputs are {sorted(outputs)}, not {PROBABILITIES!r} and {EMBEDDINGS!r}: not a "
            f"covidct export; {EXPORT_HINT}."
        )
    if len(probs) != 2 or probs[1] != classes:
        raise DataError(
            f"{where}: the model gives {_dims(probs)} class probabilities, but {side} names {classes} classes "
            f"{sidecar['class_names']}: the model and the sidecar do not belong together; {EXPORT_HINT}."
        )


def bound_content(sidecar: dict[str, Any]) -> str:
    """What the model's metadata holds of ``sidecar`` (plain JSON types): canonical JSON of every key but
    :data:`MODEL_SHA256`."""
    return json.dumps({k: v for k, v in sidecar.items() if k != MODEL_SHA256}, sort_keys=True, separators=(",", ":"))


def changed_keys(exported: dict[str, Any], sidecar: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys (``vote.tau`` for nested ones) whose values differ between two sidecars."""
    keys = []
    for key in sorted((set(exported) | set(sidecar)) - {MODEL_SHA256}):
        a, b = exported.get(key), sidecar.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
            continue
        same = key in exported and key in sidecar and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        if not same:
            keys.append(prefix + key)
    return keys


def check_binding(session: Any, sidecar: dict[str, Any], model_path: Path) -> None:
    """Refuse a sidecar that is not the copy the export wrote into the model's metadata: edited, from
    another export, or beside a model exported before the two were bound."""
    side = sidecar_path(model_path)
    copy = session.get_modelmeta().custom_metadata_map.get(SIDECAR_METADATA)
    if copy is None:
        raise DataError(
            f"{model_path}: holds no copy of its sidecar {side.name} (exported before covidct bound the two), so "
            f"an edited sidecar could not be told from the exported one; {EXPORT_HINT}."
        )
    try:
        exported = json.loads(copy)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{model_path}: its copy of the sidecar is not JSON ({_first_line(exc)}); {EXPORT_HINT}."
        ) from None
    if bound_content(exported) != bound_content(sidecar):
        keys = ", ".join(changed_keys(exported, sidecar)) or "the content"
        raise DataError(
            f"sidecar {side}: differs in {keys} from the copy exported into {model_path.name} (the sidecar was "
            f"edited, or belongs to another export); put back the sidecar exported with it, or {EXPORT_HINT}."
        )


def check_vote(sidecar: dict[str, Any], model_path: Path) -> None:
    """Refuse a sidecar whose vote rule or parameters are out of range (:func:`check_vote_settings`)."""
    vote = sidecar["vote"] if isinstance(sidecar["vote"], dict) else {}
    check_vote_settings(
        **{key: vote.get(key) for key in VOTE_KEYS},
        source=f"sidecar {sidecar_path(model_path)}",
        fix=EXPORT_HINT,
        error=DataError,
    )


@dataclass
class OnnxExport:
    """What :func:`load_onnx` read: the model, its sidecar, and the MIL head (or None)."""

    model: OnnxSliceModel
    sidecar: dict[str, Any]
    mil_head: NumpyMIL | None


def load_onnx(path: str | Path, device: str = "auto", key: str = "ckpt_path") -> OnnxExport:
    """Open an export (model, sidecar, MIL head) and check that its files belong together.

    Raises :class:`DataError` naming the file at fault for: a missing file, a file onnxruntime cannot read,
    a missing or foreign sidecar, a model whose SHA-256 is not the sidecar's, a sidecar that differs from the
    copy in the model's metadata (or a model without one), a model whose input (uint8 (batch, C, S, S)) or
    number of classes differs from the sidecar's, a vote parameter out of range, a missing or changed MIL
    head file.
    """
    path = Path(path)
    where = f"{key}={path}"
    if not path.is_file():
        raise DataError(f"{where}: {'a folder, not a file' if path.is_dir() else 'file not found'}.")
    session = open_session(path, providers_for(device, where), where)
    sidecar = read_sidecar(path, where)
    digest = file_sha256(path)
    if digest != sidecar["model_sha256"]:
        raise DataError(
            f"sidecar {sidecar_path(path)} does not match {path}: it was written for a model with SHA-256 "
            f"{str(sidecar['model_sha256'])[:16]}..., this file's is {digest[:16]}...; keep each model with the "
            f"sidecar exported with it ({EXPORT_HINT})."
        )
    check_binding(session, sidecar, path)
    check_model_against_sidecar(session, sidecar, path, where)
    check_vote(sidecar, path)
    head = None
    if sidecar["mil"]:
        npz = mil_path(path)
        if not npz.is_file():
            raise DataError(f"{where}: its sidecar names a MIL head, but {npz} is missing; {EXPORT_HINT}.")
        data = npz.read_bytes()
        if hashlib.sha256(data).hexdigest() != sidecar["mil"].get("sha256"):
            raise DataError(f"{npz} does not match the sidecar {sidecar_path(path)} (SHA-256 differs); {EXPORT_HINT}.")
        head = NumpyMIL.from_npz(data, sidecar["mil"]["init"], str(npz))
    return OnnxExport(OnnxSliceModel(path, session, sidecar), sidecar, head)
