"""A training run's validation patients as predict.py's input: the deployed path checked on the patients the
run was scored on (``make predict-demo``).

``python -m covidct.training.validation_set <run folder | folder of runs>`` picks the run (the newest finished
one, ``metrics.json`` status ok, when given a folder of runs), links each validation patient of its
``split.csv`` into ``<run>/validation/`` (a test set named ``validation``; symbolic links, no copy), writes
``<run>/validation_labels.csv`` (patient,class) and prints predict.py's arguments, one per line:
``ckpt_path=<best checkpoint> input=<run>/validation labels=<run>/validation_labels.csv``. predict.py's
accuracy on them is then the deployed model's, beside the run's own validation figure.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from covidct.contracts import DATA_SUMMARY_JSON, METRICS_FILE, SPLIT_FILE
from covidct.data.layout import discover_covid_ct_md
from covidct.errors import DataError
from covidct.io import atomic_write_csv

VALIDATION_DIR = "validation"
VALIDATION_LABELS = "validation_labels.csv"


def finished_run(path: Path) -> Path:
    """``path`` itself when it is a run folder, else its newest sub-folder whose ``metrics.json`` says ok."""
    if (path / METRICS_FILE).is_file():
        return path
    runs = [p for p in path.glob("*/") if _status(p) == "ok"] if path.is_dir() else []
    if not runs:
        raise DataError(f"{path}: no finished training run here (a folder with metrics.json status ok); train first")
    return max(runs, key=lambda p: (p / METRICS_FILE).stat().st_mtime)


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / METRICS_FILE).read_text()).get("status")
    except (OSError, ValueError):
        return None


def link_validation_patients(run: Path) -> list[str]:
    """``<run>/validation/<patient>`` -> the patient's folder under the run's data root, for every ``val`` row of
    its ``split.csv``; ``<run>/validation_labels.csv``. Returns predict.py's arguments."""
    metrics = json.loads((run / METRICS_FILE).read_text())
    if metrics.get("status") != "ok" or not metrics.get("best_checkpoint"):
        raise DataError(f"{run / METRICS_FILE}: status {metrics.get('status')!r}, no best checkpoint to predict with")
    root = Path(json.loads((run / DATA_SUMMARY_JSON).read_text())["root"])
    with (run / SPLIT_FILE).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["subset"] == "val"]
    if not rows:
        raise DataError(f"{run / SPLIT_FILE}: no validation patients (subset val)")
    folders = {p.patient_id: p.folder for p in discover_covid_ct_md(root)}
    missing = [r["patient"] for r in rows if r["patient"] not in folders]
    if missing:
        raise DataError(f"{root}: validation patients {', '.join(missing)} of {run / SPLIT_FILE} are not there")
    linked = run / VALIDATION_DIR
    linked.mkdir(exist_ok=True)
    for row in rows:
        link = linked / row["patient"]
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(folders[row["patient"]].resolve(), target_is_directory=True)
    labels = atomic_write_csv(run / VALIDATION_LABELS, ["patient", "class"], [[r["patient"], r["class"]] for r in rows])
    return [f"ckpt_path={metrics['best_checkpoint']}", f"input={linked.resolve()}", f"labels={labels.resolve()}"]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m covidct.training.validation_set <run folder | folder of runs>\n")
        return 2
    try:
        print("\n".join(link_validation_patients(finished_run(Path(argv[0])))))
    except DataError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
