"""A short, human-readable account of the data a run used: what was read, skipped and split."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidct.contracts import CLASS_NAMES, DATA_SUMMARY_JSON, DATA_SUMMARY_TEXT
from covidct.data.cache import CachedPatient, SliceCache
from covidct.data.dicom import Skipped
from covidct.data.labels import UNKNOWN
from covidct.data.series import series_line
from covidct.io import atomic_write_text

MAX_IGNORED_SHOWN = 20  # ignored entries listed in the text summary (all are in the JSON)
MAX_CROPS_SHOWN = 20  # lung crop boxes listed in the text summary (all are in the JSON)


@dataclass
class DataSummary:
    """Counts per class, skipped files with reasons, split sizes. Saved as JSON and text."""

    root: str
    cache: str
    cache_build_seconds: float
    label_mode: str
    patients: dict[str, int]
    slices: dict[str, int]
    patients_with_slice_labels: dict[str, int]
    slice_targets: dict[str, int]
    train_patients: dict[str, int]
    val_patients: dict[str, int]
    train_slices: int
    val_slices: int
    unknown_slices_not_trained: int
    slice_order: dict[str, int]  # patients per ordering key
    # per patient: patient, n_slices, series_length, order_key, order_note, lung_crop (None without
    # data.lung_crop; else box [top, bottom, left, right] px, slice_shape [rows, cols], lung_slices, note),
    # series (the one used: uid, description, kernel, thickness_mm, kind, n_images, note), n_series (axial
    # series in the folder), other_series (every other series or image group, with why not used)
    series: list[dict[str, Any]]
    skipped_patients: list[dict[str, str]]  # {"patient", "folder", "reason"}: no usable slice
    skipped_files: list[dict[str, str]]  # {"file", "reason"}: DICOM (or .dcm) files not used
    ignored_files: list[dict[str, str]]  # {"file", "reason"}: other entries (system files, links, ...)
    warnings: list[str]
    pseudo_labelled: dict[str, int] | None = None  # label_mode=pseudo: training patients per class

    @classmethod
    def collect(
        cls,
        root: str,
        cache: SliceCache,
        label_mode: str,
        targets: np.ndarray,
        train_patients: np.ndarray,
        val_patients: np.ndarray,
        train_rows: np.ndarray,
        warnings: list[str],
        skipped_entries: list[Skipped] = (),
        target_names: Sequence[str] = CLASS_NAMES,
        pseudo_labelled: Sequence[int] = (),
    ) -> DataSummary:
        """``skipped_entries``: entries of the class folders that are not patient folders (from discovery);
        ``target_names``: the slice classes (``targets`` index them); ``pseudo_labelled``: indices of the
        patients whose slice targets come from stage-1 pseudo-labels."""
        labels = np.asarray([p.label for p in cache.patients])
        n_slices = np.asarray([p.n_slices for p in cache.patients])
        per_class = lambda values: {name: int(values[c]) for c, name in enumerate(CLASS_NAMES)}  # noqa: E731
        count = lambda idx: per_class(np.bincount(labels[idx], minlength=len(CLASS_NAMES)))  # noqa: E731
        in_train = np.isin(cache.patient, train_patients)
        target_counts = {name: int((targets == c).sum()) for c, name in enumerate(target_names)}
        target_counts["unknown"] = int((targets == UNKNOWN).sum())
        return cls(
            root=root,
            cache=str(cache.path),
            cache_build_seconds=round(cache.build_seconds, 2),
            label_mode=label_mode,
            patients=count(np.arange(len(labels))),
            slices=per_class(np.bincount(labels, weights=n_slices, minlength=len(CLASS_NAMES))),
            patients_with_slice_labels=count(
                np.asarray([i for i in range(len(labels)) if (targets[cache.patient == i] != UNKNOWN).all()], int)
            ),
            slice_targets=target_counts,
            train_patients=count(train_patients),
            val_patients=count(val_patients),
            train_slices=len(train_rows),
            val_slices=int(np.isin(cache.patient, val_patients).sum()),
            unknown_slices_not_trained=int((in_train & (targets == UNKNOWN)).sum()),
            slice_order=dict(Counter(p.order_key for p in cache.patients)),
            series=[
                {
                    "patient": p.patient_id,
                    "n_slices": p.n_slices,
                    "series_length": p.series_length,
                    "order_key": p.order_key,
                    "order_note": p.order_note,
                    "lung_crop": p.lung_crop,
                    "series": p.series,
                    "n_series": p.n_series,
                    "other_series": p.other_series,
                }
                for p in cache.patients
            ],
            skipped_patients=list(cache.skipped_patients),
            skipped_files=[s for p in cache.patients for s in p.skipped]
            + [{"file": str(s.path), "reason": s.reason} for s in skipped_entries],
            ignored_files=[s for p in cache.patients for s in p.ignored],
            warnings=warnings + [f"{p.patient_id}: {p.lung_crop['note']}" for p in cache.patients if _not_cropped(p)],
            pseudo_labelled=count(np.asarray(pseudo_labelled, dtype=int)),
        )

    def text(self) -> str:
        def row(name: str, d: dict[str, int]) -> str:
            return f"  {name:<30}  " + "  ".join(f"{k}={v}" for k, v in d.items())

        lines = [
            f"Data: {self.root}",
            f"  cache {self.cache} (built in {self.cache_build_seconds:.1f} s)",
            row("patients", self.patients),
            row("slices", self.slices),
            row("patients, all slices labelled", self.patients_with_slice_labels),
            row(f"slice targets ({self.label_mode})", self.slice_targets),
            *([row("patients with pseudo-labels", self.pseudo_labelled)] if self.label_mode == "pseudo" else []),
            row("train patients", self.train_patients),
            row("val patients", self.val_patients),
            f"  train slices {self.train_slices}, val slices {self.val_slices}, "
            f"slices without a target not trained on {self.unknown_slices_not_trained}",
            row("patients, slices ordered by", self.slice_order),
        ]
        lines += [f"    {s['patient']}: {s['order_note']}" for s in self.series if s["order_note"]]
        lines += _series_lines(self.series)
        lines += _lung_crop_lines(self.series)
        lines += [
            f"  skipped patients {len(self.skipped_patients)}, skipped files {len(self.skipped_files)}, "
            f"ignored other files {len(self.ignored_files)} (all listed in data_summary.json)",
        ]
        lines += [f"    skipped patient {s['patient']}: {s['reason']}" for s in self.skipped_patients]
        lines += [f"    skipped {s['file']}: {s['reason']}" for s in self.skipped_files]
        lines += [f"    ignored {s['file']}: {s['reason']}" for s in self.ignored_files[:MAX_IGNORED_SHOWN]]
        if len(self.ignored_files) > MAX_IGNORED_SHOWN:
            lines.append(f"    ... and {len(self.ignored_files) - MAX_IGNORED_SHOWN} more ignored (data_summary.json)")
        lines += [f"  WARNING {w}" for w in self.warnings]
        return "\n".join(lines)

    def save(self, out_dir: Path) -> None:
        """Write ``data_summary.json`` and ``data_summary.txt`` into ``out_dir`` (atomic)."""
        atomic_write_text(out_dir / DATA_SUMMARY_JSON, json.dumps(asdict(self), indent=1))
        atomic_write_text(out_dir / DATA_SUMMARY_TEXT, self.text() + "\n")


def _not_cropped(patient: CachedPatient) -> bool:
    """``data.lung_crop=true`` and no lung found: the full slice was used (the note says why)."""
    return bool(patient.lung_crop and patient.lung_crop["note"])


def _series_lines(series: list[dict[str, Any]]) -> list[str]:
    """Text lines of the patients whose folder held more than their series: the series used and why, then
    each series or image group left out and why; [] when every folder held one series."""
    mixed = [s for s in series if s.get("other_series")]
    if not mixed:
        return []
    lines = [f"  series: {len(mixed)} patient folder(s) hold more than one series or image group (one used each)"]
    for s in mixed:
        lines.append(f"    {s['patient']}: used {series_line(s['series'])}")
        lines += [f"      not used: {series_line(other)}" for other in s["other_series"]]
    return lines


def _lung_crop_lines(series: list[dict[str, Any]]) -> list[str]:
    """Text lines of the lung crop (``data.lung_crop=true``): how many series were cropped, then each
    one's box (rows top:bottom, columns left:right, px of the original slice); [] without the crop."""
    crops = [s for s in series if s.get("lung_crop")]
    if not crops:
        return []
    cropped = sum(not s["lung_crop"]["note"] for s in crops)
    lines = [f"  lung crop: {cropped} of {len(crops)} series cropped to their lungs (box in px of the original slice)"]
    for s in crops[:MAX_CROPS_SHOWN]:
        crop = s["lung_crop"]
        (top, bottom, left, right), (rows, cols) = crop["box"], crop["slice_shape"]
        not_cropped = " (not cropped: no lung found)" if crop["note"] else ""
        lines.append(
            f"    {s['patient']}: rows {top}:{bottom}, cols {left}:{right} of {rows} x {cols}; "
            f"lung on {crop['lung_slices']} of {s['n_slices']} slices{not_cropped}"
        )
    if len(crops) > MAX_CROPS_SHOWN:
        lines.append(f"    ... and {len(crops) - MAX_CROPS_SHOWN} more boxes (data_summary.json)")
    return lines
