"""The dataset on disk: generation into a folder, the cache with atomic placement, Index.csv, the
slice label array and README.txt."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from covidct.contracts import CLASS_NAMES, INDEX_FILE
from covidct.data.layout import INDEX_COLUMNS
from covidct.data.synthetic.dicom_writer import write_series
from covidct.data.synthetic.patients import patient_phantom, plan_patients
from covidct.data.synthetic.spec import GENERATOR_VERSION, MAX_SLICES, SyntheticSpec, spec_fields, spec_hash
from covidct.errors import DataError

COMPLETE_MARKER = ".synthetic-complete"
"""Written last into a generated dataset; a folder without it is unfinished."""

CLASS_FOLDERS: tuple[str, ...] = ("COVID-19 subjects", "Cap subjects", "Normal subjects")
_INDEX_PATH = ("./COVID-19/", "./CAP/")  # Index.csv "Relative Path", as in the real file


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
    _write_index(root / INDEX_FILE, index_rows)
    np.save(root / "Slice-level-labels.npy", _label_array(label_rows))
    (root / "README.txt").write_text(_readme(spec))
    (root / COMPLETE_MARKER).write_text(json.dumps(spec_fields(spec), sort_keys=True) + "\n")
    return root


def _write_index(path: Path, rows: list[tuple[int, str]]) -> None:
    """Index.csv with the real file's trap: the Label Index column skips one value (real: 43)."""
    skip = min(43, len(rows) // 2)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(INDEX_COLUMNS)
        for r, (label, patient_id) in enumerate(rows):
            writer.writerow((r if r < skip else r + 1, CLASS_NAMES[label], _INDEX_PATH[label], patient_id))


def _label_array(rows: list[np.ndarray]) -> np.ndarray:
    """int32 (len(rows), 200), zero padded."""
    out = np.zeros((len(rows), MAX_SLICES), dtype=np.int32)
    for r, lesion_slices in enumerate(rows):
        out[r, : len(lesion_slices)] = lesion_slices
    return out


def _readme(spec: SyntheticSpec) -> str:
    values = "\n".join(f"  {name} = {value!r}" for name, value in spec_fields(spec).items())
    return (
        "SYNTHETIC DATA - not from any patient.\n\n"
        "A synthetic copy of the COVID-CT-MD layout (Afshar et al., Sci Data 8, 121 (2021)) made by\n"
        f"covidct.data.synthetic (generator version {GENERATOR_VERSION}): numpy chest phantoms in HU with\n"
        "ground-glass opacities (COVID-19) or consolidation (CAP), written as DICOM CT slices.\n"
        "Slice-level-labels.npy: row r = r-th data row of Index.csv, column i = i-th slice by SliceLocation\n"
        "descending; 1 = a lesion voxel lies in the lung on that slice.\n\n"
        f"Spec (hash {spec_hash(spec)}):\n{values}\n"
    )
