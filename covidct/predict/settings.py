"""What prediction takes from a checkpoint or an export's sidecar (windows, image size, class names, vote rule
and parameters, temperature), with the user's overrides: :class:`PredictorSettings`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from covidct.data.series import AUTO
from covidct.patients.parameters import (
    CENTER_SLICES,
    SLICE_THRESHOLD,
    TAU,
    TEMPERATURE,
    TOP_K,
    VOTE_KEYS,
    WINDOW_SLICES,
    VoteParameters,
)

if TYPE_CHECKING:
    from covidct.patients.aggregation import GatedAttentionMIL
    from covidct.predict.onnx_backend import NumpyMIL


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
    threshold_tau: float = TAU  # threshold
    temperature: float = TEMPERATURE  # divides the logits (temperature scaling fitted in training)
    tta: bool = False  # predict.py tta=true: mean of each slice's and its horizontal flip's probabilities
    tta_transforms: list = field(default_factory=list)  # predict.py tta_transforms: more views (covidct.predict.tta)
    tta_views: list = field(default_factory=list)  # the built tta_transforms (not recorded)
    lung_crop: bool = False  # crop each series to its lungs, as the model was trained
    mil_head: GatedAttentionMIL | NumpyMIL | None = None  # vote_rule mil: the head fitted on the validation patients
    precision: str = "fp32"  # fp32 | bf16 (checkpoint, predict.py precision=bf16) | int8 (a quantized ONNX export)
    series: str = AUTO  # predict.py series: which axial series of a folder is the patient's (covidct.data.series)
    min_slices: int = 1  # predict.py min_slices: a series with fewer usable slices is not called (status error)
    overridden: dict[str, Any] = field(default_factory=dict)

    @property
    def vote(self) -> VoteParameters:
        """The vote rule, its parameters, the temperature and the MIL head as one bundle."""
        values = {key: getattr(self, key) for key in VOTE_KEYS if key != "rule"}
        return VoteParameters(self.vote_rule, **values, mil_head=self.mil_head)


def vote_fields(vote: VoteParameters) -> dict[str, Any]:
    """The :class:`PredictorSettings` fields of ``vote`` (its names are prediction.json's: ``vote_rule``, ...)."""
    return {"vote_rule": vote.rule, **{key: getattr(vote, key) for key in VOTE_KEYS if key != "rule"}} | {
        "mil_head": vote.mil_head
    }


def settings_from_sidecar(sidecar: dict[str, Any], mil_head: NumpyMIL | None) -> PredictorSettings:
    """The :class:`PredictorSettings` an export's sidecar records (those of its source checkpoint)."""
    return PredictorSettings(
        windows=sidecar["windows"],
        image_size=int(sidecar["image_size"]),
        class_names=list(sidecar["class_names"]),
        **vote_fields(VoteParameters.from_sidecar(sidecar["vote"], mil_head)),
        lung_crop=bool(sidecar.get("lung_crop", False)),
        precision=str(sidecar["precision"]),
    )
