"""Benchmark predict: seconds per 150-slice patient, and its ratio to a bare model forward; and what deployment
choices cost or save (ONNX export, bf16, int8, GPU).

    python -m covidct.bench.predict input=../shared/data/covid-ct-md-sample [backbone=vgg16] [image_size=224]
        [rows=[overhead,onnx,bf16,int8,gpu]]

(settings in ``conf/bench_predict.yaml``; ``make bench-predict`` runs it on the COVID-CT-MD sample).
Both are measured in the same run, on the same slices and model: ``end_to_end`` is what
predict.py does per test set (DICOM decode + windowing + resizing in DataLoader workers, batched
forward, voting, CSV writing); ``forward`` is the model alone on the already preprocessed uint8
slices. overhead = end_to_end / forward (target <= 1.3). Random weights: speed does not depend on them.

The deployment rows (``onnx``, ``bf16``, ``int8``: :mod:`covidct.bench.deployment`; ``gpu``:
:mod:`covidct.bench.gpu`) compare, each A vs B on the same patient(s) in the same run, what deployment choices
cost or save. This module also measures ``make bench``'s inference row (:func:`measure_inference`).

The figures are printed (JSON, and a table of the deployment rows) and written to
``<run dir>/bench_predict.json``.

Importing this module only defines things; the process setup happens in :func:`main`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from covidct.bench.measure import Row, best_of, check_backbone
from covidct.cli import exit_if_keys_missing
from covidct.contracts import CONF_DIR
from covidct.errors import ConfigError, CovidCTError
from covidct.io import atomic_write_text

log = logging.getLogger("bench_predict")
#: bench_predict's rows: ``overhead`` (predict.py vs a bare forward) and the deployment comparisons
ROWS = ("overhead", "onnx", "bf16", "int8", "gpu")


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model and count, its bf16 / int8 instructions, torch threads, GPU."""
    import os
    import platform

    import torch

    flags, model = set(), platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(
            (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), model
        )
        flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16"}),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


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
    from covidct.models.classifier import SliceClassifier
    from covidct.patients.parameters import TAU
    from covidct.predict.predictor import predict_test_set
    from covidct.predict.settings import PredictorSettings
    from covidct.predict.test_sets import find_test_sets
    from covidct.predict.torch_backend import slice_probabilities

    torch.manual_seed(0)
    model = SliceClassifier(backbone=backbone, in_channels=1).eval()
    settings = PredictorSettings(["lung"], image_size, ["COVID-19", "CAP", "Normal"], "majority", TAU)
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


def measure_inference(sample: Path, cfg: DictConfig) -> list[Row]:
    """``make bench``'s inference row: predict.py on the first ``cfg.patients`` patients of the sample (each a
    patient folder) vs a bare forward, in seconds per 150-slice patient."""
    from covidct.data.layout import discover_covid_ct_md

    folders = [p.folder for p in discover_covid_ct_md(sample)[: cfg.patients]]
    results = [measure_predict(f, cfg.backbone, cfg.image_size, 32, cfg.num_workers, cfg.repeats) for f in folders]
    r = {k: sum(x[k] for x in results) for k in ("patients", "slices", "end_to_end_s", "forward_s")}
    r["overhead_ratio"] = r["end_to_end_s"] / r["forward_s"]
    data = f"real, {r['patients']} patients, {r['slices']} slices, {cfg.backbone} {cfg.image_size} px"
    return [
        Row(
            "inference",
            data,
            "predict.py",
            r["end_to_end_s"] / r["slices"] * 150,
            "bare forward",
            r["forward_s"] / r["slices"] * 150,
            "s/150-slice patient",
            "<= 1.3x",
            r["overhead_ratio"] <= 1.3,
        )
    ]


def check_rows(rows: Any) -> list[str]:
    """``rows`` as a list of known row names, or a ConfigError naming the key."""
    if not OmegaConf.is_list(rows) and not isinstance(rows, list):
        raise ConfigError(f"rows={rows!r} must be a list, e.g. rows=[onnx,int8]")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ConfigError(f"rows has unknown rows {unknown}; choose from {list(ROWS)}")
    return list(rows)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench_predict")
def bench_predict_app(cfg: DictConfig) -> None:
    exit_if_keys_missing(cfg, "bench_predict", log)
    try:
        check_backbone("backbone", cfg.backbone)
        rows = check_rows(cfg.get("rows", ["overhead"]))
        result: dict[str, Any] = {}
        if "overhead" in rows:
            result = measure_predict(
                cfg.input, cfg.backbone, cfg.image_size, cfg.batch_size, cfg.num_workers, cfg.repeats
            )
        deployment = [r for r in rows if r != "overhead"]
        if deployment:
            from covidct.bench.deployment import measure_deployment

            result["deployment"] = measure_deployment(
                cfg.input,
                cfg.backbone,
                cfg.image_size,
                cfg.batch_size,
                cfg.num_workers,
                cfg.repeats,
                deployment,
                cfg.get("compare_patients", 1),
                cfg.get("ckpt_path"),
                cfg.get("calibration_slices", 16),
                bool(cfg.get("bf16_force", False)),
            )
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message names the key or file; no traceback for user errors)
    result["machine"] = machine()
    text = json.dumps(result, indent=1)
    print(text)
    if result.get("deployment"):
        from covidct.bench.deployment import format_deployment

        print(format_deployment(result["deployment"]))
    atomic_write_text(Path(cfg.paths.output_dir) / "bench_predict.json", text + "\n")


def main() -> None:
    """``python -m covidct.bench.predict input=<folder> [key=value ...]``: process setup, then Hydra."""
    from covidct.config import register_resolvers

    register_resolvers()  # ${run_suffix:} names the run folder
    bench_predict_app()


if __name__ == "__main__":
    from covidct.cli import exit_on_typo

    exit_on_typo("bench_predict")
    main()
