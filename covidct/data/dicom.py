"""Read CT DICOM slices into Hounsfield units and patient folders into position-ordered series.

Canonical slice order in covidct is **head first**: SliceLocation descending, falling back to
ImagePositionPatient z descending (DICOM patient z grows towards the head), then InstanceNumber
ascending. File names are never used for ordering. This is the order the COVID-CT-MD slice labels
use (column i = i-th slice by SliceLocation descending).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
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
    ignored: list[Skipped] = field(default_factory=list)


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


def scan_folder(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """Files to try as DICOM (sorted by name), and every other entry of ``folder`` with why it is not read."""
    files: list[Path] = []
    ignored: list[Skipped] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        kind = entry_kind(entry)
        if entry.name in IGNORED_NAMES or entry.name.startswith("."):
            ignored.append(Skipped(path, "system or hidden file"))
        elif kind == "file":
            files.append(path)
        elif kind == "dir":
            ignored.append(Skipped(path, "subfolder not read (slices must lie directly in the patient folder)"))
        elif kind == "bad link":
            ignored.append(Skipped(path, "broken or looping symbolic link"))
        else:
            ignored.append(Skipped(path, "not a regular file"))
    return files, ignored


def entry_kind(entry: os.DirEntry) -> str:
    """``file`` or ``dir`` (links followed), ``bad link`` (broken or looping) or ``other`` (fifo, socket, ...)."""
    try:
        if entry.is_file():
            return "file"
        if entry.is_dir():
            return "dir"
    except OSError:  # ELOOP: a link that points back to itself
        return "bad link"
    return "bad link" if entry.is_symlink() else "other"


#: The only tags parsed from each file: pixel description, rescale, position, modality. Patient
#: attributes (PatientName, PatientID, dates, InstitutionName, AccessionNumber, ...) are never read,
#: so they cannot reach a log, a cache, a CSV, a checkpoint or W&B.
READ_TAGS = [
    "Modality", "SOPClassUID", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "SliceLocation", "ImagePositionPatient", "InstanceNumber", "PixelData",
]

#: Largest accepted Rows or Columns (px). CT slices are 512 (sometimes 768 or 1024) px a side; a
#: larger declared size is refused before decoding, so a corrupt header cannot exhaust memory.
MAX_SIDE = 4096


class SliceRejected(Exception):
    """A DICOM file that is not a usable CT slice; the message says why."""


def check_slice_header(ds: pydicom.Dataset) -> None:
    """Refuse, before any pixel is decoded, a file that is not a single-frame CT slice with HU rescale."""
    modality = str(ds.get("Modality", "") or "").strip()
    if modality and modality != "CT":
        raise SliceRejected(f"Modality {modality}, not CT")
    if "PixelData" not in ds:
        raise SliceRejected("no pixel data (a structured report, a header-only file, or a file cut short)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise SliceRejected(f"declares a {rows} x {cols} px image; refused before decoding "
                            f"(a CT slice is at most {MAX_SIDE} px a side)")
    has_rescale = "RescaleSlope" in ds and "RescaleIntercept" in ds
    if not has_rescale and "ModalityLUTSequence" not in ds and int(ds.get("PixelRepresentation", 0) or 0) != 1:
        raise SliceRejected("no RescaleSlope/RescaleIntercept and unsigned pixels: Hounsfield units unknown "
                            "(CT usually has slope 1, intercept -1024: add the tags to the files)")


def _read_slice(path: Path) -> pydicom.Dataset:
    """The tags of :data:`READ_TAGS` of one file; raises InvalidDicomError, SliceRejected or a pydicom error."""
    ds = pydicom.dcmread(path, specific_tags=READ_TAGS)
    check_slice_header(ds)
    return ds


@dataclass
class _Decoded:
    path: Path
    header: SliceHeader
    shape: tuple[int, int]
    value: object


def _drop_odd_sizes(decoded: list[_Decoded], skipped: list[Skipped]) -> list[_Decoded]:
    """Keep the slices of the series' most common (rows, cols); the others go to ``skipped``."""
    common = Counter(d.shape for d in decoded).most_common(1)[0][0]
    for d in decoded:
        if d.shape != common:
            skipped.append(Skipped(d.path, f"image size {d.shape[0]} x {d.shape[1]} px differs from the series' "
                                           f"{common[0]} x {common[1]} px"))
    return [d for d in decoded if d.shape == common]


def _drop_duplicate_positions(ordered: list[_Decoded], keys: list[float], order_key: str,
                              skipped: list[Skipped]) -> tuple[list[_Decoded], list[float]]:
    """Drop slices at the position (within 0.001) of the slice before them in head-first order."""
    kept, kept_keys = [], []
    for d, key in zip(ordered, keys, strict=True):
        if kept and abs(key - kept_keys[-1]) < 1e-3:
            skipped.append(Skipped(d.path, f"same {order_key} ({abs(key):g}) as {kept[-1].path.name}: a duplicate "
                                           "slice or a second series in the folder"))
            continue
        kept.append(d)
        kept_keys.append(key)
    return kept, kept_keys


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

    Every file not used is listed with its reason: in ``ignored`` (system files, subfolders, links,
    non-DICOM files not named ``.dcm``) or in ``skipped`` (DICOM, or named ``.dcm``, but unusable:
    unreadable, not CT, no pixel data, absurd size, no rescale, undecodable, a size differing from
    the series, a position already taken). A folder with no usable slice raises :class:`DataError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder. Point data.root (or input) at an existing patient folder.")
    files, ignored = scan_folder(folder)
    skipped: list[Skipped] = []
    decoded: list[_Decoded] = []
    for path in files:
        try:
            ds = _read_slice(path)
        except InvalidDicomError:
            if path.suffix.lower() == ".dcm":
                skipped.append(Skipped(path, "named .dcm but not a DICOM file (no 'DICM' header)"))
            else:
                ignored.append(Skipped(path, "not a DICOM file"))
            continue
        except SliceRejected as exc:
            skipped.append(Skipped(path, str(exc)))
            continue
        except Exception as exc:  # truncated or corrupt file: pydicom raises many types
            skipped.append(Skipped(path, f"unreadable DICOM: {type(exc).__name__}: {exc}"))
            continue
        try:
            hu = to_hounsfield(ds)
        except Exception as exc:  # missing decoder, truncated or corrupt pixel data, wrong shape, ...
            skipped.append(Skipped(path, f"cannot decode pixel data: {type(exc).__name__}: {exc}"))
            continue
        decoded.append(_Decoded(path, read_header(ds), hu.shape, convert(hu)))
    if decoded:
        decoded = _drop_odd_sizes(decoded, skipped)
        order_key, keys = _order([d.header for d in decoded], folder)
        order = sorted(range(len(decoded)), key=lambda i: (keys[i], decoded[i].path.name))
        decoded, keys = _drop_duplicate_positions([decoded[i] for i in order], [keys[i] for i in order], order_key,
                                                  skipped)
    for s in skipped if warn else ():
        log.warning("Skipping %s: %s", s.path, s.reason)
    if not decoded:
        detail = f"; {len(skipped)} DICOM file(s) unusable (first: {skipped[0].reason})" if skipped else ""
        raise DataError(
            f"{folder}: no readable DICOM slice ({len(ignored)} other entr(ies) ignored{detail}). "
            "Check the folder, or remove the patient."
        )
    return Series(
        folder=folder,
        slices=[d.value for d in decoded],  # type: ignore[misc]
        locations=[-key if order_key != "InstanceNumber" else key for key in keys],
        paths=[d.path for d in decoded],
        order_key=order_key,
        skipped=sorted(skipped, key=lambda s: s.path.name),
        ignored=ignored,
    )
