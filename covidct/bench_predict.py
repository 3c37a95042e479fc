"""Benchmark predict: seconds per 150-slice patient, and its ratio to a bare model forward.

    python -m covidct.bench_predict --input ../shared/data/covid-ct-md-sample --backbone vgg16 --image-size 224

Both are measured in the same run, on the same slices and model: ``end_to_end`` is what
predict.py does per test set (DICOM decode + windowing + resizing in DataLoader workers, batched
forward, voting, CSV writing); ``forward`` is the model alone on the already preprocessed uint8
slices. overhead = end_to_end / forward (target <= 1.3). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from covidct.data.dicom import read_series
from covidct.data.preprocess import SlicePreprocessor, parse_windows
from covidct.inference import PredictorSettings, find_test_sets, predict_test_set, slice_probabilities
from covidct.models.classifier import SliceClassifier


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_predict(
    input_path: str | Path, backbone: str = "vgg16", image_size: int = 224, batch_size: int = 32,
    num_workers: int = 2, repeats: int = 2,
) -> dict:
    """predict.py's work on ``input_path`` vs a bare forward over the same preprocessed slices (best of
    ``repeats`` each); returns the figures (seconds, per-patient time, overhead ratio)."""
    torch.manual_seed(0)
    model = SliceClassifier(backbone=backbone, in_channels=1).eval()
    settings = PredictorSettings(["lung"], image_size, ["COVID-19", "CAP", "Normal"], "majority", 0.5)
    test_sets = find_test_sets(input_path)
    patients = [p for t in test_sets for p in t.patients]
    pre = SlicePreprocessor(parse_windows(["lung"]), image_size)
    images = torch.from_numpy(np.concatenate([np.stack(read_series(p, pre).slices) for p in patients]))
    n_slices = len(images)
    slice_probabilities(model, images[:batch_size], batch_size)  # warm-up

    def end_to_end() -> None:
        with tempfile.TemporaryDirectory() as out:
            for t in test_sets:
                predict_test_set(t, model, settings, Path(out), batch_size, num_workers, progress=False)

    forward = best_of(repeats, lambda: slice_probabilities(model, images, batch_size))
    full = best_of(repeats, end_to_end)
    return {
        "backbone": backbone, "image_size": image_size, "patients": len(patients), "slices": n_slices,
        "threads": torch.get_num_threads(), "num_workers": num_workers,
        "end_to_end_s": round(full, 2), "forward_s": round(forward, 2),
        "seconds_per_150_slice_patient": round(full / n_slices * 150, 2), "overhead_ratio": round(full / forward, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder of patients or of test sets")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    result = measure_predict(args.input, args.backbone, args.image_size, args.batch_size, args.num_workers,
                             args.repeats)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
