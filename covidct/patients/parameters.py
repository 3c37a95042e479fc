"""The vote parameters a patient call depends on, as one typed bundle, and their defaults (named once here).

A :class:`VoteParameters` is what training stores for prediction (the patient vote callback's checkpoint
state, :meth:`~VoteParameters.to_state`), what an ONNX export's sidecar records (its ``vote`` object,
:meth:`~VoteParameters.to_sidecar`) and what predict.py and the held-out test vote with. The ranges each
value must lie in are :data:`VOTE_PARAMETER_RULES`, checked by
:func:`covidct.patients.rules.check_vote_settings`. Numpy only: the ONNX path imports this without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from math import isfinite
from typing import Any

import numpy as np

#: infected_fraction's tau and threshold's tau (a share of slices) when neither tuned nor set
TAU: float = 0.5
#: topk_mean's slices averaged per class
TOP_K: int = 5
#: weighted_center's central slices that count fully, and the central slices that vote at all
CENTER_SLICES: int = 40
WINDOW_SLICES: int = 80
#: threshold's slice threshold on P(infected) when neither tuned (no validation patients) nor set
SLICE_THRESHOLD: float = 0.5
#: the temperature the logits are divided by when none was fitted (calibration off, older checkpoints)
TEMPERATURE: float = 1.0
#: window_slices of a checkpoint from before weighted_center's voting window: every slice voted
ALL_SLICES: int = 1_000_000

#: the vote parameters a checkpoint and an export's sidecar (its ``vote`` object) record, in
#: :func:`~covidct.patients.rules.check_vote_settings`'s order
VOTE_KEYS: tuple[str, ...] = (
    "rule",
    "tau",
    "k",
    "center_slices",
    "window_slices",
    "slice_threshold",
    "threshold_tau",
    "temperature",
)
#: parameters whose null in the config means "tuned on the validation patients"
TUNED_KEYS: tuple[str, ...] = ("tau", "slice_threshold")
#: what training fits on the validation patients (the rest is configured): restored on resume
FITTED_FIELDS: tuple[str, ...] = ("tau", "slice_threshold", "threshold_tau", "temperature", "mil_head")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and isfinite(value)


def _slices(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _share(value: Any) -> bool:
    return _real(value) and 0.0 <= value <= 1.0


#: what each numeric vote parameter must be: (test, the rule in words)
VOTE_PARAMETER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tau": (_share, "in [0, 1] (a fraction of slices)"),
    "k": (_slices, "an integer >= 1 (slices)"),
    "center_slices": (_slices, "an integer >= 1 (slices)"),
    "window_slices": (_slices, "an integer >= 1 (slices)"),
    "slice_threshold": (lambda v: _real(v) and 0.0 <= v < 1.0, "in [0, 1) (an infected probability)"),
    "threshold_tau": (_share, "in [0, 1] (a fraction of slices)"),
    "temperature": (lambda v: _real(v) and v > 0.0, "a finite number > 0 (it divides the logits)"),
}


@dataclass(frozen=True)
class VoteParameters:
    """One vote rule and every rule's parameters (only the rule's own are used by it).

    Attributes:
        rule: one of :data:`covidct.patients.rules.RULES`.
        tau: infected_fraction's threshold on the infected fraction of slices, in [0, 1].
        k: topk_mean's slices averaged per class (>= 1).
        center_slices, window_slices: weighted_center's central slices counted fully / voting at all.
        slice_threshold: threshold's P(infected) above which a slice is infected, in [0, 1).
        threshold_tau: threshold's share of infected slices above which a patient is sick, in [0, 1].
        temperature: what the slice logits are divided by (> 0; temperature scaling fitted in training).
        mil_head: the ``mil`` rule's fitted head (``GatedAttentionMIL``, or ``NumpyMIL`` from an ONNX export),
            or None.
    """

    rule: str
    tau: float = TAU
    k: int = TOP_K
    center_slices: int = CENTER_SLICES
    window_slices: int = WINDOW_SLICES
    slice_threshold: float = SLICE_THRESHOLD
    threshold_tau: float = TAU
    temperature: float = TEMPERATURE
    mil_head: Any = None

    def to_sidecar(self) -> dict[str, Any]:
        """The export sidecar's ``vote`` object: :data:`VOTE_KEYS` -> value (the MIL head is its own file)."""
        return {key: getattr(self, key) for key in VOTE_KEYS}

    @classmethod
    def from_sidecar(cls, vote: dict[str, Any], mil_head: Any = None) -> VoteParameters:
        """From a sidecar's ``vote`` object (every key of :data:`VOTE_KEYS`, checked) and the export's head."""
        return cls(
            rule=str(vote["rule"]),
            tau=float(vote["tau"]),
            k=int(vote["k"]),
            center_slices=int(vote["center_slices"]),
            window_slices=int(vote["window_slices"]),
            slice_threshold=float(vote["slice_threshold"]),
            threshold_tau=float(vote["threshold_tau"]),
            temperature=float(vote["temperature"]),
            mil_head=mil_head,
        )

    def to_state(self) -> dict[str, Any]:
        """The patient vote callback's checkpoint keys: every parameter but the rule (the model's
        hyper-parameters hold it) and ``mil``, the head's plain tensors and numbers (None without one)."""
        state: dict[str, Any] = {key: getattr(self, key) for key in VOTE_KEYS if key != "rule"}
        if self.mil_head is None:
            return state | {"mil": None}
        from covidct.patients.aggregation import mil_state  # torch: not imported by the ONNX path

        return state | {"mil": mil_state(self.mil_head)}

    @classmethod
    def from_state(cls, state: dict[str, Any], defaults: VoteParameters) -> VoteParameters:
        """From a checkpoint's vote state (:meth:`to_state`); a key it lacks (older checkpoints) keeps the value
        of ``defaults``, which also gives the rule. Values are converted, not checked."""
        values = {key: state.get(key, getattr(defaults, key)) for key in VOTE_KEYS if key != "rule"}
        mil_head = defaults.mil_head
        if state.get("mil"):
            from covidct.patients.aggregation import mil_from_state  # torch: not imported by the ONNX path

            mil_head = mil_from_state(state["mil"])
        return cls(
            rule=defaults.rule,
            tau=float(values["tau"]),
            k=int(values["k"]),
            center_slices=int(values["center_slices"]),
            window_slices=int(values["window_slices"]),
            slice_threshold=float(values["slice_threshold"]),
            threshold_tau=float(values["threshold_tau"]),
            temperature=float(values["temperature"]),
            mil_head=mil_head,
        )

    def with_fitted(self, source: VoteParameters) -> VoteParameters:
        """These parameters with ``source``'s :data:`FITTED_FIELDS` (tau, threshold rule, temperature, head)."""
        return replace(self, **{key: getattr(source, key) for key in FITTED_FIELDS})
