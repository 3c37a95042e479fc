"""Slice order: the head-first position of each slice of a series, from its position tags.

Canonical slice order in covidct is **head first**: SliceLocation descending, falling back to
ImagePositionPatient z descending (DICOM patient z grows towards the head), then InstanceNumber
ascending. File names are never used for ordering (only to break exact ties reproducibly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import pydicom

from covidct.errors import DataError


@dataclass(frozen=True)
class SliceHeader:
    """Position tags of one slice, whichever the file has: SliceLocation and ImagePositionPatient z
    in mm, InstanceNumber a count. A tag that is absent or not a number is None; a value that is a
    number but not finite (nan, inf) is kept, so that the ordering can say why it was not used."""

    slice_location: float | None
    position_z: float | None
    instance_number: float | None

    def value(self, key: str) -> float | None:
        """The head-first sort value of ``key`` (one of :data:`ORDER_KEYS`): smaller = nearer the head."""
        if key == "SliceLocation":
            return None if self.slice_location is None else -self.slice_location
        if key == "ImagePositionPatient":
            return None if self.position_z is None else -self.position_z
        return self.instance_number


#: Slice ordering keys, most trusted first. SliceLocation and ImagePositionPatient z grow towards the
#: head (sorted descending: head first); InstanceNumber is sorted ascending.
ORDER_KEYS = ("SliceLocation", "ImagePositionPatient", "InstanceNumber")

#: Largest believable |position| (mm) of a slice: 100 m. Larger values (1e300, a corrupt header) mean
#: the tag is broken, and the series is ordered by the next key instead.
MAX_POSITION_MM = 1e5

#: Two positions closer than this (mm, or instance numbers) are the same position.
SAME_POSITION = 1e-3


@dataclass(frozen=True)
class SeriesOrder:
    """How a series was ordered: ``keys`` (from :data:`ORDER_KEYS`) sort it, the first most
    significant, the next ones breaking its ties; ``note`` says why a preferred key was not used or
    had ties ("" when SliceLocation alone ordered the series)."""

    keys: tuple[str, ...]
    note: str = ""

    @property
    def key(self) -> str:
        return self.keys[0]

    def sort_values(self, header: SliceHeader) -> tuple[float, ...] | None:
        """Head-first sort tuple of a slice; None when it lacks a finite, believable value of a key."""
        values = tuple(header.value(k) for k in self.keys)
        return values if all(v is not None and believable(v) for v in values) else None  # type: ignore[misc]


class PositionedFile(Protocol):
    """What :func:`place_slices` reads of a file of a series: its path, position tags (None: unreadable)
    and skip reason ("" for a kept slice; set here for a duplicate)."""

    path: Path
    header: SliceHeader | None
    skip_reason: str


F = TypeVar("F", bound=PositionedFile)


def float_or_none(value: object) -> float | None:
    """A header value as a float; None when it is absent, empty or not a number (nan and inf are kept)."""
    try:
        return None if value is None or value == "" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def believable(value: float) -> bool:
    """Whether a position (mm, or an instance number) is finite and within :data:`MAX_POSITION_MM`."""
    return math.isfinite(value) and abs(value) <= MAX_POSITION_MM


def read_header(ds: pydicom.Dataset) -> SliceHeader:
    """Position tags of a dataset; a tag that is absent or malformed becomes None."""
    ipp = ds.get("ImagePositionPatient")
    try:
        z = float_or_none(ipp[2]) if ipp is not None and len(ipp) == 3 else None
    except TypeError:  # a single value where three are expected
        z = None
    return SliceHeader(
        slice_location=float_or_none(ds.get("SliceLocation")),
        position_z=z,
        instance_number=float_or_none(ds.get("InstanceNumber")),
    )


def choose_order(headers: Sequence[SliceHeader], folder: Path) -> SeriesOrder:
    """The keys that order a series: every key of :data:`ORDER_KEYS` that each slice has with a finite,
    believable value, and that does not hold one value for the whole series (a shared SliceLocation
    orders nothing). The first sorts; the later ones break its ties."""
    notes, keys = [], []
    n = len(headers)
    for key in ORDER_KEYS:
        values = [h.value(key) for h in headers]
        present = [v for v in values if v is not None]
        bad = [v for v in present if not believable(v)]
        if len(present) < n:
            problem = f"{key} missing on {n - len(present)} of {n} slices"
        elif bad:
            problem = f"{key} not finite or beyond {MAX_POSITION_MM:g} mm on {len(bad)} of {n} slices ({bad[0]:g})"
        elif n > 1 and max(present) - min(present) < SAME_POSITION:
            problem = f"{key} is the same ({abs(present[0]):g}) on every slice"
        else:
            keys.append(key)
            continue
        if not keys:  # a problem of a key after the one that sorts does not matter
            notes.append(problem)
    if not keys:
        raise DataError(
            f"{folder}: cannot order slices: {'; '.join(notes)}. File names are never used for order; "
            "fix the headers or remove the odd files."
        )
    if notes:
        notes.append(f"ordered by {keys[0]}")
    return SeriesOrder(tuple(keys), "; ".join(notes))


def place_slices(files: list[F], order: SeriesOrder) -> tuple[list[tuple[int, F]], list[tuple[Path, str]]]:
    """Head-first (rank, file) of every file whose position is known, and (path, reason) of the skipped
    files whose position is not (their place in the series is unknown).

    Files are sorted by ``order``'s keys, then by name. A file at the same position as the file
    before it (every key within :data:`SAME_POSITION`) takes the same rank; a *kept* slice there is
    marked a duplicate (skipped).
    """
    placed, unplaced = [], []
    for f in files:
        values = None if f.header is None else order.sort_values(f.header)
        if values is None:
            if not f.skip_reason:  # choose_order picked keys every kept slice has: cannot happen
                raise AssertionError(f"{f.path}: a kept slice without a position")
            unplaced.append((f.path, f"{f.skip_reason}; its position ({', '.join(order.keys)}) is unknown"))
        else:
            placed.append((values, f))
    placed.sort(key=lambda vf: (vf[0], vf[1].path.name))
    ranked: list[tuple[int, F]] = []
    rank, previous, previous_kept = -1, None, None
    for values, f in placed:
        same = previous is not None and all(abs(a - b) < SAME_POSITION for a, b in zip(values, previous, strict=True))
        if not same:
            rank, previous_kept = rank + 1, None
        if not f.skip_reason:
            if previous_kept is not None:
                where = ", ".join(f"{slice_location(f.header, k):g}" for k in order.keys)  # type: ignore[arg-type]
                f.skip_reason = (
                    f"same {', '.join(order.keys)} ({where}) as {previous_kept.path.name}: a "
                    "duplicate slice or a second series in the folder"
                )
            else:
                previous_kept = f
        previous = values
        ranked.append((rank, f))
    return ranked, unplaced


def slice_location(header: SliceHeader, key: str) -> float:
    """The slice's value of ``key``: mm for the positions, the number for InstanceNumber."""
    value = header.value(key)
    assert value is not None
    return value if key == "InstanceNumber" else -value
