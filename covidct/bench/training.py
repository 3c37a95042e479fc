"""``make bench`` rows 3 to 5, training: Lightning epochs vs a hand-written PyTorch loop over the same batches,
model and optimizer (framework), Lightning epochs in precision ``bf16-mixed`` vs ``32-true`` with the validation
metrics of both (precision), and the peak RSS of a training run on N vs 10N slices, each in a fresh process
(memory)."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from covidct.bench.measure import Row, timed
from covidct.contracts import CONF_DIR

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from covidct.data.datamodule import CTDataModule
    from covidct.models.classifier import SliceClassifier

log = logging.getLogger("bench")
#: the precision row's arms (Lightning ``precision=``): A, measured against B
BF16, FP32 = "bf16-mixed", "32-true"
#: the precision row compares the arms' validation slice accuracy (within ``bench.precision.metric_tolerance``,
#: absolute) and their calls (the share of validation slices with the same argmax, at least 1 - tolerance); AUROC
#: and loss are reported only (the AUROC of a few validation patients swings by more than 0.05 near chance)
COMPARED_METRICS = ("slice_acc", "same_calls")


def lightning_epochs(
    dm: CTDataModule,
    cfg: DictConfig,
    work: Path,
    precision: str = FP32,
    recorder: pl.Callback | None = None,
    mil_seconds: list[float] | None = None,
) -> float:
    """Seconds of ``cfg.epochs`` Lightning epochs (our module, vote callback, CSV logging; no checkpoints) in
    Lightning ``precision``; ``recorder``: one more callback (e.g. :func:`validation_recorder`'s). The vote's one
    MIL fit at the end of fit (once per run, like the report: not epoch work) is timed apart and left out; its
    seconds are appended to ``mil_seconds`` (when given)."""
    import time

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from covidct.training.callbacks.patient_vote import PatientVoteCallback

    class EpochVote(PatientVoteCallback):
        seconds = 0.0

        def fit_best_mil(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            start = time.perf_counter()
            super().fit_best_mil(trainer, pl_module)
            self.seconds = time.perf_counter() - start

    vote = EpochVote("infected_fraction", None, str(work))
    model = new_model(dm, cfg)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=cfg.epochs,
        logger=CSVLogger(work, name="csv"),
        callbacks=[vote, *([recorder] if recorder else [])],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    seconds = timed(lambda: trainer.fit(model, datamodule=dm))
    if mil_seconds is not None:
        mil_seconds.append(vote.seconds)
    return seconds - vote.seconds


def hand_loop_epochs(dm: CTDataModule, cfg: DictConfig) -> float:
    """The same work written by hand: train steps (forward, focal loss, backward, step) + validation forward."""
    import torch

    model = new_model(dm, cfg)

    def run() -> None:
        optimizer = model.optimizer_factory(params=model.parameters())
        train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
        for _ in range(cfg.epochs):
            model.train()
            for batch in train_loader:
                loss = model.criterion(model(batch["image"]), batch["target"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.inference_mode():
                for batch in val_loader:
                    model(batch["image"]).softmax(1)

    return timed(run)


def new_model(dm: CTDataModule, cfg: DictConfig) -> SliceClassifier:
    """A fresh ``cfg.backbone`` classifier (seed 0, Adam 3e-4) for ``dm``'s channels."""
    from functools import partial

    import torch

    from covidct.models.classifier import SliceClassifier

    torch.manual_seed(0)
    return SliceClassifier(
        backbone=cfg.backbone, in_channels=dm.num_channels, optimizer=partial(torch.optim.Adam, lr=3e-4)
    )


def bench_datamodule(root: Path, image_size: int, work: Path) -> CTDataModule:
    """The training rows' data at ``root``, set up for fit: ``image_size`` px, batches of 32, 30% of the
    patients for validation, no augmentation (the same batches every run), cache in ``work``."""
    from covidct.data.datamodule import CTDataModule

    dm = CTDataModule(
        root=str(root),
        cache_dir=str(work / "cache"),
        image_size=image_size,
        batch_size=32,
        val_fraction=0.3,
        num_workers=0,
        train_transforms=None,
        seed=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def alternating_pairs(
    a: Callable[[int], float], b: Callable[[int], float], repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` pairs, ``a(i)`` then ``b(i)`` in even pairs, ``b(i)`` first in odd ones: a pair
    sees the same machine load, the order alternates against drift. Returns (a's seconds, b's seconds)."""
    a_s, b_s = [], []
    for i in range(repeats):
        if i % 2:
            b_s.append(b(i))
        a_s.append(a(i))
        if not i % 2:
            b_s.append(b(i))
    return a_s, b_s


def median_pair_ratio(a_s: list[float], b_s: list[float]) -> tuple[float, list[float]]:
    """(the median of the pairs' a/b ratios: a measured pair's, the middle one for odd counts; the ratios, sorted)."""
    ratios = sorted(a / b for a, b in zip(a_s, b_s, strict=True))
    return statistics.median_high(ratios), ratios


def measure_framework(root: Path, cfg: DictConfig, work: Path, data: str) -> list[Row]:
    """ms/slice of Lightning vs the hand-written loop on the data at ``root``: the median ratio of
    ``cfg.repeats`` alternating pairs, after one warm-up epoch of each."""
    dm = bench_datamodule(root, cfg.image_size, work)
    warm = OmegaConf.merge(cfg, {"epochs": 1})  # first calls pay one-time costs (lazy imports, allocator)
    lightning_epochs(dm, warm, work / "warm-up")
    hand_loop_epochs(dm, warm)
    mil: list[float] = []
    lightning, hand = alternating_pairs(
        lambda i: lightning_epochs(dm, cfg, work / f"lightning-{i}", mil_seconds=mil),
        lambda i: hand_loop_epochs(dm, cfg),
        cfg.repeats,
    )
    median_ratio, ratios = median_pair_ratio(lightning, hand)
    with_mil, _ = median_pair_ratio([s + m for s, m in zip(lightning, mil, strict=True)], hand)
    slices = cfg.epochs * (len(dm.train_rows) + len(dm.val_rows))
    hand_ms = min(hand) / slices * 1000
    log.info("framework pairs (Lightning/hand): %s", ", ".join(f"{r:.3f}" for r in ratios))
    mil_note = (
        f"; not in it: the vote's one MIL fit at the end of each run, median {statistics.median(mil):.2f} s "
        f"({len(dm.val_patients)} validation patients; with it {with_mil:.2f}x)"
    )
    return [
        Row(
            "framework",
            f"{data}, {cfg.backbone} {cfg.image_size} px, {cfg.epochs} epochs, median of {len(ratios)} pairs{mil_note}",
            "Lightning",
            hand_ms * median_ratio,
            "hand-written loop",
            hand_ms,
            "ms/slice",
            "<= 1.05x",
            median_ratio <= 1.05,
        )
    ]


def validation_recorder() -> pl.Callback:
    """A callback keeping a fit's last validation epoch: the slices' float32 probabilities (N, C) and targets (N,),
    and the logged ``val/loss`` and ``val/slice_acc``; its ``metrics()``: :func:`slice_metrics` of them."""
    import pytorch_lightning as pl
    import torch

    class ValidationRecorder(pl.Callback):
        def __init__(self) -> None:
            self.probs: list[torch.Tensor] = []
            self.targets: list[torch.Tensor] = []
            self.logged: dict[str, float] = {}

        def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.probs.clear()
            self.targets.clear()

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.probs.append(outputs["probs"])
            self.targets.append(batch["target"])

        def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.logged = {k: float(trainer.callback_metrics[k]) for k in ("val/loss", "val/slice_acc")}

        def metrics(self) -> dict[str, float]:
            return slice_metrics(torch.cat(self.probs), torch.cat(self.targets), self.logged)

        def calls(self) -> torch.Tensor:
            """(N,) int64 argmax call of every validation slice, in the loader's (fixed) order."""
            return torch.cat(self.probs).argmax(dim=1)

    return ValidationRecorder()


def slice_metrics(probs: Any, targets: Any, logged: dict[str, float]) -> dict[str, float]:
    """``loss`` and ``slice_acc`` (as SliceClassifier logged them) and ``auroc_macro``: torchmetrics' one-vs-rest
    AUROC of ``probs`` (N, C) for ``targets`` (N,; -1 unknown: skipped), averaged over the classes with both
    positive and negative slices (torchmetrics would count a class without positives as 0); nan when none has."""
    import torch
    from torchmetrics.functional.classification import multiclass_auroc

    from covidct.data.labels import UNKNOWN

    known = targets != UNKNOWN
    probs, targets = probs[known].float(), targets[known]
    counts = torch.bincount(targets, minlength=probs.shape[1])
    scored = (counts > 0) & (counts < len(targets))
    auroc = math.nan
    if scored.any():
        with warnings.catch_warnings():  # "no positive samples" of the classes averaged out below
            warnings.simplefilter("ignore", UserWarning)
            per_class = multiclass_auroc(probs, targets, probs.shape[1], average=None)
        auroc = float(per_class[scored].mean())
    return {"loss": logged["val/loss"], "slice_acc": logged["val/slice_acc"], "auroc_macro": auroc}


def metrics_agree(fp32: dict[str, float], bf16: dict[str, float], same_calls: float, tolerance: float) -> bool:
    """Whether the arms' validation slice accuracies differ by at most ``tolerance`` (absolute) and the share of
    validation slices they call alike, ``same_calls``, is at least 1 - ``tolerance``."""
    return abs(fp32["slice_acc"] - bf16["slice_acc"]) <= tolerance and same_calls >= 1 - tolerance


def precision_passes(ratio: float, agree: bool) -> bool:
    """The precision row's rule: bf16 faster (``ratio`` bf16/fp32 seconds < 1) and the validation metrics agree."""
    return ratio < 1.0 and agree


def measure_precision(
    root: Path, cfg: DictConfig, work: Path, data: str, extra: dict[str, Any] | None = None
) -> list[Row]:
    """ms/slice of Lightning epochs on the CPU in ``bf16-mixed`` vs ``32-true`` (the same data, model, seed 0,
    optimizer and batches): the median ratio of ``cfg.repeats`` alternating pairs after one warm-up epoch of each,
    with the validation metrics of each arm's last run (:func:`slice_metrics`). It passes when bf16 is faster and
    the metrics agree within ``cfg.metric_tolerance``; ``extra["precision"]`` (when given): the figures."""
    from covidct.hardware import cpu_bf16

    dm = bench_datamodule(root, cfg.image_size, work)
    warm = OmegaConf.merge(cfg, {"epochs": 1})  # first calls pay one-time costs (lazy imports, allocator)
    for precision in (BF16, FP32):
        lightning_epochs(dm, warm, work / f"warm-up-{precision}", precision)
    recorders = {p: validation_recorder() for p in (BF16, FP32)}
    bf16_s, fp32_s = alternating_pairs(
        lambda i: lightning_epochs(dm, cfg, work / f"bf16-{i}", BF16, recorders[BF16]),
        lambda i: lightning_epochs(dm, cfg, work / f"fp32-{i}", FP32, recorders[FP32]),
        cfg.repeats,
    )
    ratio, ratios = median_pair_ratio(bf16_s, fp32_s)
    metrics = {p: r.metrics() for p, r in recorders.items()}
    same_calls = float((recorders[BF16].calls() == recorders[FP32].calls()).float().mean())
    agree = metrics_agree(metrics[FP32], metrics[BF16], same_calls, cfg.metric_tolerance)
    passed = precision_passes(ratio, agree)
    native, hardware = cpu_bf16()
    slices = cfg.epochs * (len(dm.train_rows) + len(dm.val_rows))
    fp32_ms = min(fp32_s) / slices * 1000
    log.info("precision pairs (bf16/fp32): %s", ", ".join(f"{r:.3f}" for r in ratios))
    figures = {
        "seconds": {BF16: bf16_s, FP32: fp32_s},
        "pair_ratios": ratios,
        "ratio": ratio,
        "slices_per_run": slices,
        "val_slices": len(dm.val_rows),
        "metrics": {p: {k: json_number(v) for k, v in m.items()} for p, m in metrics.items()},
        "differences_bf16_minus_fp32": {k: json_number(metrics[BF16][k] - metrics[FP32][k]) for k in metrics[FP32]},
        "same_calls": same_calls,
        "compared": list(COMPARED_METRICS),
        "metric_tolerance": cfg.metric_tolerance,
        "metrics_agree": agree,
        "passed": passed,
        "native_bf16": native,
        "hardware": hardware,
        "trainer_cpu_precision": BF16 if native else FP32,
    }
    if extra is not None:
        extra["precision"] = figures
    epochs = f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}"
    setup = f"{data}, {cfg.backbone} {cfg.image_size} px, {epochs}, median of {len(ratios)} pairs"
    note = precision_note(metrics[FP32], metrics[BF16], same_calls, cfg.metric_tolerance, agree, native)
    return [Row("precision", f"{setup}; {note}", BF16, fp32_ms * ratio, FP32, fp32_ms, "ms/slice", "< 1.00x", passed)]


def precision_note(
    fp32: dict[str, float], bf16: dict[str, float], same_calls: float, tolerance: float, agree: bool, native: bool
) -> str:
    """The precision row's words: ``"val fp32 vs bf16: acc 0.810 vs 0.800 (-0.010), ..., same calls 0.98"``,
    whether they agree and whether this CPU has native bf16 (what ``trainer=cpu`` then trains in)."""
    names = {"slice_acc": "acc", "loss": "loss", "auroc_macro": "AUROC"}
    figures = ", ".join(f"{names[k]} {fp32[k]:.3f} vs {bf16[k]:.3f} ({bf16[k] - fp32[k]:+.3f})" for k in names)
    figures += f", same slice calls {same_calls:.3f}"
    verdict = (
        f"agree within {tolerance}"
        if agree
        else f"DISAGREE: acc differs by more than {tolerance} or fewer than {1 - tolerance:g} of the calls match"
    )
    cpu = (
        "native bf16 on this CPU: trainer=cpu trains in bf16-mixed"
        if native
        else "no native bf16 on this CPU: trainer=cpu keeps 32-true (bf16 here is emulated)"
    )
    return f"val fp32 vs bf16: {figures} ({verdict}); {cpu}"


def json_number(value: float) -> float | None:
    """``value`` for ``bench.json`` (strict JSON has no nan: None)."""
    return None if math.isnan(value) else value


MEMORY_CHILD = """
import json, resource, sys
from covidct.bench.training import memory_child
memory_child(json.loads(sys.argv[1]))
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory_child(overrides: list[str]) -> None:
    """Run one training from the train config with ``overrides`` (in a fresh process)."""
    from hydra import compose, initialize_config_dir

    from covidct.config import register_resolvers
    from covidct.training.run import train

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides)
    train(cfg)


def override_value(value: object) -> str:
    """A Hydra command-line value: None as ``null``, a tuple or list as ``[a,b,c]``, anything else as ``str``."""
    if value is None:
        return "null"
    if isinstance(value, tuple | list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return str(value)


def measure_memory(cfg: DictConfig, cache_dir: Path, work: Path) -> list[Row]:
    """Peak RSS (MiB) of a training run (a fresh process, :func:`memory_child`) on N vs 10N synthetic slices."""
    from covidct.data.cache import build_or_load_cache
    from covidct.data.layout import discover_covid_ct_md
    from covidct.data.preprocess import SlicePreprocessor, parse_windows
    from covidct.data.synthetic import SyntheticSpec, ensure_dataset

    peaks, sizes = [], []
    for factor in (1, 10):
        spec = SyntheticSpec(
            patients_per_class=(cfg.patients_per_class * factor,) * 3,
            slices_min=cfg.slices,
            slices_max=cfg.slices,
            image_size=128,
            seed=1,
        )
        root = ensure_dataset(cache_dir, spec)  # generated and cached here, so the run only reads
        pre = SlicePreprocessor(parse_windows(["lung"]), cfg.image_size)
        cache = build_or_load_cache(discover_covid_ct_md(root), pre, cache_dir, workers=2)
        sizes.append((len(cache.patient), (cache.path / "images.u8").stat().st_size))
        overrides = [f"data.synthetic.{k}={override_value(v)}" for k, v in asdict(spec).items() if v is not None] + [
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={work / str(factor)}",
            f"data.image_size={cfg.image_size}",
            "data.num_workers=0",
            "logger=csv",
            "trainer.max_epochs=1",
            f"trainer.limit_train_batches={cfg.batches}",
            f"trainer.limit_val_batches={cfg.batches}",
            "trainer.enable_progress_bar=false",
            "model=resnet18",
            "model.pretrained=false",
        ]
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, json.dumps(overrides)],
            capture_output=True,
            text=True,
            env=os.environ | {"WANDB_MODE": "offline"},
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory run failed:\n{out.stderr[-3000:]}")
        peaks.append(int(out.stdout.split("PEAK_RSS_KB")[-1]) / 1024)
    (n, bytes_n), (n10, bytes_10n) = sizes
    data = f"synthetic, {n} vs {n10} slices, cache {bytes_n / 2**20:.0f} vs {bytes_10n / 2**20:.0f} MiB"
    return [
        Row(
            "memory",
            data,
            "peak RSS 10N",
            peaks[1],
            "peak RSS N",
            peaks[0],
            "MiB",
            "<= 1.15x",
            peaks[1] / peaks[0] <= 1.15,
        )
    ]
