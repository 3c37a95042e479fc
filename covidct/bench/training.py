"""``make bench`` rows 3 and 4, training: Lightning epochs vs a hand-written PyTorch loop over the same
batches, model and optimizer (framework), and the peak RSS of a training run on N vs 10N slices, each in a
fresh process (memory)."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from covidct.bench.measure import Row, timed
from covidct.contracts import CONF_DIR

if TYPE_CHECKING:
    from covidct.data.datamodule import CTDataModule
    from covidct.models.classifier import SliceClassifier

log = logging.getLogger("bench")


def lightning_epochs(dm: CTDataModule, cfg: DictConfig, work: Path) -> float:
    """Seconds of ``cfg.epochs`` Lightning epochs (our module, vote callback, CSV logging; no checkpoints)."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from covidct.training.callbacks.patient_vote import PatientVoteCallback

    model = new_model(dm, cfg)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=cfg.epochs,
        logger=CSVLogger(work, name="csv"),
        callbacks=[PatientVoteCallback("infected_fraction", None, str(work))],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    return timed(lambda: trainer.fit(model, datamodule=dm))


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


def measure_framework(root: Path, cfg: DictConfig, work: Path, data: str) -> list[Row]:
    """ms/slice of Lightning vs the hand-written loop on the data at ``root``: the median ratio of
    ``cfg.repeats`` alternating pairs, after one warm-up epoch of each."""
    from covidct.data.datamodule import CTDataModule

    dm = CTDataModule(
        root=str(root),
        cache_dir=str(work / "cache"),
        image_size=cfg.image_size,
        batch_size=32,
        val_fraction=0.3,
        num_workers=0,
        train_transforms=None,
        seed=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    warm = OmegaConf.merge(cfg, {"epochs": 1})  # first calls pay one-time costs (lazy imports, allocator)
    lightning_epochs(dm, warm, work / "warm-up")
    hand_loop_epochs(dm, warm)
    lightning, hand = [], []
    for i in range(cfg.repeats):  # pairs see the same machine load; the order alternates against drift
        if i % 2:
            hand.append(hand_loop_epochs(dm, cfg))
        lightning.append(lightning_epochs(dm, cfg, work / f"lightning-{i}"))
        if not i % 2:
            hand.append(hand_loop_epochs(dm, cfg))
    ratios = sorted(a / b for a, b in zip(lightning, hand, strict=True))
    median_ratio = statistics.median_high(ratios)  # a measured pair's ratio (odd repeats: the middle pair)
    slices = cfg.epochs * (len(dm.train_rows) + len(dm.val_rows))
    hand_ms = min(hand) / slices * 1000
    log.info("framework pairs (Lightning/hand): %s", ", ".join(f"{r:.3f}" for r in ratios))
    return [
        Row(
            "framework",
            f"{data}, {cfg.backbone} {cfg.image_size} px, {cfg.epochs} epochs, median of {len(ratios)} pairs",
            "Lightning",
            hand_ms * median_ratio,
            "hand-written loop",
            hand_ms,
            "ms/slice",
            "<= 1.05x",
            median_ratio <= 1.05,
        )
    ]


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
