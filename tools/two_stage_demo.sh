#!/usr/bin/env bash
# Two-stage pseudo-labels vs the paper's label mode, side by side on the same synthetic patients, of whom
# only LABELLED (default 0.25) of the sick ones have radiologist slice labels. Four commands:
#   1. paper:    python train.py                       (sick patients without slice labels: not trained on)
#   2. stage 1:  python train.py stage=infection       (infected-vs-clean slices, labelled patients)
#   3. labels:   python -m covidct.training.pseudo_label ...    (marks the unlabelled sick patients' infected slices,
#                at P(infected) > 0.5 as the winner did, and at threshold=auto: Youden's J on validation)
#   4. stage 2:  python train.py data.label_mode=pseudo data.pseudo_labels=...   (once per threshold)
# Usage, from the project root:  make two-stage-demo [ARGS='<train.py overrides for all runs>']
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/two_stage_demo}
LABELLED=${LABELLED:-0.25}
export WANDB_MODE=${WANDB_MODE:-offline}
COMMON=(data.synthetic.labelled_fraction="$LABELLED" logger=csv trainer.enable_progress_bar=false "$@")
rm -rf "$OUT"
run() { local name=$1; shift; echo "== $name: $*"; "$@" hydra.run.dir="$OUT/$name" >"$OUT.$name.log" 2>&1 \
  || { tail -5 "$OUT.$name.log"; exit 1; }; }
mkdir -p "$(dirname "$OUT")"
run paper "$PY" train.py "${COMMON[@]}"
run stage1 "$PY" train.py stage=infection "${COMMON[@]}"
CKPT=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['best_checkpoint'])" "$OUT/stage1/metrics.json")
ROOT=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['root'])" "$OUT/paper/data_summary.json")
run pseudo "$PY" -m covidct.training.pseudo_label ckpt_path="$CKPT" input="$ROOT"
run pseudo_auto "$PY" -m covidct.training.pseudo_label ckpt_path="$CKPT" input="$ROOT" threshold=auto
run two_stage "$PY" train.py data.label_mode=pseudo data.pseudo_labels="$OUT/pseudo/Slice-level-labels-pseudo.npy" "${COMMON[@]}"
run two_stage_auto "$PY" train.py data.label_mode=pseudo \
  data.pseudo_labels="$OUT/pseudo_auto/Slice-level-labels-pseudo.npy" "${COMMON[@]}"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from covidct.text_table import format_table
from covidct.patients.voting import VOTE_RULES
out = Path(sys.argv[1])
s1 = json.loads((out / "stage1" / "metrics.json").read_text())
print(f"stage 1: validation slice AUROC {s1['score']:.3f}")
for name in ("pseudo", "pseudo_auto"):
    pseudo = json.loads((out / name / "pseudo_labels.json").read_text())
    counts = [p["infected"] for p in pseudo["patients"].values()]
    print(f"{name}: threshold {pseudo['threshold']:.3f} ({pseudo['threshold_source']}): {len(counts)} patients, "
          f"{sum(c == 0 for c in counts)} with no infected slice, {sum(counts)} infected slices")
runs = {name: json.loads((out / name / "metrics.json").read_text()) for name in ("paper", "two_stage", "two_stage_auto")}
rules = [r for r in VOTE_RULES if all(f"rules/{r}/acc" in run["metrics"] for run in runs.values())]
rows = []
for name, run in runs.items():
    summary = json.loads((out / name / "data_summary.json").read_text())
    accs = [f"{run['metrics'][f'rules/{r}/acc']:.3f}" for r in rules]
    rows.append([name, str(summary["train_slices"]), *accs])
print("patient accuracy on the same validation patients (best epoch by vote.rule):")
print(format_table(["labels", "train slices", *rules], rows))
PY
