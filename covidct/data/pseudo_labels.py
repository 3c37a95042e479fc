"""Stage-1 pseudo-labels on disk: written by ``python -m covidct.training.pseudo_label``, read by stage 2.

A pseudo-label folder follows the dataset's own convention, so any tool that reads COVID-CT-MD's
labels reads it too:

    <folder>/Index.csv                       Label Index,Diagnosis,Relative Path,Folder/ID (pseudo-labelled patients)
    <folder>/Slice-level-labels-pseudo.npy   int8 (rows, 200+) 0/1; row r = r-th data row of Index.csv,
                                             column i = i-th slice position head first (the cache's rank)
    <folder>/pseudo_labels.json              how they were made: threshold, stage-1 checkpoint and its
                                             SHA-256, its preprocessing and training patients, each
                                             patient's series length and infected slice count, and
                                             the label array's SHA-256 and row patients (``label_array``)

Only sick patients without radiologist slice labels get a row. Stage 2 (``data.label_mode=pseudo
data.pseudo_labels=<folder>/Slice-level-labels-pseudo.npy``) uses a row only for a *training* patient
that has no radiologist labels; :func:`check_pseudo_labels` refuses files that do not fit the data.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidct.contracts import CLASS_NAMES, INDEX_FILE
from covidct.data.layout import INDEX_COLUMNS, IndexFile, load_label_array, read_index_file
from covidct.data.preprocess import SlicePreprocessor
from covidct.errors import DataError
from covidct.io import atomic_write_bytes, atomic_write_csv, atomic_write_text

LABEL_FILE = "Slice-level-labels-pseudo.npy"
META_FILE = "pseudo_labels.json"
KIND = "covidct stage-1 pseudo-labels"
MIN_COLUMNS = 200  # as the dataset's label arrays
REGENERATE = (
    "regenerate them with python -m covidct.training.pseudo_label ckpt_path=<stage-1 checkpoint> input=<data.root>"
)


@dataclass(frozen=True)
class PseudoLabels:
    """A pseudo-label folder, read: ``rows`` patient id -> int8 (L,) 0/1 head-first row; ``meta`` the JSON."""

    path: Path
    rows: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def stage1_train_patients(self) -> list[str]:
        return list(self.meta["stage1_train_patients"])


def preprocessing_of(pre: SlicePreprocessor) -> dict[str, Any]:
    """What must match between stage 1 and stage 2: windows (level, width in HU), image size (px), lung crop."""
    return {"windows": [asdict(w) for w in pre.windows], "image_size": pre.image_size, "lung_crop": pre.lung_crop}


def write_pseudo_labels(folder: Path, patients: Sequence[tuple[str, int, np.ndarray]], meta: Mapping[str, Any]) -> Path:
    """Write ``patients`` (id, class index, int8 (L,) row) and ``meta`` into ``folder`` (each file atomic,
    the label array last but one and the JSON last). Returns the label array's path.

    ``meta["patients"]`` must give each written patient's ``series_length`` (slice positions); the JSON
    gets, per patient, its ``infected`` slice count, and under ``label_array`` the array's SHA-256 and
    the patient of each row, so that :func:`read_pseudo_labels` refuses parts edited apart."""
    folder.mkdir(parents=True, exist_ok=True)
    width = max([MIN_COLUMNS, *(len(row) for _, _, row in patients)])
    array = np.zeros((len(patients), width), dtype=np.int8)
    for r, (_, _, row) in enumerate(patients):
        array[r, : len(row)] = row
    given = meta.get("patients", {})
    records = {pid: {**given.get(pid, {}), "infected": int(row.sum())} for pid, _, row in patients}
    unsized = [pid for pid, record in records.items() if "series_length" not in record]
    if unsized:
        raise ValueError(f"write_pseudo_labels: meta['patients'] gives no series_length for {unsized[:5]}")
    atomic_write_csv(
        folder / INDEX_FILE,
        INDEX_COLUMNS,
        [(r, CLASS_NAMES[label], f"./{CLASS_NAMES[label]}/", pid) for r, (pid, label, _) in enumerate(patients)],
    )
    buf = io.BytesIO()
    np.save(buf, array)
    label_path = atomic_write_bytes(folder / LABEL_FILE, buf.getvalue())
    binding = {"file": LABEL_FILE, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "rows": list(records)}
    document = {"kind": KIND, **meta, "patients": records, "label_array": binding}
    atomic_write_text(folder / META_FILE, json.dumps(document, indent=1) + "\n")
    return label_path


def read_pseudo_labels(path: str | Path) -> PseudoLabels:
    """Read a pseudo-label array and the ``Index.csv`` and ``pseudo_labels.json`` beside it.

    A missing, misshapen or foreign file, or parts that disagree (see :func:`_check_binding`), raise
    :class:`DataError` naming the file, the patient and what differs."""
    path = Path(path)
    folder = path.parent
    where = f"data.pseudo_labels={path}"
    for needed in (path, folder / INDEX_FILE, folder / META_FILE):
        if not needed.is_file():
            raise DataError(
                f"{needed}: not found ({where}); write pseudo-labels with python -m covidct.training.pseudo_label"
            )
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / META_FILE}: unreadable ({exc}); {REGENERATE}") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise DataError(f"{folder / META_FILE}: not covidct pseudo-labels ({where})")
    index = read_index_file(folder) or IndexFile(folder / INDEX_FILE, [], [])
    data = path.read_bytes()
    array = load_label_array(path, data)
    ids = index.ids
    if array.shape[0] != len(ids):
        raise DataError(
            f"{path}: expected one row per data row of {folder / INDEX_FILE} ({len(ids)}), got shape {array.shape}; "
            f"{REGENERATE}"
        )
    _check_binding(path, meta, index, array, data)
    return PseudoLabels(path, dict(zip(ids, array, strict=True)), meta)


def _check_binding(path: Path, meta: dict[str, Any], index: IndexFile, array: np.ndarray, data: bytes) -> None:
    """Refuse a pseudo-label array, ``Index.csv`` and JSON that were not written together: the JSON's row
    patients must be Index.csv's, in order; its patients exactly the rows' patients, each with as many
    infected slices as its row and none past its series; and the array's SHA-256 the JSON's."""
    meta_path = path.parent / META_FILE
    binding, records = meta.get("label_array"), meta.get("patients")
    if not isinstance(binding, dict) or not {"sha256", "rows"} <= binding.keys() or not isinstance(records, dict):
        raise DataError(
            f"{meta_path}: records no SHA-256 and row patients of {path.name} (written by an older covidct); "
            f"{REGENERATE}"
        )
    rows = [str(pid) for pid in binding["rows"]]
    for r, (line, pid) in enumerate(zip(index.lines, index.ids, strict=True)):
        if r >= len(rows) or pid != rows[r]:
            expected = f"patient {rows[r]!r}" if r < len(rows) else "no such row"
            raise DataError(
                f"{index.path}, line {line}: row {r} is patient {pid!r} but {meta_path.name} says {expected}; "
                f"{REGENERATE}"
            )
    if len(rows) > len(index.ids):
        raise DataError(f"{path}: no row for patient {rows[len(index.ids)]!r} of {meta_path.name}; {REGENERATE}")
    unrecorded = [pid for pid in rows if pid not in records]
    rowless = [pid for pid in records if pid not in rows]
    if unrecorded or rowless:
        what = f"no record of patient {unrecorded[0]!r}" if unrecorded else f"patient {rowless[0]!r} but no row of it"
        raise DataError(f"{meta_path}: {what} in {path.name}; {REGENERATE}")
    for r, pid in enumerate(rows):
        _check_row(path, pid, r, array[r], records[pid])
    if hashlib.sha256(data).hexdigest() != binding["sha256"]:
        raise DataError(f"{path}: changed since it was written (SHA-256 differs from {meta_path.name}); {REGENERATE}")


def _check_row(path: Path, pid: str, r: int, row: np.ndarray, record: Mapping[str, Any]) -> None:
    """Refuse row ``r`` of ``path`` when its infected count or extent disagrees with the JSON's ``record``."""
    infected, series_length = int(row.sum()), int(record.get("series_length", -1))
    marked = np.flatnonzero(row)
    if infected != record.get("infected"):
        differs = f"{infected} infected slices, {META_FILE} says {record.get('infected')}"
    elif len(marked) and marked[-1] >= series_length:
        differs = f"an infected slice at column {marked[-1]}, past its series of {series_length} ({META_FILE})"
    else:
        return
    raise DataError(f"{path}: patient {pid!r} (row {r}) has {differs}; {REGENERATE}")


def check_pseudo_labels(
    pseudo: PseudoLabels,
    series_lengths: Mapping[str, int],
    pre: SlicePreprocessor,
    val_patients: Sequence[str],
) -> None:
    """Refuse pseudo-labels stage 2 must not use, with what to do:

    * made by a stage-1 model that read the slices otherwise than ``pre`` (windows, image size, lung
      crop): stage 1 saw other images than stage 2 trains on;
    * a patient's series has another length than when they were written (files added or removed);
    * stage 1 trained on one of this run's validation patients: its radiologist labels would reach
      stage 2's training through the pseudo-labels (a leak). Split both stages alike (same patients,
      ``data.seed``, ``data.val_fraction``, ``data.num_folds``, ``data.fold``).
    """
    meta, where = pseudo.meta, f"data.pseudo_labels={pseudo.path}"
    ours = preprocessing_of(pre)
    theirs = {k: meta.get("preprocessing", {}).get(k) for k in ours}
    if theirs != ours:
        raise DataError(
            f"{where}: stage 1 read the slices with {theirs}, this run with {ours}; train stage 1 "
            "with the same data.windows, data.image_size and data.lung_crop, and write the pseudo-labels again"
        )
    written = meta.get("patients", {})
    changed = [
        f"{pid} ({written[pid]['series_length']} then, {n} now)"
        for pid, n in series_lengths.items()
        if pid in written and int(written[pid]["series_length"]) != n
    ]
    if changed:
        raise DataError(
            f"{where}: series changed since the pseudo-labels were written: {', '.join(changed[:5])}; "
            "write them again from the stage-1 checkpoint"
        )
    leaked = sorted(set(pseudo.stage1_train_patients) & set(val_patients))
    if leaked:
        raise DataError(
            f"{where}: stage 1 trained on {len(leaked)} of this run's validation patients ({', '.join(leaked[:5])}): "
            "their slice labels would leak into stage 2. Train stage 1 on the same split (data.seed, "
            "data.val_fraction, data.num_folds, data.fold) as stage 2"
        )
