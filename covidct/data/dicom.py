"""Read CT DICOM slices into Hounsfield units and patient folders into position-ordered series.

Slices are put in the canonical **head-first** order of :mod:`covidct.data.slice_order` (SliceLocation
descending, then ImagePositionPatient z, then InstanceNumber; never file names). This is the order the
COVID-CT-MD slice labels use (column i = i-th slice by SliceLocation descending).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from covidct.data import hounsfield
from covidct.data.series import AUTO, SERIES_TAGS, ImageHeader, SeriesInfo, choose_series, image_header
from covidct.data.slice_order import (
    SeriesOrder,
    SliceHeader,
    choose_order,
    float_or_none,
    place_slices,
    read_header,
    slice_location,
)
from covidct.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Names that are never DICOM and are ignored without a warning (OS and tool droppings).
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "DICOMDIR"}


#: A series in which more than this share of the CT slices fails to decode is corrupt as a whole: the
#: few slices that do decode (possibly into noise) are not voted on; the patient is an error.
MAX_UNDECODABLE_FRACTION = 0.5


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why (shown in the data summary)."""

    path: Path
    reason: str


@dataclass
class Series(Generic[T]):
    """The readable slices of one patient folder, head first.

    ``slices[i]`` is what ``convert`` returned for the i-th slice; ``locations[i]`` its position
    (mm, or the instance number) along ``order_key``; ``ranks[i]`` its head-first index in the whole
    series: the kept slices *and* the skipped slices whose position is known (an undecodable slice
    still takes its place, so the slices after it keep their own rank, which is the column of the
    dataset's slice labels). ``series_length`` counts those positions. ``unplaced`` lists skipped
    files that may be slices of the series but whose position cannot be read: with any of them, the
    ranks (and so the slice labels) of this series are ambiguous. ``series`` is the chosen series
    (see :mod:`covidct.data.series`), ``other_series`` every other series or image group of the
    folder with why it was not used (their files are in neither ``skipped`` nor ``ignored``);
    ``sop_digest`` identifies the kept images (SOPInstanceUIDs), to find one series under two ids.
    """

    folder: Path
    slices: list[T]
    locations: list[float]
    paths: list[Path]
    order_key: str
    ranks: list[int] = field(default_factory=list)
    series_length: int = 0
    order_note: str = ""
    unplaced: list[Skipped] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: list[Skipped] = field(default_factory=list)
    series: SeriesInfo | None = None
    other_series: list[SeriesInfo] = field(default_factory=list)
    sop_digest: str = ""


def one_line(text: object) -> str:
    """A message on one line (decoder errors come over several)."""
    return " ".join(str(text).split())


def to_hounsfield(ds: pydicom.Dataset) -> np.ndarray:
    """Decode one single-frame slice to Hounsfield units: float32 (rows, cols) HU.

    The modality rescale is applied (identity when absent) and padding pixels become air; MONOCHROME1
    is a display instruction and changes nothing (see :mod:`covidct.data.hounsfield`). Compressed
    transfer syntaxes (JPEG Lossless, JPEG 2000, RLE, ...) are decoded by pydicom's plugins (pylibjpeg).
    """
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"multi-frame image ({ds.NumberOfFrames} frames); expected one slice per file")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"SamplesPerPixel={ds.SamplesPerPixel}; a CT slice must be grayscale")
    with _quiet_pydicom():  # pydicom logs a traceback per undecodable frame; the caller reports the error
        stored = ds.pixel_array
    if stored.ndim != 2:
        raise ValueError(f"pixel array has shape {stored.shape}; expected (rows, cols)")
    return hounsfield.to_hounsfield(ds, stored)


_logs_off_depth = 0  # how many _pydicom_logs_off blocks are open (one process reads one series at a time)


@contextmanager
def _pydicom_logs_off() -> Iterator[None]:
    """pydicom's log records off (its logger's level above CRITICAL; its child loggers inherit it), re-entrant:
    the level is set once for a whole series, not per file (setting a level clears every logger's cache, which
    cost ~8% of predict's time when done four times a slice)."""
    global _logs_off_depth
    logger = logging.getLogger("pydicom")
    level = logger.level
    if _logs_off_depth == 0:
        logger.setLevel(logging.CRITICAL + 1)
    _logs_off_depth += 1
    try:
        yield
    finally:
        _logs_off_depth -= 1
        if _logs_off_depth == 0:
            logger.setLevel(level)


@contextmanager
def _quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Silence pydicom's own log records and warnings (collected in the yielded list) while reading
    one file: every problem is reported once, by the caller, as the file's skip reason."""
    with _pydicom_logs_off(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


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


#: The only tags parsed from each file: pixel description, rescale, padding, position, modality, series
#: identity and kind (:data:`covidct.data.series.SERIES_TAGS`). Patient
#: attributes (PatientName, PatientID, dates, InstitutionName, AccessionNumber, ...) are never read,
#: so they cannot reach a log, a cache, a CSV, a checkpoint or W&B.
READ_TAGS = [
    "Modality",
    "SOPClassUID",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "SliceLocation",
    "ImagePositionPatient",
    "InstanceNumber",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    *SERIES_TAGS,
    "PixelData",
]

#: Largest accepted Rows or Columns (px). CT slices are 512 (sometimes 768 or 1024) px a side; a
#: larger declared size is refused before decoding, so a corrupt header cannot exhaust memory.
MAX_SIDE = 4096


class SliceRejected(Exception):
    """A DICOM CT file that is not a usable slice; the message says why."""


class NotCTSlice(SliceRejected):
    """A DICOM file of another modality (MR, a structured report, ...): not part of the CT series."""


def check_slice_header(ds: pydicom.Dataset, read_warnings: Sequence[str] = ()) -> None:
    """Refuse, before any pixel is decoded, a file that is not a single-frame CT slice with a usable HU
    rescale. ``read_warnings``: what pydicom warned while reading the file (the reason a PixelData
    element that is there could not be parsed)."""
    modality = str(ds.get("Modality", "") or "").strip()
    if modality and modality != "CT":
        raise NotCTSlice(f"Modality {modality}, not CT")
    if "PixelData" not in ds:
        if read_warnings:
            raise SliceRejected(
                f"pixel data cannot be parsed ({one_line(read_warnings[0])}): a corrupt or cut-short file"
            )
        raise SliceRejected("no pixel data (a structured report, a header-only file, or a file cut short)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise SliceRejected(
            f"declares a {rows} x {cols} px image; refused before decoding (a CT slice is at most {MAX_SIDE} px a side)"
        )
    has_rescale = "RescaleSlope" in ds and "RescaleIntercept" in ds
    if not has_rescale and "ModalityLUTSequence" not in ds and int(ds.get("PixelRepresentation", 0) or 0) != 1:
        raise SliceRejected(
            "no RescaleSlope/RescaleIntercept and unsigned pixels: Hounsfield units unknown "
            "(CT usually has slope 1, intercept -1024: add the tags to the files)"
        )
    if has_rescale:
        slope, intercept = float_or_none(ds.RescaleSlope), float_or_none(ds.RescaleIntercept)
        if slope is None or intercept is None or not math.isfinite(slope) or not math.isfinite(intercept) or slope == 0:
            raise SliceRejected(
                f"RescaleSlope {ds.RescaleSlope}, RescaleIntercept {ds.RescaleIntercept}: not a "
                "usable rescale (a slope of 0 or a non-finite value would turn every pixel into "
                "one HU value); fix the header"
            )


@dataclass
class _SeriesFile:
    """One CT file of a patient folder: its headers, and its decoded slice or why it was skipped. ``ds``
    holds the parsed header (pixel data read only when decoded) until the file is decoded or dropped."""

    path: Path
    header: SliceHeader | None  # None: the header cannot be read, so neither can the position
    image: ImageHeader | None = None  # series and kind; None when the header cannot be read
    ds: pydicom.Dataset | None = None
    shape: tuple[int, int] = (0, 0)
    value: object = None
    air_hu: float = 0.0
    skip_reason: str = ""


#: Elements larger than this (bytes) are read from the file only when used: the pixel data of a file
#: is read when the file is decoded, so the files of series that are not chosen are never read whole.
DEFER_SIZE = 4096


def _read_header(path: Path) -> _SeriesFile | Skipped | None:
    """Parse one file's header. Returns a :class:`_SeriesFile` for a file that is (or may be, when its
    header cannot be read) a CT image: with ``skip_reason`` when it cannot be a usable slice; a
    :class:`Skipped` for a DICOM file of another modality; None for a file that is not DICOM at all."""
    try:
        with _quiet_pydicom() as caught:
            ds = pydicom.dcmread(path, specific_tags=READ_TAGS, defer_size=DEFER_SIZE)
    except InvalidDicomError:
        if path.suffix.lower() != ".dcm":
            return None
        return _SeriesFile(path, None, skip_reason="named .dcm but not a DICOM file (no 'DICM' header)")
    except Exception as exc:  # truncated or corrupt file: pydicom raises many types
        return _SeriesFile(path, None, skip_reason=f"unreadable DICOM: {type(exc).__name__}: {one_line(exc)}")
    header = read_header(ds)
    try:
        check_slice_header(ds, [str(w.message) for w in caught])
    except NotCTSlice as exc:
        return Skipped(path, str(exc))
    except SliceRejected as exc:
        return _SeriesFile(path, header, image_header(ds), skip_reason=str(exc))
    return _SeriesFile(path, header, image_header(ds), ds)


def _decode(f: _SeriesFile, convert: Callable[[np.ndarray], object]) -> None:
    """Decode ``f``'s pixels into ``value`` (through ``convert``), or set ``skip_reason``; frees ``ds``."""
    try:
        hu = to_hounsfield(f.ds)  # type: ignore[arg-type]
    except Exception as exc:  # missing decoder, truncated or corrupt pixel data, wrong shape, ...
        f.skip_reason = f"cannot decode pixel data: {type(exc).__name__}: {one_line(exc)}"
    else:
        f.shape, f.air_hu, f.value = hu.shape, hounsfield.slice_air(hu), convert(hu)
    f.ds = None


def _drop_odd_sizes(decoded: list[_SeriesFile]) -> None:
    """Mark the slices whose (rows, cols) differ from the series' most common size as skipped."""
    common = Counter(d.shape for d in decoded).most_common(1)[0][0]
    for d in decoded:
        if d.shape != common:
            d.skip_reason = (
                f"image size {d.shape[0]} x {d.shape[1]} px differs from the series' {common[0]} x {common[1]} px"
            )


@_pydicom_logs_off()
def read_series(
    folder: str | Path,
    convert: Callable[[np.ndarray], T] = lambda hu: hu,  # type: ignore[assignment,return-value]
    warn: bool = True,
    series: str = AUTO,
    min_slices: int = 1,
) -> Series[T]:
    """Read the CT series of one patient folder, head first.

    Args:
        folder: a patient folder, one image per file.
        convert: applied to each slice's HU array (float32 (rows, cols)) right after decoding,
            e.g. window + resize, so that a large series never sits in memory as float HU.
        warn: log a warning per skipped file (callers that report ``skipped`` themselves pass False).
        series: which axial series is the patient's when the folder holds several (``data.series``:
            ``auto`` or a part of its SeriesDescription / ConvolutionKernel; see :mod:`covidct.data.series`).
        min_slices: fewest usable slices a series may have (``data.min_slices``).

    Localizers, non-axial images and the other series are left out, each group with its reason in
    ``other_series``. Every other file not used is listed with its reason: in ``ignored`` (system files,
    subfolders, links, non-DICOM files not named ``.dcm``) or in ``skipped`` (DICOM, or named ``.dcm``,
    but unusable: unreadable, not CT, no pixel data, absurd size, no or broken rescale, undecodable, a
    size differing from the series, a position already taken). The order uses :func:`choose_order`; see
    :class:`Series` for ranks. Raises :class:`DataError` for a folder with no axial series, fewer than
    ``min_slices`` usable slices, more than :data:`MAX_UNDECODABLE_FRACTION` undecodable slices, or pixel
    values that are not HU (:func:`covidct.data.hounsfield.check_series_hu`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder. Point data.root (or input) at an existing patient folder.")
    files, ignored = scan_folder(folder)
    read, skipped = _read_headers(folder, files, ignored)  # skipped: files of other modalities, so far
    chosen, members, other_series = choose_series(
        [f.image for f in read], [not f.skip_reason for f in read], series, folder
    )
    # the chosen series' files, and the unreadable ones (they may be its slices: their place is unknown)
    ct_files = [read[i] for i in members] + [f for f in read if f.image is None]
    _decode_series(folder, ct_files, convert)
    order, ranked, unplaced = _order_series(folder, ct_files)
    skipped += [Skipped(f.path, f.skip_reason) for f in ct_files if f.skip_reason]
    for s in skipped if warn else ():
        log.warning("Skipping %s: %s", s.path, s.reason)
    kept = [(rank, f) for rank, f in ranked if not f.skip_reason]
    _check_series(folder, [f for _, f in kept], skipped, chosen, min_slices)
    assert order is not None
    return Series(
        folder=folder,
        slices=[f.value for _, f in kept],  # type: ignore[misc]
        locations=[slice_location(f.header, order.key) for _, f in kept],  # type: ignore[arg-type]
        paths=[f.path for _, f in kept],
        order_key=order.key,
        ranks=[rank for rank, _ in kept],
        series_length=ranked[-1][0] + 1,
        order_note=order.note,
        unplaced=sorted((Skipped(path, reason) for path, reason in unplaced), key=lambda s: s.path.name),
        skipped=sorted(skipped, key=lambda s: s.path.name),
        ignored=ignored,
        series=chosen,
        other_series=other_series,
        sop_digest=_sop_digest([f for _, f in kept]),
    )


def _read_headers(folder: Path, files: list[Path], ignored: list[Skipped]) -> tuple[list[_SeriesFile], list[Skipped]]:
    """The headers of ``files``: the (possibly) CT files, and the DICOM files of other modalities; files that
    are not DICOM are appended to ``ignored``. Raises :class:`DataError` when no file has a readable CT header."""
    read: list[_SeriesFile] = []
    skipped: list[Skipped] = []
    for path in files:
        result = _read_header(path)
        if result is None:
            ignored.append(Skipped(path, "not a DICOM file"))
        elif isinstance(result, Skipped):
            skipped.append(result)
        else:
            read.append(result)
    if not any(f.image is not None for f in read):
        reasons = [f.skip_reason for f in read] + [s.reason for s in skipped]
        detail = f"; {len(reasons)} DICOM file(s) unusable (first: {reasons[0]})" if reasons else ""
        raise DataError(
            f"{folder}: no readable DICOM slice ({len(ignored)} other entr(ies) ignored{detail}). "
            "Check the folder, or remove the patient."
        )
    return read, skipped


def _decode_series(folder: Path, ct_files: list[_SeriesFile], convert: Callable[[np.ndarray], object]) -> None:
    """Decode every usable file of ``ct_files`` (:func:`_decode`). Raises :class:`DataError` when more than
    :data:`MAX_UNDECODABLE_FRACTION` of those tried cannot be decoded (a corrupt series)."""
    for f in ct_files:
        if not f.skip_reason:
            _decode(f, convert)
    undecodable = [f for f in ct_files if f.skip_reason.startswith("cannot decode")]
    attempted = undecodable + [f for f in ct_files if not f.skip_reason]
    if attempted and len(undecodable) > MAX_UNDECODABLE_FRACTION * len(attempted):
        raise DataError(
            f"{folder}: {len(undecodable)} of {len(attempted)} CT slices cannot be decoded (first: "
            f"{undecodable[0].path.name}: {undecodable[0].skip_reason}). A series that is mostly corrupt is not "
            f"used (the limit is {MAX_UNDECODABLE_FRACTION:.0%}): copy the folder again from its source."
        )


def _order_series(
    folder: Path, ct_files: list[_SeriesFile]
) -> tuple[SeriesOrder | None, list[tuple[int, _SeriesFile]], list[tuple[Path, str]]]:
    """Order the decoded files of ``ct_files`` head first (odd sizes and duplicates marked skipped): the
    order, (rank, file) of every placed file, (path, reason) of the skipped files with unknown position.
    (None, [], []) when no file was decoded."""
    decoded = [f for f in ct_files if not f.skip_reason]
    if not decoded:
        return None, [], []
    _drop_odd_sizes(decoded)
    order = choose_order([f.header for f in ct_files if not f.skip_reason], folder)  # type: ignore[misc]
    ranked, unplaced = place_slices(ct_files, order)
    return order, ranked, unplaced


def _check_series(
    folder: Path, kept: list[_SeriesFile], skipped: list[Skipped], chosen: SeriesInfo, min_slices: int
) -> None:
    """Raise :class:`DataError` when the kept slices are too few, or their values are not HU."""
    if not kept:
        detail = f"; {len(skipped)} DICOM file(s) unusable (first: {skipped[0].reason})" if skipped else ""
        raise DataError(f"{folder}: no readable DICOM slice in series {chosen.label}{detail}. Check the folder.")
    if len(kept) < min_slices:
        raise DataError(
            f"{folder}: {len(kept)} usable slice(s) in series {chosen.label}, fewer than the {min_slices} a series "
            "needs (data.min_slices; predict.py min_slices): a stray image or a partial export, not a patient's CT"
        )
    why = hounsfield.check_series_hu([f.air_hu for f in kept])
    if why:
        raise DataError(f"{folder}: {why}")


def _sop_digest(kept: list[_SeriesFile]) -> str:
    """sha256 (hex, 16 digits) of the kept images' sorted SOPInstanceUIDs; "" when any image lacks one."""
    uids = sorted(f.image.sop_uid for f in kept if f.image is not None)
    if len(uids) != len(kept) or not all(uids):
        return ""
    return hashlib.sha256("\0".join(uids).encode()).hexdigest()[:16]
