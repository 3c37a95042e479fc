"""The dataset on disk: resumable, parallel generation, the cache with atomic placement, Index.csv, the
slice label array and README.txt.

Generation works in ``.<name>.partial/`` next to the dataset folder ``<name>``::

    spec.json               the spec being generated (an unfinished generation of another one is removed)
    dataset/                the dataset being made; a patient folder appears there whole (written in a
                            scratch folder, then renamed in), so a patient folder there is finished
    labels/<patient>.npy    each finished labelled patient's slice labels, saved before its folder moves in
    tmp-<host>-<pid>-*/     one generating process's scratch folder (removed once that process is gone)

``data.synthetic.workers`` processes make the patients; each patient derives from its own seed, so the
files do not depend on the number of processes or on the order they finish in. An interrupted generation
(Ctrl-C, ``kill -9``, a full disk) resumes with the patients not yet done. When every patient is there,
Index.csv, the label array, README.txt and, last, the completion marker are written and ``dataset/`` is
renamed to ``<name>``: a dataset folder is always finished, and reusing it costs one ``stat``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless

from covidct.contracts import CLASS_NAMES, INDEX_FILE
from covidct.data.layout import INDEX_COLUMNS
from covidct.data.synthetic.dicom_writer import write_series
from covidct.data.synthetic.patients import PatientPlan, patient_phantom, patient_slices, plan_patients
from covidct.data.synthetic.spec import GENERATOR_VERSION, MAX_SLICES, SyntheticSpec, spec_fields, spec_hash
from covidct.errors import DataError
from covidct.processes import host_prefix, remove_dead_scratch, worker_pool

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".synthetic-complete"
"""Written last into a generated dataset; a folder without it is unfinished."""

WORK_SUFFIX = ".partial"
"""``.<dataset folder name><WORK_SUFFIX>``: the folder a generation works (and resumes) in."""

CLASS_FOLDERS: tuple[str, ...] = ("COVID-19 subjects", "Cap subjects", "Normal subjects")
_INDEX_PATH = ("./COVID-19/", "./CAP/")  # Index.csv "Relative Path", as in the real file

BYTES_PER_PIXEL = {ExplicitVRLittleEndian: 2.0, RLELossless: 2.0, JPEGLosslessSV1: 1.3}
"""Upper bounds of a slice's pixel data in bytes per pixel, by transfer syntax, for the disk estimate.
Measured on the phantoms (32-512 px, patient_shift 0-300): JPEG Lossless 1.04-1.28, RLE 1.09-1.73."""

FILE_OVERHEAD = 4096
"""Bytes per DICOM file beyond its pixels, an upper bound: header (~1.2 kB), encapsulation, last disk block."""


def ensure_dataset(cache_dir: Path, spec: SyntheticSpec, progress: bool = True) -> Path:
    """Return ``cache_dir/synthetic-<hash>``, generating it first unless a finished copy is there.

    Generation resumes what an interrupted one left in ``.synthetic-<hash>.partial`` and moves the dataset
    into place only when complete, so an interrupted run never looks finished. Concurrent callers share
    the work (a patient made twice is the same; the second copy is dropped); a caller that finds the
    dataset finished by another uses it. A final folder without the completion marker (not made by this
    function) is replaced. ``progress``: a progress bar over the patients (stderr).
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / f"synthetic-{spec_hash(spec)}"
    if is_complete(root):
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    _generate(root, spec, progress)
    return root


def is_complete(root: Path) -> bool:
    """True if ``root`` holds a finished generated dataset (its completion marker)."""
    return (Path(root) / COMPLETE_MARKER).is_file()


def generate_dataset(root: Path, spec: SyntheticSpec, progress: bool = True) -> Path:
    """Write the synthetic dataset into ``root`` (must not exist or be empty) and return ``root``.

    Resumable: the patients are made in ``.<root name>.partial`` next to ``root`` (see the module), and
    ``root`` appears, complete, at the end."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: exists and is not an empty folder; give a new or empty folder instead.")
    root.parent.mkdir(parents=True, exist_ok=True)
    _generate(root, spec, progress)
    return root


def work_folder(root: Path) -> Path:
    """The folder where ``root`` is generated, and resumed after an interruption."""
    return root.with_name(f".{root.name}{WORK_SUFFIX}")


def estimate_disk(spec: SyntheticSpec, plans: Sequence[PatientPlan] | None = None) -> tuple[int, int]:
    """(bytes, slices) of the DICOM files of ``plans`` (default: every patient), the bytes an upper bound:
    each patient's slice count (drawn from its seed, at no cost) x the bytes of a slice of that size and
    transfer syntax (:data:`BYTES_PER_PIXEL`, :data:`FILE_OVERHEAD`)."""
    total_bytes = total_slices = 0
    for plan in plan_patients(spec) if plans is None else plans:
        n = patient_slices(spec, plan.label, plan.number)
        per_slice = math.ceil(BYTES_PER_PIXEL[plan.transfer_syntax] * spec.image_size**2) + FILE_OVERHEAD
        total_bytes, total_slices = total_bytes + n * per_slice, total_slices + n
    return total_bytes, total_slices


def _generate(root: Path, spec: SyntheticSpec, progress: bool) -> None:
    """Make (or finish) the dataset in its work folder, then move it to ``root``. Failures caused by another
    caller finishing first (it moves and removes the work folder) end with that caller's dataset."""
    work = work_folder(root)
    try:
        _fill(work, spec, progress)
        _move_into_place(work / "dataset", root)
    except OSError as exc:
        if is_complete(root):
            return  # another caller finished first
        if exc.errno == errno.ENOSPC:
            raise DataError(
                f"{root.parent}: the disk filled up while generating {root.name} ({exc}). Free some space (or "
                "set paths.cache_dir to a larger disk) and rerun: the patients already made are kept."
            ) from exc
        raise
    shutil.rmtree(work, ignore_errors=True)


def _fill(work: Path, spec: SyntheticSpec, progress: bool) -> None:
    """Make the patients ``work/dataset`` lacks, then its label files, README.txt and completion marker."""
    _claim(work, spec)
    _remove_dead_scratch(work)
    plans = plan_patients(spec)
    todo = [plan for plan in plans if not _patient_done(work, plan)]
    if todo:
        _check_disk(work, spec, todo, len(plans))
    scratch = Path(tempfile.mkdtemp(prefix=_scratch_prefix(), dir=work))
    try:
        if todo:
            _make_patients(work, scratch, spec, todo, len(plans), progress)
        _finish(work, scratch, spec, plans)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _claim(work: Path, spec: SyntheticSpec) -> None:
    """Create ``work`` for ``spec``, or resume it if it holds an unfinished generation of the same spec (its
    ``spec.json``); one of another spec (or generator version), which only :func:`generate_dataset` with a
    reused folder name can meet, is removed."""
    tag = work / "spec.json"
    text = json.dumps({"hash": spec_hash(spec), **spec_fields(spec)}, sort_keys=True) + "\n"
    if tag.is_file() and tag.read_text() != text:
        log.warning("Removing %s: an unfinished generation of another dataset", work)
        shutil.rmtree(work, ignore_errors=True)
    (work / "labels").mkdir(parents=True, exist_ok=True)
    (work / "dataset").mkdir(exist_ok=True)
    if not tag.is_file():
        mine = work / f".spec.json.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        mine.write_text(text)
        os.replace(mine, tag)


def _patient_done(work: Path, plan: PatientPlan) -> bool:
    folder = work / "dataset" / CLASS_FOLDERS[plan.label] / plan.patient_id
    return folder.is_dir() and (not plan.labelled or _label_file(work, plan).is_file())


def _label_file(work: Path, plan: PatientPlan) -> Path:
    return work / "labels" / f"{plan.patient_id}.npy"


def _check_disk(work: Path, spec: SyntheticSpec, todo: list[PatientPlan], total: int) -> None:
    """Refuse, before writing anything, when the disk cannot hold the patients still to make."""
    needed, slices = estimate_disk(spec, todo)
    free = shutil.disk_usage(work).free
    size = spec.image_size
    log.info(
        "Generating the synthetic dataset %s: %d of %d patients to make, %d slices of %d x %d px, about %s "
        "on disk (%s free), %d process(es)",
        work.name.removeprefix(".").removesuffix(WORK_SUFFIX),
        len(todo),
        total,
        slices,
        size,
        size,
        _size(needed),
        _size(free),
        min(spec.workers, len(todo)),
    )
    if free < needed:
        raise DataError(
            f"{work.parent}: not enough free disk for the synthetic dataset: it needs about {_size(needed)} "
            f"({len(todo)} patients to make, {slices} slices of {size} x {size} px; "
            f"data.synthetic.patients_per_class={list(spec.patients_per_class)}, "
            f"slices_min={spec.slices_min}, slices_max={spec.slices_max}, image_size={size}) and the disk has "
            f"{_size(free)} free. Free some space, set paths.cache_dir to a folder on a larger disk, or make "
            "the dataset smaller (data.synthetic.patients_per_class, slices_max, image_size)."
        )


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def _make_patients(
    work: Path, scratch: Path, spec: SyntheticSpec, todo: list[PatientPlan], total: int, progress: bool
) -> None:
    """Make the ``todo`` patients, in ``spec.workers`` processes, with a progress bar over all patients."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    workers = min(spec.workers, len(todo))
    with tqdm(
        total=total, initial=total - len(todo), unit="patient", desc="synthetic data", disable=not progress
    ) as bar:
        if workers <= 1:
            with threadpool_limits(1):  # see _one_blas_thread
                for plan in todo:
                    _make_patient(work, scratch, spec, plan)
                    bar.update()
            return
        pool = worker_pool(workers, _one_blas_thread)  # they die with this process, even after kill -9
        try:
            for future in as_completed([pool.submit(_make_patient, work, scratch, spec, plan) for plan in todo]):
                future.result()
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error: only the patients under way finish


def _one_blas_thread() -> None:
    """In a worker: one BLAS thread. The phantoms' matrix products are many small ones (a slice each), which
    threads slow down: a 215-slice 512 px patient took 15-27 s with OpenBLAS's 2 threads and 5.5-7 s with 1
    on 2 busy cores. The results do not depend on it (:func:`~covidct.data.synthetic.noise.smooth_noise`
    works in float64)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _make_patient(work: Path, scratch: Path, spec: SyntheticSpec, plan: PatientPlan) -> None:
    """Make one patient in ``scratch`` and move it into ``work``: its slice labels first, then its folder,
    whose appearance marks the patient done."""
    phantom = patient_phantom(spec, plan.label, plan.number)
    folder = scratch / plan.patient_id
    folder.mkdir()  # fails if the scratch folder is gone (another caller finished and removed the work folder)
    write_series(folder, phantom, plan, spec)
    if plan.labelled:
        np.save(scratch / f"{plan.patient_id}.npy", phantom.lesion_slices)
        os.replace(scratch / f"{plan.patient_id}.npy", _label_file(work, plan))
    target = work / "dataset" / CLASS_FOLDERS[plan.label] / plan.patient_id
    target.parent.mkdir(exist_ok=True)
    try:
        os.rename(folder, target)  # atomic; fails when another caller placed this patient first
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(folder, ignore_errors=True)  # the other copy has the same files


def _finish(work: Path, scratch: Path, spec: SyntheticSpec, plans: list[PatientPlan]) -> None:
    """Index.csv, the slice label array, README.txt and, last, the completion marker into ``work/dataset``,
    each written in ``scratch`` and renamed in (identical from any caller)."""
    labelled = [plan for plan in plans if plan.labelled]
    files = {
        INDEX_FILE: _index_csv([(plan.label, plan.patient_id) for plan in labelled]).encode(),
        "Slice-level-labels.npy": _npy_bytes(_label_array([np.load(_label_file(work, p)) for p in labelled])),
        "README.txt": _readme(spec).encode(),
        COMPLETE_MARKER: (json.dumps(spec_fields(spec), sort_keys=True) + "\n").encode(),
    }
    for name, data in files.items():
        (scratch / name).write_bytes(data)
        os.replace(scratch / name, work / "dataset" / name)


def _scratch_prefix() -> str:
    return f"{host_prefix('tmp')}{os.getpid()}-"


def _remove_dead_scratch(work: Path) -> None:
    """Delete the scratch folders of killed generating processes of this host (their pid is gone)."""
    remove_dead_scratch(work, host_prefix("tmp"), "the patients in progress of a generation that was killed")
    return True


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


def _index_csv(rows: list[tuple[int, str]]) -> str:
    """Index.csv with the real file's trap: the Label Index column skips one value (real: 43)."""
    skip = min(43, len(rows) // 2)
    text = io.StringIO()
    writer = csv.writer(text)  # lines end in CRLF, as csv writes them
    writer.writerow(INDEX_COLUMNS)
    for r, (label, patient_id) in enumerate(rows):
        writer.writerow((r if r < skip else r + 1, CLASS_NAMES[label], _INDEX_PATH[label], patient_id))
    return text.getvalue()


def _label_array(rows: list[np.ndarray]) -> np.ndarray:
    """int32 (len(rows), columns), zero padded: MAX_SLICES (200, as the real array) columns, more if a
    labelled series is longer (as the pseudo-label files do)."""
    out = np.zeros((len(rows), max([MAX_SLICES, *map(len, rows)])), dtype=np.int32)
    for r, lesion_slices in enumerate(rows):
        out[r, : len(lesion_slices)] = lesion_slices
    return out


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


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
