"""The lesion-free chest: per-patient anatomy drawn from the seed and rendered in HU.

Body with a fat rim and chest wall, ribs, spine, mediastinum and heart, trachea and main bronchi,
two textured lungs with vessels and a denser dependent part, the CT couch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covidct.data.synthetic.noise import smooth_noise

HU_AIR = -1000.0

Num = float | np.ndarray


@dataclass(frozen=True)
class Anatomy:
    """Per-patient geometry (mm, relative to the body centre, x to the patient's left, y posterior)."""

    body_a: float  # body semi-axes
    body_b: float
    body_p: float  # superellipse exponent (2 = ellipse)
    fat: float  # subcutaneous fat thickness
    wall: float  # chest wall (muscle, ribs) thickness
    lung_x: float  # lung centre |x|, fraction of the inner (thoracic cavity) semi-axis
    lung_y: float
    lung_w: float  # lung semi-axes at their widest, fractions of the inner semi-axes
    lung_h: float
    t_top: float  # lung apex and base, fractions of the scan length
    t_bot: float
    heart: float  # heart size factor
    lung_hu: float
    texture_hu: float
    vessel_threshold: float  # vessels where a unit gaussian field exceeds this
    rib_period: float  # mm along z
    noise_hu: float  # gaussian noise sigma


def draw_anatomy(rng: np.random.Generator, fov: float) -> Anatomy:
    body_a = rng.uniform(0.8, 0.93) * fov / 2
    return Anatomy(
        body_a=body_a,
        body_b=body_a * rng.uniform(0.62, 0.76),
        body_p=rng.uniform(2.0, 2.8),
        fat=rng.uniform(4.0, 16.0),
        wall=rng.uniform(8.0, 13.0),
        lung_x=rng.uniform(0.48, 0.53),
        lung_y=rng.uniform(-0.06, 0.04),
        lung_w=rng.uniform(0.42, 0.47),
        lung_h=rng.uniform(0.78, 0.88),
        t_top=rng.uniform(0.02, 0.07),
        t_bot=rng.uniform(0.93, 0.98),
        heart=rng.uniform(0.85, 1.15),
        lung_hu=rng.uniform(-890.0, -840.0),
        texture_hu=rng.uniform(8.0, 20.0),
        vessel_threshold=rng.uniform(2.0, 2.4),
        rib_period=rng.uniform(28.0, 40.0),
        noise_hu=rng.uniform(10.0, 30.0),
    )


def _superellipse(xx: np.ndarray, yy: np.ndarray, a: float, b: float, p: float) -> np.ndarray:
    return np.abs(xx / a) ** p + np.abs(yy / b) ** p <= 1.0


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: Num, cy: Num, a: Num, b: Num) -> np.ndarray:
    """Bool mask; centres and semi-axes (mm) are floats or (n, 1, 1) arrays (0 -> empty)."""
    a, b = np.maximum(a, 1e-3), np.maximum(b, 1e-3)
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0


def _bump(u: np.ndarray, power: float) -> np.ndarray:
    """sin(pi u) ** power for u in [0, 1], 0 outside: float32 (n, 1, 1) size factors in [0, 1]."""
    hump = np.maximum(np.sin(np.pi * np.clip(u, 0.0, 1.0)), 0.0) ** power
    return hump.astype(np.float32)[:, None, None]


def _lung_profile(t: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Lung size factor per slice, (n, 1, 1) in [0, 1]: 0 outside the lungs, small at apex and base,
    widest in the lower half."""
    u = np.clip((t - anatomy.t_top) / (anatomy.t_bot - anatomy.t_top), 0.0, 1.0)
    return _bump(u**1.4, 0.35)


@dataclass(frozen=True)
class LungGeometry:
    """Lung ellipses per slice (mm): centres (+-cx, cy), semi-axes ax, ay (n,) and size factor."""

    cx: float
    cy: float
    ax: np.ndarray
    ay: np.ndarray
    size: np.ndarray


def render_anatomy(
    rng: np.random.Generator,
    anatomy: Anatomy,
    xx: np.ndarray,
    yy: np.ndarray,
    t: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, LungGeometry]:
    """Lesion-free volume: float32 (n, H, W) HU, bool lung mask, lung geometry.

    xx, yy: (1, H, W) body-frame coordinates (mm); t: (n,) position along the scan in [0, 1] (head
    first); x: (H,) pixel coordinates (mm); z: (n,) slice positions (mm).
    """
    shape = (len(t), xx.shape[1], xx.shape[2])
    a, b = anatomy.body_a, anatomy.body_b
    ai, bi = a - anatomy.fat - anatomy.wall, b - anatomy.fat - anatomy.wall  # thoracic cavity
    hu = np.full(shape, HU_AIR, dtype=np.float32)
    _paint(hu, _table(xx, yy, b), 60.0)
    _paint(hu, _superellipse(xx, yy, a, b, anatomy.body_p), -100.0)  # fat
    _paint(hu, _superellipse(xx, yy, a - anatomy.fat, b - anatomy.fat, anatomy.body_p), 45.0)  # muscle
    _paint(hu, _ribs(rng, xx, yy, z, ai + anatomy.wall / 2, bi + anatomy.wall / 2, anatomy.rib_period), 700.0)
    size = _lung_profile(t, anatomy)
    heart = _bump((t - 0.4) / 0.65, 0.5) * anatomy.heart
    spine_y, spine_r = 0.55 * bi, 0.2 * bi
    mediastinum = (
        _ellipse(xx, yy, 0.0, 0.0, 0.2 * ai, 0.6 * bi)
        | _ellipse(xx, yy, 0.12 * ai, -0.25 * bi, 0.3 * ai * heart, 0.42 * bi * heart)
        | _ellipse(xx, yy, 0.0, spine_y, 1.4 * spine_r, 1.4 * spine_r)
    )
    geometry = LungGeometry(
        cx=anatomy.lung_x * ai,
        cy=anatomy.lung_y * bi,
        ax=(anatomy.lung_w * ai * size).ravel(),
        ay=(anatomy.lung_h * bi * size).ravel(),
        size=size.ravel(),
    )
    ax, ay, cx, cy = geometry.ax[:, None, None], geometry.ay[:, None, None], geometry.cx, geometry.cy
    lungs = _ellipse(xx, yy, -cx, cy, ax, ay) | _ellipse(xx, yy, cx, cy, ax, ay)
    lung = lungs & ~mediastinum & _superellipse(xx, yy, ai, bi, anatomy.body_p)
    _paint_spine(hu, xx, yy, spine_y, spine_r)
    _paint_trachea(hu, xx, yy, t, anatomy, 0.05 * bi)
    texture = smooth_noise(rng, z, x, 6.0, 12.0) * anatomy.texture_hu
    dependent = 30.0 * np.clip((yy - geometry.cy) / (0.8 * bi), 0.0, 1.0)  # denser posterior lung
    vessel_scale = max(2.0, float(x[1] - x[0]))  # mm; no finer than a pixel
    vessel_field = smooth_noise(rng, z, x, vessel_scale, 8.0)
    vessels = np.clip((vessel_field - anatomy.vessel_threshold) / 0.3, 0.0, 1.0)
    lung_hu = anatomy.lung_hu + texture + dependent
    hu[lung] = (lung_hu + vessels * (50.0 - lung_hu))[lung]
    return hu, lung, geometry


def _paint(hu: np.ndarray, mask: np.ndarray, value: float) -> None:
    """Set ``hu`` to ``value`` where ``mask`` (broadcast to hu's shape) is True."""
    hu[np.broadcast_to(mask, hu.shape)] = value


def _table(xx: np.ndarray, yy: np.ndarray, body_b: float) -> np.ndarray:
    """The CT couch: a thin arc below the body, (1, H, W) bool."""
    y0 = body_b + 12.0
    return (np.abs(yy - y0 - xx**2 / 1500.0) < 2.0) & (np.abs(xx) < 1.3 * body_b)


def _ribs(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, z: np.ndarray, a: float, b: float, period: float
) -> np.ndarray:
    """Rib cross-sections on an ellipse in the chest wall, each on a periodic run of slices: (n, H, W)."""
    # angle 0 = the patient's left, 90 = posterior: 6 anterior, 6 posterior and 2 paravertebral ribs
    angles = np.deg2rad(np.r_[np.linspace(-160, -30, 6), np.linspace(30, 160, 6), 80, 100])
    phases = rng.uniform(0, 2 * np.pi, len(angles))
    ribs = np.zeros((len(z),) + xx.shape[1:], dtype=bool)
    for angle, phase in zip(angles, phases, strict=True):
        present = np.sin(2 * np.pi * z / period + phase) > 0.0
        if present.any():
            ribs[present] |= _ellipse(xx, yy, a * math.cos(angle), b * math.sin(angle), 5.0, 4.0)[0]
    return ribs


def _paint_spine(hu: np.ndarray, xx: np.ndarray, yy: np.ndarray, y: float, r: float) -> None:
    """Vertebral body (cortex ~+800 HU, cancellous ~+300 HU), canal (+20 HU) and arch (+650 HU)."""
    canal_y, canal_r = y + r + 8.0, 7.0
    _paint(hu, _ellipse(xx, yy, 0.0, y, r, r), 800.0)
    _paint(hu, _ellipse(xx, yy, 0.0, y, r - 3.0, r - 3.0), 300.0)
    _paint(hu, _ellipse(xx, yy, 0.0, canal_y, canal_r + 4.0, canal_r + 4.0), 650.0)
    _paint(hu, _ellipse(xx, yy, 0.0, canal_y, canal_r, canal_r), 20.0)


def _paint_trachea(hu: np.ndarray, xx: np.ndarray, yy: np.ndarray, t: np.ndarray, anatomy: Anatomy, y: float) -> None:
    """Trachea (air) above the carina, two main bronchi just below it."""
    carina = anatomy.t_top + 0.35 * (anatomy.t_bot - anatomy.t_top)
    trachea = _ellipse(xx, yy, 0.0, y, 9.0, 8.0)
    bronchi = _ellipse(xx, yy, -16.0, y + 4.0, 6.0, 5.0) | _ellipse(xx, yy, 16.0, y + 4.0, 6.0, 5.0)
    _paint(hu, trachea & (t < carina)[:, None, None], HU_AIR)
    _paint(hu, bronchi & ((t >= carina) & (t < carina + 0.1))[:, None, None], HU_AIR)
