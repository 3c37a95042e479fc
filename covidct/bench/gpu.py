"""``make bench-gpu`` rows (CUDA only; skipped with a message without a GPU): VGG16 224 px bf16 training img/s
fed from the slice cache vs from tensors already on the GPU, without and with ``torch.compile``; and predict.py
(checkpoint, and ONNX with the CUDA provider) vs a bare forward on the GPU."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covidct.bench.measure import best_of
from covidct.contracts import INDEX_FILE
from covidct.errors import ConfigError

log = logging.getLogger("bench_predict")


def measure_gpu(
    input_path: str | Path, test_set: Any, ckpt: Path, batch_size: int, num_workers: int, repeats: int
) -> list[dict[str, Any]]:
    """GPU rows (CUDA only; [] with a message without a GPU): VGG16 224 px bf16 training img/s from the slice
    cache vs from batches already on the GPU, each without and with ``torch.compile``; predict.py with the
    checkpoint and with the ONNX export (CUDA provider) vs a bare forward on the GPU."""
    import torch

    if not torch.cuda.is_available():
        log.warning("gpu rows skipped: no CUDA GPU here (torch.cuda.is_available() is False); nothing else uses them")
        return []
    rows = []
    root = Path(input_path)
    if (root / INDEX_FILE).is_file():
        rows += measure_gpu_training(root, batch_size, num_workers)
    else:
        log.warning("gpu training rows skipped: input=%s is not a COVID-CT-MD layout (no Index.csv)", root)
    return rows + measure_gpu_predict(test_set, ckpt, batch_size, num_workers, repeats)


def measure_gpu_predict(
    test_set: Any, ckpt: Path, batch_size: int, num_workers: int, repeats: int
) -> list[dict[str, Any]]:
    """predict.py on the GPU with the checkpoint, and with its ONNX export (CUDA provider; skipped with a message
    without one), vs a bare forward on the GPU over the same slices (best of ``repeats``)."""
    import numpy as np
    import torch

    from covidct.predict.export import export_onnx
    from covidct.predict.onnx_backend import load_onnx
    from covidct.predict.predictor import predict_test_set
    from covidct.predict.settings import settings_from_sidecar
    from covidct.predict.test_sets import read_patient
    from covidct.predict.torch_backend import load_checkpoint, slice_probabilities

    device = torch.device("cuda")
    rows = []
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
    """The :class:`SlicePreprocessor` of a checkpoint's settings (windows, image size, lung crop)."""
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
