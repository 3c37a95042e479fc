"""What the learned ``mil`` rule reads of each slice (pure numpy: predict.py's ONNX path imports no torch).

``vote.mil_features`` chooses, per slice:

* ``embeddings``: the slice model's penultimate features (N, D), D = 512 for resnet18; each patient's are
  centred on its own median slice (``standardize="center"``).
* ``log_probs``: the log of the calibrated slice probabilities (N, C); the head reads them centred on the
  patient's own median slice *and* as they are (``standardize="center_concat"``, 2C features): how far
  a slice stands out from the rest of its patient, and where it stands. 2C features instead of 512: tens
  of validation patients can fit a head on them (measured in docs/voting.md, experiment=patient_shift).
"""

from __future__ import annotations

import numpy as np

MIL_FEATURES: tuple[str, ...] = ("embeddings", "log_probs")
#: ``vote.mil_features``'s default: on the synthetic demo and on a dataset with a scanner shift per patient
#: it scored higher than embeddings at most epochs (docs/voting.md)
DEFAULT_MIL_FEATURES: str = "log_probs"
#: the per-patient standardisation the head applies to each kind (covidct.patients.aggregation.bag_features)
STANDARDIZE_OF: dict[str, str] = {"embeddings": "center", "log_probs": "center_concat"}
#: probabilities are clipped to this before the log (a slice with P = 0 would give -inf)
MIN_PROB: float = 1e-6


def check_mil_features(kind: str) -> str:
    """``kind`` if it is one of :data:`MIL_FEATURES`, else a ValueError naming ``vote.mil_features``."""
    if kind not in MIL_FEATURES:
        raise ValueError(f"vote.mil_features={kind!r} is not known; choose one of {list(MIL_FEATURES)}")
    return kind


def slice_features(kind: str, probs: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
    """(N, F) float32 what the head of ``kind`` reads of N slices: ``embeddings`` (N, D) as given, or the
    log of ``probs`` (N, C) float (calibrated softmax probabilities), clipped at :data:`MIN_PROB`."""
    if check_mil_features(kind) == "log_probs":
        return np.log(np.clip(np.asarray(probs, dtype=np.float64), MIN_PROB, 1.0)).astype(np.float32)
    if embeddings is None:
        raise ValueError("vote.mil_features=embeddings needs the slice embeddings; none were given")
    return np.asarray(embeddings, dtype=np.float32)
