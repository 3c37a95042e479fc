"""Stored pixel values to Hounsfield units, as DICOM PS3.3 defines them, and a check that they are HU.

* The modality rescale (RescaleSlope/Intercept, or a Modality LUT) turns stored values into HU
  (PS3.3 C.11.1). PhotometricInterpretation MONOCHROME1 only says how to *display* the result
  (minimum = white, PS3.3 C.7.6.3.1.2): it is applied after the rescale, by viewers, and never
  changes HU. (No scanner is known to write CT whose HU need inverting; pydicom's
  ``apply_modality_lut`` does not invert either.)
* Pixels equal to PixelPaddingValue (or between it and PixelPaddingRangeLimit) lie outside the
  scanned field of view (PS3.3 C.7.5.1.1.2); they are air here (:data:`AIR_HU`), not the padding
  value's rescaled number (often -2000 or -3024 HU).
* A header that contradicts its data (an intercept of +1024 on data already in HU, a slope of 1000,
  a PixelRepresentation that reads negative numbers as large ones) gives numbers that are not HU.
  Every chest CT shows air (outside the body, in the airways and lungs): :func:`check_series_hu`
  refuses a series whose air is not near -1000 HU (:data:`PLAUSIBLE_AIR_HU`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

#: HU of air: what padding pixels (outside the field of view) become.
AIR_HU = -1000.0

#: Below this (HU) a pixel is no tissue and no air: undeclared padding outside the field of view
#: (-2000, -3024, ...). Left out of :func:`slice_air`.
BELOW_AIR_HU = -1100.0

#: Range (HU) of a chest CT series' air (:func:`slice_air`, median over the slices): air outside the
#: body and in the airways is -1000 HU. Measured on the real COVID-CT-MD sample: -1019 to -1002 HU per
#: series (-1024 to -996 per slice). The upper bound leaves room for lungs without air around the body
#: (a tight field of view): their parenchyma is -900 to -700 HU. An intercept of 0 instead of -1024
#: puts air near 0 HU; an intercept of +1024 near +1000 or +2000; a slope of 1000 far above.
PLAUSIBLE_AIR_HU = (-1100.0, -500.0)

#: Every STRIDE-th pixel of every STRIDE-th row is enough for a slice's statistic (1/64 of a 512 px slice).
STRIDE = 8


def padding_mask(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """bool (rows, cols): the pixels at PixelPaddingValue (or in its range up to PixelPaddingRangeLimit),
    compared as stored values; None when the file declares no padding."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    low, high = (int(value), int(value)) if limit is None else sorted((int(value), int(limit)))
    data = stored.astype(np.int64)
    return (data >= low) & (data <= high)


def to_hounsfield(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Stored pixel values (rows, cols) of ``ds`` -> float32 (rows, cols) HU: the modality rescale
    (identity when absent), padding pixels set to :data:`AIR_HU`. MONOCHROME1 is not inverted (see the
    module docstring)."""
    hu = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    mask = padding_mask(stored, ds)
    if mask is not None:
        hu[mask] = AIR_HU
    return hu


def slice_air(hu: np.ndarray) -> float:
    """The HU of air in one slice (float32 (rows, cols)): the 5th percentile of a regular subsample of its
    pixels at or above :data:`BELOW_AIR_HU`; nan when none is."""
    values = hu[::STRIDE, ::STRIDE]
    values = values[values >= BELOW_AIR_HU]
    return float(np.percentile(values, 5)) if values.size else float("nan")


def check_series_hu(air: Sequence[float]) -> str:
    """Why a series whose slices have ``air`` (HU, :func:`slice_air`) is not in Hounsfield units; "" if it is."""
    if not len(air):
        return ""
    median = float(np.median(np.nan_to_num(air, nan=np.inf)))  # no pixel at air or above: not HU either
    low, high = PLAUSIBLE_AIR_HU
    if low <= median <= high:
        return ""
    return (
        f"air reads {median:.0f} HU after the rescale, not {low:g}..{high:g} HU: RescaleSlope/RescaleIntercept "
        "or PixelRepresentation contradict the pixel data, so the values are not Hounsfield units (fix the headers)"
    )
