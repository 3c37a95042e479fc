"""Read CT DICOM slices into Hounsfield units and patient folders into position-ordered series.

Canonical slice order in covidct is **head first**: SliceLocation descending, falling back to
ImagePositionPatient z descending (DICOM patient z grows towards the head), then InstanceNumber
ascending. File names are never used for ordering. This is the order the COVID-CT-MD slice labels
use (column i = i-th slice by SliceLocation descending).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from covidct.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Names that are never DICOM and are ignored without a warning (OS and tool droppings).
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "DICOMDIR"}


@dataclass(frozen=True)
class SliceHeader:
    """Position tags of one slice (mm), whichever the file has."""

    slice_location: float | None
    position_z: float | None
    instance_number: int | None


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why (shown in the data summary)."""

    path: Path
    reason: str


@dataclass
class Series(Generic[T]):
    """The readable slices of one patient folder, head first.

    ``slices[i]`` is what ``convert`` returned for the i-th slice; ``locations[i]`` its position
    (mm) along the ordering key named by ``order_key``.
    """

    folder: Path
    slices: list[T]
    locations: list[float]
    paths: list[Path]
    order_key: str
    skipped: list[Skipped] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def _float_or_none(value: object) -> float | None:
    try:
        return None if value is None or value == "" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def read_header(ds: pydicom.Dataset) -> SliceHeader:
    """Position tags of a dataset; a tag that is absent or malformed becomes None."""
    ipp = ds.get("ImagePositionPatient")
    z = _float_or_none(ipp[2]) if ipp is not None and len(ipp) == 3 else None
    instance = _float_or_none(ds.get("InstanceNumber"))
    return SliceHeader(
        slice_location=_float_or_none(ds.get("SliceLocation")),
        position_z=z,
        instance_number=None if instance is None else int(instance),
    )


def to_hounsfield(ds: pydicom.Dataset) -> np.ndarray:
    """Decode one single-frame slice to Hounsfield units.

    Returns float32 (rows, cols) HU. RescaleSlope/Intercept are applied (identity when absent).
    MONOCHROME1 (minimum = white) is mirrored within the stored bit range first, so that larger
    values always mean denser tissue. Compressed transfer syntaxes (JPEG Lossless, JPEG 2000,
    RLE, ...) are decoded by pydicom's plugins (pylibjpeg).
    """
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"multi-frame image ({ds.NumberOfFrames} frames); expected one slice per file")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"SamplesPerPixel={ds.SamplesPerPixel}; a CT slice must be grayscale")
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise ValueError(f"pixel array has shape {stored.shape}; expected (rows, cols)")
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        stored = (lo + hi) - stored.astype(np.int64)
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def _order(headers: list[SliceHeader], folder: Path) -> tuple[str, list[float]]:
    """Pick the ordering key every slice has; return its name and per-slice head-first sort values."""
    if all(h.slice_location is not None for h in headers):
        return "SliceLocation", [-h.slice_location for h in headers]  # type: ignore[operator]
    if all(h.position_z is not None for h in headers):
        return "ImagePositionPatient", [-h.position_z for h in headers]  # type: ignore[operator]
    if all(h.instance_number is not None for h in headers):
        return "InstanceNumber", [float(h.instance_number) for h in headers]  # type: ignore[arg-type]
    raise DataError(
        f"{folder}: cannot order slices: not every file has SliceLocation, ImagePositionPatient or "
        "InstanceNumber. File names are never used for order; fix the headers or remove the odd files."
    )


def list_files(folder: Path) -> list[Path]:
    """Regular files directly inside ``folder`` (sorted by name only for reproducible reading)."""
    return sorted(Path(e.path) for e in os.scandir(folder) if e.is_file())


def read_series(
    folder: str | Path,
    convert: Callable[[np.ndarray], T] = lambda hu: hu,  # type: ignore[assignment,return-value]
    warn: bool = True,
) -> Series[T]:
    """Read every DICOM slice of one patient folder, head first.

    Args:
        folder: a patient folder holding one CT series, one slice per file.
        convert: applied to each slice's HU array (float32 (rows, cols)) right after decoding,
            e.g. window + resize, so that a large series never sits in memory as float HU.
        warn: log a warning per skipped file (callers that report ``skipped`` themselves pass False).

    Non-DICOM files (``.DS_Store``, text, ...) are ignored. A DICOM that cannot be decoded is
    skipped with a warning naming the file and the reason. A folder with no readable slice raises
    :class:`DataError` naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder. Point data.root (or input) at an existing patient folder.")
    converted: list[T] = []
    headers: list[SliceHeader] = []
    paths: list[Path] = []
    skipped: list[Skipped] = []
    ignored: list[Path] = []
    for path in list_files(folder):
        if path.name in IGNORED_NAMES or path.name.startswith("."):
            ignored.append(path)
            continue
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            ignored.append(path)
            continue
        except Exception as exc:  # truncated or corrupt file: pydicom raises many types
            skipped.append(Skipped(path, f"unreadable DICOM: {type(exc).__name__}: {exc}"))
            continue
        try:
            hu = to_hounsfield(ds)
        except Exception as exc:  # missing decoder, corrupt pixel data, wrong shape, ...
            skipped.append(Skipped(path, f"cannot decode pixel data: {type(exc).__name__}: {exc}"))
            continue
        converted.append(convert(hu))
        headers.append(read_header(ds))
        paths.append(path)
    for s in skipped if warn else ():
        log.warning("Skipping %s: %s", s.path, s.reason)
    if not converted:
        detail = f"; {len(skipped)} DICOM file(s) could not be decoded (first: {skipped[0].reason})" if skipped else ""
        raise DataError(
            f"{folder}: no readable DICOM slice ({len(ignored)} non-DICOM file(s) ignored{detail}). "
            "Check the folder, or remove the patient."
        )
    order_key, sort_values = _order(headers, folder)
    order = sorted(range(len(converted)), key=lambda i: (sort_values[i], paths[i].name))
    locations = {
        "SliceLocation": [h.slice_location for h in headers],
        "ImagePositionPatient": [h.position_z for h in headers],
        "InstanceNumber": [h.instance_number for h in headers],
    }[order_key]
    return Series(
        folder=folder,
        slices=[converted[i] for i in order],
        locations=[float(locations[i]) for i in order],  # type: ignore[arg-type]
        paths=[paths[i] for i in order],
        order_key=order_key,
        skipped=skipped,
        ignored=ignored,
    )
