"""Slice-level losses: multi-class focal loss (Lin et al., RetinaNet) and plain cross-entropy.

Both are built by Hydra from ``conf/loss/*.yaml`` as partial constructors (``_partial_: true``); the
model completes them with ``num_classes`` and ``ignore_index``. Focal loss on softmax probabilities::

    FL(p_t) = -alpha_t * (1 - p_t) ** gamma * log(p_t)

where ``p_t`` is the softmax probability of the target class. ``gamma = 0`` and ``alpha = None``
is exactly cross-entropy; larger ``gamma`` down-weights well-classified (easy) slices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from covidct.contracts import CLASS_NAMES
from covidct.errors import ConfigError

AlphaSpec = None | float | Sequence[float] | str


def _class_list(num_classes: int) -> str:
    if num_classes == len(CLASS_NAMES):
        return f"{num_classes} classes ({', '.join(CLASS_NAMES)})"
    return f"{num_classes} classes"


def _to_number(value: object, key: str) -> float:
    """A finite float from a number or numeric string, else ConfigError naming ``key``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got the string {value!r}") from None
    elif isinstance(value, Real):
        number = float(value)
    else:
        raise ConfigError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def validate_gamma(gamma: object) -> float:
    """Return ``loss.gamma`` as a float; ConfigError unless it is a finite number >= 0."""
    value = _to_number(gamma, "loss.gamma")
    if value < 0:
        raise ConfigError(
            f"loss.gamma must be >= 0, got {gamma}: use 0 for plain cross-entropy, "
            "2 as in the focal-loss paper (Lin et al. 2017)"
        )
    return value


def _check_weight(value: object, key: str) -> float:
    weight = _to_number(value, key)
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"{key} must be in [0, 1], got {value}")
    return weight


def resolve_alpha(alpha: AlphaSpec, class_counts: Sequence[int] | None, num_classes: int) -> list[float] | float | None:
    """Validate ``loss.alpha`` and resolve ``"auto"``.

    Accepts ``None`` (no weighting), one number in [0, 1] (returned as a float), a list/tuple/ListConfig
    with one weight in [0, 1] per class, or ``"auto"``: inverse class frequency of the training split
    (``class_counts``, one count per class), normalised to sum to 1. Raises ConfigError naming ``loss.alpha``.
    """
    if alpha is None:
        return None
    if isinstance(alpha, str) and alpha.strip().lower() == "auto":
        return _auto_alpha(class_counts, num_classes)
    if isinstance(alpha, str | Real):
        try:
            return _check_weight(alpha, "loss.alpha")
        except ConfigError as err:
            raise ConfigError(f"{err}; use a number in [0, 1], a list with one per class, null or auto") from None
    if not isinstance(alpha, Mapping) and (isinstance(alpha, Sequence) or hasattr(alpha, "__iter__")):
        weights = list(alpha)
        if len(weights) != num_classes:
            raise ConfigError(
                f"loss.alpha has {len(weights)} values but there are {_class_list(num_classes)}: "
                "give one weight per class, a single number, null or auto"
            )
        return [_check_weight(w, f"loss.alpha[{i}]") for i, w in enumerate(weights)]
    raise ConfigError(
        f"loss.alpha must be null, a number in [0, 1], a list with one weight per class or auto, got {alpha!r}"
    )


def _auto_alpha(class_counts: Sequence[int] | None, num_classes: int) -> list[float]:
    if class_counts is None:
        raise ConfigError(
            "loss.alpha=auto needs the class counts of the training split; none were given "
            "(set loss.alpha to a number, a list or null instead)"
        )
    counts = [float(c) for c in class_counts]
    if len(counts) != num_classes:
        raise ConfigError(f"loss.alpha=auto got {len(counts)} class counts but there are {_class_list(num_classes)}")
    missing = [CLASS_NAMES[i] if num_classes == len(CLASS_NAMES) else str(i) for i, c in enumerate(counts) if c <= 0]
    if missing:
        raise ConfigError(
            f"loss.alpha=auto needs every class in the training split, but it has no slices of "
            f"{', '.join(missing)}: add them to the split or set loss.alpha to a list, a number or null"
        )
    inverse = [1.0 / c for c in counts]
    total = sum(inverse)
    return [w / total for w in inverse]


#: the run report's name of :func:`auto_class_weights` (its key metrics and configuration)
CLASS_WEIGHTS_SETTING = "class weights (loss.alpha=auto)"


def class_weights_text(weights: Mapping[str, float]) -> str:
    """``COVID-19 0.434, CAP 0.434, Normal 0.132``: class weights as the console and the run report show them."""
    return ", ".join(f"{name} {w:.3f}" for name, w in weights.items())


def auto_class_weights(criterion: object, class_names: Sequence[str]) -> dict[str, float] | None:
    """``loss.alpha=auto``'s class weights, as :meth:`FocalLoss.fit_class_counts` fitted them: class name ->
    weight, in ``class_names`` order; None for any other loss or alpha, or before they are fitted."""
    alpha = getattr(criterion, "alpha", None)
    if not getattr(criterion, "auto_alpha", False) or alpha is None:
        return None
    return {str(name): float(w) for name, w in zip(class_names, alpha.tolist(), strict=True)}


class FocalLoss(nn.Module):
    """Multi-class focal loss on softmax probabilities, averaged over the non-ignored samples.

    Args:
        gamma: focusing parameter >= 0 (0 = cross-entropy).
        alpha: ``None`` = no class weighting; one number = the same weight for every class, i.e. it
            only scales the loss (as in RetinaNet's multi-class use); a sequence = one weight per class,
            ``alpha_t = alpha[target]``; ``"auto"`` = inverse class frequency of the training slices,
            resolved by :meth:`fit_class_counts` (the model calls it in ``setup`` with the data's counts).
        num_classes: number of classes C.
        ignore_index: targets with this value contribute nothing.

    Every value is checked here, when the config is instantiated (before any data is read).
    ``alpha`` is a non-persistent buffer: it follows ``.to(device)`` but is not saved in checkpoints,
    so a checkpoint loads whatever the loss config is.
    """

    alpha: torch.Tensor | None

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: AlphaSpec = None,
        num_classes: int = 3,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.gamma = validate_gamma(gamma)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.auto_alpha = isinstance(alpha, str) and alpha.strip().lower() == "auto"
        self.register_buffer("alpha", None if self.auto_alpha else self._weights(alpha, None), persistent=False)
        self.alpha_setting = "auto" if self.auto_alpha else resolve_alpha(alpha, None, self.num_classes)

    def settings(self) -> dict[str, object]:
        """What this loss was configured with, as plain data (saved in the model's checkpoint)."""
        return {"_target_": "covidct.models.losses.FocalLoss", "gamma": self.gamma, "alpha": self.alpha_setting}

    def _weights(self, alpha: AlphaSpec, class_counts: Sequence[int] | None) -> torch.Tensor | None:
        resolved = resolve_alpha(alpha, class_counts, self.num_classes)
        if resolved is None:
            return None
        if isinstance(resolved, float):
            return torch.full((self.num_classes,), resolved, dtype=torch.float32)
        return torch.tensor(resolved, dtype=torch.float32)

    def fit_class_counts(self, class_counts: Sequence[int]) -> None:
        """With ``alpha="auto"``: set alpha from the training slices per class (C,) int; else nothing."""
        if self.auto_alpha:
            self.alpha = self._weights("auto", class_counts)

    def extra_repr(self) -> str:
        alpha = (
            "auto (not fitted)"
            if self.auto_alpha and self.alpha is None
            else (None if self.alpha is None else [round(a, 4) for a in self.alpha.tolist()])
        )
        return f"gamma={self.gamma}, alpha={alpha}, num_classes={self.num_classes}, ignore_index={self.ignore_index}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits: (B, C) float; target: (B,) int64 class indices. Returns a 0-dim float32 tensor."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        if target.shape != logits.shape[:1]:
            raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
        if self.auto_alpha and self.alpha is None:
            raise RuntimeError("loss.alpha=auto is not fitted: call fit_class_counts() with the training counts")
        valid = target != self.ignore_index
        logits, target = logits[valid], target[valid].long()
        if target.numel() == 0:
            return logits.sum() * 0.0
        logpt = F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -logpt
        if self.gamma != 0.0:
            # 1 - p_t via expm1 is accurate for easy samples; the clamp keeps the gradient of
            # (1 - p_t) ** gamma finite where p_t rounds to 1 (gamma < 1).
            one_minus_pt = (-torch.expm1(logpt)).clamp_min(1e-12)
            loss = one_minus_pt.pow(self.gamma) * loss
        if self.alpha is not None:
            loss = self.alpha[target] * loss
        return loss.mean()


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Plain cross-entropy (``loss=ce``), built like :class:`FocalLoss` so that the model treats every
    loss alike: ``num_classes`` and ``ignore_index`` from the model, :meth:`fit_class_counts` a no-op."""

    def __init__(self, num_classes: int = 3, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=int(ignore_index))
        self.num_classes = int(num_classes)

    def settings(self) -> dict[str, object]:
        """What this loss was configured with, as plain data (saved in the model's checkpoint)."""
        return {"_target_": "covidct.models.losses.CrossEntropyLoss"}

    def fit_class_counts(self, class_counts: Sequence[int]) -> None:
        """Nothing to fit: cross-entropy has no class weights here."""
