"""Test-time augmentation beyond the horizontal flip: ``predict.py tta_transforms=[...]``, albumentations
transforms (Hydra ``_target_`` nodes) applied to every slice; each is one more view whose probabilities
(and embeddings) are averaged with the others (the slice itself, and its flip with ``tta=true``).

The transforms run in one ``A.Compose`` seeded with ``seed``, so a random transform (``A.Rotate(limit=10,
p=1)``) gives the same views on every run; a transform that changes a slice's size or dtype is refused.
numpy only (albumentations is imported when a list is given), so the ONNX path stays free of torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from covidct.errors import ConfigError

#: what the compose of a view is seeded with: the views are the same on every run
SEED = 0


def tta_views(transforms: Sequence[Any] | None) -> list[Callable[[np.ndarray], np.ndarray]]:
    """One view per transform config in ``transforms`` (``{_target_: albumentations.VerticalFlip, p: 1}``):
    a function uint8 (N, C, S, S) -> uint8 (N, C, S, S). Empty for None or []. A config that is not an
    albumentations transform is refused naming ``tta_transforms[i]``."""
    if not transforms:
        return []
    import albumentations as A
    from hydra.utils import instantiate

    views = []
    for i, node in enumerate(transforms):
        try:
            transform = instantiate(node)
        except Exception as exc:  # a bad _target_ or argument: say which entry
            raise ConfigError(
                f"tta_transforms[{i}]={node}: cannot be built ({exc}); give albumentations "
                "transforms, e.g. tta_transforms='[{_target_: albumentations.VerticalFlip, p: 1}]'"
            ) from None
        if not isinstance(transform, A.BasicTransform):
            raise ConfigError(
                f"tta_transforms[{i}]={node}: {type(transform).__name__} is not an albumentations transform"
            )
        views.append(_view(A.Compose([transform], seed=SEED), f"tta_transforms[{i}]"))
    return views


def _view(compose: Any, name: str) -> Callable[[np.ndarray], np.ndarray]:
    def apply(images: np.ndarray) -> np.ndarray:
        out = np.empty_like(images)
        for j, image in enumerate(images):  # (C, S, S) -> (S, S, C) for albumentations and back
            augmented = compose(image=np.ascontiguousarray(image.transpose(1, 2, 0)))["image"]
            if augmented.shape != image.shape[1:] + image.shape[:1] or augmented.dtype != np.uint8:
                raise ConfigError(
                    f"{name}: a view must keep the slice's size and uint8 type "
                    f"({image.shape[1:] + image.shape[:1]} uint8), got {augmented.shape} {augmented.dtype}"
                )
            out[j] = augmented.transpose(2, 0, 1)
        return out

    return apply


def mean_over_views(
    run: Callable[[Any], tuple[np.ndarray, np.ndarray | None]], images: Any, views: Sequence[Callable]
) -> tuple[np.ndarray, np.ndarray | None]:
    """``run(images)`` -> (probabilities (N, K), embeddings (N, D) or None), averaged with ``run`` of each view
    of ``images`` (uint8 (N, C, S, S), numpy or a CPU tensor; a view gets and gives numpy, converted back
    to the type given)."""
    probs, embeddings = run(images)
    if not views:
        return probs, embeddings
    as_numpy = np.asarray(images)
    to_input: Callable[[np.ndarray], Any] = lambda a: a  # noqa: E731
    if not isinstance(images, np.ndarray):  # a torch tensor (the checkpoint path)
        import torch

        to_input = torch.from_numpy
    for view in views:
        p, e = run(to_input(view(as_numpy)))
        probs = probs + p
        embeddings = None if embeddings is None else embeddings + e
    n = len(views) + 1
    return probs / n, None if embeddings is None else embeddings / n
