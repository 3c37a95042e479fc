"""One patient's phantom: anatomy, lesions for its diagnosis and noise, as a volume in HU with masks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covidct.contracts import CLASS_NAMES
from covidct.data.synthetic.anatomy import draw_anatomy, render_anatomy
from covidct.data.synthetic.lesions import add_lesions


@dataclass(frozen=True)
class Phantom:
    """One patient's volume, slices head first (SliceLocation descending).

    hu: float32 (n, H, W) Hounsfield units. lung, lesion: bool (n, H, W) masks (lesion within lung).
    pixel_spacing, slice_spacing: mm.
    """

    hu: np.ndarray
    lung: np.ndarray
    lesion: np.ndarray
    pixel_spacing: float
    slice_spacing: float

    @property
    def lesion_slices(self) -> np.ndarray:
        """bool (n,): True where a lesion voxel lies inside the lung (the slice label)."""
        return self.lesion.any(axis=(1, 2))


def make_phantom(rng: np.random.Generator, n_slices: int, image_size: int, diagnosis: str) -> Phantom:
    """Draw one patient (anatomy, position, lesions for ``diagnosis`` in CLASS_NAMES) and render it."""
    if diagnosis not in CLASS_NAMES:
        raise ValueError(f"diagnosis {diagnosis!r} is not one of {CLASS_NAMES}")
    fov = rng.uniform(330.0, 390.0)  # mm, field of view
    pixel_spacing = fov / image_size
    slice_spacing = float(rng.choice([2.0, 2.5, 3.0, 4.0, 5.0]))
    anatomy = draw_anatomy(rng, fov)
    x = (np.arange(image_size, dtype=np.float32) - (image_size - 1) / 2) * pixel_spacing
    z = np.arange(n_slices, dtype=np.float32) * -slice_spacing
    free = fov / 2 - anatomy.body_a
    offset = (rng.uniform(-0.5, 0.5) * free, rng.uniform(-0.3, 0.6) * (fov / 2 - anatomy.body_b))
    xx, yy = _body_frame(x, offset, rng.uniform(-0.1, 0.1))
    t = np.linspace(0.0, 1.0, n_slices, dtype=np.float32)
    hu, lung, lung_geometry = render_anatomy(rng, anatomy, xx, yy, t, x, z)
    lesion = np.zeros_like(lung)
    if diagnosis != "Normal":
        lesion = add_lesions(rng, hu, lung, lung_geometry, diagnosis, xx, yy, x, z)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(anatomy.noise_hu)
    return Phantom(hu, lung, lesion, pixel_spacing, slice_spacing)


def _body_frame(x: np.ndarray, offset: tuple[float, float], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (mm) in the body frame (shifted, rotated): two float32 (1, H, W) arrays."""
    dx, dy = x[None, :] - offset[0], x[:, None] - offset[1]
    c, s = math.cos(angle), math.sin(angle)
    return (c * dx + s * dy)[None].astype(np.float32), (-s * dx + c * dy)[None].astype(np.float32)
