"""Benchmark predict: seconds per 150-slice patient, and its ratio to a bare model forward.

    python -m covidct.bench_predict input=../shared/data/covid-ct-md-sample [backbone=vgg16] [image_size=224]

(settings in ``conf/bench_predict.yaml``; ``make bench-predict`` runs it on the COVID-CT-MD sample).
Both are measured in the same run, on the same slices and model: ``end_to_end`` is what
predict.py does per test set (DICOM decode + windowing + resizing in DataLoader workers, batched
forward, voting, CSV writing); ``forward`` is the model alone on the already preprocessed uint8
slices. overhead = end_to_end / forward (target <= 1.3). Random weights: speed does not depend on them.
The figures are printed as JSON and written to ``<run dir>/bench_predict.json``.

Importing this module only defines things; the process setup happens in :func:`main`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from covidct.errors import ConfigError, CovidCTError
from covidct.io import atomic_write_text

log = logging.getLogger("bench_predict")


def check_backbone(key: str, name: str) -> None:
    """A ConfigError naming ``key`` unless ``name`` is a known backbone (before any data is read)."""
    from covidct.models.backbones import BACKBONES

    if name not in BACKBONES:
        raise ConfigError(f"{key}={name!r} is not known; choose one of {sorted(BACKBONES)}")


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_predict(
    input_path: str | Path,
    backbone: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    repeats: int,
) -> dict:
    """predict.py's work on ``input_path`` vs a bare forward over the same preprocessed slices (best of
    ``repeats`` each); returns the figures (seconds, per-patient time, overhead ratio)."""
    import numpy as np
    import torch

    from covidct.data.dicom import read_series
    from covidct.data.preprocess import SlicePreprocessor, parse_windows
    from covidct.inference import PredictorSettings, find_test_sets, predict_test_set, slice_probabilities
    from covidct.models.classifier import SliceClassifier

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
        "backbone": backbone,
        "image_size": image_size,
        "patients": len(patients),
        "slices": n_slices,
        "threads": torch.get_num_threads(),
        "num_workers": num_workers,
        "end_to_end_s": round(full, 2),
        "forward_s": round(forward, 2),
        "seconds_per_150_slice_patient": round(full / n_slices * 150, 2),
        "overhead_ratio": round(full / forward, 3),
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_predict")
def bench_predict_app(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "input"):
        log.error(
            "input not set: python -m covidct.bench_predict input=<patient folder | test set | folder of test sets>"
        )
        sys.exit(1)
    try:
        check_backbone("backbone", cfg.backbone)
        result = measure_predict(cfg.input, cfg.backbone, cfg.image_size, cfg.batch_size, cfg.num_workers, cfg.repeats)
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message names the key or file; no traceback for user errors)
    text = json.dumps(result, indent=1)
    print(text)
    atomic_write_text(Path(cfg.paths.output_dir) / "bench_predict.json", text + "\n")


def main() -> None:
    """``python -m covidct.bench_predict input=<folder> [key=value ...]``: process setup, then Hydra."""
    from covidct.config import register_resolvers

    register_resolvers()  # ${run_suffix:} names the run folder
    bench_predict_app()


if __name__ == "__main__":
    main()
