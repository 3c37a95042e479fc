"""A learned patient rule: gated attention multiple-instance learning over what the slice model says.

A patient is a *bag* of per-slice features (n_slices, D) float32 (:mod:`covidct.patients.mil_features`): the slice
model's penultimate features (:meth:`covidct.models.classifier.SliceClassifier.features`) or the log of its
calibrated slice probabilities. :class:`GatedAttentionMIL` (Ilse et al.,
"Attention-based deep multiple instance learning", ICML 2018; MONAI's ``MILModel`` ``att_gated``) maps
each bag to C class logits and is trained on patient labels only (:func:`fit_mil`), so every patient
with a known class counts, whether or not its slices were labelled.

Comparable across patients: a scanner shifts the intensities (and the noise) of all of a patient's
slices alike, which moves all of its embeddings together. ``standardize="center"`` (for embeddings)
subtracts each bag's per-feature median (the patient's typical slice: its own clean tissue when fewer
than half of its slices are infected) before anything else, so the head sees how slices differ from the
rest of their patient rather than where the patient's scanner put them; the centred features are then
scaled by one global per-feature std fitted on the training bags. Not divided by each bag's own std:
that would blow a Normal patient's small slice-to-slice noise up to the size of a sick patient's
lesions. ``"none"`` uses the raw features (globally standardised), ``"center_concat"`` (for log
probabilities) both.

:func:`cross_fit_predictions` gives each patient the prediction of a head fitted on the other patients
only (stratified k-fold, or leave-one-out for few patients): a head scored on the patients it was fitted
on has learnt them (the two-stage demo's finding), so only cross-fitted figures are reported.
:func:`mil_state` / :func:`mil_from_state` turn a fitted head into plain tensors and numbers (loadable
with ``torch.load(weights_only=True)``) and back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from covidct.patients.mil_features import STANDARDIZE_OF, check_mil_features

STANDARDIZE_MODES: tuple[str, ...] = ("center", "none", "center_concat")
#: fit_mil's defaults (full-batch Adam: tens of patients fit in well under a second on a CPU)
EPOCHS: int = 150
LR: float = 3e-3
WEIGHT_DECAY: float = 1e-3
HIDDEN: int = 64
ATTENTION: int = 32
#: cross_fit_predictions uses leave-one-out up to this many patients, stratified k-fold above
LEAVE_ONE_OUT_MAX: int = 10


def bag_features(bag: torch.Tensor, standardize: str) -> torch.Tensor:
    """(n, D) float embeddings -> (n, F) float features before the global scaling: ``center`` subtracts the
    bag's per-feature median (F = D), ``none`` keeps them (F = D), ``center_concat`` gives both (F = 2D)."""
    if standardize == "none":
        return bag
    centred = bag - bag.median(dim=0).values
    return centred if standardize == "center" else torch.cat([centred, bag], dim=1)


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL head (Ilse et al. 2018): bag (n, D) -> C logits.

    h_i = ReLU(W x_i) (hidden) of the standardised slice features x_i; a_i = softmax_i(w^T (tanh(V h_i) *
    sigmoid(U h_i))); the bag h = sum_i a_i h_i goes through a linear classifier. ``shift`` and ``scale``
    (F,) are the global feature standardisation, set by :func:`fit_mil` from the training bags.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 3,
        hidden: int = HIDDEN,
        attention: int = ATTENTION,
        standardize: str = "center",
        dropout: float = 0.25,
        slice_features: str = "embeddings",
    ) -> None:
        super().__init__()
        if standardize not in STANDARDIZE_MODES:
            raise ValueError(f"standardize must be one of {STANDARDIZE_MODES}, got {standardize!r}")
        self.init_args: dict[str, Any] = {
            "slice_features": check_mil_features(slice_features),  # what it reads (covidct.patients.mil_features)
            "in_features": int(in_features),
            "num_classes": int(num_classes),
            "hidden": int(hidden),
            "attention": int(attention),
            "standardize": standardize,
            "dropout": float(dropout),
        }
        self.standardize = standardize
        features = 2 * in_features if standardize == "center_concat" else in_features
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU())
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    @property
    def slice_features(self) -> str:
        """What the head reads of each slice (:data:`covidct.patients.mil_features.MIL_FEATURES`)."""
        return self.init_args["slice_features"]

    def features(self, bag: torch.Tensor) -> torch.Tensor:
        """(n, D) slice features (embeddings or log probabilities) -> (n, F) standardised features."""
        return (bag_features(bag.float(), self.standardize) - self.shift) / self.scale

    def forward_padded(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (B, n_max, F) and bool mask (B, n_max) (True = a slice) -> logits (B, C)
        and attention (B, n_max) (0 on padding)."""
        h = self.project(x)
        score = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        attention = score.masked_fill(~mask, float("-inf")).softmax(dim=1)
        return self.classifier((attention.unsqueeze(-1) * h).sum(dim=1)), attention

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        """One bag (n, D) -> logits (C,)."""
        x = self.features(bag).unsqueeze(0)
        return self.forward_padded(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))[0][0]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: the head is tiny, and threads only contend (x100 slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pad_bags(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of (n_i, F) -> zero-padded (B, n_max, F) and its bool mask (B, n_max)."""
    n_max = max(len(f) for f in features)
    x = torch.zeros(len(features), n_max, features[0].shape[1])
    mask = torch.zeros(len(features), n_max, dtype=torch.bool)
    for i, f in enumerate(features):
        x[i, : len(f)], mask[i, : len(f)] = f, True
    return x, mask


def _as_bags(bags: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
    out = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in bags]
    if not out or any(b.ndim != 2 or not len(b) for b in out) or len({b.shape[1] for b in out}) != 1:
        raise ValueError(f"bags must be one or more (n_slices >= 1, D) arrays of one D, got {[b.shape for b in out]}")
    return out


def fit_mil(
    bags: Sequence[np.ndarray | torch.Tensor],
    labels: np.ndarray | Sequence[int],
    num_classes: int = 3,
    seed: int = 0,
    epochs: int = EPOCHS,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    standardize: str | None = None,
    hidden: int = HIDDEN,
    slice_features: str = "embeddings",
) -> GatedAttentionMIL:
    """A :class:`GatedAttentionMIL` fitted on ``bags`` (P bags of (n_i, D) float32) and ``labels`` (P,) int.

    ``slice_features`` names what the bags hold (:mod:`covidct.patients.mil_features`; stored with the head so that
    predict.py feeds it the same); ``standardize`` None: that kind's (``STANDARDIZE_OF``).

    Full-batch Adam on the class-balanced cross-entropy (each present class weighs the same in total),
    on the CPU, deterministic for a ``seed`` (the global torch RNG is left as it was). Returned in eval mode.
    """
    # autograd on, and tensors that are not inference tensors, even inside Lightning's validation loop
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]), one_thread():
        tensors = _as_bags(bags)
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
        if len(y) != len(tensors):
            raise ValueError(f"got {len(tensors)} bags and {len(y)} labels")
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got {sorted(set(y.tolist()))}")
        counts = torch.bincount(y, minlength=num_classes).float()
        weight = torch.where(counts > 0, len(y) / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros(()))
        standardize = STANDARDIZE_OF[check_mil_features(slice_features)] if standardize is None else standardize
        torch.manual_seed(seed)
        model = GatedAttentionMIL(
            tensors[0].shape[1], num_classes, hidden=hidden, standardize=standardize, slice_features=slice_features
        )
        raw = [bag_features(b, standardize) for b in tensors]
        stacked = torch.cat(raw)
        model.shift.copy_(stacked.mean(dim=0))
        model.scale.copy_(stacked.std(dim=0, unbiased=False).clamp(min=1e-6))
        x, mask = pad_bags([(f - model.shift) / model.scale for f in raw])
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        model.train()
        for _ in range(epochs):
            optimizer.zero_grad()
            loss_fn(model.forward_padded(x, mask)[0], y).backward()
            optimizer.step()
    return model.eval()


@torch.inference_mode()
def predict_proba(model: GatedAttentionMIL, bags: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """(P, C) float32 softmax class probabilities of ``bags`` (P bags of (n_i, D)) under ``model``."""
    model.eval()
    with one_thread():
        x, mask = pad_bags([model.features(b) for b in _as_bags(bags)])
        return model.forward_padded(x, mask)[0].softmax(dim=1).numpy()


def predict(model: GatedAttentionMIL, bags: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """(P,) int64 predicted class of each bag (argmax of :func:`predict_proba`)."""
    return predict_proba(model, bags).argmax(axis=1).astype(np.int64)


def folds_of(labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """(P,) int64 fold of each patient: leave-one-out (fold i = patient i) up to :data:`LEAVE_ONE_OUT_MAX`
    patients, else ``folds`` folds stratified by class (each class shuffled with ``seed``, dealt round robin)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) <= LEAVE_ONE_OUT_MAX:
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)  # the next class starts where this one stopped: folds stay balanced in size
    return fold


def cross_fit_predictions(
    bags: Sequence[np.ndarray | torch.Tensor],
    labels: np.ndarray | Sequence[int],
    num_classes: int = 3,
    folds: int = 5,
    seed: int = 0,
    **fit_kwargs: Any,
) -> np.ndarray:
    """(P,) int64 predictions, each made by a head (:func:`fit_mil`) fitted on the other folds only
    (:func:`folds_of`). P >= 2: a single patient has no others to be scored by."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) < 2:
        raise ValueError(f"cross-fitting needs at least 2 patients, got {len(labels)}")
    fold = folds_of(labels, folds, seed)
    preds = np.empty(len(labels), dtype=np.int64)
    for f in np.unique(fold):
        held = fold == f
        train = ~held
        model = fit_mil(
            [b for b, t in zip(bags, train, strict=True) if t], labels[train], num_classes, seed, **fit_kwargs
        )
        preds[held] = predict(model, [b for b, h in zip(bags, held, strict=True) if h])
    return preds


def mil_state(model: GatedAttentionMIL) -> dict[str, Any]:
    """The fitted head as plain data: ``{"init": constructor arguments, "state_dict": {name: tensor}}``."""
    return {
        "init": dict(model.init_args),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def mil_from_state(state: dict[str, Any]) -> GatedAttentionMIL:
    """Inverse of :func:`mil_state` (eval mode); heads saved before ``slice_features`` read embeddings."""
    model = GatedAttentionMIL(**state["init"])
    model.load_state_dict(state["state_dict"])
    return model.eval()
