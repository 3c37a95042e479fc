"""Patient planning: who is in the dataset, how each series is stored, and each patient's phantom."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless

from covidct.contracts import CLASS_NAMES
from covidct.data.synthetic.phantom import Phantom, make_phantom
from covidct.data.synthetic.spec import SyntheticSpec

_PATIENT_ID = ("P{:03d}", "cap{:03d}", "normal{:03d}")


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
    n_labelled = labelled_counts(spec)
    plans = []
    for key in keys:
        syntax = JPEGLosslessSV1 if key in jpeg else RLELossless if key in rle else ExplicitVRLittleEndian
        label, number = key
        plans.append(PatientPlan(label, number, number <= n_labelled[label], syntax, key in signed))
    return plans


def labelled_counts(spec: SyntheticSpec) -> list[int]:
    """Slice-labelled patients of each class: ``labelled_per_class``, else ``labelled_fraction`` of the
    COVID-19 and CAP patients (never Normal ones)."""
    if spec.labelled_per_class is not None:
        return list(spec.labelled_per_class)
    return [_count(spec.labelled_fraction, n) if label < 2 else 0 for label, n in enumerate(spec.patients_per_class)]


def patient_slices(spec: SyntheticSpec, label: int, number: int) -> int:
    """The number of slices of patient ``number`` of class ``label`` (the first draw of its phantom), at
    no cost: to size a dataset before it is generated."""
    return _draw_slices(np.random.default_rng([spec.seed, label, number]), spec)


def _draw_slices(rng: np.random.Generator, spec: SyntheticSpec) -> int:
    return int(rng.integers(spec.slices_min, spec.slices_max + 1))


def patient_phantom(spec: SyntheticSpec, label: int, number: int) -> Phantom:
    """The phantom of patient ``number`` (1-based) of class ``label``: depends on the seed, not on
    the other patients; with ``spec.patient_shift`` > 0, seen through a scanner of its own
    (:func:`scanner_shift`)."""
    rng = np.random.default_rng([spec.seed, label, number])
    n_slices = _draw_slices(rng, spec)
    phantom = make_phantom(rng, n_slices, spec.image_size, CLASS_NAMES[label])
    if spec.patient_shift:
        scanner_shift(np.random.default_rng([spec.seed, label, number, 11]), phantom.hu, spec.patient_shift)
    return phantom


def scanner_shift(rng: np.random.Generator, hu: np.ndarray, shift: float) -> None:
    """Add (in place) to the float32 (n, H, W) ``hu`` one offset uniform in [-shift, shift] HU and gaussian
    noise of one sigma uniform in [0, shift / 2] HU: a patient's scanner calibration and dose."""
    offset, sigma = rng.uniform(-shift, shift), rng.uniform(0.0, shift / 2)
    hu += np.float32(offset) + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma)
