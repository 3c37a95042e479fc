"""Picture of ``data.lung_crop``: the lung mask, the slice's box and the series' crop box on a few slices.

    python tools/lung_crop_figure.py OUT.png [--root SAMPLE] [--patient P001] [--size 224]

Columns: the apex (first slice with lung), the middle slice, the base (last slice with lung) and
the middle one of the radiologist-labelled infected slices (when the patient has slice labels). Top
row: the slice in the lung window, the mask in red, the slice's lung box dashed, the series box in
yellow; bottom row: the model input (the series box, resized to ``--size`` px).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from covidct.data.dicom import read_series  # noqa: E402
from covidct.data.layout import discover_covid_ct_md  # noqa: E402
from covidct.data.lung import Box, lung_mask, mask_box, series_box  # noqa: E402
from covidct.data.preprocess import SlicePreprocessor, Window, parse_windows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "covid-ct-md-sample"


def chosen_slices(has_lung: list[bool], infected: list[int]) -> dict[str, int]:
    """Titles -> slice index: apex, middle, base and the middle labelled infected slice."""
    lung = [i for i, found in enumerate(has_lung) if found]
    picks = {"apex": lung[0], "middle": len(has_lung) // 2, "base": lung[-1]}
    if infected:
        picks["labelled infected"] = infected[len(infected) // 2]
    return picks


def outline(ax: plt.Axes, box: Box, **style: object) -> None:
    ax.add_patch(Rectangle((box.left - 0.5, box.top - 0.5), box.width, box.height, fill=False, **style))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--root", type=Path, default=SAMPLE, help="COVID-CT-MD folder (default: the shared sample)")
    parser.add_argument("--patient", default="P001")
    parser.add_argument("--size", type=int, default=224, help="model input side (px)")
    args = parser.parse_args()

    patient = next(p for p in discover_covid_ct_md(args.root) if p.patient_id == args.patient)
    series = read_series(patient.folder)  # float32 HU, head first
    masks = [lung_mask(hu) for hu in series.slices]
    boxes = [mask_box(m) for m in masks]
    box = series_box(boxes, series.slices[0].shape)
    if box is None:
        raise SystemExit(f"{patient.folder}: no lung found on any slice")
    labels = patient.slice_labels
    infected = [i for i, r in enumerate(series.ranks) if labels is not None and labels[r] == 1]
    picks = chosen_slices([b is not None for b in boxes], infected)
    pre = SlicePreprocessor(parse_windows(["lung"]), args.size)
    lung_window = Window(-600, 1500)

    fig, axes = plt.subplots(2, len(picks), figsize=(3.2 * len(picks), 6.6), squeeze=False)
    for col, (title, i) in enumerate(picks.items()):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(lung_window.apply(series.slices[i]), cmap="gray")
        top.imshow(np.ma.masked_where(~masks[i], masks[i]), cmap="autumn", alpha=0.35)
        if boxes[i] is not None:
            outline(top, boxes[i], edgecolor="red", linestyle="--", linewidth=1)
        outline(top, box, edgecolor="yellow", linewidth=1.5)
        top.set_title(f"{title}: slice {series.ranks[i]}", fontsize=9)
        bottom.imshow(pre(series.slices[i][box.slices])[0], cmap="gray")
        bottom.set_title(f"model input ({args.size} px)", fontsize=9)
        for ax in (top, bottom):
            ax.set_axis_off()
    rows, cols = series.slices[0].shape
    fig.suptitle(
        f"{patient.patient_id}: lung mask (red), slice box (dashed), series box (yellow) "
        f"rows {box.top}:{box.bottom}, cols {box.left}:{box.right} of {rows} x {cols}",
        fontsize=9,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
