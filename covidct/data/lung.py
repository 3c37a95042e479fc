"""A lung mask from Hounsfield units alone, and the bounding box that a series is cropped to.

No learned weights: thresholds and connected components (scipy.ndimage), computed on a copy of the
slice shrunk to :data:`MASK_SIZE` px (the box does not need full resolution; it costs ~1 ms a slice).

1. body: the largest connected region denser than :data:`BODY_HU`, its holes filled (the lungs and
   airways are holes in it);
2. air inside the body: lighter than :data:`LUNG_HU` (aerated lung is -950 to -600 HU, ground glass
   -700 to -300), not touching the image border (air outside the patient);
3. lungs: every such region of at least :data:`MIN_LUNG_FRACTION` of the slice, holes (vessels,
   dense lesions surrounded by lung) filled. Every region, not the two largest: consolidation and
   fibrosis split a diseased lung into pieces (seen on the real CAP sample). The trachea and main
   bronchi count too; they lie between the lungs, so the box is the same.

Dense lesions touching the chest wall are not in the mask (no threshold separates them from it);
the series box, a union over slices plus a margin, still holds them on the real sample.

A series is cropped to one box, the union of its slices' boxes plus a margin; the resize to the
model's square input then stretches it (the lungs are wider than deep: ~1.5x), as the SPGC entries
that cropped did. Making the box square instead would keep little crop: the lungs span ~85% of the
slice's width on the real sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

#: Side (px) of the shrunk copy of a slice the mask is computed on.
MASK_SIZE = 128
#: Body: denser than this (HU). Fat is about -100, aerated lung below -600.
BODY_HU = -500.0
#: Lung (air inside the body): lighter than this (HU); -400 keeps ground-glass opacities (-700..-300).
LUNG_HU = -400.0
#: A lung region covers at least this fraction of the slice (at 0.7 mm pixels and 512 px: ~260 mm²);
#: smaller air pockets (bowel gas, the oesophagus, an apex tip) are not counted.
MIN_LUNG_FRACTION = 0.002
#: Margin added on each side of a series' box, as a fraction of the slice side.
MARGIN_FRACTION = 0.05


@dataclass(frozen=True)
class Box:
    """A rectangle of a slice in pixels, half-open: rows ``top:bottom``, columns ``left:right``."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """``hu[box.slices]`` is the cropped array."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def union(self, other: Box) -> Box:
        return Box(
            min(self.top, other.top),
            max(self.bottom, other.bottom),
            min(self.left, other.left),
            max(self.right, other.right),
        )

    def contains(self, other: Box) -> bool:
        return (
            self.top <= other.top
            and self.left <= other.left
            and other.bottom <= self.bottom
            and other.right <= self.right
        )


def full_box(shape: tuple[int, int]) -> Box:
    """The whole slice of ``shape`` (rows, cols)."""
    return Box(0, shape[0], 0, shape[1])


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """float32 or int16 (rows, cols) HU -> bool (rows, cols): True on the lungs (all False if none).

    Computed at :data:`MASK_SIZE` px and scaled back (nearest neighbour), so its edges are accurate to
    about ``rows / MASK_SIZE`` px.
    """
    rows, cols = hu.shape
    small = cv2.resize(np.asarray(hu, dtype=np.float32), (MASK_SIZE, MASK_SIZE), interpolation=cv2.INTER_AREA)
    mask = _lungs(small)
    return cv2.resize(mask.view(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)


def _lungs(hu: np.ndarray) -> np.ndarray:
    """float32 (n, n) HU -> bool (n, n) lung mask at this resolution."""
    body = _largest(hu > BODY_HU)
    if not body.any():
        return body
    inside = ndimage.binary_fill_holes(body)
    air, n = ndimage.label((hu < LUNG_HU) & inside)
    if n == 0:
        return np.zeros_like(body)
    edge = np.unique(np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]]))
    areas = np.bincount(air.ravel(), minlength=n + 1)
    areas[0] = 0
    areas[edge] = 0  # air touching the border is outside the patient
    keep = np.flatnonzero(areas >= MIN_LUNG_FRACTION * hu.size)
    return ndimage.binary_fill_holes(np.isin(air, keep))


def _largest(mask: np.ndarray) -> np.ndarray:
    """bool (n, n) -> bool (n, n): the largest 8-connected region of ``mask`` (all False if none)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    return labels == areas.argmax()


def mask_box(mask: np.ndarray) -> Box | None:
    """bool (rows, cols) -> the smallest box holding every True pixel; None when there is none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return Box(int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def lung_box(hu: np.ndarray) -> Box | None:
    """float32 or int16 (rows, cols) HU -> the box of its lungs in pixels of ``hu``; None without lung."""
    return mask_box(lung_mask(hu))


def series_box(boxes: Sequence[Box | None], shape: tuple[int, int], margin: float = MARGIN_FRACTION) -> Box | None:
    """One box for a whole series: the union of its slices' lung boxes (None: no lung on that slice),
    widened by ``margin`` x the slice side on each side and clipped to the slice of ``shape`` (rows,
    cols). None when no slice has lung."""
    found = [b for b in boxes if b is not None]
    if not found:
        return None
    box = found[0]
    for b in found[1:]:
        box = box.union(b)
    rows, cols = shape
    dr, dc = round(margin * rows), round(margin * cols)
    return Box(max(box.top - dr, 0), min(box.bottom + dr, rows), max(box.left - dc, 0), min(box.right + dc, cols))
