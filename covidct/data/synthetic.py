"""A seeded synthetic copy of COVID-CT-MD: real DICOM files, the real layout and label files.

The default dataset of the project (``data=synthetic``): the whole pipeline runs with no download.
Layout and label files follow the real dataset (see ``DESIGN.md``)::

    <root>/COVID-19 subjects/P001/<prefix>_<k>.dcm   (k: a random permutation, not the slice order)
    <root>/Cap subjects/cap001/...
    <root>/Normal subjects/normal001/...
    <root>/Index.csv               Label Index,Diagnosis,Relative Path,Folder/ID (labelled COVID-19, CAP)
    <root>/Slice-level-labels.npy  int32 (n_index_rows, 200); row r = r-th data row of Index.csv,
                                   column i = i-th slice by SliceLocation descending (head first)
    <root>/README.txt

Each patient is a numpy chest phantom in HU (:func:`make_phantom`): body with a fat rim, ribs,
spine, mediastinum and heart, trachea, two textured lungs with vessels, gaussian noise. COVID-19
patients get bilateral peripheral ground-glass opacities, CAP patients denser, larger, often
one-sided consolidation, Normal patients nothing. Lesions cover one contiguous run of slices (30-80%
of the patient's slices) and lie inside the lungs; a slice is labelled 1 iff a lesion voxel is in
the lung mask on it.

Series are stored like real scanners do: mostly unsigned 12-bit (stored = HU + 1024), some signed
16-bit; a fraction JPEG Lossless SV1 (1.2.840.10008.1.2.4.70, the real data's transfer syntax,
written by :func:`encode_jpeg_lossless`, since pydicom cannot encode it), some RLE Lossless.
InstanceNumber follows the acquisition direction, which is feet-to-head in some series, so only
SliceLocation / ImagePositionPatient give the head-first order.

Everything derives from ``SyntheticSpec.seed``: the same spec gives the same files, pixels and labels.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless, generate_uid

from covidct import CLASS_NAMES
from covidct.errors import ConfigError, DataError

GENERATOR_VERSION = 2
"""Bump when the generator's output changes: it is part of the cache folder name."""

MAX_SLICES = 200
"""Columns of the slice label array (as in the real dataset)."""

COMPLETE_MARKER = ".synthetic-complete"
"""Written last into a generated dataset; a folder without it is unfinished."""

CLASS_FOLDERS: tuple[str, ...] = ("COVID-19 subjects", "Cap subjects", "Normal subjects")
_PATIENT_ID = ("P{:03d}", "cap{:03d}", "normal{:03d}")
_INDEX_PATH = ("./COVID-19/", "./CAP/")  # Index.csv "Relative Path", as in the real file
_INDEX_HEADER = ("Label Index", "Diagnosis", "Relative Path", "Folder/ID")

_HU_AIR = -1000.0
_INTERCEPT = -1024

Num = float | np.ndarray


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Config keys are ``data.synthetic.<field>``.

    patients_per_class: patients of COVID-19, CAP, Normal.
    slices_min, slices_max: slices per patient, uniform in [min, max], max <= 200.
    image_size: Rows = Columns in pixels (512 in the real data).
    labelled_fraction: fraction of COVID-19 / CAP patients (the first ones, as in the real data) that
        have a row in Index.csv and the label array.
    compressed_fraction: fraction of patients stored JPEG Lossless SV1 (unsigned 12-bit).
    rle_fraction: fraction of the other patients stored RLE Lossless.
    signed_fraction: fraction of the other patients stored signed 16-bit instead of unsigned 12-bit.
    seed: the seed everything derives from.
    """

    patients_per_class: tuple[int, int, int] = (20, 20, 20)
    slices_min: int = 32
    slices_max: int = 48
    image_size: int = 128
    labelled_fraction: float = 1.0
    compressed_fraction: float = 0.3
    rle_fraction: float = 0.1
    signed_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        counts = tuple(self.patients_per_class)
        if len(counts) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            _bad("patients_per_class", counts, "give 3 counts >= 0 (COVID-19, CAP, Normal), e.g. [20,20,20]")
        object.__setattr__(self, "patients_per_class", counts)
        _check_int(self, "slices_min", 4, MAX_SLICES, "lungs and a lesion run need at least 4 slices")
        _check_int(self, "slices_max", 4, MAX_SLICES, f"the label array has {MAX_SLICES} columns")
        if self.slices_min > self.slices_max:
            _bad("slices_min", self.slices_min, f"it must be <= data.synthetic.slices_max={self.slices_max}")
        _check_int(self, "image_size", 32, None, "use at least 32 pixels (the real data has 512)")
        _check_int(self, "seed", 0, None, "use an integer >= 0")
        for name in ("labelled_fraction", "compressed_fraction", "rle_fraction", "signed_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                _bad(name, value, "use a fraction between 0 and 1")
            object.__setattr__(self, name, float(value))  # 1 and 1.0: the same spec, the same hash


def _bad(name: str, value: object, what_to_do: str) -> None:
    raise ConfigError(f"data.synthetic.{name}={value!r} is invalid: {what_to_do}.")


def _check_int(spec: SyntheticSpec, name: str, low: int, high: int | None, why: str) -> None:
    value = getattr(spec, name)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        _bad(name, value, f"set it to an integer {bounds}; {why}")


def spec_hash(spec: SyntheticSpec) -> str:
    """Short hex digest of the spec and GENERATOR_VERSION (names the cache folder)."""
    payload = json.dumps({**asdict(spec), "generator_version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Dataset and cache
# ----------------------------------------------------------------------------------------------


def ensure_dataset(cache_dir: Path, spec: SyntheticSpec) -> Path:
    """Return ``cache_dir/synthetic-<hash>``, generating it first unless a finished copy is there.

    Generation goes into a unique temporary sibling that is renamed into place only when complete,
    so an interrupted run never looks finished and concurrent callers do not corrupt each other
    (a caller that loses the rename race discards its copy and uses the winner's). A final folder
    without the completion marker (not made by this function) is replaced.
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / f"synthetic-{spec_hash(spec)}"
    if is_complete(root):
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique per caller
    try:
        generate_dataset(tmp, spec)
        _move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def is_complete(root: Path) -> bool:
    """True if ``root`` holds a finished generated dataset (its completion marker)."""
    return (Path(root) / COMPLETE_MARKER).is_file()


def _move_into_place(tmp: Path, root: Path) -> None:
    """Atomically rename the finished ``tmp`` to ``root`` unless a finished ``root`` already exists."""
    for _ in range(2):
        try:
            os.rename(tmp, root)  # atomic; fails when root exists and is not empty
            return
        except OSError:
            if is_complete(root):
                return  # another caller finished first
        stale = root.with_name(f".{root.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):  # another caller may have moved it already
            os.rename(root, stale)
        shutil.rmtree(stale, ignore_errors=True)
    raise DataError(f"{root}: could not move the generated dataset into place; delete the folder and rerun.")


def generate_dataset(root: Path, spec: SyntheticSpec) -> Path:
    """Write the synthetic dataset into ``root`` (must not exist or be empty) and return ``root``."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: exists and is not an empty folder; give a new or empty folder instead.")
    root.mkdir(parents=True, exist_ok=True)
    index_rows: list[tuple[int, str]] = []
    label_rows: list[np.ndarray] = []
    for plan in plan_patients(spec):
        phantom = patient_phantom(spec, plan.label, plan.number)
        write_series(root / CLASS_FOLDERS[plan.label] / plan.patient_id, phantom, plan, spec)
        if plan.labelled:
            index_rows.append((plan.label, plan.patient_id))
            label_rows.append(phantom.lesion_slices)
    _write_index(root / "Index.csv", index_rows)
    np.save(root / "Slice-level-labels.npy", _label_array(label_rows))
    (root / "README.txt").write_text(_readme(spec))
    (root / COMPLETE_MARKER).write_text(json.dumps(asdict(spec), sort_keys=True) + "\n")
    return root


@dataclass(frozen=True)
class PatientPlan:
    """Dataset-level facts about one patient: class index, 1-based number, storage."""

    label: int
    number: int
    labelled: bool
    transfer_syntax: str
    signed: bool

    @property
    def patient_id(self) -> str:
        return _PATIENT_ID[self.label].format(self.number)


def _count(fraction: float, n: int) -> int:
    return math.floor(fraction * n + 0.5)


def plan_patients(spec: SyntheticSpec) -> list[PatientPlan]:
    """All patients, COVID-19 then CAP then Normal, each by number; storage drawn from the seed."""
    keys = [(label, k + 1) for label, n in enumerate(spec.patients_per_class) for k in range(n)]
    rng = np.random.default_rng([spec.seed, 7])
    order = [keys[i] for i in rng.permutation(len(keys))]
    n_jpeg = _count(spec.compressed_fraction, len(keys))
    jpeg, others = set(order[:n_jpeg]), order[n_jpeg:]
    rle = {others[i] for i in rng.permutation(len(others))[: _count(spec.rle_fraction, len(others))]}
    signed = {others[i] for i in rng.permutation(len(others))[: _count(spec.signed_fraction, len(others))]}
    n_labelled = [
        _count(spec.labelled_fraction, n) if label < 2 else 0
        for label, n in enumerate(spec.patients_per_class)
    ]
    plans = []
    for key in keys:
        syntax = JPEGLosslessSV1 if key in jpeg else RLELossless if key in rle else ExplicitVRLittleEndian
        label, number = key
        plans.append(PatientPlan(label, number, number <= n_labelled[label], syntax, key in signed))
    return plans


def patient_phantom(spec: SyntheticSpec, label: int, number: int) -> Phantom:
    """The phantom of patient ``number`` (1-based) of class ``label``: depends on the seed, not on
    the other patients."""
    rng = np.random.default_rng([spec.seed, label, number])
    n_slices = int(rng.integers(spec.slices_min, spec.slices_max + 1))
    return make_phantom(rng, n_slices, spec.image_size, CLASS_NAMES[label])


def _write_index(path: Path, rows: list[tuple[int, str]]) -> None:
    """Index.csv with the real file's trap: the Label Index column skips one value (real: 43)."""
    skip = min(43, len(rows) // 2)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_INDEX_HEADER)
        for r, (label, patient_id) in enumerate(rows):
            writer.writerow((r if r < skip else r + 1, CLASS_NAMES[label], _INDEX_PATH[label], patient_id))


def _label_array(rows: list[np.ndarray]) -> np.ndarray:
    """int32 (len(rows), 200), zero padded."""
    out = np.zeros((len(rows), MAX_SLICES), dtype=np.int32)
    for r, lesion_slices in enumerate(rows):
        out[r, : len(lesion_slices)] = lesion_slices
    return out


def _readme(spec: SyntheticSpec) -> str:
    values = "\n".join(f"  {f.name} = {getattr(spec, f.name)!r}" for f in fields(spec))
    return (
        "SYNTHETIC DATA - not from any patient.\n\n"
        "A synthetic copy of the COVID-CT-MD layout (Afshar et al., Sci Data 8, 121 (2021)) made by\n"
        f"covidct.data.synthetic (generator version {GENERATOR_VERSION}): numpy chest phantoms in HU with\n"
        "ground-glass opacities (COVID-19) or consolidation (CAP), written as DICOM CT slices.\n"
        "Slice-level-labels.npy: row r = r-th data row of Index.csv, column i = i-th slice by SliceLocation\n"
        "descending; 1 = a lesion voxel lies in the lung on that slice.\n\n"
        f"Spec (hash {spec_hash(spec)}):\n{values}\n"
    )


# ----------------------------------------------------------------------------------------------
# Chest phantom
# ----------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Anatomy:
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


def _draw_anatomy(rng: np.random.Generator, fov: float) -> _Anatomy:
    body_a = rng.uniform(0.8, 0.93) * fov / 2
    return _Anatomy(
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


def make_phantom(rng: np.random.Generator, n_slices: int, image_size: int, diagnosis: str) -> Phantom:
    """Draw one patient (anatomy, position, lesions for ``diagnosis`` in CLASS_NAMES) and render it."""
    if diagnosis not in CLASS_NAMES:
        raise ValueError(f"diagnosis {diagnosis!r} is not one of {CLASS_NAMES}")
    fov = rng.uniform(330.0, 390.0)  # mm, field of view
    pixel_spacing = fov / image_size
    slice_spacing = float(rng.choice([2.0, 2.5, 3.0, 4.0, 5.0]))
    anatomy = _draw_anatomy(rng, fov)
    x = (np.arange(image_size, dtype=np.float32) - (image_size - 1) / 2) * pixel_spacing
    z = np.arange(n_slices, dtype=np.float32) * -slice_spacing
    free = fov / 2 - anatomy.body_a
    offset = (rng.uniform(-0.5, 0.5) * free, rng.uniform(-0.3, 0.6) * (fov / 2 - anatomy.body_b))
    xx, yy = _body_frame(x, offset, rng.uniform(-0.1, 0.1))
    t = np.linspace(0.0, 1.0, n_slices, dtype=np.float32)
    hu, lung, lung_geometry = _render_anatomy(rng, anatomy, xx, yy, t, x, z)
    lesion = np.zeros_like(lung)
    if diagnosis != "Normal":
        lesion = _add_lesions(rng, hu, lung, lung_geometry, diagnosis, xx, yy, x, z)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(anatomy.noise_hu)
    return Phantom(hu, lung, lesion, pixel_spacing, slice_spacing)


def _body_frame(x: np.ndarray, offset: tuple[float, float], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (mm) in the body frame (shifted, rotated): two float32 (1, H, W) arrays."""
    dx, dy = x[None, :] - offset[0], x[:, None] - offset[1]
    c, s = math.cos(angle), math.sin(angle)
    return (c * dx + s * dy)[None].astype(np.float32), (-s * dx + c * dy)[None].astype(np.float32)


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


def _lung_profile(t: np.ndarray, anatomy: _Anatomy) -> np.ndarray:
    """Lung size factor per slice, (n, 1, 1) in [0, 1]: 0 outside the lungs, small at apex and base,
    widest in the lower half."""
    u = np.clip((t - anatomy.t_top) / (anatomy.t_bot - anatomy.t_top), 0.0, 1.0)
    return _bump(u**1.4, 0.35)


@dataclass(frozen=True)
class _LungGeometry:
    """Lung ellipses per slice (mm): centres (+-cx, cy), semi-axes ax, ay (n,) and size factor."""

    cx: float
    cy: float
    ax: np.ndarray
    ay: np.ndarray
    size: np.ndarray


def _render_anatomy(
    rng: np.random.Generator,
    anatomy: _Anatomy,
    xx: np.ndarray,
    yy: np.ndarray,
    t: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, _LungGeometry]:
    """Lesion-free volume: float32 (n, H, W) HU, bool lung mask, lung geometry.

    xx, yy: (1, H, W) body-frame coordinates (mm); t: (n,) position along the scan in [0, 1] (head
    first); x: (H,) pixel coordinates (mm); z: (n,) slice positions (mm).
    """
    shape = (len(t), xx.shape[1], xx.shape[2])
    a, b = anatomy.body_a, anatomy.body_b
    ai, bi = a - anatomy.fat - anatomy.wall, b - anatomy.fat - anatomy.wall  # thoracic cavity
    hu = np.full(shape, _HU_AIR, dtype=np.float32)
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
    geometry = _LungGeometry(
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
    texture = _smooth_noise(rng, z, x, 6.0, 12.0) * anatomy.texture_hu
    dependent = 30.0 * np.clip((yy - geometry.cy) / (0.8 * bi), 0.0, 1.0)  # denser posterior lung
    vessel_scale = max(2.0, float(x[1] - x[0]))  # mm; no finer than a pixel
    vessel_field = _smooth_noise(rng, z, x, vessel_scale, 8.0)
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


def _paint_trachea(
    hu: np.ndarray, xx: np.ndarray, yy: np.ndarray, t: np.ndarray, anatomy: _Anatomy, y: float
) -> None:
    """Trachea (air) above the carina, two main bronchi just below it."""
    carina = anatomy.t_top + 0.35 * (anatomy.t_bot - anatomy.t_top)
    trachea = _ellipse(xx, yy, 0.0, y, 9.0, 8.0)
    bronchi = _ellipse(xx, yy, -16.0, y + 4.0, 6.0, 5.0) | _ellipse(xx, yy, 16.0, y + 4.0, 6.0, 5.0)
    _paint(hu, trachea & (t < carina)[:, None, None], _HU_AIR)
    _paint(hu, bronchi & ((t >= carina) & (t < carina + 0.1))[:, None, None], _HU_AIR)


def _smooth_noise(
    rng: np.random.Generator, z: np.ndarray, x: np.ndarray, scale: float, scale_z: float
) -> np.ndarray:
    """Unit-variance smooth gaussian field, float32 (len(z), len(x), len(x)).

    White noise on a coarse grid (node spacing = correlation length, mm) interpolated with gaussian
    kernels; separable, so it costs a few matrix products per slice. The products run in float64:
    BLAS results vary in the last bits with the thread count, and float64 keeps that variation
    below float32 precision, so the dataset does not depend on the machine's core count.
    """
    kz, kx = _kernel(z, scale_z), _kernel(x, scale)
    coarse = rng.standard_normal((kz.shape[1], kx.shape[1], kx.shape[1]))
    return (kx @ np.tensordot(kz, coarse, axes=1) @ kx.T).astype(np.float32)


def _kernel(coords: np.ndarray, scale: float) -> np.ndarray:
    """float64 (len(coords), n_nodes) gaussian interpolation weights, rows of unit L2 norm."""
    coords = coords.astype(np.float64)
    nodes = np.arange(coords.min() - 2 * scale, coords.max() + 2 * scale, scale)
    k = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / scale) ** 2)
    return k / np.linalg.norm(k, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Lesions
# ----------------------------------------------------------------------------------------------


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


def _add_lesions(
    rng: np.random.Generator,
    hu: np.ndarray,
    lung: np.ndarray,
    geometry: _LungGeometry,
    diagnosis: str,
    xx: np.ndarray,
    yy: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
) -> np.ndarray:
    """Paint lesions into ``hu`` (in place, lung voxels only); return the bool (n, H, W) lesion mask."""
    first, last = _lesion_run(rng, geometry.size)
    blobs = _covid_blobs(rng, first, last) if diagnosis == "COVID-19" else _cap_blobs(rng, first, last)
    irregular = _smooth_noise(rng, z, x, 8.0, 8.0)
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


def _segments(
    rng: np.random.Generator, first: int, last: int, min_len: int, max_len: int
) -> list[tuple[int, int]]:
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
    blob: _Blob, geometry: _LungGeometry, xx: np.ndarray, yy: np.ndarray, irregular: np.ndarray
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


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def write_series(folder: Path, phantom: Phantom, plan: PatientPlan, spec: SyntheticSpec) -> None:
    """Write one CT series, one file per slice, named ``<prefix>_<k>.dcm`` with k in random order."""
    rng = np.random.default_rng([spec.seed, plan.label, plan.number, 1])
    n, size = phantom.hu.shape[0], phantom.hu.shape[1]
    uid = _uid_factory(spec, plan)
    prefix = f"{rng.integers(16**8):08X}-SYNT"
    file_numbers = rng.permutation(n) + 1
    z_top = round(float(rng.uniform(-90.0, 0.0)), 1)
    feet_first = bool(rng.random() < 0.4)  # InstanceNumber follows acquisition, not head-first order
    date = f"2020{int(rng.integers(3, 13)):02d}{int(rng.integers(1, 29)):02d}"
    ds = _series_dataset(plan, size)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.StudyDate = ds.SeriesDate = date
    ds.SeriesNumber = int(rng.integers(2, 9))
    ds.PixelSpacing = [round(phantom.pixel_spacing, 6)] * 2
    ds.SliceThickness = phantom.slice_spacing
    corner = round(-(size - 1) / 2 * phantom.pixel_spacing, 4)
    stored = _to_stored(phantom.hu, plan.signed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # one dataset, updated per slice: much faster than building 50 tags per file
        z = round(z_top - i * phantom.slice_spacing, 2)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(f"sop-{i}")
        ds.InstanceNumber = n - i if feet_first else i + 1
        ds.SliceLocation = z
        ds.ImagePositionPatient = [corner, corner, z]
        ds.PixelData = _encode(stored[i], ds, plan.transfer_syntax)
        ds.save_as(folder / f"{prefix}_{file_numbers[i]}.dcm", enforce_file_format=True)


def _uid_factory(spec: SyntheticSpec, plan: PatientPlan) -> Callable[[str], str]:
    """Deterministic UIDs: unique per spec, patient and role."""
    base = [spec_hash(spec), plan.patient_id]
    return lambda role: generate_uid(entropy_srcs=[*base, role])


def _to_stored(hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU -> stored values (stored = HU + 1024): int16, or uint16 clipped to 12 bits."""
    stored = np.rint(hu) - _INTERCEPT
    if signed:
        return np.clip(stored, -32768, 32767).astype(np.int16)
    return np.clip(stored, 0, 4095).astype(np.uint16)


def _series_dataset(plan: PatientPlan, size: int) -> pydicom.Dataset:
    """The tags shared by all slices of a CT Image Storage series (size x size pixels)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = plan.transfer_syntax
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = "covidct synthetic"
    ds.SeriesDescription = "synthetic chest CT"
    ds.PatientName = "ANONYMOUS"
    ds.PatientID = "ANONYMOUS"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if plan.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(plan.signed)
    ds.WindowCenter, ds.WindowWidth = [-600, 40], [1500, 400]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _INTERCEPT, 1, "HU"
    if plan.transfer_syntax != ExplicitVRLittleEndian:
        ds.LossyImageCompression = "00"
        ds.PixelData = b""
        ds["PixelData"].VR = "OB"  # encapsulated
    return ds


def _encode(pixels: np.ndarray, ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """Pixel Data bytes of one (rows, cols) uint16 / int16 slice in ``transfer_syntax``."""
    if transfer_syntax == JPEGLosslessSV1:
        return encapsulate([encode_jpeg_lossless(pixels)])
    if transfer_syntax == RLELossless:
        frame = RLELosslessEncoder.encode(
            pixels,
            encoding_plugin="pydicom",
            rows=ds.Rows,
            columns=ds.Columns,
            number_of_frames=1,
            samples_per_pixel=1,
            bits_allocated=16,
            bits_stored=ds.BitsStored,
            pixel_representation=ds.PixelRepresentation,
            photometric_interpretation="MONOCHROME2",
        )
        return encapsulate([frame])
    return pixels.tobytes()


# ----------------------------------------------------------------------------------------------
# JPEG Lossless, non-hierarchical, first-order prediction (process 14, selection value 1)
# ----------------------------------------------------------------------------------------------

# The Huffman table found in the real COVID-CT-MD files: number of codes of each length 1..16, and
# the SSSS categories (bit length of the prediction difference, 0..16) in code order.
_HUFF_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0)
_HUFF_VALUES = tuple(range(17))


def _huffman_codes() -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes (ITU T.81 Annex C) for the categories: int64 (17,) codes and lengths."""
    codes, lengths = np.zeros(17, dtype=np.int64), np.zeros(17, dtype=np.int64)
    code, k = 0, 0
    for length, count in enumerate(_HUFF_BITS, start=1):
        for _ in range(count):
            codes[_HUFF_VALUES[k]], lengths[_HUFF_VALUES[k]] = code, length
            code, k = code + 1, k + 1
        code <<= 1
    return codes, lengths


_HUFF_CODES, _HUFF_LENGTHS = _huffman_codes()


def encode_jpeg_lossless(pixels: np.ndarray) -> bytes:
    """Encode a uint16 (rows, cols) image as a JPEG lossless SV1 codestream (SOF3, precision 16,
    one component, predictor 1 = left neighbour, point transform 0), the encoding of transfer
    syntax 1.2.840.10008.1.2.4.70. int16 input is encoded by its 16-bit pattern. Pure numpy."""
    if pixels.ndim != 2 or pixels.dtype not in (np.uint16, np.int16):
        raise ValueError(f"expected a uint16 or int16 (rows, cols) array, got {pixels.dtype} {pixels.shape}")
    x = pixels.view(np.uint16).astype(np.int32)
    predicted = np.empty_like(x)
    predicted[0, 0] = 1 << 15  # 2**(P-1)
    predicted[0, 1:] = x[0, :-1]  # first row: left
    predicted[1:, 0] = x[:-1, 0]  # first column: above
    predicted[1:, 1:] = x[1:, :-1]  # elsewhere: left (selection value 1)
    diff = ((x - predicted + 32768) & 0xFFFF) - 32768  # modulo 2**16, in [-32768, 32767]
    ssss = np.frexp(np.abs(diff).astype(np.float64))[1].astype(np.int64)  # bit length of |diff|
    n_extra = np.where(ssss == 16, 0, ssss)  # category 16 (diff 32768) has no extra bits
    extra = np.where(diff < 0, diff - 1, diff) & ((1 << n_extra) - 1)  # negative: one's complement
    values = (_HUFF_CODES[ssss] << n_extra) | extra
    scan = _pack_bits(values.ravel(), (_HUFF_LENGTHS[ssss] + n_extra).ravel())
    rows, cols = pixels.shape
    dht = bytes([0x00, *_HUFF_BITS, *_HUFF_VALUES])  # class 0 (DC / lossless), table 0
    sof3 = bytes([16, rows >> 8, rows & 0xFF, cols >> 8, cols & 0xFF, 1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # 1 component, table 0, Ss = predictor 1, Se = 0, Ah/Al = 0
    return b"\xff\xd8" + _segment(0xC4, dht) + _segment(0xC3, sof3) + _segment(0xDA, sos) + scan + b"\xff\xd9"


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _pack_bits(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate variable-length codes (values < 2**32, MSB first, each ``lengths`` bits long),
    pad with 1-bits to a byte, and stuff a 0x00 after every 0xFF byte."""
    words = np.unpackbits(values.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)  # (N, 32) bits
    bits = words[np.arange(32) >= 32 - lengths[:, None]]  # the last lengths[i] bits of each row
    data = np.packbits(np.concatenate([bits, np.ones(-len(bits) % 8, dtype=np.uint8)]))
    return np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0).tobytes()
