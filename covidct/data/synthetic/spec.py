"""What to generate: the validated :class:`SyntheticSpec`, its hash and the generator's version."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from covidct.errors import ConfigError

GENERATOR_VERSION = 2
"""Bump when the generator's output changes: it is part of the cache folder name."""

MAX_SLICES = 200
"""Columns of the slice label array (as in the real dataset); more when a labelled series is longer."""

SLICES_LIMIT = 600
"""The most slices a series may have (a 0.6 mm chest scan). Memory while one 512 px patient is made: up to
~14 MB a slice (4.1 GB measured for 300 slices), in each of ``workers`` processes."""


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Config keys are ``data.synthetic.<field>``.

    patients_per_class: patients of COVID-19, CAP, Normal.
    slices_min, slices_max: slices per patient, uniform in [min, max], max <= SLICES_LIMIT (600).
    image_size: Rows = Columns in pixels (512 in the real data).
    labelled_fraction: fraction of COVID-19 / CAP patients (the first ones, as in the real data) that
        have a row in Index.csv and the label array.
    compressed_fraction: fraction of patients stored JPEG Lossless SV1 (unsigned 12-bit).
    rle_fraction: fraction of the other patients stored RLE Lossless.
    signed_fraction: fraction of the other patients stored signed 16-bit instead of unsigned 12-bit.
    seed: the seed everything derives from.
    patient_shift: HU; > 0 gives each patient a scanner of its own: an intensity offset uniform in
        [-patient_shift, +patient_shift] HU on the whole volume and extra gaussian noise of a sigma uniform
        in [0, patient_shift / 2] HU (drawn from a stream of their own: the anatomy and lesions stay those of
        patient_shift=0). 0 (the default) leaves the dataset, its hash and its files as before the field.
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
    patient_shift: float = 0.0
    labelled_per_class: tuple[int, int, int] | None = None
    workers: int = 2

    def __post_init__(self) -> None:
        counts = tuple(self.patients_per_class)
        if len(counts) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            _bad("patients_per_class", counts, "give 3 counts >= 0 (COVID-19, CAP, Normal), e.g. [20,20,20]")
        object.__setattr__(self, "patients_per_class", counts)
        _check_int(self, "slices_min", 4, SLICES_LIMIT, "lungs and a lesion run need at least 4 slices")
        _check_int(self, "slices_max", 4, SLICES_LIMIT, "a chest scan at 0.6 mm has ~600 slices")
        if self.slices_min > self.slices_max:
            _bad("slices_min", self.slices_min, f"it must be <= data.synthetic.slices_max={self.slices_max}")
        _check_int(self, "image_size", 32, None, "use at least 32 pixels (the real data has 512)")
        _check_int(self, "seed", 0, None, "use an integer >= 0")
        for name in ("labelled_fraction", "compressed_fraction", "rle_fraction", "signed_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                _bad(name, value, "use a fraction between 0 and 1")
            object.__setattr__(self, name, float(value))  # 1 and 1.0: the same spec, the same hash
        value = self.patient_shift
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 500.0:
            _bad("patient_shift", value, "use a number of HU between 0 (no shift) and 500")
        object.__setattr__(self, "patient_shift", float(value))
        if self.labelled_per_class is not None:
            object.__setattr__(self, "labelled_per_class", _labelled_counts(self.labelled_per_class, counts))
        _check_int(self, "workers", 1, None, "the number of processes that generate patients (1: this one)")


def _labelled_counts(value: object, patients: tuple[int, ...]) -> tuple[int, int, int]:
    """``labelled_per_class`` checked against ``patients_per_class``, as a tuple."""
    counts = tuple(value) if isinstance(value, list | tuple) else (value,)
    if len(counts) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        _bad("labelled_per_class", value, "give 3 counts >= 0 (COVID-19, CAP, Normal), e.g. [54,25,0], or null")
    if counts[2]:
        _bad("labelled_per_class", value, "Normal patients have no slice labels (as in the real data): make it 0")
    if counts[0] > patients[0] or counts[1] > patients[1]:
        _bad("labelled_per_class", value, f"at most data.synthetic.patients_per_class={list(patients)} per class")
    return counts  # type: ignore[return-value]


def _bad(name: str, value: object, what_to_do: str) -> None:
    raise ConfigError(f"data.synthetic.{name}={value!r} is invalid: {what_to_do}.")


def _check_int(spec: SyntheticSpec, name: str, low: int, high: int | None, why: str) -> None:
    value = getattr(spec, name)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        _bad(name, value, f"set it to an integer {bounds}; {why}")


def spec_fields(spec: SyntheticSpec) -> dict[str, object]:
    """What the dataset depends on: the spec's fields without ``workers`` (how, not what), without
    ``patient_shift`` when it is 0 and ``labelled_per_class`` when None: a dataset generated before these
    fields existed keeps its hash, cache folder and files."""
    fields = asdict(spec)
    del fields["workers"]
    if not spec.patient_shift:
        del fields["patient_shift"]
    if spec.labelled_per_class is None:
        del fields["labelled_per_class"]
    return fields


def spec_hash(spec: SyntheticSpec) -> str:
    """Short hex digest of the spec and GENERATOR_VERSION (names the cache folder)."""
    payload = json.dumps({**spec_fields(spec), "generator_version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
