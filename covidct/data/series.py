"""Which files of a patient folder are its CT series: one axial series, chosen on purpose.

A patient folder exported from a PACS may hold more than the series that was labelled: a localizer
(scout), a sagittal or coronal reformat, a second reconstruction of the same scan (another kernel or
slice thickness). Files are grouped by SeriesInstanceUID and by what each image is:

* ``localizer``: ImageType contains LOCALIZER; never a slice;
* ``non-axial``: the image plane's normal (ImageOrientationPatient) is more than
  :data:`MAX_TILT_DEGREES` from the patient's head-feet axis (a reformat, or a scout without
  ImageType); never a slice;
* ``axial``: everything else (also images without ImageOrientationPatient: nothing says otherwise).

Of the axial series, one is the patient's series (:func:`choose_series`, ``data.series``):

* ``auto``: the series with the most usable images; ties go to the thinnest SliceThickness, then to
  the smallest SeriesInstanceUID (so the choice never depends on file order). The longest series is
  the one that covers the chest at full resolution; a second reconstruction of the same scan has the
  same length and the thinner one keeps the most detail;
* any other text: the axial series whose SeriesDescription or ConvolutionKernel contains it (case
  insensitive); ``auto`` decides among several matches; no match is an error that lists the series.

This module reads no pixels: it decides from the headers which files are worth decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom

from covidct.errors import ConfigError, DataError

#: ``data.series`` default: the axial series with the most slices (see the module docstring).
AUTO = "auto"

#: Largest angle (degrees) between an image plane's normal and the head-feet axis of an axial slice.
#: Gantry tilt reaches ~30 degrees; a coronal or sagittal reformat or a scout is at 90.
MAX_TILT_DEGREES = 45.0

#: The tags this module reads (besides what :mod:`covidct.data.dicom` reads for the pixels).
SERIES_TAGS = [
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SeriesDescription",
    "ConvolutionKernel",
    "SliceThickness",
    "ImageType",
    "ImageOrientationPatient",
]

KINDS = ("axial", "localizer", "non-axial")


@dataclass(frozen=True)
class ImageHeader:
    """What one file says about the series it belongs to. Strings are "" when the tag is absent;
    ``kind`` is one of :data:`KINDS`, ``kind_reason`` says why an image is not axial ("" if it is)."""

    series_uid: str
    sop_uid: str
    description: str
    kernel: str
    thickness_mm: float | None
    kind: str
    kind_reason: str = ""


@dataclass(frozen=True)
class SeriesInfo:
    """One group of a folder's images: a series (by SeriesInstanceUID) and kind. ``n_images`` counts
    the images whose header is usable; ``note`` says why it was chosen, or why not."""

    uid: str
    description: str
    kernel: str
    thickness_mm: float | None
    kind: str
    n_images: int
    note: str = ""

    @property
    def label(self) -> str:
        """A short name for messages: description, kernel and thickness where known, then the UID."""
        parts = [p for p in (self.description, self.kernel) if p]
        if self.thickness_mm is not None:
            parts.append(f"{self.thickness_mm:g} mm")
        return f"{' / '.join(parts) or 'no description'} ({self.uid or 'no SeriesInstanceUID'})"

    def as_dict(self) -> dict[str, object]:
        """For the cache manifest and the data summary."""
        return {
            "uid": self.uid,
            "description": self.description,
            "kernel": self.kernel,
            "thickness_mm": self.thickness_mm,
            "kind": self.kind,
            "n_images": self.n_images,
            "note": self.note,
        }


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return " ".join(str(value).split())


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def tilt_degrees(orientation: object) -> float | None:
    """Angle (degrees, 0..90) between the plane of ImageOrientationPatient (row and column direction
    cosines, 6 numbers) and an axial plane; None when the tag is absent or malformed."""
    try:
        r = [float(v) for v in orientation]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(r) != 6 or not all(map(math.isfinite, r)):
        return None
    n = (r[1] * r[5] - r[2] * r[4], r[2] * r[3] - r[0] * r[5], r[0] * r[4] - r[1] * r[3])
    norm = math.sqrt(sum(c * c for c in n))
    if norm < 1e-6:  # parallel row and column: not an orientation
        return None
    return math.degrees(math.acos(min(1.0, abs(n[2]) / norm)))


def image_header(ds: pydicom.Dataset) -> ImageHeader:
    """The series-level tags of one dataset, and whether it is an axial slice."""
    image_type = {v.strip().upper() for v in _text(ds, "ImageType").split("\\")}
    tilt = tilt_degrees(ds.get("ImageOrientationPatient"))
    if "LOCALIZER" in image_type:
        kind, why = "localizer", "a localizer (ImageType contains LOCALIZER), not a slice"
    elif tilt is not None and tilt > MAX_TILT_DEGREES:
        kind, why = "non-axial", f"not axial (image plane {tilt:.0f} degrees from axial): a reformat or a scout"
    else:
        kind, why = "axial", ""
    return ImageHeader(
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        description=_text(ds, "SeriesDescription"),
        kernel=_text(ds, "ConvolutionKernel"),
        thickness_mm=_number(ds.get("SliceThickness")),
        kind=kind,
        kind_reason=why,
    )


def check_series_rule(rule: object, key: str = "data.series") -> str:
    """``rule`` as given, if it is ``auto`` or a non-empty text; else a ConfigError naming ``key``."""
    if not isinstance(rule, str) or not rule.strip():
        raise ConfigError(
            f"{key}={rule!r}: give 'auto' (the axial series with the most slices) or a part of the "
            "SeriesDescription or ConvolutionKernel of the series to use"
        )
    return rule.strip()


def check_min_slices(value: object, key: str = "data.min_slices") -> int:
    """``value`` if it is an integer >= 1; else a ConfigError naming ``key``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1 (usable slices a series needs), got {value!r}")
    return value


def _groups(headers: Sequence[ImageHeader | None]) -> dict[tuple[str, str], list[int]]:
    """File indices per (SeriesInstanceUID, kind); files without a header are in no group."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, h in enumerate(headers):
        if h is not None:
            groups.setdefault((h.series_uid, h.kind), []).append(i)
    return groups


def _info(headers: Sequence[ImageHeader | None], members: list[int], usable: Sequence[bool]) -> SeriesInfo:
    first = headers[members[0]]
    assert first is not None
    thickness = sorted({h.thickness_mm for i in members if (h := headers[i]) and h.thickness_mm is not None})
    return SeriesInfo(
        uid=first.series_uid,
        description=first.description,
        kernel=first.kernel,
        thickness_mm=thickness[0] if thickness else None,
        kind=first.kind,
        n_images=sum(usable[i] for i in members),
        note=first.kind_reason,
    )


def _auto_key(info: SeriesInfo) -> tuple[float, float, str]:
    return (-info.n_images, math.inf if info.thickness_mm is None else info.thickness_mm, info.uid)


def _why_chosen(chosen: SeriesInfo, rivals: list[SeriesInfo], rule: str) -> str:
    """Why ``chosen`` beat ``rivals`` (the other axial series that matched ``rule``)."""
    matched = f"matches data.series={rule!r}" if rule != AUTO else ""
    if not rivals:
        return matched
    best = min(rivals, key=_auto_key)
    if best.n_images < chosen.n_images:
        why = f"most slices ({chosen.n_images}; next {best.n_images})"
    elif chosen.thickness_mm is not None and (best.thickness_mm is None or best.thickness_mm > chosen.thickness_mm):
        next_mm = "unknown" if best.thickness_mm is None else f"{best.thickness_mm:g} mm"
        why = f"as many slices as another ({chosen.n_images}), thinner ({chosen.thickness_mm:g} mm; next {next_mm})"
    else:
        why = f"as many slices and as thick as another series: the smaller SeriesInstanceUID ({chosen.n_images} slices)"
    return "; ".join(p for p in (matched, f"chosen of {len(rivals) + 1} axial series: {why}") if p)


def choose_series(
    headers: Sequence[ImageHeader | None], usable: Sequence[bool], rule: str, folder: Path
) -> tuple[SeriesInfo, list[int], list[SeriesInfo]]:
    """The patient's series among a folder's files.

    Args:
        headers: per file, its :class:`ImageHeader`, or None when the header cannot be read.
        usable: per file, True when its header passed the slice checks (counted in ``n_images``).
        rule: ``auto`` or a part of SeriesDescription / ConvolutionKernel (see the module docstring).
        folder: for messages.

    Returns:
        (the chosen series, the indices of its files, every other group with the reason it was not used).
        The files of an axial group without a usable image go with the chosen series' files (they are
        skipped there with their own reasons, never hidden as another series).
        Raises :class:`DataError` when no axial series is there, or none matches ``rule``.
    """
    groups = _groups(headers)
    infos = {key: _info(headers, members, usable) for key, members in groups.items()}
    axial = [k for k, info in infos.items() if info.kind == "axial" and info.n_images > 0]
    if not axial:
        found = "; ".join(
            f"{info.label}: {info.n_images} image(s), {info.note or 'no usable image'}" for info in infos.values()
        )
        raise DataError(
            f"{folder}: no axial CT series ({found or 'no CT image'}). Check the folder, or remove the patient."
        )
    candidates = axial
    if rule != AUTO:
        needle = rule.lower()
        candidates = [k for k in axial if needle in infos[k].description.lower() or needle in infos[k].kernel.lower()]
        if not candidates:
            listed = "; ".join(infos[k].label for k in sorted(axial, key=lambda k: _auto_key(infos[k])))
            raise DataError(
                f"{folder}: no axial series has {rule!r} in its SeriesDescription or ConvolutionKernel "
                f"(data.series; the folder's series: {listed}). Name a part of one of them, or data.series=auto."
            )
    ranked = sorted(candidates, key=lambda k: _auto_key(infos[k]))
    chosen_key = ranked[0]
    chosen = replace(infos[chosen_key], note=_why_chosen(infos[chosen_key], [infos[k] for k in ranked[1:]], rule))
    members = list(groups[chosen_key])
    others = []
    for key, info in sorted(infos.items(), key=lambda kv: _auto_key(kv[1])):
        if key == chosen_key:
            continue
        if info.kind == "axial" and info.n_images == 0:  # unusable files only: skipped with their reasons
            members += groups[key]
            continue
        if info.kind == "axial":
            why = "does not match data.series" if key not in candidates else "not chosen"
            info = replace(info, note=f"another axial series, {why} ({info.n_images} slices)")
        others.append(info)
    return chosen, sorted(members), others


#: Columns that say which series a patient's row was read from (split.csv, predict's patient CSV).


def series_cells(chosen: dict | None, n_series: int) -> tuple[str, str, int]:
    """The :data:`SERIES_COLUMNS` cells of a patient: its series' UID and description (or kernel), and
    how many axial series its folder holds."""
    chosen = chosen or {}
    return str(chosen.get("uid", "")), str(chosen.get("description") or chosen.get("kernel") or ""), n_series


def series_line(info: dict) -> str:
    """One line for a series (``SeriesInfo.as_dict()``): what it is, how many images, and its note."""
    label = SeriesInfo(**info).label
    return f"{label}, {info['n_images']} image(s){': ' + str(info['note']) if info['note'] else ''}"


def other_axial(others: Sequence[dict]) -> list[dict]:
    """The other axial series (``SeriesInfo.as_dict()``) of a folder: a slice label row could belong to them too."""
    return [s for s in others if s["kind"] == "axial" and s["n_images"] > 0]


def find_shared_series(patients: Sequence[tuple[str, str, str]]) -> str:
    """Why two patients are one series, or "". ``patients``: (patient id, SeriesInstanceUID, SOP digest)
    each; an empty UID or digest matches nothing (unknown)."""
    seen: dict[tuple[str, str], str] = {}
    for pid, uid, digest in patients:
        if shared := add_series(seen, pid, uid, digest):
            return shared
    return ""


def add_series(seen: dict[tuple[str, str], str], pid: str, uid: str, digest: str) -> str:
    """Record patient ``pid``'s series (SeriesInstanceUID ``uid``, SOP digest ``digest``) in ``seen`` and return
    "", or why an earlier patient of ``seen`` holds the same series (then ``seen`` is left as it was). O(1) a
    patient, so a test set is checked in one pass."""
    keys = [key for key in (("SeriesInstanceUID", uid), ("SOPInstanceUIDs", digest)) if key[1]]
    for key in keys:
        if key in seen and seen[key] != pid:
            what = f"SeriesInstanceUID {uid}" if key[0] == "SeriesInstanceUID" else "the same SOPInstanceUIDs"
            return (
                f"patients {seen[key]!r} and {pid!r} hold one series ({what}): a copy or a link under two ids "
                "would be trained and validated on, or called twice. Keep one of the folders"
            )
    for key in keys:
        seen.setdefault(key, pid)
    return ""
