"""Where does the time go? ``make bench`` (``python -m covidct.bench [bench.scale=4]``).

Every row compares two ways of doing the same work, on the same data, in the same run (this machine
is shared and noisy: only ratios measured side by side mean anything) and reports the ratio:

1. loader: model-ready slices/s (augmentation on) from the slice cache vs decoding DICOM every
   epoch vs the paper's route (DICOM converted once to JPEG files, JPEGs decoded every epoch);
2. cache build: slices/s with N worker processes vs one process vs raw ``pydicom`` decode (the floor);
   and (real sample) seconds with ``data.lung_crop=true`` vs without (target: at most 1.5x);
3. framework: Lightning epochs (our module and vote callback, metrics, CSV logging; checkpoints off,
   their disk writes are the same in any loop) vs a hand-written PyTorch loop over the same
   batches, model and optimizer;
4. memory: peak RSS of a training run on N vs 10N slices (the cache is read, never loaded);
5. inference: predict.py per patient vs a bare forward over the same slices.

Data rows use the synthetic generator at real size (512 x 512, JPEG Lossless); rows marked "real"
use the 3-patient COVID-CT-MD sample. Results: a table on stdout and ``<run dir>/bench.json``.

Importing this module only defines things: each row imports the libraries it needs, and the process
setup (environment, resolvers) happens in :func:`main`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from covidct.errors import ConfigError, CovidCTError
from covidct.io import atomic_write_text
from covidct.text_table import format_table

if TYPE_CHECKING:
    import albumentations as A
    import torch
    from torch.utils.data import Dataset

    from covidct.data.datamodule import CTDataModule
    from covidct.data.layout import PatientFolder
    from covidct.data.preprocess import SlicePreprocessor
    from covidct.models.classifier import SliceClassifier

log = logging.getLogger("bench")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
BENCH_ROWS = ("loader", "cache_build", "cache_lung_crop", "framework", "memory", "inference")


@dataclass
class Row:
    """One comparison: ``a`` vs ``b`` (same unit); ratio = a / b; ``ok`` is None without a target."""

    name: str
    data: str
    a_label: str
    a: float
    b_label: str
    b: float
    unit: str
    target: str = ""
    ok: bool | None = None

    @property
    def ratio(self) -> float:
        return self.a / self.b if self.b else float("nan")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training_augmentation() -> A.Compose:
    """The default training augmentation, instantiated from ``conf/data/synthetic.yaml``."""
    import albumentations as A
    from hydra.utils import instantiate

    transforms = OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml").train_transforms
    return A.Compose([instantiate(t) for t in transforms])


def slice_files(patients: list[PatientFolder]) -> list[Path]:
    from covidct.data.dicom import list_files

    return [f for p in patients for f in list_files(p.folder)]


# ---- row 1: loaders ---------------------------------------------------------------------------
class DicomSlices:
    """Decode a DICOM file every time: HU -> windows -> resize -> augmentation (a map-style dataset)."""

    def __init__(self, files: list[Path], pre: SlicePreprocessor, transform: A.Compose) -> None:
        self.files, self.pre, self.transform = files, pre, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        import pydicom

        from covidct.data.datamodule import to_model_input
        from covidct.data.dicom import to_hounsfield
        from covidct.data.preprocess import one_thread_per_worker

        one_thread_per_worker()
        return to_model_input(self.pre(to_hounsfield(pydicom.dcmread(self.files[i]))), self.transform)


class JpegSlices:
    """The paper's route: 8-bit lung-window JPEG files (made once), decoded every time, resized, augmented."""

    def __init__(self, files: list[Path], image_size: int, transform: A.Compose) -> None:
        self.files, self.image_size, self.transform = files, image_size, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        import cv2
        import numpy as np
        from PIL import Image

        from covidct.data.datamodule import to_model_input
        from covidct.data.preprocess import one_thread_per_worker

        one_thread_per_worker()
        with Image.open(self.files[i]) as im:
            image = np.asarray(im)
        image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        return to_model_input(image[None], self.transform)


def convert_to_jpeg(files: list[Path], pre: SlicePreprocessor, out_dir: Path) -> list[Path]:
    """DICOM -> full-size lung-window JPEG (quality 95), as the paper prepared its data."""
    import pydicom
    from PIL import Image

    from covidct.data.dicom import to_hounsfield

    out_dir.mkdir(parents=True, exist_ok=True)
    window = pre.windows[0]
    jpegs = []
    for i, f in enumerate(files):
        path = out_dir / f"{i:06d}.jpg"
        Image.fromarray(window.apply(to_hounsfield(pydicom.dcmread(f)))).save(path, quality=95)
        jpegs.append(path)
    return jpegs


def loader_throughput(dataset: Dataset, batch_size: int, workers: int) -> float:
    """Slices/s of the second epoch through a DataLoader (the first one starts the workers)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    for _ in loader:
        pass
    seconds = timed(lambda: [None for _ in loader])
    return len(dataset) / seconds


def measure_loaders(
    patients: list[PatientFolder], pre: SlicePreprocessor, cfg: DictConfig, work: Path, data: str, with_jpeg: bool
) -> list[Row]:
    import numpy as np

    from covidct.data.cache import build_or_load_cache
    from covidct.data.datamodule import SliceDataset

    cache = build_or_load_cache(patients, pre, work / "cache", workers=cfg.cache_build.workers)
    n = len(cache.patient)
    transform = training_augmentation()
    rows_all = np.arange(n)
    cached = SliceDataset(
        cache.path, cache.images.shape, rows_all, np.zeros(n, np.int64), cache.patient, cache.slice_index, transform
    )
    bs, workers = cfg.loader.batch_size, cfg.loader.num_workers
    rate_cache = loader_throughput(cached, bs, workers)
    files = slice_files(patients)
    rate_dicom = loader_throughput(DicomSlices(files, pre, transform), bs, workers)
    rows = [
        Row(
            "loader",
            data,
            "cache",
            rate_cache,
            "DICOM every epoch",
            rate_dicom,
            "slices/s",
            ">= 20x",
            rate_cache / rate_dicom >= 20,
        )
    ]
    if with_jpeg:
        jpegs = convert_to_jpeg(files, pre, work / "jpeg")
        rate_jpeg = loader_throughput(JpegSlices(jpegs, pre.image_size, transform), bs, workers)
        rows.append(Row("loader", data, "cache", rate_cache, "JPEG files (paper)", rate_jpeg, "slices/s"))
    return rows


# ---- row 2: cache build -------------------------------------------------------------------------
def measure_cache_build(
    patients: list[PatientFolder], pre: SlicePreprocessor, workers: int, work: Path, data: str, repeats: int = 1
) -> list[Row]:
    """Slices/s of a cache build with 1 process vs raw decoding (alternating ``repeats`` times, the best
    of each counts), then with ``workers`` processes."""
    import pydicom

    from covidct.data.cache import build_or_load_cache

    files = slice_files(patients)

    def decode() -> float:
        return len(files) / timed(lambda: [pydicom.dcmread(f).pixel_array for f in files])

    def build(n_workers: int) -> float:
        target = Path(tempfile.mkdtemp(dir=work))
        seconds = timed(lambda: build_or_load_cache(patients, pre, target, workers=n_workers))
        shutil.rmtree(target)
        return len(files) / seconds

    pairs = [(decode(), build(1)) for _ in range(repeats)]  # the first decode also warms the page cache
    raw, one = max(p[0] for p in pairs), max(p[1] for p in pairs)
    many = build(workers)
    return [
        Row("cache build", data, "1 process", one, "raw pydicom decode", raw, "slices/s", ">= 0.8x", one / raw >= 0.8),
        Row("cache build", data, f"{workers} workers", many, "1 process", one, "slices/s"),
    ]


def measure_lung_crop(
    patients: list[PatientFolder], pre: SlicePreprocessor, workers: int, work: Path, data: str, repeats: int = 1
) -> list[Row]:
    """Seconds of a cache build with ``lung_crop`` vs without (alternating ``repeats`` times, the best of
    each counts): the cost of the lung mask and the crop (target: at most 1.5x)."""
    from dataclasses import replace

    from covidct.data.cache import build_or_load_cache

    def build(p: SlicePreprocessor) -> float:
        target = Path(tempfile.mkdtemp(dir=work))
        seconds = timed(lambda: build_or_load_cache(patients, p, target, workers=workers))
        shutil.rmtree(target)
        return seconds

    crop = replace(pre, lung_crop=True)
    pairs = [(build(crop), build(pre)) for _ in range(repeats)]
    cropped, plain = min(p[0] for p in pairs), min(p[1] for p in pairs)
    label = f"{data}, {workers} process{'es' if workers > 1 else ''}"
    return [
        Row(
            "cache lung crop",
            label,
            "lung_crop=true",
            cropped,
            "lung_crop=false",
            plain,
            "s",
            "<= 1.5x",
            cropped / plain <= 1.5,
        )
    ]


# ---- row 3: framework overhead -----------------------------------------------------------------
def lightning_epochs(dm: CTDataModule, cfg: DictConfig, work: Path) -> float:
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
    from functools import partial

    import torch

    from covidct.models.classifier import SliceClassifier

    torch.manual_seed(0)
    return SliceClassifier(
        backbone=cfg.backbone, in_channels=dm.num_channels, optimizer=partial(torch.optim.Adam, lr=3e-4)
    )


def measure_framework(root: Path, cfg: DictConfig, work: Path, data: str) -> list[Row]:
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


# ---- row 4: memory ------------------------------------------------------------------------------
MEMORY_CHILD = """
import json, resource, sys
from covidct.bench.framework import memory_child
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


def measure_memory(cfg: DictConfig, cache_dir: Path, work: Path) -> list[Row]:
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
        overrides = [f"data.synthetic.{k}={v}" for k, v in asdict(spec).items() if k != "patients_per_class"] + [
            f"data.synthetic.patients_per_class=[{spec.patients_per_class[0]},{spec.patients_per_class[0]},"
            f"{spec.patients_per_class[0]}]",
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


# ---- row 5: inference ---------------------------------------------------------------------------
def measure_inference(sample: Path, cfg: DictConfig) -> list[Row]:
    """predict.py on the first ``cfg.patients`` patients of the sample (each a patient folder)."""
    from covidct.bench.predict import measure_predict
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


# ---- report -------------------------------------------------------------------------------------
def format_rows(rows: list[Row]) -> str:
    header = ["row", "data", "A", "value A", "B", "value B", "unit", "A/B", "target", "met"]
    cells = [header] + [
        [
            r.name,
            r.data,
            r.a_label,
            f"{r.a:.4g}",
            r.b_label,
            f"{r.b:.4g}",
            r.unit,
            f"{r.ratio:.3g}x",
            r.target,
            "" if r.ok is None else ("yes" if r.ok else "NO"),
        ]
        for r in rows
    ]
    return format_table(cells[0], cells[1:])


def environment() -> dict[str, Any]:
    import torch

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "max_rss_mib_of_bench": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def row_key(step_name: str) -> str:
    """``"cache build (real)"`` -> ``"cache_build"`` (the name ``bench.rows`` uses)."""
    return step_name.removesuffix(" (real)").replace(" ", "_")


def check_bench(cfg: DictConfig) -> None:
    """Fail before any data is made, naming the key, on the values only the bench reads."""
    from covidct.bench.predict import check_backbone

    rows = cfg.rows
    if not OmegaConf.is_list(rows):
        raise ConfigError(f"bench.rows={rows!r} must be a list, e.g. bench.rows=[framework]")
    unknown = set(rows) - set(BENCH_ROWS)
    if unknown:
        raise ConfigError(f"bench.rows has unknown rows {sorted(unknown)}; choose from {list(BENCH_ROWS)}")
    scale = cfg.scale
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ConfigError(f"bench.scale={scale!r} must be a whole number >= 1")
    for row in ("framework", "inference"):
        if row in rows:
            check_backbone(f"bench.{row}.backbone", cfg[row].backbone)


def run_bench(cfg: DictConfig, output_dir: Path) -> list[Row]:
    """All rows for ``cfg`` (the ``bench`` node); writes ``bench.json`` into ``output_dir``."""
    from covidct.data.layout import discover_covid_ct_md
    from covidct.data.preprocess import SlicePreprocessor, parse_windows
    from covidct.data.synthetic import SyntheticSpec, ensure_dataset

    check_bench(cfg)
    scale = cfg.scale
    cache_dir = Path(cfg.cache_dir)
    pre = SlicePreprocessor(parse_windows(list(cfg.windows), key="bench.windows"), cfg.image_size)
    spec = SyntheticSpec(
        patients_per_class=(cfg.data.patients_per_class * scale,) * 3,
        slices_min=cfg.data.slices,
        slices_max=cfg.data.slices,
        image_size=512,
        compressed_fraction=1.0,
        seed=0,
    )
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-"))
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        root = ensure_dataset(cache_dir, spec)
        synthetic = discover_covid_ct_md(root)
        data = f"synthetic 512 px JPEG-LS, {len(slice_files(synthetic))} slices"
        steps: list[tuple[str, Callable[[], list[Row]]]] = [
            ("loader", lambda: measure_loaders(synthetic, pre, cfg, work / "syn", data, with_jpeg=True)),
            (
                "cache build",
                lambda: measure_cache_build(
                    synthetic, pre, cfg.cache_build.workers, work, data, cfg.cache_build.repeats
                ),
            ),
        ]
        sample = Path(cfg.real_sample)
        if (sample / "Index.csv").is_file():
            real = discover_covid_ct_md(sample)
            real_data = f"real sample, {len(slice_files(real))} slices"
            steps += [
                ("loader (real)", lambda: measure_loaders(real, pre, cfg, work / "real", real_data, with_jpeg=False)),
                (
                    "cache build (real)",
                    lambda: measure_cache_build(
                        real, pre, cfg.cache_build.workers, work, real_data, cfg.cache_build.repeats
                    ),
                ),
                (
                    "cache lung crop (real)",
                    lambda: measure_lung_crop(
                        real, pre, cfg.cache_lung_crop.workers, work, real_data, cfg.cache_lung_crop.repeats
                    ),
                ),
            ]
        else:
            log.warning("Real sample not found at %s: its rows are skipped (bench.real_sample=...)", sample)
        memory = OmegaConf.merge(cfg.memory, {"patients_per_class": cfg.memory.patients_per_class * scale})
        steps += [
            ("framework", lambda: measure_framework(root, cfg.framework, work / "framework", "synthetic")),
            ("memory", lambda: measure_memory(memory, cache_dir, work / "memory")),
        ]
        if (sample / "Index.csv").is_file():
            steps.append(("inference", lambda: measure_inference(sample, cfg.inference)))
        steps = [(name, step) for name, step in steps if row_key(name) in cfg.rows]
        for name, step in steps:
            log.info("Measuring %s ...", name)
            new = step()
            rows += new
            log.info("\n%s", format_rows(new))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
        "environment": environment(),
        "bench": OmegaConf.to_container(cfg, resolve=True),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(output_dir / "bench.json", json.dumps(report, indent=2) + "\n")
    return rows


# ---- command line -------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def bench_app(cfg: DictConfig) -> None:
    output_dir = Path(cfg.paths.output_dir)
    try:
        rows = run_bench(cfg.bench, output_dir)
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message names the key; no traceback for user errors)
    env = environment()
    print(
        f"covidct bench on {env['cpus']} CPUs ({env['torch_threads']} torch threads), GPU: {env['gpu']}; "
        f"A/B measured side by side in this run"
    )
    print(format_rows(rows))
    print(f"figures: {output_dir / 'bench.json'}")


def main() -> None:
    """``python -m covidct.bench [key=value ...]``: process setup (here, not at import), then Hydra."""
    from covidct.config import register_resolvers

    register_resolvers()  # ${run_suffix:} names the run folder
    bench_app()


if __name__ == "__main__":
    main()
