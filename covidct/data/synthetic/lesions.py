"""Lesions painted into the lungs: peripheral bilateral ground-glass (COVID-19) or lobar
consolidation (CAP), on one contiguous run of slices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covidct.data.synthetic.anatomy import LungGeometry
from covidct.data.synthetic.noise import smooth_noise


@dataclass(frozen=True)
class _Blob:
    """One lesion on slices first..last (inclusive), centred in lung ``side`` (-1 right, +1 left)
    at polar position (rho, theta) of the lung ellipse (theta 0 = lateral); radius mm; target HU."""

    side: int
    first: int
    last: int
    rho: float
    theta: float
    drift: float  # theta change per slice (rad)
    radius: float
    aspect: float
    tilt: float
    hu: float
    edge: float  # width of the soft rim, fraction of the radius


def add_lesions(
    rng: np.random.Generator,
    hu: np.ndarray,
    lung: np.ndarray,
    geometry: LungGeometry,
    diagnosis: str,
    xx: np.ndarray,
    yy: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
) -> np.ndarray:
    """Paint lesions into ``hu`` (in place, lung voxels only); return the bool (n, H, W) lesion mask."""
    first, last = _lesion_run(rng, geometry.size)
    blobs = _covid_blobs(rng, first, last) if diagnosis == "COVID-19" else _cap_blobs(rng, first, last)
    irregular = smooth_noise(rng, z, x, 8.0, 8.0)
    lesion = np.zeros_like(lung)
    for blob in blobs:
        sl = slice(blob.first, blob.last + 1)
        weight = _blob_weight(blob, geometry, xx, yy, irregular[sl]) * lung[sl]
        patchy = blob.hu + 40.0 * irregular[sl]
        hu[sl] += weight * np.maximum(patchy - hu[sl], 0.0)  # only raises density: vessels stay visible
        lesion[sl] |= weight > 0
    return lesion


def _lesion_run(rng: np.random.Generator, size: np.ndarray) -> tuple[int, int]:
    """A contiguous run of 30-80% of the slices inside the lungs (where they are not tiny)."""
    n = len(size)
    inside = np.flatnonzero(size >= 0.35)
    longest = min(math.floor(0.8 * n), len(inside))
    length = int(rng.integers(min(math.ceil(0.3 * n), longest), longest + 1))
    first = int(rng.integers(inside[0], inside[-1] - length + 2))
    return first, first + length - 1


def _segments(rng: np.random.Generator, first: int, last: int, min_len: int, max_len: int) -> list[tuple[int, int]]:
    """Slice ranges (inclusive) that overlap a little and together cover first..last."""
    segments, start = [], first
    while True:
        end = min(last, start + int(rng.integers(min_len, max_len + 1)) - 1)
        segments.append((start, end))
        if end == last:
            return segments
        start = max(start + 1, end + 1 - int(rng.integers(0, 3)))


def _covid_blobs(rng: np.random.Generator, first: int, last: int) -> list[_Blob]:
    """Peripheral ground-glass opacities (-500..-300 HU, soft rims) in both lungs."""
    length = last - first + 1
    ranges = _segments(rng, first, last, max(2, length // 5), max(2, length // 3))
    for _ in range(int(rng.integers(2, 5))):
        start = int(rng.integers(first, last + 1))
        ranges.append((start, min(last, start + int(rng.integers(1, max(2, length // 3) + 1)))))
    first_side = 1 if rng.random() < 0.5 else -1
    sides = [first_side * (-1) ** k for k in range(len(ranges))]  # alternating: always bilateral
    return [
        _Blob(
            side,
            s,
            e,
            rho=rng.uniform(0.5, 0.8),
            theta=rng.uniform(-1.4, 1.4),
            drift=rng.uniform(-0.05, 0.05),
            radius=rng.uniform(18.0, 34.0),
            aspect=rng.uniform(0.75, 1.3),
            tilt=rng.uniform(0, np.pi),
            hu=rng.uniform(-500.0, -300.0),
            edge=rng.uniform(0.15, 0.35),
        )
        for side, (s, e) in zip(sides, ranges, strict=True)
    ]


def _cap_blobs(rng: np.random.Generator, first: int, last: int) -> list[_Blob]:
    """Lobar consolidation (-150..+30 HU, sharper rims), larger, one-sided in most patients."""
    length = last - first + 1
    ranges = _segments(rng, first, last, max(2, length // 2), length)
    if rng.random() < 0.5:
        start = int(rng.integers(first, last + 1))
        ranges.append((start, min(last, start + length // 2)))
    side = 1 if rng.random() < 0.5 else -1
    one_sided = rng.random() < 0.7
    return [
        _Blob(
            side if one_sided else int(rng.choice([-1, 1])),
            s,
            e,
            rho=rng.uniform(0.3, 0.55),
            theta=rng.uniform(-0.2, 1.4),
            drift=rng.uniform(-0.03, 0.03),
            radius=rng.uniform(28.0, 45.0),
            aspect=rng.uniform(0.7, 1.4),
            tilt=rng.uniform(0, np.pi),
            hu=rng.uniform(-150.0, 30.0),
            edge=rng.uniform(0.1, 0.25),
        )
        for s, e in ranges
    ]


def _blob_weight(
    blob: _Blob, geometry: LungGeometry, xx: np.ndarray, yy: np.ndarray, irregular: np.ndarray
) -> np.ndarray:
    """Lesion weight in [0, 1], float32 (last-first+1, H, W): 1 inside, soft rim, 0 outside."""
    k = np.arange(blob.first, blob.last + 1)
    theta = blob.theta + blob.drift * (k - (blob.first + blob.last) / 2)
    cx = blob.side * (geometry.cx + blob.rho * geometry.ax[k] * np.cos(theta))
    cy = geometry.cy + blob.rho * geometry.ay[k] * np.sin(theta)
    profile = 0.6 + 0.4 * np.sin(np.pi * (k - blob.first + 0.5) / (blob.last - blob.first + 1))
    radius = (blob.radius * profile)[:, None, None]
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    c, s = math.cos(blob.tilt), math.sin(blob.tilt)
    u, v = (c * dx + s * dy) / (radius * blob.aspect), (-s * dx + c * dy) * blob.aspect / radius
    distance = np.sqrt(u**2 + v**2) * np.clip(1.0 + 0.3 * irregular, 0.5, 2.0)  # ragged outline
    w = np.clip((1.0 - distance) / blob.edge, 0.0, 1.0)
    return (w * w * (3.0 - 2.0 * w)).astype(np.float32)  # smoothstep
