"""Preprocess every slice once into a memory-mapped uint8 cache, reused by every run and sweep job.

A cache folder ``<cache_dir>/slices-<key>/`` holds

* ``images.u8``: raw uint8 array (N, C, S, S), C = number of windows, S = image size (px),
  patients one after another, each patient's slices head first;
* ``slices.npz``: ``patient`` int32 (N,) index into the manifest's patients, ``slice`` int32 (N,)
  head-first rank of the slice in its whole series (skipped slices whose position is known keep
  their rank, so this is the column of the dataset's slice labels; see
  :class:`covidct.data.dicom.Series`), ``location`` float32 (N,) position along the ordering key;
* ``manifest.json``: settings, shape, and per patient: id, class, folder, offset, slice count,
  series length, ordering key and note, skipped, unplaced and ignored files with reasons, lung crop
  (box, slice size, why not cropped; ``data.lung_crop=true`` only); patients skipped (no usable
  slice) with reasons. Written last: a folder without it (or with a short
  ``images.u8``, or an unreadable ``slices.npz``) is not a cache.

The key hashes the preprocessing settings and every input file's path, size and mtime, so a
change of either builds a new cache. A cache is built in a temporary folder and renamed into place
when complete, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from covidct.data.dicom import list_files
from covidct.data.layout import PatientFolder
from covidct.data.preprocess import SlicePreprocessor, read_preprocessed
from covidct.data.series import other_axial, series_line
from covidct.errors import DataError
from covidct.processes import remove_dead_scratch, worker_pool

log = logging.getLogger(__name__)

# 3: series ranks (labels survive skipped slices), ordering fallbacks and notes (issue 14)
# 4: each patient's lung crop (data.lung_crop, issue 16)
# 5: one chosen series per patient, the others listed; padding is air, MONOCHROME1 not inverted (issue 26)
CACHE_VERSION = 5


@dataclass(frozen=True)
class CachedPatient:
    """One patient's block of rows in the cache."""

    patient_id: str
    label: int | None
    folder: str
    offset: int
    n_slices: int
    series_length: int  # kept slices + skipped slices whose position is known (duplicates once)
    order_key: str
    order_note: str  # why a preferred ordering key was not used ("" when none)
    skipped: list[dict[str, str]]  # {"file", "reason"}: DICOM files not used
    unplaced: list[dict[str, str]]  # {"file", "reason"}: skipped files whose position is unknown
    ignored: list[dict[str, str]]  # {"file", "reason"}: other entries of the folder
    # data.lung_crop=true: {"box": [top, bottom, left, right] px, "slice_shape": [rows, cols],
    # "lung_slices", "note"} (see covidct.data.preprocess.LungCrop); None without the crop
    lung_crop: dict[str, object] | None = None
    # the chosen series (covidct.data.series.SeriesInfo.as_dict()), every other series or image group of
    # the folder with why it was not used, and a digest of the kept images' SOPInstanceUIDs ("" if unknown)
    series: dict[str, object] | None = None
    other_series: list[dict[str, object]] = field(default_factory=list)
    sop_digest: str = ""

    @property
    def n_series(self) -> int:
        """Axial series in the patient folder (the chosen one included)."""
        return 1 + len(other_axial(self.other_series))


@dataclass
class SliceCache:
    """An opened cache. ``images`` is a read-only memmap uint8 (N, C, S, S)."""

    path: Path
    images: np.ndarray
    patient: np.ndarray
    slice_index: np.ndarray  # int32 (N,) head-first rank in the patient's whole series
    location: np.ndarray
    patients: list[CachedPatient]
    build_seconds: float
    skipped_patients: list[dict[str, str]]  # {"patient", "folder", "reason"}: folders without a usable slice


def cache_key(patients: Sequence[PatientFolder], preprocessor: SlicePreprocessor) -> str:
    """Hex digest over the preprocessing settings and every input file's path, size and mtime."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "pre": asdict(preprocessor)}, sort_keys=True).encode())
    for p in patients:
        h.update(os.fsencode(f"\0{p.patient_id}\0{p.label}\0{p.folder.resolve()}"))  # any bytes in names
        for f in list_files(p.folder) if p.folder.is_dir() else ():
            st = f.stat()
            h.update(os.fsencode(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}"))
    return h.hexdigest()[:20]


def _read_patient(folder: Path, preprocessor: SlicePreprocessor) -> dict:
    """Worker: one patient folder -> uint8 (n, C, S, S) stack plus order and skip information;
    ``{"error": reason}`` when the folder has no usable slice."""
    import cv2

    cv2.setNumThreads(1)
    try:
        # warned in the main process, into the run log
        series, crop = read_preprocessed(folder, preprocessor, warn=False)
    except DataError as exc:
        return {"error": str(exc)}
    listed = lambda entries: [{"file": str(s.path), "reason": s.reason} for s in entries]  # noqa: E731
    return {
        "images": np.stack(series.slices),
        "locations": np.asarray(series.locations, dtype=np.float32),
        "ranks": np.asarray(series.ranks, dtype=np.int32),
        "series_length": series.series_length,
        "order_key": series.order_key,
        "order_note": series.order_note,
        "skipped": listed(series.skipped),
        "unplaced": listed(series.unplaced),
        "ignored": listed(series.ignored),
        "lung_crop": None if crop is None else crop.as_dict(),
        "series": series.series.as_dict() if series.series else None,
        "other_series": [s.as_dict() for s in series.other_series],
        "sop_digest": series.sop_digest,
    }


def _read_all(patients: Sequence[PatientFolder], pre: SlicePreprocessor, workers: int) -> Iterator[dict]:
    """``_read_patient`` results in patient order, read by ``workers`` processes."""
    folders = [p.folder for p in patients]
    if workers <= 1:
        yield from (_read_patient(folder, pre) for folder in folders)
        return
    with worker_pool(workers) as pool:  # forked on Linux; they die with this process, even after kill -9
        yield from pool.map(_read_patient, folders, repeat(pre))


def _write_cache(tmp: Path, patients: Sequence[PatientFolder], pre: SlicePreprocessor, workers: int) -> dict:
    """Read all patients and write the cache files into ``tmp``; returns the manifest."""
    started = time.perf_counter()
    entries, patient_col, slice_col, location_col, skipped_patients = [], [], [], [], []
    offset = 0
    with open(tmp / "images.u8", "wb") as out:
        for patient, result in zip(patients, _read_all(patients, pre, workers), strict=True):
            if "error" in result:
                log.warning("Skipping patient %s: %s", patient.patient_id, result["error"])
                skipped_patients.append(
                    {"patient": patient.patient_id, "folder": str(patient.folder), "reason": result["error"]}
                )
                continue
            i = len(entries)
            images = result["images"]
            out.write(np.ascontiguousarray(images).tobytes())
            n = len(images)
            entry = CachedPatient(
                patient.patient_id,
                patient.label,
                str(patient.folder),
                offset,
                n,
                result["series_length"],
                result["order_key"],
                result["order_note"],
                result["skipped"],
                result["unplaced"],
                result["ignored"],
                result["lung_crop"],
                result["series"],
                result["other_series"],
                result["sop_digest"],
            )
            entries.append(asdict(entry))
            patient_col.append(np.full(n, i))
            slice_col.append(result["ranks"])
            location_col.append(result["locations"])
            offset += n
            for skipped in result["skipped"]:
                log.warning("Skipping %s: %s", skipped["file"], skipped["reason"])
            for other in result["other_series"]:
                log.warning("Patient %s: not used: %s", patient.patient_id, series_line(other))
            if result["lung_crop"] and result["lung_crop"]["note"]:
                log.warning("Patient %s: %s", patient.patient_id, result["lung_crop"]["note"])
    if not entries:
        raise DataError(
            f"no patient has a usable slice (first: {skipped_patients[0]['reason']})"
            if skipped_patients
            else "no patients to cache"
        )
    np.savez(
        tmp / "slices.npz",
        patient=np.concatenate(patient_col).astype(np.int32),
        slice=np.concatenate(slice_col).astype(np.int32),
        location=np.concatenate(location_col).astype(np.float32),
    )
    manifest = {
        "version": CACHE_VERSION,
        "preprocessor": asdict(pre),
        "shape": [offset, len(pre.windows), pre.image_size, pre.image_size],
        "patients": entries,
        "skipped_patients": skipped_patients,
        "build_seconds": time.perf_counter() - started,
        "workers": workers,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _is_complete(path: Path) -> bool:
    """A finished cache: manifest written last, an images file of the size the manifest declares, and a
    readable slice table with one row per image."""
    try:
        shape = json.loads((path / "manifest.json").read_text())["shape"]
        if (path / "images.u8").stat().st_size != int(np.prod(shape)):
            return False
        with np.load(path / "slices.npz") as table:
            return all(len(table[column]) == shape[0] for column in ("patient", "slice", "location"))
    except Exception:  # missing, cut short or damaged (OSError, BadZipFile, KeyError, ValueError, ...)
        return False


def open_cache(path: Path) -> SliceCache:
    """Open a finished cache folder (memory-mapped, read-only)."""
    manifest = json.loads((path / "manifest.json").read_text())
    with np.load(path / "slices.npz") as npz:
        table = {column: npz[column] for column in ("patient", "slice", "location")}
    images = np.memmap(path / "images.u8", dtype=np.uint8, mode="r", shape=tuple(manifest["shape"]))
    return SliceCache(
        path=path,
        images=images,
        patient=table["patient"],
        slice_index=table["slice"],
        location=table["location"],
        patients=[CachedPatient(**p) for p in manifest["patients"]],
        build_seconds=float(manifest["build_seconds"]),
        skipped_patients=manifest["skipped_patients"],
    )


def _tmp_prefix(final: Path, pid: int | None = None) -> str:
    """Name prefix of a build in progress: ``.<final>.tmp-<host>-<pid>-`` (who is building it)."""
    return f".{final.name}.tmp-{socket.gethostname()}-{os.getpid() if pid is None else pid}-"


def _remove_dead_builds(final: Path) -> None:
    """Delete half-written builds of ``final`` left by killed processes of this host (their pid is gone)."""
    remove_dead_scratch(
        final.parent, f".{final.name}.tmp-{socket.gethostname()}-", "a cache build that was killed before it finished"
    )
    return True


def build_or_load_cache(
    patients: Sequence[PatientFolder],
    preprocessor: SlicePreprocessor,
    cache_dir: str | Path,
    workers: int = 1,
) -> SliceCache:
    """Return the cache for these patients and settings, building it first if it does not exist.

    Safe when several processes (sweep jobs, DDP ranks) race: each builds into its own temporary
    folder and the first rename wins; the others discard theirs. A build killed part-way leaves only
    its temporary folder, never a cache: the next build removes it and starts again.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"slices-{cache_key(patients, preprocessor)}"
    if _is_complete(final):
        log.info("Using slice cache %s", final)
        return open_cache(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(final)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=cache_dir))
    try:
        manifest = _write_cache(tmp, patients, preprocessor, max(1, workers))
        if final.exists() and not _is_complete(final):
            log.warning("Replacing %s: incomplete (damaged or cut short)", final)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not _is_complete(final):
                raise
        else:
            log.info(
                "Built slice cache %s: %d slices in %.1f s", final, manifest["shape"][0], manifest["build_seconds"]
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(final)
