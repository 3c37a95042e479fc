"""Benchmark predict: seconds per 150-slice patient, and its ratio to a bare model forward; and what deployment
choices cost or save (ONNX export, bf16, int8, GPU).

    python -m covidct.bench.predict input=../shared/data/covid-ct-md-sample [backbone=vgg16] [image_size=224]
        [rows=[overhead,onnx,bf16,int8,gpu]]

(settings in ``conf/bench_predict.yaml``; ``make bench-predict`` runs it on the COVID-CT-MD sample).
Both are measured in the same run, on the same slices and model: ``end_to_end`` is what
predict.py does per test set (DICOM decode + windowing + resizing in DataLoader workers, batched
forward, voting, CSV writing); ``forward`` is the model alone on the already preprocessed uint8
slices. overhead = end_to_end / forward (target <= 1.3). Random weights: speed does not depend on them.

Deployment rows (:func:`measure_deployment`; predict.py's work on the first ``compare_patients`` patient(s),
best of ``repeats``), each A vs B on the same patient in the same run, with the speed ratio B/A (> 1: A is
faster), the largest slice-probability difference and the patients whose call changes:

* ``onnx``: predict.py with the ONNX export (onnxruntime, CPU provider) vs with the checkpoint (PyTorch fp32);
* ``bf16``: the checkpoint under bfloat16 autocast vs fp32 (forced: on a CPU without AVX-512 BF16 or AMX,
  predict.py precision=bf16 falls back to fp32, and this row shows what emulated bf16 would cost);
* ``int8``: the int8-quantized export (calibrated on ``calibration_slices`` slices of another patient when the
  input has one) vs the fp32 export;
* ``gpu``: (a CUDA GPU only; skipped with a message without one) VGG16 bf16 training img/s fed from the slice
  cache vs from tensors already on the GPU, with and without ``torch.compile``, and predict.py (checkpoint, and
  ONNX with the CUDA provider) vs a bare forward.

The figures are printed (JSON, and a table of the deployment rows) and written to
``<run dir>/bench_predict.json``.

Importing this module only defines things; the process setup happens in :func:`main`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from covidct.errors import ConfigError, CovidCTError
from covidct.io import atomic_write_text

log = logging.getLogger("bench_predict")
#: bench_predict's rows: ``overhead`` (predict.py vs a bare forward) and the deployment comparisons
ROWS = ("overhead", "onnx", "bf16", "int8", "gpu")


def check_backbone(key: str, name: str) -> None:
    """A ConfigError naming ``key`` unless ``name`` is a known backbone (before any data is read)."""
    from covidct.models.backbones import BACKBONES

    if name not in BACKBONES:
        raise ConfigError(f"{key}={name!r} is not known; choose one of {sorted(BACKBONES)}")


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
    from covidct.models.classifier import SliceClassifier
    from covidct.predict.predictor import PredictorSettings, find_test_sets, predict_test_set, slice_probabilities

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


# ---- deployment rows ----------------------------------------------------------------------------
def random_checkpoint(backbone: str, image_size: int, path: Path) -> Path:
    """A covidct checkpoint of a random-weight ``backbone`` (lung window, majority vote) at ``path``."""
    import torch

    from covidct.models.classifier import SliceClassifier

    torch.manual_seed(0)
    pre = {"windows": ["lung"], "image_size": image_size, "lung_crop": False, "vote_rule": "majority"}
    model = SliceClassifier(backbone=backbone, in_channels=1, preprocessing=pre).eval()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def compare(
    name: str, data: str, a_label: str, a: tuple[float, dict], b_label: str, b: tuple[float, dict], note: str = ""
) -> dict[str, Any]:
    """One deployment row: A vs B, each (best seconds, {patient: (slice probabilities, call)})."""
    import numpy as np

    (a_s, a_res), (b_s, b_res) = a, b
    return {
        "row": name,
        "data": data,
        "a": a_label,
        "a_s": round(a_s, 2),
        "b": b_label,
        "b_s": round(b_s, 2),
        "speed_ratio_b_over_a": round(b_s / a_s, 3),
        "max_abs_prob_diff": float(max(np.abs(a_res[p][0] - b_res[p][0]).max() for p in b_res)),
        "calls_changed": sorted(p for p in b_res if a_res[p][1] != b_res[p][1]),
        "note": note,
    }


def measure_deployment(
    input_path: str | Path,
    backbone: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    repeats: int,
    rows: list[str],
    patients: int = 1,
    ckpt_path: str | None = None,
    calibration_slices: int = 16,
    force_bf16: bool = False,
) -> list[dict[str, Any]]:
    """The deployment rows (module docstring) of ``rows`` on the first ``patients`` patient(s) of ``input_path``,
    with the checkpoint ``ckpt_path`` or, when None, random ``backbone`` weights at ``image_size``. Without
    native bfloat16 the bf16 row is skipped (predict.py would run fp32) unless ``force_bf16``."""
    import torch

    from covidct.predict.export import export_onnx, quantize_export
    from covidct.predict.onnx_backend import load_onnx
    from covidct.predict.predictor import TestSet, find_test_sets, predict_test_set, settings_from_sidecar
    from covidct.predict.torch_backend import bf16_supported, load_checkpoint

    everyone = [p for t in find_test_sets(input_path) for p in t.patients]
    test_set = TestSet("bench", everyone[:patients])
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-deploy-"))
    try:
        ckpt = Path(ckpt_path) if ckpt_path else random_checkpoint(backbone, image_size, work / "random.ckpt")
        model, settings = load_checkpoint(ckpt, torch.device("cpu"))
        backbone, image_size = model.hparams.backbone, settings.image_size
        n_slices: list[int] = []

        def run(m: Any, s: Any) -> tuple[float, dict]:
            results: dict = {}

            def once() -> None:
                results.clear()
                with tempfile.TemporaryDirectory() as out:
                    predict_test_set(test_set, m, s, Path(out), batch_size, num_workers, False, record=results)

            seconds = best_of(repeats, once)
            n_slices[:] = [sum(len(p) for p, _ in results.values())]
            return seconds, dict(results)

        weights = f"checkpoint {ckpt}" if ckpt_path else "random weights"
        fp32 = run(model, settings)
        data = (
            f"{', '.join(p.name for p in test_set.patients)} ({n_slices[0]} slices), {backbone} {image_size} px, "
            f"{weights}, best of {repeats}"
        )
        out = []
        if "onnx" in rows or "int8" in rows:
            start = time.perf_counter()
            files = export_onnx(ckpt, work / "model.onnx")
            export_s = time.perf_counter() - start
            export = load_onnx(files[0], "cpu")
            onnx_fp32 = run(export.model, settings_from_sidecar(export.sidecar, export.mil_head))
        if "onnx" in rows:
            out.append(
                compare(
                    "onnx",
                    data,
                    "predict.py onnxruntime fp32",
                    onnx_fp32,
                    "predict.py checkpoint fp32",
                    fp32,
                    f"export took {export_s:.0f} s (once)",
                )
            )
        if "bf16" in rows:
            native, what = bf16_supported(torch.device("cpu"))
            if native or force_bf16:
                note = what + ("" if native else "; predict.py precision=bf16 falls back to fp32 here, bf16 forced")
                bf16 = run(model, dataclasses.replace(settings, precision="bf16", overridden={}))
                out.append(compare("bf16", data, "checkpoint bf16 autocast", bf16, "checkpoint fp32", fp32, note))
            else:
                skipped = f"{what}: predict.py precision=bf16 runs fp32 here (bf16_force=true measures emulated bf16)"
                log.warning("bf16 row skipped: %s", skipped)
                out.append({"row": "bf16", "data": data, "skipped": skipped})
        if "int8" in rows:
            others = [p for p in everyone if p not in test_set.patients]
            calibration = others[0] if others else test_set.patients[0]
            start = time.perf_counter()
            files8 = quantize_export(files[0], work / "model.int8.onnx", calibration, calibration_slices)
            quantize_s = time.perf_counter() - start
            export8 = load_onnx(files8[0], "cpu")
            int8 = run(export8.model, settings_from_sidecar(export8.sidecar, export8.mil_head))
            note = (
                f"calibrated on {calibration_slices} slices of {calibration.name} in {quantize_s:.0f} s; vs the "
                f"checkpoint fp32: max diff {compare('', '', '', int8, '', fp32)['max_abs_prob_diff']:.3g}"
            )
            out.append(compare("int8", data, "onnxruntime int8", int8, "onnxruntime fp32", onnx_fp32, note))
        if "gpu" in rows:
            out += measure_gpu(input_path, test_set, ckpt, batch_size, num_workers, repeats)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_gpu(
    input_path: str | Path, test_set: Any, ckpt: Path, batch_size: int, num_workers: int, repeats: int
) -> list[dict[str, Any]]:
    """GPU rows (CUDA only; [] with a message without a GPU): VGG16 224 px bf16 training img/s from the slice
    cache vs from batches already on the GPU, each without and with ``torch.compile``; predict.py with the
    checkpoint and with the ONNX export (CUDA provider) vs a bare forward on the GPU."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        log.warning("gpu rows skipped: no CUDA GPU here (torch.cuda.is_available() is False); nothing else uses them")
        return []
    from covidct.predict.export import export_onnx
    from covidct.predict.onnx_backend import load_onnx
    from covidct.predict.predictor import predict_test_set, read_patient, settings_from_sidecar
    from covidct.predict.torch_backend import load_checkpoint, slice_probabilities

    device = torch.device("cuda")
    rows = []
    root = Path(input_path)
    if (root / "Index.csv").is_file():
        rows += measure_gpu_training(root, batch_size, num_workers)
    else:
        log.warning("gpu training rows skipped: input=%s is not a COVID-CT-MD layout (no Index.csv)", root)
    model, settings = load_checkpoint(ckpt, device)
    pre = _preprocessor(settings)  # the bare forward's input, read once
    images = torch.from_numpy(np.concatenate([read_patient(p, pre)["images"] for p in test_set.patients]))
    slice_probabilities(model, images[:batch_size], batch_size)  # warm-up (cuDNN autotuning)

    def bare() -> None:
        slice_probabilities(model, images, batch_size)
        torch.cuda.synchronize()

    def predict(m: Any, s: Any) -> Callable[[], None]:
        def once() -> None:
            with tempfile.TemporaryDirectory() as out:
                predict_test_set(test_set, m, s, Path(out), batch_size, num_workers, False)

        return once

    forward_s = best_of(repeats, bare)
    ckpt_s = best_of(repeats, predict(model, settings))
    timed = [("predict.py checkpoint (GPU)", ckpt_s)]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export = load_onnx(export_onnx(ckpt, Path(tmp) / "model.onnx")[0], "cuda")
        except ConfigError as exc:  # onnxruntime without its CUDA provider (pip install onnxruntime-gpu)
            log.warning("gpu onnxruntime row skipped: %s", exc)
        else:
            settings_onnx = settings_from_sidecar(export.sidecar, export.mil_head)
            timed.append(("predict.py onnxruntime CUDA", best_of(repeats, predict(export.model, settings_onnx))))
    data = f"{len(images)} slices, {model.hparams.backbone} {settings.image_size} px, {torch.cuda.get_device_name()}"
    for label, seconds in timed:
        rows.append(
            {
                "row": "gpu predict",
                "data": data,
                "a": label,
                "a_s": round(seconds, 2),
                "b": "bare forward (GPU)",
                "b_s": round(forward_s, 2),
                "speed_ratio_b_over_a": round(forward_s / seconds, 3),
            }
        )
    return rows


def _preprocessor(settings: Any) -> Any:
    from covidct.data.preprocess import SlicePreprocessor, parse_windows

    return SlicePreprocessor(parse_windows(settings.windows), settings.image_size, settings.lung_crop)


def training_rate(compiled: bool, batches: Callable[[], Any], steps: int) -> float:
    """Images/s of VGG16 bf16 training steps (Adam, focal loss) on the GPU over ``batches()`` (re-iterated
    until ``steps`` steps are done), after 3 warm-up steps (which also compile, with ``compiled``)."""
    import torch

    from covidct.models.classifier import SliceClassifier
    from covidct.models.losses import FocalLoss

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = SliceClassifier("vgg16", in_channels=1).to(device)
    if compiled:
        model.net.compile()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = FocalLoss(num_classes=3)

    def step(batch: dict) -> int:
        image, target = batch["image"].to(device, non_blocking=True), batch["target"].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(image), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(image)

    def run(n: int) -> int:
        seen, done = 0, 0
        while done < n:
            for batch in batches():
                seen += step(batch)
                done += 1
                if done >= n:
                    break
        return seen

    run(3)
    torch.cuda.synchronize()
    start = time.perf_counter()
    seen = run(steps)
    torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def measure_gpu_training(root: Path, batch_size: int, num_workers: int, steps: int = 30) -> list[dict[str, Any]]:
    """VGG16 224 px bf16 training img/s on the GPU: batches from the slice cache (DataLoader workers, as
    train.py) vs the same kind of batches already on the GPU (the model's ceiling), without and with compile."""
    import torch

    from covidct.data.datamodule import CTDataModule

    device = torch.device("cuda")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        dm = CTDataModule(
            root=str(root),
            cache_dir=cache,
            image_size=224,
            batch_size=batch_size,
            val_fraction=0.3,
            num_workers=num_workers,
            seed=0,
        )
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        resident = []
        for batch in loader:
            resident.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
            if len(resident) >= 8:
                break
        for compiled in (False, True):
            from_cache = training_rate(compiled, lambda: iter(loader), steps)
            on_gpu = training_rate(compiled, lambda: iter(resident), steps)
            rows.append(
                {
                    "row": "gpu training",
                    "data": f"vgg16 224 px bf16, batch {batch_size}, compile={compiled}",
                    "a": "slice cache (DataLoader)",
                    "a_img_s": round(from_cache, 1),
                    "b": "tensors on the GPU",
                    "b_img_s": round(on_gpu, 1),
                    "ratio_a_over_b": round(from_cache / on_gpu, 3),
                }
            )
    return rows


def format_deployment(rows: list[dict[str, Any]]) -> str:
    """The deployment rows as a text table."""
    from covidct.text_table import format_table

    header = ["row", "A", "A s", "B", "B s", "B/A", "max prob diff", "calls changed", "note"]
    cells = [
        [r["row"], "skipped", "", "", "", "", "", "", r["skipped"]]
        if "skipped" in r
        else [
            r["row"],
            r["a"],
            str(r.get("a_s", r.get("a_img_s"))),
            r["b"],
            str(r.get("b_s", r.get("b_img_s"))),
            f"{r.get('speed_ratio_b_over_a', r.get('ratio_a_over_b'))}x",
            f"{r['max_abs_prob_diff']:.2g}" if "max_abs_prob_diff" in r else "",
            ", ".join(r.get("calls_changed", [])) or ("none" if "calls_changed" in r else ""),
            r.get("note", ""),
        ]
        for r in rows
    ]
    return format_table(header, cells)


def check_rows(rows: Any) -> list[str]:
    """``rows`` as a list of known row names, or a ConfigError naming the key."""
    if not OmegaConf.is_list(rows) and not isinstance(rows, list):
        raise ConfigError(f"rows={rows!r} must be a list, e.g. rows=[onnx,int8]")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ConfigError(f"rows has unknown rows {unknown}; choose from {list(ROWS)}")
    return list(rows)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench_predict")
def bench_predict_app(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "input"):
        log.error(
            "input not set: python -m covidct.bench.predict input=<patient folder | test set | folder of test sets>"
        )
        sys.exit(1)
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
        print(format_deployment(result["deployment"]))
    atomic_write_text(Path(cfg.paths.output_dir) / "bench_predict.json", text + "\n")


def main() -> None:
    """``python -m covidct.bench.predict input=<folder> [key=value ...]``: process setup, then Hydra."""
    from covidct.config import register_resolvers

    register_resolvers()  # ${run_suffix:} names the run folder
    bench_predict_app()


if __name__ == "__main__":
    main()
