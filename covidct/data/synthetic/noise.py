"""Smooth random fields: the lung texture, the vessels and the ragged lesion outlines."""

from __future__ import annotations

import numpy as np


def smooth_noise(rng: np.random.Generator, z: np.ndarray, x: np.ndarray, scale: float, scale_z: float) -> np.ndarray:
    """Unit-variance smooth gaussian field, float32 (len(z), len(x), len(x)).

    White noise on a coarse grid (node spacing = correlation length, mm) interpolated with gaussian
    kernels; separable, so it costs a few matrix products per slice. The products run in float64:
    BLAS results vary in the last bits with the thread count, and float64 keeps that variation
    below float32 precision, so the dataset does not depend on the machine's core count.
    """
    kz, kx = _kernel(z, scale_z), _kernel(x, scale)
    coarse = rng.standard_normal((kz.shape[1], kx.shape[1], kx.shape[1]))
    return (kx @ np.tensordot(kz, coarse, axes=1) @ kx.T).astype(np.float32)


def _kernel(coords: np.ndarray, scale: float) -> np.ndarray:
    """float64 (len(coords), n_nodes) gaussian interpolation weights, rows of unit L2 norm."""
    coords = coords.astype(np.float64)
    nodes = np.arange(coords.min() - 2 * scale, coords.max() + 2 * scale, scale)
    k = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / scale) ** 2)
    return k / np.linalg.norm(k, axis=1, keepdims=True)
